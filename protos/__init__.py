"""Generated gRPC code for the kubellm.v1 wire API."""

"""Serving over the network: the gRPC worker (torch), and the torch-free router, REST gateway and client."""

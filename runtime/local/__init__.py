"""Persistent local deployments: `serve()` / `client()` / `terminate_server()` and `kubellm serve | status | stop`."""

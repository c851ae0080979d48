"""What a call forwarded to the replicas ends with when it cannot be answered (no torch).

The router raises it; its gRPC servicer aborts the call with the code, the REST gateway turns it
into the HTTP error of the same meaning. A module of its own so that the gateway, which the router
serves, needs nothing from the router's module.
"""

from __future__ import annotations

import grpc


class UpstreamError(Exception):
    """A request could not be answered: a gRPC status code and a message for the caller."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details

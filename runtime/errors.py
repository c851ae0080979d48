"""Errors a caller can act on. Each message names the offending field and the fix."""


class RequestError(ValueError):
    """A request is invalid (maps to gRPC INVALID_ARGUMENT / HTTP 400)."""


class EngineFullError(RuntimeError):
    """The engine's queue is full (maps to gRPC RESOURCE_EXHAUSTED / HTTP 429)."""


class ExecutorBrokenError(RuntimeError):
    """The executor can run no further step: a rank of its group died or a collective failed. Every
    later step raises it too; only a new engine (a restarted worker) recovers (gRPC UNAVAILABLE)."""


class SeedOptionWarning(UserWarning):
    """An option of LMDeploy or DeepSpeed-MII was accepted but has no effect here; the message says why
    (docs/seeds.md)."""

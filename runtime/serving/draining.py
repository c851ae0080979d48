"""Waiting for the calls in flight to end, bounded: how a terminated worker or router drains (no torch)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable


async def until_idle(busy: Callable[[], int], timeout: float) -> bool:
    """Wait up to `timeout` s for `busy()` (calls in flight) to reach 0; True if it did."""
    end = time.monotonic() + timeout
    while busy() and time.monotonic() < end:
        await asyncio.sleep(0.02)
    return not busy()


async def drain(busy: Callable[[], int], timeout: float, who: str, log: logging.Logger) -> bool:
    """`until_idle`, saying in `log` what `who` waits for and how it ended."""
    started = time.monotonic()
    if busy():
        log.info("%s draining %d requests (up to %g s)", who, busy(), timeout)
    if not await until_idle(busy, timeout):
        log.warning("%s drain timeout (%g s): cutting %d requests", who, timeout, busy())
        return False
    if time.monotonic() - started > 0.05:
        log.info("%s drained in %.1f s", who, time.monotonic() - started)
    return True

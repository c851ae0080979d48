"""Progress of a running benchmark, on stderr: which side is being measured, done / total, elapsed and an ETA.

A benchmark that prints nothing for minutes looks hung (issue 19: `kubellm bench offline` was silent for 17
minutes for a new user). On a terminal this is a tqdm bar; elsewhere (a log file, CI, the GPU machine's
captured output) plain lines, at the start, every EVERY_S seconds and at the end, as the weight loader's
LoadProgress does: a carriage-return bar is one unreadable line in a log.

    with Progress("bench offline", "kubellm", total=5800, unit="tokens") as progress:
        ...
        progress.update(n)            # n more done
        progress.switch("HF generate", total=5800)   # the next side, counted afresh

    bench offline: kubellm 1200/5800 tokens (21%), 0:12 elapsed, ETA 0:45

Torch-free and tqdm optional (`kubellm bench serve` runs where only the client is installed). Thread-safe:
`bench serve` updates it from one thread per stream.
"""

from __future__ import annotations

import os
import sys
import threading
import time

EVERY_S = 10.0   # seconds between plain lines; KUBELLM_PROGRESS_EVERY overrides it (0: a line per update)
_SAME = object()


def clock(seconds: float) -> str:
    """0:07, 1:02:03: elapsed and ETA as a person reads them."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(done: float, total: float, elapsed: float) -> float | None:
    """Seconds left at the rate so far; None before anything is done (no rate yet) or without a total."""
    if not total or done <= 0:
        return None
    return max(0.0, elapsed / done * (total - done))


def format_line(bench: str, side: str, done: float, total: float | None, unit: str, elapsed: float,
                note: str = "") -> str:
    """`bench offline: kubellm 1200/5800 tokens (21%), 0:12 elapsed, ETA 0:45` (pure: tested by table)."""
    if total:
        count = f"{done:g}/{total:g} {unit} ({100 * done / total:.0f}%)"
    else:   # a phase of unknown length (a roofline, a load) counts nothing: say it runs, not "0 tokens"
        count = f"{done:g} {unit}" if done else "running"
    eta = eta_seconds(done, total or 0, elapsed)
    tail = f", ETA {clock(eta)}" if eta is not None and done < (total or 0) else ""
    if total and done >= total:
        tail = ", done"
    extra = f" [{note}]" if note else ""
    return f"{bench}: {side} {count}, {clock(elapsed)} elapsed{tail}{extra}"


def every_seconds() -> float:
    value = os.environ.get("KUBELLM_PROGRESS_EVERY", "")
    try:
        return max(0.0, float(value)) if value else EVERY_S
    except ValueError:
        raise ValueError(f"KUBELLM_PROGRESS_EVERY={value!r}: give seconds between progress lines, e.g. 10") from None


def interactive(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """One benchmark's progress; `side` names what is being measured now (kubellm, HF generate, llama.cpp...)."""

    def __init__(self, bench: str, side: str, total: int | float | None, unit: str = "items", stream=None,
                 every_s: float | None = None, bar: bool | None = None, enabled: bool = True):
        self.bench, self.unit = bench, unit
        self.every_s = every_s if every_s is not None else every_seconds()
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self._lock = threading.Lock()
        self._want_bar = interactive(self.stream) if bar is None else bar
        self._bar = None
        self._last_line = ""
        self._start(side, total)

    # -- the side being measured ----------------------------------------------------------------
    def _start(self, side: str, total) -> None:
        self.side, self.total, self.done, self.note = side, total, 0, ""
        self.started = self._last = time.monotonic()
        if not self.enabled:
            return
        if self._want_bar:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=f"{self.bench}: {side}", unit=f" {self.unit}", file=self.stream,
                                 leave=True, dynamic_ncols=True)
                return
            except ImportError:  # a client-only install: lines instead
                self._want_bar = False
        self._emit()

    def switch(self, side: str, total=_SAME) -> None:
        """The next side (or phase) of the benchmark, counted afresh (total: the same as before unless given;
        None: unknown); the previous one's last line first."""
        with self._lock:
            self._finish()
            self._start(side, self.total if total is _SAME else total)

    # -- counting -------------------------------------------------------------------------------
    def update(self, n: float = 1, note: str | None = None, force: bool = False) -> None:
        """n more done; `note` says what is being measured now (shown on the line); `force`: a line now."""
        with self._lock:
            self._set(self.done + n, note, force)

    def set(self, done: float, note: str | None = None, force: bool = False) -> None:
        with self._lock:
            self._set(done, note, force)

    def _set(self, done: float, note: str | None, force: bool) -> None:
        step, self.done = done - self.done, done
        if note is not None:
            self.note = note
        if not self.enabled:
            return
        if self._bar is not None:
            if note is not None:
                self._bar.set_postfix_str(note, refresh=False)
            self._bar.update(step)
            return
        now = time.monotonic()
        if force or now - self._last >= self.every_s:
            self._emit(now)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def _emit(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last = now
        line = format_line(self.bench, self.side, self.done, self.total, self.unit, now - self.started, self.note)
        if line != self._last_line:   # close() right after a forced line: once is enough
            self._last_line = line
            print(line, file=self.stream, flush=True)

    def _finish(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._emit()

    def close(self) -> None:
        with self._lock:
            self._finish()
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Where a model load's time goes, by phase, filled in by the engine and executor constructors as they
run and read by the worker (its log line and the kubellm_model_load_* metrics).

    times = LoadTimes()
    with times.phase("weights"):
        runner = ModelRunner(...)
    times.phases   # {"download": 0.0, "weights": 3.2, "warmup": 0.0}
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

PHASES = ("download", "weights", "warmup")
# download: resolve the model (hf:// download, GGUF conversion of the embedded default);
# weights:  build the model (and join the group's other ranks) and read the checkpoint into it;
# warmup:   allocate the KV cache and capture the CUDA graphs or compile the CPU decode step (and agree on its
#           size across ranks).


@dataclass
class LoadTimes:
    """Seconds per phase of rank 0's load (the other ranks load at the same time), and the whole load."""

    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    total: float = 0.0

    @contextmanager
    def phase(self, name: str):
        if name not in self.phases:
            raise ValueError(f"phase: {name!r} is not one of {', '.join(PHASES)}")
        started = time.monotonic()
        try:
            yield
        finally:
            self.phases[name] += time.monotonic() - started

    @property
    def slowest(self) -> str:
        return max(self.phases, key=self.phases.get)

    def describe(self) -> str:
        """One line for the log: 'total 12.3 s (download 0.1 s, weights 9.0 s, warmup 3.2 s)'."""
        parts = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
        return f"{self.total:.1f} s ({parts})"

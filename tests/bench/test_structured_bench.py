"""`python -m kubellm.bench.structured` runs end to end on a tiny model (its figures come from running it on the
embedded model: docs/structured-outputs.md)."""

import pytest

from kubellm.bench.structured import run

pytestmark = pytest.mark.model


def test_structured_bench_times_free_and_constrained_steps(tiny_llama):
    rows = run(str(tiny_llama), batch=4, steps=3, warmup=1, device="cpu", dtype="float32", seed=0, rounds=1)
    assert [r["case"] for r in rows] == ["free", "int array", "objects"]
    assert all(r["steps"] == 3 and r["step_ms"] > 0 and r["batch"] == 4 for r in rows)
    assert rows[0]["mask_ms"] == 0 and rows[0]["overhead"] == 0
    assert all(r["mask_ms"] > 0 for r in rows[1:])   # the grammars filled and applied the batch's mask at every timed step

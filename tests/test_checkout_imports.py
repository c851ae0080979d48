"""The checkout's folders are kubellm's sub-packages (pyproject's package-dir), never top-level packages: its
kernels/ must not stand in for Hugging Face's `kernels`, which transformers imports, in the tests' process or in
the processes they start from the checkout (conftest.py)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIND = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec and spec.origin)"


def _outside_the_checkout(origin: str | None) -> bool:
    return origin in (None, "None") or not Path(origin).resolve().is_relative_to(ROOT)


def test_a_process_started_in_the_checkout_does_not_import_its_folders():
    run = subprocess.run([sys.executable, "-c", FIND], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert _outside_the_checkout(run.stdout.strip()), run.stdout


def test_a_test_that_puts_the_checkout_first_still_gets_the_installed_kernels(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.find_spec("kernels")
    assert _outside_the_checkout(spec and spec.origin), spec.origin

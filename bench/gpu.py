"""`kubellm bench gpu` (or `python -m kubellm.bench.gpu`): every GPU figure the project owes, in one call.

GPU time is short and rare, and the GPU machine starts bare and offline (e2e/gpu-check.sh brings the
missing packages along as wheels). So one command runs every check (bench/gpu_steps.py) and writes what
it found, `docs/gpu/<date>-<device>.json` and a markdown summary beside it (bench/gpu_report.py), after
every step: a step that fails, crashes the process or overruns loses nothing measured before it.

Each step runs in a process of its own, within its own time budget (STEP_BUDGETS, --step-budget NAME=S),
all of them within --total-budget (480 s: the issue's 8 minutes on an H200). A step past its budget is
killed (its whole process group) and recorded as "timeout"; the next one runs. A step that cannot run
here (no CUDA for CUDA graphs, a kernel not built yet) is "skipped" with the reason; a failed correctness
check is "fail", an exception "fail" with its error. With --device cpu every step runs on tiny shapes (the
Triton kernels under Triton's interpreter), so that the whole pipeline is exercised without a GPU.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

from kubellm.bench import gpu_report
from kubellm.bench.progress import Progress, clock

# Seconds each step may take on an H200 (sized from the work it does; together they pass the total budget,
# which caps the later ones if earlier ones ran long). The order is the order they run in: the cheap
# correctness steps first, the long offline comparison last.
STEP_BUDGETS = {
    "environment": 40,
    "attention_kernels": 100,
    "pointwise_kernels": 50,
    "engine_vs_hf": 70,
    "cuda_graphs": 60,
    "roofline_8b": 90,
    "quant_gemm": 50,
    "int8_kv_attention": 75,
    "offline_vs_hf": 150,
    "gpu_tests": 120,
}
NEEDS_CUDA = {"cuda_graphs": "CUDA graphs need a CUDA device",
              "gpu_tests": "the tests marked gpu need a CUDA device (the CPU tiers run them elsewhere)"}
STEP_BUDGETS_CPU = 180         # each step on tiny shapes (--device cpu): Triton interpreted, a shared 2-core box
TOTAL_BUDGET = 480.0           # the 8 minutes
MIN_STEP_S = 5.0               # with less of the total budget left, a step is skipped, not started
TAIL_LINES = 30                # of a step's output kept in the JSON


def parse_budgets(values: list[str] | None) -> dict[str, float]:
    """--step-budget NAME=S (repeatable) -> {name: seconds}; bad input names the flag and the fix."""
    budgets = {}
    for value in values or []:
        name, sep, seconds = value.partition("=")
        if not sep:
            raise ValueError(f"--step-budget {value!r}: give NAME=SECONDS, e.g. roofline_8b=120")
        if name not in STEP_BUDGETS:
            raise ValueError(f"--step-budget {value!r}: no step {name!r}; the steps are {', '.join(STEP_BUDGETS)}")
        try:
            budgets[name] = float(seconds)
        except ValueError:
            raise ValueError(f"--step-budget {value!r}: {seconds!r} is not a number of seconds") from None
        if not budgets[name] > 0:
            raise ValueError(f"--step-budget {value!r}: give more than 0 seconds")
    return budgets


def parse_steps(value: str | None) -> list[str]:
    """--steps a,b (default: all, in STEP_BUDGETS's order); unknown names are refused by name."""
    if not value:
        return list(STEP_BUDGETS)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in STEP_BUDGETS]
    if unknown:
        raise ValueError(f"--steps: no step {', '.join(map(repr, unknown))}; the steps are {', '.join(STEP_BUDGETS)}")
    return [n for n in STEP_BUDGETS if n in names]   # always in the documented order


def resolve_device(device: str | None) -> str:
    """auto: cuda where torch sees a GPU, else cpu (tiny shapes). Asked in a child, so that this process never
    initializes CUDA (a hung driver must not hang the check itself)."""
    if device and device != "auto":
        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"--device {device!r}: give auto, cpu, cuda or cuda:N")
        return device
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
    return "cuda" if probe.stdout.strip() == "True" else "cpu"


def versions() -> dict:
    def version(name: str):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    import kubellm

    return {"python": sys.version.split()[0], "torch": version("torch"), "triton": version("triton"),
            "transformers": version("transformers"), "kubellm": kubellm.__version__, "pydantic": version("pydantic"),
            "cuda": None, "cudnn": None, "driver": None}   # the environment step fills these in


# --------------------------------------------------------------------------- one step, in its own process
def run_step(name: str, device: str, workdir: Path, budget: float, echo=sys.stderr) -> dict:
    """Runs the step in a child process; kills its process group past `budget` seconds. The child's output
    is echoed (it carries the step's own progress lines) and its last lines kept."""
    result_file = workdir / f"{name}.result.json"
    partial_file = workdir / f"{name}.partial.json"
    result_file.unlink(missing_ok=True)
    partial_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "kubellm.bench.gpu", "--child", name, "--device", device,
               "--workdir", str(workdir), "--result", str(result_file), "--budget", str(budget)]
    # PYTHONSAFEPATH: it starts in the checkout, whose kernels/ must not shadow an installed `kernels`
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONUNBUFFERED": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)   # its own group: a timeout kills its children too
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def pump():
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            print(f"  [{name}] {line.rstrip()}", file=echo, flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=budget)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill_group(proc)
    except BaseException:   # SIGTERM (as SystemExit, _exits_on_sigterm), ^C: the step must not outlive the check
        _kill_group(proc)
        raise
    reader.join(timeout=5)
    seconds = time.monotonic() - start
    if timed_out:
        return with_partial({"status": "timeout", "seconds": seconds, "budget_s": budget,
                             "error": f"ran past its budget of {budget:.0f} s and was killed",
                             "output_tail": list(tail)}, partial_file)
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = {"status": "fail", "error": f"the step's process exited with {proc.returncode} and wrote no result",
                  "output_tail": list(tail)}
    result.update(seconds=seconds, budget_s=budget)
    if result["status"] == "fail":
        result.setdefault("output_tail", list(tail))
    return result


def with_partial(result: dict, partial_file: Path) -> dict:
    """A killed step's result with the figures it saved before (Context.save_partial), marked as partial."""
    try:
        figures = json.loads(partial_file.read_text())
    except (OSError, ValueError):
        return result
    return {**figures, **result, "partial": True}


def child(name: str, device: str, workdir: str, result_file: str, budget: float | None = None) -> int:
    """The step itself (in the child process): its figures and status, written to `result_file`."""
    if not device.startswith("cuda"):
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton (tests/conftest.py too)
    from kubellm.bench import gpu_steps

    ctx = gpu_steps.Context(device=device, tiny=not device.startswith("cuda"), workdir=Path(workdir), budget_s=budget,
                            partial_file=Path(workdir) / f"{name}.partial.json")
    try:
        figures = gpu_steps.STEPS[name](ctx)
        checks = figures.get("checks", {})
        failed = [check for check, ok in checks.items() if not ok]
        result = {"status": "fail" if failed else "pass", **figures}
        if failed:
            result["error"] = "failed: " + "; ".join(failed)
    except gpu_steps.Skipped as why:
        result = {"status": "skipped", "reason": str(why)}
    except Exception as err:   # any failure of one step is that step's result, never the whole check's
        result = {"status": "fail", "error": f"{type(err).__name__}: {err}",
                  "traceback": traceback.format_exc().splitlines()[-TAIL_LINES:]}
    Path(result_file).write_text(json.dumps(result, default=str))
    return 0


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class _exits_on_sigterm:
    """A step runs in a session of its own (so that its timeout kills everything it started), which a wall-clock
    stop (`timeout` in e2e/gpu-check.sh, the device tool ending a command) does not reach. So while the check
    runs, SIGTERM and SIGHUP raise SystemExit where they would end the process outright; run_step then kills
    the running step's group rather than leave it holding the GPU. The report keeps the finished steps."""

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                if signal.getsignal(sig) is signal.SIG_DFL:
                    self.saved[sig] = signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# --------------------------------------------------------------------------- the whole check
def run_check(device: str = "auto", out_dir: str | Path = "docs/gpu", steps: list[str] | None = None,
              budgets: dict[str, float] | None = None, total_budget: float = TOTAL_BUDGET, echo=sys.stderr) -> dict:
    with _exits_on_sigterm():
        return _run_check(device, out_dir, steps, budgets, total_budget, echo)


def _run_check(device, out_dir, steps, budgets, total_budget, echo) -> dict:
    device = resolve_device(device)
    steps = steps or list(STEP_BUDGETS)
    budgets = budgets or {}
    started = time.monotonic()
    deadline = started + total_budget
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {"device_name": None, "device": device, "date": now.strftime("%Y-%m-%d"),
              "started_at": now.isoformat(timespec="seconds"), "versions": versions(),
              "total_budget_s": total_budget, "steps": {}}
    out_dir = Path(out_dir)
    paths: list[Path] = []
    # Lines, not a bar, even on a terminal: the steps' own output is echoed between them.
    progress = Progress("bench gpu", f"{device} check", total=len(steps), unit="steps", bar=False)
    with tempfile.TemporaryDirectory(prefix="kubellm-gpu-check-") as workdir:
        for i, name in enumerate(steps):
            left = deadline - time.monotonic()
            budget = min(budgets.get(name, STEP_BUDGETS[name] if device != "cpu" else STEP_BUDGETS_CPU), left)
            if left < MIN_STEP_S:
                result = {"status": "skipped", "seconds": 0.0,
                          "reason": f"the check's total budget ({total_budget:.0f} s) was spent"}
            elif name in NEEDS_CUDA and not device.startswith("cuda"):   # no process started only to say so
                result = {"status": "skipped", "seconds": 0.0, "reason": NEEDS_CUDA[name]}
            else:
                progress.update(0, note=f"step {i + 1}/{len(steps)} {name}: up to {budget:.0f} s, "
                                        f"{clock(left)} of the check left", force=True)
                result = run_step(name, device, Path(workdir), budget, echo)
            report["steps"][name] = result
            if name == "environment" and result.get("device_name"):
                report["device_name"] = result["device_name"]
                report["versions"].update({k: result.get(k) for k in ("cuda", "cudnn", "driver")})
            report["seconds"] = time.monotonic() - started
            written = gpu_report.write(report, out_dir)   # after every step: nothing measured is lost
            for stale in set(paths) - set(written):   # named before the environment step knew the device
                stale.unlink(missing_ok=True)
            paths = written
            progress.update(1, note=f"{name}: {result['status']} in {result.get('seconds', 0):.0f} s", force=True)
    progress.close()
    report["files"] = [str(p) for p in paths]
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (default), cuda, cuda:N, or cpu (tiny shapes)")
    parser.add_argument("--out-dir", default="docs/gpu", help="where <date>-<device>.json and .md go (default docs/gpu)")
    parser.add_argument("--steps", default=None, help=f"comma-separated subset of: {', '.join(STEP_BUDGETS)}")
    parser.add_argument("--step-budget", action="append", default=None, metavar="NAME=S",
                        help="seconds a step may take (repeatable); past it the step is killed and recorded as timeout")
    parser.add_argument("--total-budget", type=float, default=TOTAL_BUDGET,
                        help=f"seconds for the whole check (default {TOTAL_BUDGET:.0f})")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main_with(device, out_dir, steps, step_budget, total_budget, as_json) -> int:
    report = run_check(device or "auto", out_dir or "docs/gpu", parse_steps(steps), parse_budgets(step_budget),
                       TOTAL_BUDGET if total_budget is None else total_budget)
    print(json.dumps(report, default=str) if as_json else gpu_report.summary(report))
    return 0


def command(args) -> int:
    """`kubellm bench gpu` (the bench parser's flags of the same names)."""
    if args.total_budget is not None and not args.total_budget > 0:
        raise ValueError("--total-budget: give more than 0 seconds (default 480)")
    return main_with(args.device, args.out_dir, args.steps, args.step_budget, args.total_budget, args.json)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubellm.bench.gpu", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)   # one step, run by the parent
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.device, args.workdir, args.result, args.budget)
    if not args.total_budget > 0:
        parser.error("--total-budget: give more than 0 seconds (default 480)")
    try:
        return main_with(args.device, args.out_dir, args.steps, args.step_budget, args.total_budget, args.json)
    except ValueError as err:
        print(f"kubellm bench gpu: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`kubellm bench gpu`: its CPU-side logic, and its whole pipeline on CPU (tiny shapes, Triton interpreted).

The figures only mean something on a GPU (docs/gpu/README.md says how that run is made); here: the flags,
the report it writes (every step present with a status, the headline keys, the targets), each step's time
budget (a step past it is killed, recorded as timeout, and the next one runs), the total budget, and the
wheel set the GPU machine needs (downloaded from PyPI, at most 64 MiB).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kubellm.bench import gpu, gpu_report

REPO = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = {"device_name", "date", "versions", "steps", "roofline_fraction", "kernel_ratios", "offline_ratio",
                 "targets"}
VERSION_KEYS = {"python", "torch", "triton", "transformers", "kubellm", "cuda"}
STATUSES = {"pass", "fail", "timeout", "skipped"}


# --------------------------------------------------------------------------- flags (pure)
@pytest.mark.parametrize("value, expected", [
    (None, list(gpu.STEP_BUDGETS)),
    ("", list(gpu.STEP_BUDGETS)),
    ("quant_gemm,environment", ["environment", "quant_gemm"]),   # always in the documented order
    (" roofline_8b , ", ["roofline_8b"]),
])
def test_steps_flag(value, expected):
    assert gpu.parse_steps(value) == expected


def test_unknown_step_is_refused_by_name_with_the_list():
    with pytest.raises(ValueError, match=r"--steps: no step 'nope'; the steps are environment, attention_kernels"):
        gpu.parse_steps("environment,nope")


@pytest.mark.parametrize("values, expected", [
    (None, {}),
    (["roofline_8b=120"], {"roofline_8b": 120.0}),
    (["quant_gemm=0.5", "quant_gemm=7"], {"quant_gemm": 7.0}),   # the last one given wins
])
def test_step_budget_flag(values, expected):
    assert gpu.parse_budgets(values) == expected


@pytest.mark.parametrize("value, message", [
    ("roofline_8b", r"give NAME=SECONDS, e\.g\. roofline_8b=120"),
    ("warp=3", r"no step 'warp'; the steps are"),
    ("quant_gemm=soon", r"'soon' is not a number of seconds"),
    ("quant_gemm=0", r"give more than 0 seconds"),
])
def test_bad_step_budget_names_the_flag_and_the_fix(value, message):
    with pytest.raises(ValueError, match=r"--step-budget .*" + message):
        gpu.parse_budgets([value])


def test_the_command_line_refuses_bad_flags_before_anything_runs(capsys):
    from kubellm.runtime.cli.main import main

    assert main(["bench", "gpu", "--steps", "environment,warp"]) == 2
    assert "--steps: no step 'warp'" in capsys.readouterr().err
    assert main(["bench", "gpu", "--step-budget", "environment"]) == 2
    assert "give NAME=SECONDS" in capsys.readouterr().err
    assert main(["bench", "gpu", "--total-budget", "0"]) == 2
    assert "--total-budget: give more than 0 seconds" in capsys.readouterr().err


@pytest.mark.parametrize("name, expected", [("NVIDIA H200", "nvidia-h200"), ("cpu-x86_64", "cpu-x86-64"),
                                            ("  NVIDIA  GH200 (120GB) ", "nvidia-gh200-120gb"), ("", "unknown")])
def test_file_names_from_device_names(name, expected):
    assert gpu_report.slug(name) == expected


# --------------------------------------------------------------------------- the report (pure)
def _report(device="cuda", **steps) -> dict:
    return {"device_name": "NVIDIA H200", "device": device, "date": "2026-12-01", "started_at": "2026-12-01T20:00:00",
            "versions": {"python": "3.12.3", "torch": "2.11.0", "cuda": "13.0"}, "total_budget_s": 480, "seconds": 300,
            "steps": steps}


GOOD = dict(
    roofline_8b={"status": "pass", "seconds": 50, "roofline_fraction": 0.74, "decode_tok_s": 200.0,
                 "roofline_tok_s": 270.0},
    offline_vs_hf={"status": "pass", "seconds": 90, "ratio": 12.5, "engine_tok_s": 5000.0, "hf_tok_s": 400.0},
    attention_kernels={"status": "pass", "seconds": 40, "decode_ratio_min": 1.2, "prefill_ratio_min": 0.9,
                       "rows": [{"kernel": "paged decode", "shape": "batch 1, context 1024", "triton_ms": 0.02,
                                 "torch_ms": 0.03, "gather_ms": 0.1, "ratio": 1.5}]},
    quant_gemm={"status": "pass", "seconds": 20, "w4a16_speedup_b1": 3.1, "w8a16_speedup_b1": 1.8, "rows": []},
)


@pytest.mark.parametrize("steps, device, expected", [
    (GOOD, "cuda", {"roofline": True, "offline": True, "paged_decode": True, "w4a16": True}),
    ({**GOOD, "roofline_8b": {"status": "pass", "roofline_fraction": 0.69},
      "quant_gemm": {"status": "pass", "w4a16_speedup_b1": 2.4}},
     "cuda", {"roofline": False, "offline": True, "paged_decode": True, "w4a16": False}),
    ({"offline_vs_hf": GOOD["offline_vs_hf"], "roofline_8b": {"status": "timeout", "seconds": 90}},
     "cuda", {"roofline": None, "offline": True, "paged_decode": None, "w4a16": None}),
    (GOOD, "cpu", {"roofline": None, "offline": None, "paged_decode": None, "w4a16": None}),   # a dry run proves nothing
])
def test_targets_are_met_not_met_or_not_measured(steps, device, expected):
    targets = gpu_report.targets(_report(device, **steps))
    assert {key: t["met"] for key, t in targets.items()} == expected
    for t in targets.values():
        if t["met"] is None:
            assert t["note"] in ("not measured", "CPU dry run: tiny shapes, not the target's")


def test_headline_figures_are_lifted_from_their_steps():
    head = gpu_report.headline(_report(**GOOD))
    assert head["roofline_fraction"] == 0.74 and head["offline_ratio"] == 12.5
    assert head["kernel_ratios"] == {"paged decode: batch 1, context 1024": 1.5}
    assert head["w4a16_speedup_b1"] == 3.1 and head["paged_decode_ratio_min"] == 1.2


def test_markdown_shows_every_step_every_target_and_the_failures():
    steps = {**GOOD, "cuda_graphs": {"status": "fail", "seconds": 3, "error": "failed: graph decode steps replayed",
                                     "traceback": ["Traceback ...", "AssertionError: no replays"]},
             "int8_kv_attention": {"status": "skipped", "seconds": 1, "reason": "not built: kubellm.kernels.kv_int8"},
             "engine_vs_hf": {"status": "timeout", "seconds": 70, "error": "ran past its budget of 70 s and was killed"}}
    text = gpu_report.markdown(_report(**steps))
    for name, step in steps.items():
        assert f"| {name} | {step['status']} |" in text
    assert "| batch-1 decode >= 70% of the HBM roofline (Llama-3-8B shape) | 0.74 | met |" in text
    assert "| W4A16 decode GEMM >= 2.5x bf16 at batch 1 (geomean of the 8B linears) | 3.10 | met |" in text
    assert "not built: kubellm.kernels.kv_int8" in text
    assert "**cuda_graphs** (fail): failed: graph decode steps replayed" in text and "AssertionError: no replays" in text
    assert "**engine_vs_hf** (timeout)" in text
    assert "| paged decode | batch 1, context 1024 | 0.020 | 0.030 | 0.100 | 1.50 |" in text


def test_write_puts_json_and_markdown_side_by_side(tmp_path):
    paths = gpu_report.write(_report(**GOOD), tmp_path / "docs" / "gpu")
    assert [p.name for p in paths] == ["2026-12-01-nvidia-h200.json", "2026-12-01-nvidia-h200.md"]
    data = json.loads(paths[0].read_text())
    assert REQUIRED_KEYS <= set(data) and data["roofline_fraction"] == 0.74
    assert data["targets"]["offline"]["met"] is True
    assert paths[1].read_text().startswith("# GPU check 2026-12-01: NVIDIA H200")


# --------------------------------------------------------------------------- the real thing, on CPU
def _check_report(path: Path, steps: list[str]) -> dict:
    data = json.loads(path.read_text())
    assert REQUIRED_KEYS <= set(data), set(REQUIRED_KEYS) - set(data)
    assert VERSION_KEYS <= set(data["versions"])
    assert list(data["steps"]) == steps
    for name, step in data["steps"].items():
        assert step["status"] in STATUSES, (name, step)
        assert isinstance(step["seconds"], (int, float)), name
    return data


@pytest.mark.multiprocess
def test_the_whole_check_runs_on_cpu_and_writes_its_report(tmp_path, capsys):
    """`kubellm bench gpu --device cpu`: every step runs its real code on tiny shapes (in its own process)."""
    from kubellm.runtime.cli.main import main

    assert main(["bench", "gpu", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    files = sorted(tmp_path.iterdir())
    assert [f.suffix for f in files] == [".json", ".md"] and "-cpu-" in files[0].name
    data = _check_report(files[0], list(gpu.STEP_BUDGETS))
    statuses = {name: step["status"] for name, step in data["steps"].items()}
    assert statuses.pop("cuda_graphs") == statuses.pop("gpu_tests") == "skipped"
    broken = {n: (s, data["steps"][n].get("error") or data["steps"][n].get("reason")) for n, s in statuses.items()
              if s not in ("pass", "skipped")}
    assert not broken
    # Skipped only where a piece another change is still building is absent, with the reason.
    for name, status in statuses.items():
        if status == "skipped":
            assert name in ("quant_gemm", "int8_kv_attention") and "not built" in data["steps"][name]["reason"]
    assert data["steps"]["engine_vs_hf"]["tokens_compared"] > 0
    quant = data["steps"]["quant_gemm"]   # the FP8 kernel too: Triton interpreted is not sm89-bound
    assert quant["fp8_speedup_b1"] > 0 and any(k.startswith("FP8 ") for k in quant["checks"])
    assert all(quant["checks"].values()), quant["rel_errors"]
    assert data["steps"]["offline_vs_hf"]["ratio"] > 0 and data["offline_ratio"] == data["steps"]["offline_vs_hf"]["ratio"]
    assert 0 < data["roofline_fraction"] and data["kernel_ratios"]
    assert all(t["met"] is None for t in data["targets"].values())   # a CPU run meets no GPU target
    assert "# GPU check" in out and "| environment | pass |" in out
    assert "bench gpu: cpu check" in err and "ETA" in err   # progress on stderr


@pytest.mark.multiprocess
def test_a_step_past_its_budget_is_killed_recorded_and_the_next_one_runs(tmp_path):
    started = __import__("time").monotonic()
    report = gpu.run_check("cpu", tmp_path, ["attention_kernels", "cuda_graphs", "environment"],
                           {"attention_kernels": 2.0})
    took = __import__("time").monotonic() - started
    data = _check_report(Path(report["files"][0]), ["attention_kernels", "cuda_graphs", "environment"])
    slow = data["steps"]["attention_kernels"]
    assert slow["status"] == "timeout" and slow["budget_s"] == 2.0 and 2.0 <= slow["seconds"] < 10
    assert "ran past its budget of 2 s" in slow["error"]
    assert data["steps"]["cuda_graphs"]["status"] == "skipped"
    assert data["steps"]["environment"]["status"] == "pass" and data["device_name"].startswith("cpu")
    assert took < 60
    assert "**attention_kernels** (timeout)" in Path(report["files"][1]).read_text()


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry.name))
    return kids


@pytest.mark.multiprocess
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
def test_sigterm_to_the_check_kills_the_running_step_too(tmp_path):
    """A step runs in a session of its own, which a wall-clock stop's SIGTERM does not reach: the check kills it."""
    import os
    import signal
    import time

    check = subprocess.Popen([sys.executable, "-m", "kubellm.bench.gpu", "--device", "cpu", "--steps",
                              "attention_kernels", "--out-dir", str(tmp_path)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    steps = []
    while not steps and time.monotonic() < deadline and check.poll() is None:
        steps = [pid for pid in _children(check.pid)
                 if b"--child" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        time.sleep(0.2)
    assert steps, "the step's process never started"
    check.send_signal(signal.SIGTERM)
    assert check.wait(timeout=30) == 128 + signal.SIGTERM
    for pid in steps:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_killed_step_keeps_the_figures_it_saved(tmp_path):
    from kubellm.bench.gpu_steps import Context

    killed = {"status": "timeout", "seconds": 150.2, "error": "ran past its budget of 150 s and was killed"}
    assert gpu.with_partial(killed, tmp_path / "none.json") == killed
    ctx = Context("cpu", True, tmp_path, budget_s=150, partial_file=tmp_path / "offline_vs_hf.partial.json")
    ctx.save_partial({"engine_tok_s": 5000.0, "status": "pass", "decode": {"roofline_fraction": 0.7}})
    merged = gpu.with_partial(killed, ctx.partial_file)
    assert merged["status"] == "timeout" and merged["partial"] is True and merged["engine_tok_s"] == 5000.0
    assert merged["seconds"] == 150.2 and merged["decode"] == {"roofline_fraction": 0.7}
    Context("cpu", True, tmp_path).save_partial({"x": 1})   # no file given: nothing written, no error
    text = gpu_report.markdown(_report(offline_vs_hf={**merged, "engine_tok_s": 5000.0}))
    assert "| offline_vs_hf | timeout | 150 | ran past its budget of 150 s and was killed; kubellm 5000 tok/s" in text


@pytest.mark.multiprocess
def test_steps_past_the_total_budget_are_skipped_not_started(tmp_path):
    report = gpu.run_check("cpu", tmp_path, ["environment", "pointwise_kernels", "engine_vs_hf"], {}, total_budget=7)
    steps = report["steps"]
    assert steps["environment"]["status"] in ("pass", "timeout")
    assert steps["engine_vs_hf"]["status"] == "skipped"
    assert steps["engine_vs_hf"]["reason"] == "the check's total budget (7 s) was spent"
    assert report["seconds"] < 7 + 15


def test_gpu_test_outcomes_are_read_from_pytest_junit_xml(tmp_path):
    """The gpu_tests step's reading of pytest's report, on a real pytest run of four small tests."""
    from kubellm.bench.gpu_steps import junit_outcomes, run_pytest, verbose_outcomes

    (tmp_path / "test_four.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no GPU here')\n"
        "def test_skipped(): pass\n"
        "@pytest.fixture\n"
        "def broken(): raise RuntimeError('fixture broke')\n"
        "def test_error(broken): pass\n")
    exit_code, output = run_pytest(tmp_path, ["test_four.py"], tmp_path / "report.xml")
    assert exit_code == 1
    tests = junit_outcomes(tmp_path / "report.xml")
    outcomes = {name.split("::")[-1]: t["outcome"] for name, t in tests.items()}
    assert outcomes == {"test_ok": "passed", "test_bad": "failed", "test_skipped": "skipped", "test_error": "error"}
    assert "one is not two" in next(t["message"] for t in tests.values() if t["outcome"] == "failed")
    assert junit_outcomes(tmp_path / "missing.xml") == {}
    # pytest -v's own lines say the same (what is read when pytest is stopped before its report)
    assert {name.split("::")[-1]: t["outcome"] for name, t in verbose_outcomes(output).items()} == outcomes


def test_gpu_tests_stopped_at_their_limit_keep_the_outcomes_so_far(tmp_path):
    from kubellm.bench.gpu_steps import junit_outcomes, run_pytest, verbose_outcomes

    (tmp_path / "test_slow.py").write_text(
        "import time\n"
        "import pytest\n"
        "def test_first(): pass\n"
        "@pytest.mark.parametrize('n', [1, 2])\n"
        "def test_second(n): assert n == 1\n"
        "def test_hangs(): time.sleep(600)\n")
    exit_code, output = run_pytest(tmp_path, ["test_slow.py"], tmp_path / "report.xml", timeout=20)
    assert exit_code is None and junit_outcomes(tmp_path / "report.xml") == {}
    outcomes = {name.split("::")[-1]: t["outcome"] for name, t in verbose_outcomes(output).items()}
    assert outcomes == {"test_first": "passed", "test_second[1]": "passed", "test_second[2]": "failed"}


# --------------------------------------------------------------------------- what the GPU machine is sent
@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """e2e/gpu-wheels.sh's download (PyPI), once for the tests below."""
    dest = tmp_path_factory.mktemp("gpu-wheels") / "whl"
    run = subprocess.run(["bash", str(REPO / "e2e" / "gpu-wheels.sh"), str(dest)], capture_output=True, text=True,
                         timeout=300)
    if run.returncode and ("Could not find" in run.stderr or "connection" in run.stderr.lower()):
        pytest.skip(f"PyPI not reachable: {run.stderr.strip().splitlines()[-1]}")
    assert run.returncode == 0, run.stderr
    return dest


@pytest.mark.multiprocess
def test_the_wheels_the_gpu_machine_lacks_download_and_fit_in_64_mib(wheels):
    dest = wheels
    wheels = sorted(p.name for p in dest.glob("*.whl"))
    names = {w.split("-")[0].lower() for w in wheels}
    assert {"pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions", "gguf"} <= names
    assert len(names) == len(wheels)   # one version of each: two would stop the install there
    assert any("cp312" in w and "manylinux" in w and "x86_64" in w for w in wheels if w.startswith("pydantic_core"))
    assert sum(p.stat().st_size for p in dest.iterdir()) < 64 * 2 ** 20


def test_the_check_script_maps_this_tree_and_names_the_carried_wheels():
    script = (REPO / "e2e" / "gpu-check.sh").read_text()
    assert "--target" in script and "KUBELLM_GPU_WHEELS:-.whl}" in script and "PYTHONSAFEPATH=1" in script
    assert "-m kubellm.bench.gpu" in script and "timeout" in script
    readme = (REPO / "docs" / "gpu" / "README.md").read_text()
    assert "e2e/gpu-check.sh" in readme and '"carry": [".whl"]' in readme


@pytest.mark.multiprocess
def test_the_check_script_runs_here_against_this_tree(tmp_path):
    """e2e/gpu-check.sh as the device tool runs it (OUT set), one cheap step: kubellm imports from the mapped
    tree, the report and the log land in $OUT."""
    out = tmp_path / "out"
    out.mkdir()
    env = {**__import__("os").environ, "OUT": str(out), "KUBELLM_GPU_SITE": str(tmp_path / "site"),
           "PYTHON": sys.executable}
    run = subprocess.run(["bash", str(REPO / "e2e" / "gpu-check.sh"), "--device", "cpu", "--steps", "cuda_graphs"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"kubellm from {tmp_path / 'site' / 'tree' / 'kubellm'}" in run.stdout
    names = sorted(p.suffix for p in out.iterdir())
    assert names == [".json", ".log", ".md"]


def _python312() -> str | None:
    """A Python 3.12 that runs (a pyenv shim may name one that is not active)."""
    import glob
    import os

    for candidate in [shutil.which("python3.12"), *glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12"))]:
        if candidate and subprocess.run([candidate, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"],
                                        capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.multiprocess
def test_on_a_bare_python_312_the_carried_wheels_are_all_kubellm_needs_to_start(wheels, tmp_path):
    """The GPU machine's Python is 3.12 without pydantic: with only the carried wheels, e2e/gpu-check.sh installs
    them, kubellm's config (pydantic) and the check import from this tree, and the check writes its report."""
    python312 = _python312()
    if python312 is None:
        pytest.skip("needs a Python 3.12 (the GPU machine's)")
    probe = subprocess.run([python312, "-c", "import pydantic"], capture_output=True, text=True)
    if probe.returncode == 0:
        pytest.skip("this Python 3.12 has pydantic already: it would not show that the wheels suffice")
    out = tmp_path / "out"
    out.mkdir()
    env = {**__import__("os").environ, "OUT": str(out), "KUBELLM_GPU_SITE": str(tmp_path / "site"),
           "KUBELLM_GPU_WHEELS": str(wheels), "PYTHON": python312}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", str(REPO / "e2e" / "gpu-check.sh"), "--device", "cpu", "--steps", "cuda_graphs"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "did not install" not in run.stderr
    assert "; pydantic 2.14.4" in run.stdout and str(tmp_path / "site" / "tree" / "kubellm") in run.stdout
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".log", ".md"]

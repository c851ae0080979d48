"""bench/progress.py: what a running benchmark prints (side, done/total, elapsed, ETA), and a real short
`bench offline` run showing it for both sides."""

from __future__ import annotations

import io
import re
import threading

import pytest

from kubellm.bench import progress
from kubellm.bench.progress import Progress, clock, eta_seconds, format_line


@pytest.mark.parametrize("seconds, text", [(0, "0:00"), (7.4, "0:07"), (62, "1:02"), (3723, "1:02:03"), (-3, "0:00")])
def test_clock(seconds, text):
    assert clock(seconds) == text


@pytest.mark.parametrize("done, total, elapsed, eta", [
    (0, 100, 5.0, None),        # no rate yet
    (25, 100, 10.0, 30.0),
    (100, 100, 40.0, 0.0),
    (5, None, 3.0, None),       # no total, no ETA
])
def test_eta(done, total, elapsed, eta):
    assert eta_seconds(done, total, elapsed) == eta


@pytest.mark.parametrize("args, line", [
    (("bench offline", "kubellm", 1200, 5800, "tokens", 12.0),
     "bench offline: kubellm 1200/5800 tokens (21%), 0:12 elapsed, ETA 0:46"),
    (("bench offline", "HF generate", 0, 5800, "tokens", 0.2), "bench offline: HF generate 0/5800 tokens (0%), 0:00 elapsed"),
    (("bench offline", "HF generate", 5800, 5800, "tokens", 75.0),
     "bench offline: HF generate 5800/5800 tokens (100%), 1:15 elapsed, done"),
    (("bench serve", "deploy, 16 streams", 3, None, "requests", 4.0), "bench serve: deploy, 16 streams 3 requests, 0:04 elapsed"),
    (("bench offline", "kubellm q4 batch-1 decode", 0, None, "tokens", 6.0),
     "bench offline: kubellm q4 batch-1 decode running, 0:06 elapsed"),
    (("bench kernels", "Triton / SDPA", 2, 15, "shapes", 10.0, "paged decode batch 1"),
     "bench kernels: Triton / SDPA 2/15 shapes (13%), 0:10 elapsed, ETA 1:05 [paged decode batch 1]"),
])
def test_format_line(args, line):
    assert format_line(*args) == line


def test_plain_lines_at_start_every_interval_and_at_the_end():
    out = io.StringIO()   # not a terminal: lines, no bar
    p = Progress("bench x", "kubellm", total=4, unit="runs", stream=out, every_s=0)
    for _ in range(4):
        p.update()
    p.switch("HF generate", total=2)
    p.update(2)
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "bench x: kubellm 0/4 runs (0%), 0:00 elapsed"
    assert any(re.fullmatch(r"bench x: kubellm 2/4 runs \(50%\), 0:00 elapsed, ETA 0:00", line) for line in lines)
    assert "bench x: kubellm 4/4 runs (100%), 0:00 elapsed, done" in lines
    assert lines[-1] == "bench x: HF generate 2/2 runs (100%), 0:00 elapsed, done"
    assert len(lines) == len(set(lines))   # no line twice in a row (close after the last update)


def test_lines_wait_for_the_interval():
    out = io.StringIO()
    p = Progress("bench x", "side", total=1000, stream=out, every_s=3600)
    for _ in range(999):
        p.update()
    assert out.getvalue().count("\n") == 1     # only the opening line so far
    p.update(note="last one", force=True)
    assert out.getvalue().splitlines()[-1].endswith("done [last one]")


def test_a_terminal_gets_a_tqdm_bar_naming_the_side():
    out = io.StringIO()
    p = Progress("bench offline", "kubellm", total=10, unit="tokens", stream=out, bar=True)
    p.update(10)
    p.close()
    assert "\r" in out.getvalue() and "bench offline: kubellm" in out.getvalue() and "10/10" in out.getvalue()


def test_disabled_prints_nothing():
    out = io.StringIO()
    p = Progress("bench x", "side", total=3, stream=out, enabled=False)
    p.update(3)
    p.close()
    assert out.getvalue() == ""


def test_threads_count_every_update():
    p = Progress("bench serve", "deploy", total=800, stream=io.StringIO(), every_s=0)
    threads = [threading.Thread(target=lambda: [p.update() for _ in range(100)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p.done == 800


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("KUBELLM_PROGRESS_EVERY", "2.5")
    assert Progress("b", "s", total=1, stream=io.StringIO()).every_s == 2.5
    monkeypatch.setenv("KUBELLM_PROGRESS_EVERY", "often")
    with pytest.raises(ValueError, match="KUBELLM_PROGRESS_EVERY='often': give seconds between progress lines"):
        progress.every_seconds()


@pytest.mark.multiprocess
def test_a_short_offline_run_prints_progress_naming_each_side_with_an_eta(tiny_llama, capsys, monkeypatch):
    from kubellm.bench.offline import offline

    monkeypatch.setenv("KUBELLM_PROGRESS_EVERY", "0")   # a line per update: the run is seconds long
    result = offline(str(tiny_llama), num_prompts=6, batch_size=2, prompt_len=(4, 24), new_tokens=(4, 12), seed=1,
                     device="cpu")
    err = capsys.readouterr().err
    total = result["generated_tokens"]
    for side in ("kubellm", "HF generate"):
        # this side's own lines (the roofline steps of each weight format are sides of their own)
        lines = [line for line in err.splitlines() if re.match(rf"bench offline: {side} \d", line)]
        assert lines, err
        assert any(re.search(rf" \d+/{total} tokens \(\d+%\), \d+:\d\d elapsed, ETA \d+:\d\d$", line) for line in lines)
        assert lines[-1].endswith(f"{total}/{total} tokens (100%), " + lines[-1].split(", ")[1] + ", done")

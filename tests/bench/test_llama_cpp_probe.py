"""`--baseline llama.cpp` runs llama.cpp once in a child process first: a crash of its native code (the AMX
build's general protection fault) becomes an error that names the rebuild, not the end of the benchmark."""

from pathlib import Path

import pytest

from kubellm.bench import llama_cpp


@pytest.mark.parametrize("script,error", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", r"crashed \(SIGSEGV\).*-mno-amx-tile"),
    ("import sys; sys.exit('no such model')", r"llama.cpp failed on m.gguf: no such model"),
    ("pass", None),
])
def test_probe_reports_a_crash_with_its_fix(monkeypatch, script, error):
    monkeypatch.setattr(llama_cpp, "_PROBE", script)
    monkeypatch.setattr(llama_cpp, "_has_amx", lambda: True)
    if error is None:
        assert llama_cpp.probe(Path("m.gguf"), 2) is None
    else:
        with pytest.raises(RuntimeError, match=error):
            llama_cpp.probe(Path("m.gguf"), 2)


def test_a_crash_without_amx_is_not_blamed_on_it(monkeypatch):
    monkeypatch.setattr(llama_cpp, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGABRT)")
    monkeypatch.setattr(llama_cpp, "_has_amx", lambda: False)
    with pytest.raises(RuntimeError, match=r"crashed \(SIGABRT\)") as error:
        llama_cpp.probe(Path("m.gguf"), 2)
    assert "AMX" not in str(error.value)

"""Fixtures shared by the serving tests that run real `kubellm` processes."""

import subprocess
import sys

import pytest


@pytest.fixture
def procs(tmp_path):
    """procs(*args) -> a `kubellm` process logging to processes.log (`procs.log`); all are killed at the end."""
    log = open(tmp_path / "processes.log", "wb")  # noqa: SIM115 - closed once the processes are gone
    started: list[subprocess.Popen] = []

    def run(*args):
        started.append(subprocess.Popen([sys.executable, "-m", "kubellm.runtime.cli.main", *args], stdout=log,
                                        stderr=subprocess.STDOUT))
        return started[-1]

    run.log = tmp_path / "processes.log"
    yield run
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()
    log.close()

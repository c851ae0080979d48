"""The registry of local deployments: one `<cache>/deployments/<name>.json` per deployment (router address, REST
port, model, pids), and whether its processes still run. Shared by every process on the machine."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$")


class DeploymentError(RuntimeError):
    """A local deployment cannot be started, found or stopped; the message says why and what to do."""


def registry_dir() -> Path:
    from kubellm.runtime.hub.cache import cache_dir

    return cache_dir() / "deployments"


def entry_path(name: str) -> Path:
    return registry_dir() / f"{name}.json"


def deployment_dir(name: str) -> Path:
    return registry_dir() / name


def default_name(model: str) -> str:
    """A deployment name from a model path or name: its basename, lower-cased, odd characters as '-'."""
    base = os.path.basename(str(model).rstrip("/\\")) or "model"
    base = re.sub(r"^(hf|pvc)://", "", base)
    name = re.sub(r"[^a-z0-9_.-]+", "-", base.lower()).strip("-._")
    return name[:63].strip("-._") or "model"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 63:
        raise ValueError(f"deployment_name: {name!r} must be 1-63 lower-case letters, digits, '-', '_' or '.', "
                         "starting and ending with a letter or digit")
    return name


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (reaping it if it is our own exited child; zombies count as dead)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):
            return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"kubellm" in cmdline  # guards against a reused pid
    except (OSError, IndexError):
        return True


def entry_pids(entry: dict) -> list[int]:
    return [int(p) for p in [entry.get("router_pid"), *entry.get("worker_pids", [])] if p]


def with_liveness(entry: dict) -> dict:
    alive = [pid_alive(p) for p in entry_pids(entry)]
    entry = dict(entry)
    entry["alive"] = bool(alive) and all(alive)
    entry["state"] = "running" if entry["alive"] else ("degraded" if any(alive) else "dead")
    return entry


def read_entry(name: str) -> dict | None:
    path = entry_path(name)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DeploymentError(f"cannot read the registry entry {path}: {err}; delete it and serve again") from None


def write_entry(entry: dict) -> None:
    path = entry_path(entry["name"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(entry, indent=2, sort_keys=True))
    os.replace(tmp, path)


def remove_entry(name: str) -> None:
    try:
        entry_path(name).unlink()
    except FileNotFoundError:
        pass


def list_deployments() -> list[dict]:
    """Every registered deployment, each with `alive` (all its processes run) and `state`."""
    out = []
    directory = registry_dir()
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.json")):
        try:
            out.append(with_liveness(json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out


def kill(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM each process group (they lead their own sessions), then SIGKILL what is left after `grace`."""
    def signal_all(sig):
        for pid in pids:
            if not pid_alive(pid):
                continue
            try:
                os.killpg(pid, sig)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    signal_all(signal.SIGTERM)
    if wait_dead(pids, grace):
        return
    signal_all(signal.SIGKILL)
    wait_dead(pids, 5.0)


def wait_dead(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if not any(pid_alive(p) for p in pids):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)

"""kopf's private registry API that handlers.py relies on (timers without a finalizer) is where it
was: if kopf moves it, this fails before an operator silently blocks deletions again.

pyproject.toml pins kopf to the range checked here; widen the pin only with this test passing.
"""

import dataclasses
import importlib.metadata
import inspect
import tomllib
from pathlib import Path

import kopf
from packaging.requirements import Requirement

from kubellm.operator import handlers

ROOT = Path(__file__).resolve().parents[2]


def pinned(extra: str, name: str) -> Requirement:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return next(r for r in map(Requirement, project["optional-dependencies"][extra]) if r.name == name)


def test_installed_kopf_is_within_the_pin():
    requirement = pinned("operator", "kopf")
    assert requirement.specifier.filter(["1.37.0", "1.45.2"]) and not requirement.specifier.contains("1.46.0"), (
        "kopf has an upper bound: its private registry is used")
    assert requirement.specifier.contains(importlib.metadata.version("kopf"))


def test_timer_handlers_live_in_the_spawning_registry_as_dataclasses():
    from kopf._core.intents.handlers import TimerHandler
    from kopf._core.intents.registries import SpawningRegistry

    registry = kopf.get_default_registry()
    assert isinstance(registry._spawning, SpawningRegistry)
    assert isinstance(registry._spawning._handlers, list)
    timers = [h for h in registry._spawning._handlers if isinstance(h, TimerHandler)]
    assert any(h.fn is handlers.observe for h in timers), "the timer is registered where it is rewritten"
    assert dataclasses.is_dataclass(TimerHandler) and "requires_finalizer" in {
        f.name for f in dataclasses.fields(TimerHandler)}
    assert not any(h.requires_finalizer for h in timers)


def test_kopf_decides_the_finalizer_from_that_field():
    """What the rewrite relies on: the finalizer is added only for a spawning handler whose
    requires_finalizer is set, and kopf.timer sets it (else the rewrite is no longer needed)."""
    from kopf._core.intents.registries import SpawningRegistry
    from kopf._core.reactor import processing

    assert "registry._spawning.requires_finalizer(" in inspect.getsource(processing)
    assert "handler.requires_finalizer" in inspect.getsource(SpawningRegistry.requires_finalizer)
    assert "requires_finalizer=True" in inspect.getsource(kopf.timer)

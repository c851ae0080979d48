"""`kubellm worker`'s flags as the operator writes them (RuntimeSettings.worker_args) reach the worker."""

from __future__ import annotations

from kubellm.api.runtime_settings import RuntimeSettings
from kubellm.runtime.cli.main import build_parser


def test_served_model_name_reaches_the_parser_and_defaults_to_none():
    settings = RuntimeSettings({}, {})
    named = build_parser().parse_args(settings.worker_args("/models/m", "/etc/kubellm", port=50051, served_model_name="demo"))
    assert named.served_model_name == "demo"
    plain = build_parser().parse_args(settings.worker_args("/models/m", "/etc/kubellm", port=50051))
    assert plain.served_model_name is None   # the worker then serves it as --model

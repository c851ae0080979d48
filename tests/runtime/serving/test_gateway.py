"""The REST gateway's pure decisions (serving/gateway.py): which model a reply names, or the error."""

from __future__ import annotations

import pytest

from kubellm.runtime.serving.gateway import BadRequest, checked_model

WORKER = ["tiny-chat", "/models/tiny"]   # a worker: its served name first, then the model's own name


@pytest.mark.parametrize("requested, served, want", [
    ("anything", None, "anything"),        # a router accepts any model and echoes it
    (None, None, "deployment"),            # ... and names the deployment when none is given
    (42, None, "deployment"),
    ("tiny-chat", WORKER, "tiny-chat"),
    ("/models/tiny", WORKER, "/models/tiny"),
    (None, WORKER, "tiny-chat"),           # absent: the served name (vLLM accepts a request without one)
    ("", WORKER, "tiny-chat"),
])
def test_accepted(requested, served, want):
    assert checked_model(requested, served, "deployment") == want


@pytest.mark.parametrize("requested, status, code, words", [
    ("gpt-4o", 404, "model_not_found", ["The model `gpt-4o` does not exist", "`tiny-chat` or `/models/tiny`"]),
    ("Tiny-Chat", 404, "model_not_found", ["`Tiny-Chat`"]),   # names are exact, as vLLM's
    (7, 400, None, ["'model' must be a string"]),
    (["tiny-chat"], 400, None, ["'model' must be a string"]),
])
def test_refused(requested, status, code, words):
    with pytest.raises(BadRequest) as caught:
        checked_model(requested, WORKER, "deployment")
    err = caught.value
    assert (err.status, err.code, err.param) == (status, code, "model")
    assert all(w in err.message for w in words), err.message


def test_the_tool_call_parser_a_worker_uses():
    from types import SimpleNamespace

    from kubellm.runtime.serving.worker_http import tool_call_parser

    assert tool_call_parser(SimpleNamespace(tool_call_parser="mistral")) == "mistral"   # --tool-call-parser wins
    loading = SimpleNamespace(tool_call_parser=None, engine_loop=None)
    pick = tool_call_parser(loading)
    assert pick() is None   # still loading: auto, asked again on the next request
    hf = SimpleNamespace(chat_template={"default": "{{ messages }}", "tool_use": "<tool_call>{{ call }}</tool_call>"})
    loading.engine_loop = SimpleNamespace(engine=SimpleNamespace(tokenizer=SimpleNamespace(hf=hf)))
    assert pick() == "hermes"   # named templates: any of them


def test_an_unknown_tool_call_parser_is_refused_naming_the_choices():
    from test_limits import Recording

    from kubellm.runtime.serving.gateway import build_app

    with pytest.raises(ValueError, match="hermes, llama3_json, mistral, auto"):
        build_app(Recording(), tool_call_parser="pythonic")


def test_tool_call_ids_in_openais_shape_or_mistrals():
    from kubellm.runtime.serving.openai_replies import call_id

    assert call_id().startswith("call_") and len(call_id()) == 29
    assert len(call_id(mistral=True)) == 9 and call_id(mistral=True).isalnum()   # Mistral's templates insist

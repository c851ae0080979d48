"""The REST gateway (no torch): DeepSpeed-MII's `/mii/{deployment}` and OpenAI's API, in front of an
upstream (serving.upstream.Upstream): the router's replicas, or a worker's own engine (serving.worker_http).

    POST /mii/{deployment_name}   {"prompts": [...] | "prompt": "...", "max_length": 128, ...}
                                  -> [{"generated_text", "prompt_length", "generated_length", "finish_reason"}]
    POST /v1/completions          prompt (str, list of str, token ids), n, best_of, echo, logprobs, stop, seed,
                                  penalties, logit_bias, response_format / guided_*, stream (server-sent events)
    POST /v1/chat/completions     messages, the same options, logprobs / top_logprobs, tools / tool_choice
    GET  /v1/models               the deployment, its model and its LoRA adapters (parent: the base)
    GET  /health                  200 while the upstream can answer, else 503
    GET  /metrics                 the upstream's Prometheus metrics
    GET  /openapi.json            an OpenAPI 3.1 document of these routes (serving/openapi.py)

Every OpenAI field is checked by openai_requests.py (unknown and unserved ones refused naming them), replies are
shaped by openai_replies.py, tool calls parsed by tool_parsers.py; docs/rest.md lists what is served.
On a router, requests go through its own forwarding (balancing, retries) and any `model` is accepted;
on a worker, the route is OpenAI's only and `model` must be one it serves (404 `model_not_found`, as
vLLM answers, naming the ones it serves; absent means the first); on both, a LoRA adapter's name selects it. gRPC errors map to
HTTP: INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, DEADLINE_EXCEEDED 504;
error bodies have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.
With API keys (serving/auth.py) every route but /health, /metrics and /openapi.json needs
`Authorization: Bearer <key>`, else 401 `invalid_api_key`.

Limits (serving/limits.py, docs/limits.md): a body past `max_request_bytes` is 413 before it is read; past
the per-key rate limit a generation request is 429 with `Retry-After`; a body that is not UTF-8, not JSON,
nested too deeply, or holds a non-finite number or a lone surrogate is 400; so are more prompts than
`max_prompts_per_request` and a `max_tokens` that cannot fit in the model's session_len.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from aiohttp import web
from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.auth import ApiKeys, rest_middleware
from kubellm.runtime.serving.limits import (
    Limits,
    RateLimiter,
    caller_key,
    rate_limited_message,
    too_large_message,
)
from kubellm.runtime.serving.openai_replies import (
    Output,
    TokenLogprob,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    tool_call_deltas,
    tool_calls,
    usage,
)
from kubellm.runtime.serving.openai_requests import (
    OpenAIRequest,
    chat_request,
    completion_request,
)
from kubellm.runtime.serving.openapi import openapi_document
from kubellm.runtime.serving.rest_fields import (
    BadRequest,
    check_prompt_count,
    field,
    words,
)
from kubellm.runtime.serving.tool_parsers import PARSERS, Call, Content, ToolCallStream
from kubellm.runtime.serving.upstream import Upstream, UpstreamError

__all__ = ["BadRequest", "build_app", "check_prompt_count", "checked_model", "parse_json_body", "resolve_model"]
log = logging.getLogger("kubellm.gateway")

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


def _error(status: int, message: str, kind: str, param: str | None = None, code: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return web.json_response(body, status=status)


def _from_upstream(err: UpstreamError) -> web.Response:
    status, kind = _HTTP_STATUS.get(err.code, (500, "internal_error"))
    response = _error(status, err.details, kind, code=err.code.name.lower())
    if err.retry_after is not None:   # whole seconds, as HTTP says (rounded up: never sooner than asked)
        response.headers["Retry-After"] = str(math.ceil(err.retry_after))
    return response


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):   # 1e400: Python's json makes it infinity
        raise ValueError(f"the number {text[:40]} is beyond a double's range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")   # Python's json accepts NaN, Infinity


def parse_json_body(raw: bytes) -> dict:
    """A request body -> its JSON object, or BadRequest saying what is wrong with it (pure: no request)."""
    try:
        text = raw.decode("utf-8")   # JSON is UTF-8 (RFC 8259), whatever charset a client claims
    except UnicodeDecodeError as err:
        raise BadRequest(f"the request body is not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r}); "
                         "send JSON encoded as UTF-8") from None
    try:
        body = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise BadRequest("the request body is nested too deeply; no request field nests more than a few "
                         "levels") from None
    except ValueError as err:   # JSONDecodeError, a non-finite number, an integer of thousands of digits
        raise BadRequest(f"the request body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except (UnicodeEncodeError, ValueError, RecursionError):
        raise BadRequest("the request body has invalid text (a lone surrogate, such as \\ud800, is not "
                         "Unicode text); send valid UTF-8") from None
    return body


async def _json_body(request: web.Request) -> dict:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:   # a chunked body (no Content-Length) past client_max_size
        raise _too_large(None, request.app[LIMITS].max_request_bytes) from None
    return parse_json_body(raw)


def _too_large(size: int | None, limit: int) -> BadRequest:
    return BadRequest(too_large_message(size, limit), status=413, code="request_too_large")


# --------------------------------------------------------------------------- options


def _mii_config(body: dict, session_len: int = 0) -> llm_pb2.GenerationConfig:
    """DeepSpeed-MII's options. `session_len` (0: unknown): a max_new_tokens that could not fit beside even a
    one-token prompt is refused here; the worker checks prompt + max_new_tokens exactly."""
    cfg = llm_pb2.GenerationConfig()
    num = (int, float)
    max_new = field(body, "max_new_tokens", int, lo=1)
    if max_new is not None:
        if max_new >= 2**31:
            raise BadRequest(f"'max_new_tokens' is out of range, got {max_new!r}", "max_new_tokens")
        if session_len and max_new >= session_len:
            raise BadRequest(f"'max_new_tokens' is {max_new}, but the model's session_len is {session_len} tokens "
                             f"(prompt + max_new_tokens); ask for at most {session_len - 1} (fewer, by the prompt's "
                             "length), or leave it unset", "max_new_tokens")
        cfg.max_new_tokens = max_new
    for key, name, typ, lo, hi in (("min_new_tokens", "min_new_tokens", int, 0, None),
                                   ("min_tokens", "min_new_tokens", int, 0, None),
                                   ("temperature", "temperature", num, 0, None),
                                   ("top_p", "top_p", num, 0, 1),
                                   ("top_k", "top_k", int, 0, None),
                                   ("repetition_penalty", "repetition_penalty", num, 0, None),
                                   ("ignore_eos", "ignore_eos", bool, None, None),
                                   ("seed", "random_seed", int, None, None),
                                   ("random_seed", "random_seed", int, None, None),
                                   ("skip_special_tokens", "skip_special_tokens", bool, None, None),
                                   ("max_length", "max_length", int, 1, None)):
        value = field(body, key, typ, lo=lo, hi=hi)
        if value is not None:
            try:
                setattr(cfg, name, value)
            except (ValueError, TypeError, OverflowError):
                raise BadRequest(f"'{key}' is out of range, got {value!r}", key) from None
    if body.get("do_sample") is False and not cfg.HasField("temperature"):
        cfg.temperature = 0.0  # MII: greedy
    cfg.stop_words.extend(words(body, "stop"))
    cfg.stop_words.extend(words(body, "stop_words"))
    cfg.bad_words.extend(words(body, "bad_words"))
    return cfg


def resolve_model(requested, served: Sequence[str] | None, default: str,
                  adapters: Sequence[str] = ()) -> tuple[str, str]:
    """(the model a reply names, the LoRA adapter to generate with or ""). A name in `adapters` is that adapter
    (vLLM serves its LoRA adapters as models). Otherwise, `served` None (a router): any name, echoed (absent:
    `default`); else `requested` must be one of `served` (absent: the first), anything else is vLLM's 404 naming
    the models served."""
    if requested is not None and not isinstance(requested, str) and served is not None:
        raise BadRequest(f"'model' must be a string, got {requested!r}", "model")
    if isinstance(requested, str) and requested in adapters:
        return requested, requested
    if served is None:
        return (requested if isinstance(requested, str) and requested else default), ""
    if requested is None or requested == "":
        return served[0], ""
    if requested in served:
        return requested, ""
    names = " or ".join(f"`{n}`" for n in [*served, *adapters])
    raise BadRequest(f"The model `{requested}` does not exist; this server serves {names}", "model",
                     status=404, kind="not_found_error", code="model_not_found")


def checked_model(requested, served: Sequence[str] | None, default: str) -> str:
    """The model a reply names (resolve_model without adapters)."""
    return resolve_model(requested, served, default)[0]


def _tokens(entries) -> list[TokenLogprob]:
    return [TokenLogprob(e.chosen.token, e.chosen.logprob, tuple((t.token, t.logprob) for t in e.top))
            for e in entries]


def output_of(r) -> Output:
    """A worker's Response or GenerateStreamResponse as one choice's Output."""
    return Output(index=r.index, prompt_index=r.prompt_index, text=r.text, finish_reason=r.finish_reason,
                  prompt_length=r.prompt_length, generated_length=r.generated_length,
                  tokens=_tokens(r.token_logprobs), prompt_tokens=_tokens(r.prompt_logprobs))


# --------------------------------------------------------------------------- the app


def _first_prompt_token(prompt: str, rest: list[TokenLogprob]) -> TokenLogprob:
    """The prompt's first token, which the workers' prompt logprobs leave out (nothing predicts it): its text is
    what of the prompt the other tokens do not cover (empty for a BOS token), its logprob null as OpenAI's."""
    tail = "".join(t.token for t in rest)
    return TokenLogprob(prompt[:len(prompt) - len(tail)] if prompt.endswith(tail) else "", None)


def _echo_tokens(req: OpenAIRequest, o: Output) -> list[TokenLogprob]:
    prompt = req.prompt_texts[o.prompt_index]
    return [_first_prompt_token(prompt, o.prompt_tokens), *o.prompt_tokens]


def _with_chosen(tokens: list[TokenLogprob]) -> list[TokenLogprob]:
    """Completions' top_logprobs hold the chosen token too (as vLLM's and OpenAI's do)."""
    return [t if t.logprob is None or any(text == t.token for text, _ in t.top)
            else TokenLogprob(t.token, t.logprob, (*t.top, (t.token, t.logprob))) for t in tokens]


@dataclass
class _ChoiceStream:
    """What a streamed choice has sent so far."""
    started: bool = False
    offset: int = 0                      # completions: characters sent (logprobs' text_offset)
    calls: ToolCallStream | None = None  # tool_choice auto: the reply parsed as it comes
    constrained: str = ""                # a constrained tool call's text, parsed at its end
    tool_calls: int = 0


class Gateway:
    def __init__(self, upstream: Upstream, models: Sequence[str] | None = None, limits: Limits | None = None,
                 tool_call_parser: str | Callable[[], str | None] | None = None):
        self.upstream = upstream
        self.models_served = list(models) if models is not None else None   # None: any model (a router)
        self.limits = limits or Limits()
        if isinstance(tool_call_parser, str) and tool_call_parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(PARSERS)}, got {tool_call_parser!r}")
        self.tool_call_parser = tool_call_parser

    @property
    def session_len(self) -> int:
        """The model's session_len where the upstream has said it (ModelInfo), else 0 (unknown)."""
        info = self.upstream.model_info
        return int(info.session_len) if info is not None else 0

    @property
    def adapters(self) -> list[str]:
        info = self.upstream.model_info
        return list(info.adapters) if info is not None else []

    def parser(self) -> str:
        """The tool-call format of this model's replies: the option's, else its chat template's, else auto."""
        chosen = self.tool_call_parser() if callable(self.tool_call_parser) else self.tool_call_parser
        return chosen or "auto"

    # MII
    async def mii(self, request: web.Request) -> web.Response:
        name = request.match_info["deployment_name"]
        if name != self.upstream.deployment_name:
            return _error(404, f"unknown deployment {name!r}; this gateway serves "
                               f"{self.upstream.deployment_name!r}", "not_found_error", "deployment_name")
        body = await _json_body(request)
        if "prompts" in body:
            prompts, param = body["prompts"], "prompts"
        elif "prompt" in body:
            prompts, param = body["prompt"], "prompt"
        else:
            raise BadRequest("give 'prompts' (a list of strings) or 'prompt'", "prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, list):
            check_prompt_count(len(prompts), param, self.limits.max_prompts_per_request)
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise BadRequest(f"'{param}' must be a string or a non-empty list of strings", param)
        req = llm_pb2.GenerateRequest(prompts=[llm_pb2.Prompt(text=p) for p in prompts],
                                      config=_mii_config(body, self.session_len))
        full = field(body, "return_full_text", bool)
        reply = await self.upstream.forward_unary("Generate", req)
        out = []
        for r in sorted(reply.responses, key=lambda r: r.index):
            text = prompts[r.index] + r.text if full and r.index < len(prompts) else r.text
            out.append({"generated_text": text, "prompt_length": r.prompt_length,
                        "generated_length": r.generated_length, "finish_reason": r.finish_reason})
        return web.json_response(out)

    # OpenAI
    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model, adapter = self._model(body)   # first, as vLLM: a wrong model is 404 whatever else is wrong
        req = completion_request(body, session_len=self.session_len, max_prompts=self.limits.max_prompts_per_request)
        req.generate.adapter = adapter
        return await self._openai(request, req, model)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model, adapter = self._model(body)
        req = chat_request(body, session_len=self.session_len)
        req.generate.adapter = adapter
        if req.tools is not None and req.tools.mode == "auto":
            req.parser = self.parser()
            # Mistral's [TOOL_CALLS] and Llama's <|python_tag|> are special tokens: keep them in the text to parse.
            if req.parser != "hermes" and not req.generate.config.HasField("skip_special_tokens"):
                req.generate.config.skip_special_tokens = False
        return await self._openai(request, req, model)

    def _model(self, body: dict) -> tuple[str, str]:
        return resolve_model(body.get("model"), self.models_served, self.upstream.deployment_name, self.adapters)

    async def _openai(self, request, req: OpenAIRequest, model: str) -> web.StreamResponse:
        created = int(time.time())
        rid = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        req.generate.request_id = rid
        if req.user is not None:   # OpenAI's end-user id: for the logs (abuse tracing), nothing else
            log.info("request %s for user %r", rid, req.user[:200])
        if req.stream:
            return await self._sse(request, req, rid=rid, model=model, created=created)
        reply = await self.upstream.forward_unary("Generate", req.generate)
        outputs = [output_of(r) for r in sorted(reply.responses, key=lambda r: r.index)]
        choices = [self._chat_choice(req, o) if req.chat else self._completion_choice(req, o) for o in outputs]
        return web.json_response({
            "id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created,
            "model": model, "choices": choices, "system_fingerprint": reply.replica or None,
            "usage": self._usage(req, outputs)})

    @staticmethod
    def _usage(req: OpenAIRequest, outputs) -> dict:
        prompts = {o.prompt_index: o.prompt_length for o in outputs}   # each prompt once, whatever its n
        generated = 0 if req.prompt_only else sum(o.generated_length for o in outputs)
        return usage(sum(prompts.values()), generated)

    @staticmethod
    def _completion_choice(req: OpenAIRequest, o: Output) -> dict:
        text, tokens = ("", []) if req.prompt_only else (o.text, o.tokens)
        if req.echo:
            text = req.prompt_texts[o.prompt_index] + text
            if req.logprobs is not None:
                tokens = _echo_tokens(req, o) + tokens
        return {"index": o.index, "text": text,
                "logprobs": completion_logprobs(_with_chosen(tokens)) if req.logprobs is not None else None,
                "finish_reason": "length" if req.prompt_only else finish_reason(o.finish_reason)}

    def _calls(self, req: OpenAIRequest, text: str) -> tuple[str | None, list[Call]]:
        """A whole chat reply's content and tool calls."""
        plan = req.tools
        if plan is None or plan.mode == "none":
            return text, []
        if plan.mode == "auto":
            stream = ToolCallStream(req.parser)
            events = stream.feed(text) + stream.finish()
            calls = plan.keep([e for e in events if isinstance(e, Call)])
            content = "".join(e.text for e in events if isinstance(e, Content))
            return (content if content.strip() or not calls else None), calls
        calls = plan.calls_from_constrained(text)
        return (None, plan.keep(calls)) if calls else (text, [])

    def _chat_choice(self, req: OpenAIRequest, o: Output) -> dict:
        content, calls = self._calls(req, o.text)
        message = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = tool_calls(calls, mistral_ids=req.parser == "mistral")
        return {"index": o.index, "message": message,
                "logprobs": chat_logprobs(o.tokens, req.logprobs) if req.logprobs is not None else None,
                "finish_reason": "tool_calls" if calls else finish_reason(o.finish_reason)}

    def _chat_deltas(self, req: OpenAIRequest, st: _ChoiceStream, text: str, last: bool) -> list[dict]:
        """A streamed chat choice's next deltas: content, and tool calls as they are known."""
        plan, deltas = req.tools, []

        def add(events):
            for e in events:
                if isinstance(e, Content):
                    deltas.append({"content": e.text})
                elif plan.parallel or st.tool_calls == 0:
                    st.tool_calls += 1
                    deltas.extend({"tool_calls": [d]}
                                  for d in tool_call_deltas(e, mistral_ids=req.parser == "mistral"))

        if plan is None or plan.mode == "none":
            if text:
                deltas.append({"content": text})
        elif plan.mode == "auto":
            st.calls = st.calls or ToolCallStream(req.parser)
            add(st.calls.feed(text) + (st.calls.finish() if last else []))
        else:
            st.constrained += text
            if last:
                calls = plan.calls_from_constrained(st.constrained)
                add(calls if calls else [Content(st.constrained)] if st.constrained else [])
        return deltas

    async def _sse(self, request, req: OpenAIRequest, *, rid, model, created) -> web.StreamResponse:
        chat = req.chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        upstream = self.upstream.forward_stream(req.generate)
        try:
            try:  # the first message before any header: errors up to here get a proper HTTP status
                first = await upstream.__anext__()
            except StopAsyncIteration:
                first = None
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)
            totals: dict[int, Output] = {}

            async def send(choice=None, with_usage=False):
                payload = {"id": rid, "object": obj, "created": created, "model": model,
                           "choices": [choice] if choice is not None else []}
                if with_usage or (req.continuous_usage and choice is not None):
                    payload["usage"] = self._usage(req, list(totals.values()))
                await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

            states: dict[int, _ChoiceStream] = {}
            try:
                message = first
                while message is not None:
                    o = output_of(message)
                    totals[o.index] = Output(o.index, o.prompt_index, prompt_length=o.prompt_length,
                                             generated_length=o.generated_length)   # the lengths so far
                    st = states.setdefault(o.index, _ChoiceStream())
                    last = bool(message.finish_reason)
                    if chat:
                        await self._chat_chunks(req, st, o, last, send)
                    else:
                        await self._completion_chunk(req, st, o, last, send)
                    try:
                        message = await upstream.__anext__()
                    except StopAsyncIteration:
                        message = None
                if req.include_usage:
                    await send(with_usage=True)
            except UpstreamError as err:  # after the headers: an error event, then the end
                _, kind = _HTTP_STATUS.get(err.code, (500, "internal_error"))
                await response.write(b"data: " + json.dumps({"error": {
                    "message": err.details, "type": kind, "param": None, "code": err.code.name.lower()}}).encode()
                    + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            await upstream.aclose()

    async def _completion_chunk(self, req: OpenAIRequest, st: _ChoiceStream, o: Output, last: bool, send) -> None:
        text, tokens = ("", []) if req.prompt_only else (o.text, o.tokens)
        if req.echo and not st.started:
            text = req.prompt_texts[o.prompt_index] + text
            if req.logprobs is not None:
                tokens = _echo_tokens(req, o) + tokens
        st.started = True
        finish = ("length" if req.prompt_only else finish_reason(o.finish_reason)) if last else None
        if text or tokens or finish:
            logprobs = completion_logprobs(_with_chosen(tokens), st.offset) if req.logprobs is not None else None
            await send({"index": o.index, "text": text, "logprobs": logprobs, "finish_reason": finish})
        st.offset += len(text)

    async def _chat_chunks(self, req: OpenAIRequest, st: _ChoiceStream, o: Output, last: bool, send) -> None:
        if not st.started:
            st.started = True
            await send({"index": o.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None})
        deltas = self._chat_deltas(req, st, o.text, last)
        logprobs = chat_logprobs(o.tokens, req.logprobs) if req.logprobs is not None and o.tokens else None
        if logprobs and not deltas:
            deltas = [{}]   # the tokens' logprobs, while their text is held back (a tool call forming)
        finish = ("tool_calls" if st.tool_calls else finish_reason(o.finish_reason)) if last else None
        for k, delta in enumerate(deltas):
            await send({"index": o.index, "delta": delta, "logprobs": logprobs if k == 0 else None,
                        "finish_reason": finish if k == len(deltas) - 1 else None})
        if finish and not deltas:
            await send({"index": o.index, "delta": {}, "logprobs": None, "finish_reason": finish})

    async def models(self, request: web.Request) -> web.Response:
        info = self.upstream.model_info
        if info is None:
            try:
                info = await self.upstream.forward_unary("ModelInfo", llm_pb2.ModelInfoRequest(), timeout=10)
            except UpstreamError:
                info = None
        if self.models_served is not None:
            names = list(self.models_served)
        else:
            names = [self.upstream.deployment_name]
            if info is not None and info.model and info.model not in names:
                names.append(info.model)
        adapters = list(info.adapters) if info is not None else []
        session_len = int(info.session_len) if info is not None else None
        root = info.model if info is not None and info.model else names[0]
        cards = [{"id": n, "object": "model", "created": 0, "owned_by": "kubellm", "root": root, "parent": None,
                  "max_model_len": session_len} for n in names]
        # vLLM lists each LoRA adapter as a model whose parent is the base model.
        cards += [{"id": a, "object": "model", "created": 0, "owned_by": "kubellm", "root": a, "parent": names[0],
                   "max_model_len": session_len} for a in adapters if a not in names]
        return web.json_response({"object": "list", "data": cards})

    async def health(self, request: web.Request) -> web.Response:
        healthy = len(self.upstream.healthy_replicas())
        # A scale-from-zero router takes (holds) requests with no replica; a worker's upstream never does.
        scaled_to_zero = bool(getattr(self.upstream, "scaled_to_zero", False))
        ok = bool(healthy) or scaled_to_zero
        return web.json_response({"status": "ok" if ok else "unavailable", "healthy_replicas": healthy,
                                  "replicas": len(self.upstream.replicas), "scaled_to_zero": scaled_to_zero},
                                 status=200 if ok else 503)


async def _openapi(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])


LIMITS = web.AppKey("kubellm.limits", Limits)
OPENAPI = web.AppKey("kubellm.openapi", dict)
# What a rate limit counts: the requests that generate (what costs the GPU), not probes, scrapes or model lists.
_GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions", "/mii/")


def _limits_middleware(limits: Limits, limiter: RateLimiter | None):
    """413 for a declared body past max_request_bytes (before it is read), 429 past the caller's rate limit."""

    @web.middleware
    async def limited(request: web.Request, handler):
        size = request.content_length
        if size is not None and size > limits.max_request_bytes:
            raise _too_large(size, limits.max_request_bytes)
        if limiter is not None and request.method == "POST" and request.path.startswith(_GENERATION_PATHS):
            # The auth middleware (before this one) names the caller's key; without auth, its address.
            key = caller_key(request.get("kubellm.key_id"), request.remote)
            wait = limiter.wait_time(key)
            if wait is not None:
                response = _error(429, rate_limited_message(limits, wait), "requests", code="rate_limit_exceeded")
                response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return response
        return await handler(request)
    return limited


@web.middleware
async def _errors(request: web.Request, handler):
    try:
        return await handler(request)
    except BadRequest as err:
        return _error(err.status, err.message, err.kind, err.param, err.code)
    except UpstreamError as err:
        return _from_upstream(err)


def build_app(upstream: Upstream, *, models: Sequence[str] | None = None, mii: bool = True,
              limits: Limits | None = None, api_keys: ApiKeys | None = None,
              rate_limiter: RateLimiter | None = None,
              tool_call_parser: str | Callable[[], str | None] | None = None) -> web.Application:
    """The REST app over `upstream`. `models`: the names `model` may take (None: any, as a router);
    `mii`: serve DeepSpeed-MII's route too (a router's only); `limits`: the body size, rate and prompt limits
    (default: Limits(), 1 MiB bodies and no rate limit; `rate_limiter`: the buckets, shared with the router's
    gRPC port, else the gateway's own); `api_keys`: `Authorization: Bearer` required but on
    /health, /metrics and /openapi.json (None: no key asked for); `tool_call_parser`: the format of the model's
    tool calls (tool_parsers.PARSERS; a callable: asked per request, the model's chat template once loaded;
    None: auto, by their markers)."""
    limits = limits or Limits()
    gw = Gateway(upstream, models, limits, tool_call_parser)
    # The key first: an unauthenticated request is answered 401 before its body, size or rate count.
    auth = [rest_middleware(api_keys)] if api_keys is not None else []
    limiter = rate_limiter if rate_limiter is not None else limits.rate_limiter()
    app = web.Application(middlewares=[*auth, _errors, _limits_middleware(limits, limiter)],
                          client_max_size=limits.max_request_bytes)
    app[LIMITS] = limits
    app[OPENAPI] = openapi_document(upstream.deployment_name, mii=mii)
    if mii:
        app.router.add_post("/mii/{deployment_name}", gw.mii)
    app.router.add_post("/v1/completions", gw.completions)
    app.router.add_post("/v1/chat/completions", gw.chat_completions)
    app.router.add_get("/v1/models", gw.models)
    app.router.add_get("/health", gw.health)
    app.router.add_get("/metrics", upstream.metrics_handler)
    app.router.add_get("/openapi.json", _openapi)
    return app

"""The REST gateway (no torch): DeepSpeed-MII's `/mii/{deployment}` and OpenAI's API, in front of an
upstream (serving.upstream.Upstream): the router's replicas, or a worker's own engine (serving.worker_http).

    POST /mii/{deployment_name}   {"prompts": [...] | "prompt": "...", "max_length": 128, ...}
                                  -> [{"generated_text", "prompt_length", "generated_length", "finish_reason"}]
    POST /v1/completions          prompt (str, list of str, token ids), max_tokens, temperature, top_p,
                                  stop, seed, n=1, stream (server-sent events, then `data: [DONE]`)
    POST /v1/chat/completions     messages, the same options, stream
    GET  /v1/models               the deployment (and its model)
    GET  /health                  200 while the upstream can answer, else 503
    GET  /metrics                 the upstream's Prometheus metrics
    GET  /openapi.json            an OpenAPI 3.1 document of these routes (serving/openapi.py)

On a router, requests go through its own forwarding (balancing, retries) and any `model` is accepted;
on a worker, the route is OpenAI's only and `model` must be one it serves (404 `model_not_found`, as
vLLM answers, naming the ones it serves; absent means the first). gRPC errors map to
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
import math
import time
import uuid
from collections.abc import Sequence

import grpc
from aiohttp import web

from kubellm.protos.v1 import llm_pb2
from kubellm.runtime.serving.auth import ApiKeys, rest_middleware
from kubellm.runtime.serving.limits import Limits, RateLimiter, caller_key, rate_limited_message, too_large_message
from kubellm.runtime.serving.openapi import openapi_document
from kubellm.runtime.serving.upstream import Upstream, UpstreamError

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


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


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


def _get(body: dict, key: str, types, *, lo=None, hi=None):
    """body[key] checked against `types` (and bounds); None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise BadRequest(f"'{key}' must be {_names(types)}, got {value!r}", key)
    if not isinstance(value, types):
        raise BadRequest(f"'{key}' must be {_names(types)}, got {value!r}", key)
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise BadRequest(f"'{key}' is out of range, got {value!r}", key)
    if lo is not None and value < lo:
        raise BadRequest(f"'{key}' must be >= {lo}, got {value!r}", key)
    if hi is not None and value > hi:
        raise BadRequest(f"'{key}' must be <= {hi}, got {value!r}", key)
    return value


def _names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                        list: "a list"}.get(t, t.__name__) for t in types)


def _stop_words(body: dict, key: str) -> list[str]:
    stop = body.get(key)
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise BadRequest(f"'{key}' must be a string or a list of strings", key)


def _config(body: dict, *, max_new_key: str, openai: bool, session_len: int = 0) -> llm_pb2.GenerationConfig:
    """The request's options. `session_len` (0: unknown): a max_tokens that could not fit beside even a
    one-token prompt is refused here; the worker checks prompt + max_tokens exactly."""
    cfg = llm_pb2.GenerationConfig()
    num = (int, float)
    max_new = _get(body, max_new_key, int, lo=1)
    if max_new is None and openai:
        max_new = _get(body, "max_completion_tokens", int, lo=1)
    if max_new is not None:
        if max_new >= 2**31:
            raise BadRequest(f"'{max_new_key}' is out of range, got {max_new!r}", max_new_key)
        if session_len and max_new >= session_len:
            raise BadRequest(f"'{max_new_key}' is {max_new}, but the model's session_len is {session_len} tokens "
                             f"(prompt + {max_new_key}); ask for at most {session_len - 1} (fewer, by the prompt's "
                             f"length), or leave it unset", max_new_key)
        cfg.max_new_tokens = max_new
    elif openai and max_new_key == "max_tokens" and "messages" not in body:
        cfg.max_new_tokens = 16  # OpenAI's default for /v1/completions
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
        if openai and key == "max_length":
            continue
        value = _get(body, key, typ, lo=lo, hi=hi)
        if value is not None:
            try:
                setattr(cfg, name, value)
            except (ValueError, TypeError, OverflowError):
                raise BadRequest(f"'{key}' is out of range, got {value!r}", key) from None
    if not openai and body.get("do_sample") is False and not cfg.HasField("temperature"):
        cfg.temperature = 0.0  # MII: greedy
    cfg.stop_words.extend(_stop_words(body, "stop"))
    if not openai:
        cfg.stop_words.extend(_stop_words(body, "stop_words"))
        cfg.bad_words.extend(_stop_words(body, "bad_words"))
    if openai:
        n = _get(body, "n", int, lo=1)
        if n not in (None, 1):
            raise BadRequest("only n=1 is supported", "n")
        best_of = _get(body, "best_of", int, lo=1)
        if best_of not in (None, 1):
            raise BadRequest("only best_of=1 is supported", "best_of")
        if body.get("echo"):
            raise BadRequest("echo is not supported", "echo")
    return cfg


def check_prompt_count(count: int, param: str, most: int) -> None:
    if count > most:
        raise BadRequest(f"'{param}': {count} prompts in one request, more than max_prompts_per_request ({most}: "
                         "spec.limits.maxPromptsPerRequest, --max-prompts-per-request); split them over several "
                         "requests", param)


def _text_prompts(value, param: str, most: int) -> list[llm_pb2.Prompt]:
    if isinstance(value, list) and value and not isinstance(value[0], int):   # a batch (not one prompt's ids)
        check_prompt_count(len(value), param, most)   # before any Prompt is built
    try:
        return _text_prompts_unchecked(value, param)
    except (ValueError, TypeError, OverflowError) as err:
        if isinstance(err, BadRequest):
            raise
        raise BadRequest(f"'{param}': token ids must be 32-bit integers", param) from None


def _text_prompts_unchecked(value, param: str) -> list[llm_pb2.Prompt]:
    if isinstance(value, str):
        return [llm_pb2.Prompt(text=value)]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return [llm_pb2.Prompt(text=p) for p in value]
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return [llm_pb2.Prompt(token_ids=llm_pb2.TokenIds(ids=value))]
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
               for p in value):
            return [llm_pb2.Prompt(token_ids=llm_pb2.TokenIds(ids=p)) for p in value]
    raise BadRequest(f"'{param}' must be a string, a non-empty list of strings, or token ids", param)


def _conversation(messages) -> llm_pb2.Prompt:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    conv = llm_pb2.Conversation()
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}].role")
        content = m.get("content")
        if content is None:
            content = ""
        elif isinstance(content, list):  # content parts: keep the text ones
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                     f"messages[{i}].content")
                parts.append(part["text"])
            content = "".join(parts)
        elif not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", f"messages[{i}].content")
        conv.messages.append(llm_pb2.ChatMessage(role=m["role"], content=content))
    return llm_pb2.Prompt(chat=conv)


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def checked_model(requested, served: Sequence[str] | None, default: str) -> str:
    """The model a reply names. `served` None (a router): any, else `default`. Otherwise `requested` must
    be one of `served` (absent: the first); anything else is vLLM's 404 naming the served ones."""
    if served is None:
        return requested if isinstance(requested, str) else default
    if requested is None or requested == "":
        return served[0]
    if not isinstance(requested, str):
        raise BadRequest(f"'model' must be a string, got {requested!r}", "model")
    if requested in served:
        return requested
    names = " or ".join(f"`{n}`" for n in served)
    raise BadRequest(f"The model `{requested}` does not exist; this server serves {names}", "model",
                     status=404, kind="not_found_error", code="model_not_found")


# --------------------------------------------------------------------------- the app


class Gateway:
    def __init__(self, upstream: Upstream, models: Sequence[str] | None = None, limits: Limits | None = None):
        self.upstream = upstream
        self.models_served = list(models) if models is not None else None   # None: any model (a router)
        self.limits = limits or Limits()

    @property
    def session_len(self) -> int:
        """The model's session_len where the upstream has said it (ModelInfo), else 0 (unknown)."""
        info = self.upstream.model_info
        return int(info.session_len) if info is not None else 0

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
                                      config=_config(body, max_new_key="max_new_tokens", openai=False,
                                                     session_len=self.session_len))
        full = _get(body, "return_full_text", bool)
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
        model = self._model(body)   # first, as vLLM: a wrong model is 404 whatever else is wrong
        if "prompt" not in body:
            raise BadRequest("'prompt' is required", "prompt")
        req = llm_pb2.GenerateRequest(prompts=_text_prompts(body["prompt"], "prompt",
                                                            self.limits.max_prompts_per_request),
                                      config=_config(body, max_new_key="max_tokens", openai=True,
                                                     session_len=self.session_len))
        return await self._openai(request, body, req, model, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        model = self._model(body)
        req = llm_pb2.GenerateRequest(prompts=[_conversation(body.get("messages"))],
                                      config=_config(body, max_new_key="max_tokens", openai=True,
                                                     session_len=self.session_len))
        return await self._openai(request, body, req, model, chat=True)

    def _model(self, body: dict) -> str:
        return checked_model(body.get("model"), self.models_served, self.upstream.deployment_name)

    async def _openai(self, request, body, req, model: str, *, chat: bool) -> web.StreamResponse:
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        req.request_id = rid
        stream = _get(body, "stream", bool)
        if stream:
            opts = body.get("stream_options") or {}
            usage = isinstance(opts, dict) and bool(opts.get("include_usage"))
            return await self._sse(request, req, rid=rid, model=model, created=created, chat=chat, usage=usage)
        reply = await self.upstream.forward_unary("Generate", req)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for r in sorted(reply.responses, key=lambda r: r.index):
            prompt_tokens += r.prompt_length
            completion_tokens += r.generated_length
            if chat:
                choices.append({"index": r.index, "message": {"role": "assistant", "content": r.text},
                                "logprobs": None, "finish_reason": _finish(r.finish_reason)})
            else:
                choices.append({"index": r.index, "text": r.text, "logprobs": None,
                                "finish_reason": _finish(r.finish_reason)})
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "system_fingerprint": reply.replica or None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}})

    async def _sse(self, request, req, *, rid, model, created, chat, usage) -> web.StreamResponse:
        obj = "chat.completion.chunk" if chat else "text_completion"
        upstream = self.upstream.forward_stream(req)
        try:
            try:  # the first message before any header: errors up to here get a proper HTTP status
                first = await upstream.__anext__()
            except StopAsyncIteration:
                first = None
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-cache"})
            await response.prepare(request)

            async def send(payload):
                await response.write(b"data: " + json.dumps(payload).encode() + b"\n\n")

            def chunk(index, delta_text, finish, role=False):
                if chat:
                    delta = {"role": "assistant", "content": delta_text} if role else (
                        {"content": delta_text} if delta_text or not finish else {})
                    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                else:
                    choice = {"index": index, "text": delta_text, "logprobs": None, "finish_reason": finish}
                return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}

            started, totals = set(), {}
            try:
                message = first
                while message is not None:
                    if chat and message.index not in started:
                        started.add(message.index)
                        await send(chunk(message.index, "", None, role=True))
                    finish = _finish(message.finish_reason) if message.finish_reason else None
                    if message.text or finish:
                        await send(chunk(message.index, message.text, finish))
                    totals[message.index] = (message.prompt_length, message.generated_length)
                    try:
                        message = await upstream.__anext__()
                    except StopAsyncIteration:
                        message = None
                if usage:
                    p = sum(t[0] for t in totals.values())
                    c = sum(t[1] for t in totals.values())
                    await send({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}})
            except UpstreamError as err:  # after the headers: an error event, then the end
                _, kind = _HTTP_STATUS.get(err.code, (500, "internal_error"))
                await send({"error": {"message": err.details, "type": kind, "param": None,
                                      "code": err.code.name.lower()}})
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            await upstream.aclose()

    async def models(self, request: web.Request) -> web.Response:
        if self.models_served is not None:
            return _model_list(self.models_served)
        info = self.upstream.model_info
        if info is None:
            try:
                info = await self.upstream.forward_unary("ModelInfo", llm_pb2.ModelInfoRequest(), timeout=10)
            except UpstreamError:
                info = None
        names = [self.upstream.deployment_name]
        if info is not None and info.model and info.model not in names:
            names.append(info.model)
        return _model_list(names)

    async def health(self, request: web.Request) -> web.Response:
        healthy = len(self.upstream.healthy_replicas())
        # A scale-from-zero router takes (holds) requests with no replica; a worker's upstream never does.
        scaled_to_zero = bool(getattr(self.upstream, "scaled_to_zero", False))
        ok = bool(healthy) or scaled_to_zero
        return web.json_response({"status": "ok" if ok else "unavailable", "healthy_replicas": healthy,
                                  "replicas": len(self.upstream.replicas), "scaled_to_zero": scaled_to_zero},
                                 status=200 if ok else 503)


def _model_list(names: Sequence[str]) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": n, "object": "model", "created": 0, "owned_by": "kubellm"} for n in names]})


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
              rate_limiter: RateLimiter | None = None) -> web.Application:
    """The REST app over `upstream`. `models`: the names `model` may take (None: any, as a router);
    `mii`: serve DeepSpeed-MII's route too (a router's only); `limits`: the body size, rate and prompt limits
    (default: Limits(), 1 MiB bodies and no rate limit; `rate_limiter`: the buckets, shared with the router's
    gRPC port, else the gateway's own); `api_keys`: `Authorization: Bearer` required but on
    /health, /metrics and /openapi.json (None: no key asked for)."""
    limits = limits or Limits()
    gw = Gateway(upstream, models, limits)
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

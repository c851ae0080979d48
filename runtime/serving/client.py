"""A light gRPC client of a kubellm worker or router: grpc and the generated protos only (no torch).

    client = Client("localhost:50051")
    for r in client.generate(["Hello", "DeepSpeed is"], max_new_tokens=32):
        print(r.text, r.generated_length, r.finish_reason)
    for delta in client.stream("Once upon a time", max_new_tokens=32):
        print(delta.text, end="")
    client.generate("SELECT", adapter="sql")            # a LoRA adapter the server serves (model_info().adapters)
    client.generate("Once upon a time", streaming_fn=lambda rs: print(rs[0].text, end=""))   # DeepSpeed-MII's
    client.close()

Errors of the server come back as `ClientError` with the gRPC status name and the server's message.

A router that asks for an API key gets it from `api_key=` (default: $KUBELLM_API_KEY, its first key if it
lists several) as `authorization: Bearer <key>` metadata on every call; without a valid one, ClientError
UNAUTHENTICATED. `tls=True` speaks TLS with the system's roots, `ca_file=` with a CA bundle (a self-signed
certificate is its own CA):

    client = Client("llm.example.com:443", api_key="sk-...", tls=True)
    client = Client("127.0.0.1:50051", api_key="sk-...", ca_file="tls.crt")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Iterator

import grpc

from kubellm.protos.v1 import llm_pb2, llm_pb2_grpc
from kubellm.runtime.mii_compat import full_text, generate_options
from kubellm.runtime.response import Response, TokenLogprob, TokenLogprobs
from kubellm.runtime.serving.tls import channel_credentials

API_KEY_ENV = "KUBELLM_API_KEY"

# Options that map one-to-one onto the proto's GenerationConfig.
_SCALAR_OPTIONS = ("max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                   "ignore_eos", "random_seed", "skip_special_tokens", "logprobs", "max_length", "presence_penalty",
                   "frequency_penalty", "prompt_logprobs", "n", "best_of", "guided_json", "guided_json_object",
                   "guided_regex", "guided_grammar", "guided_whitespace_pattern")
_LIST_OPTIONS = ("stop_words", "bad_words", "guided_choice")
GEN_OPTIONS = frozenset(_SCALAR_OPTIONS + _LIST_OPTIONS + ("logit_bias", "stop", "do_sample"))  # + MII aliases


class ClientError(RuntimeError):
    """A failed call: `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `message` the server's text."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message




@dataclass
class ModelInfo:
    model: str
    architecture: str
    tensor_parallel: int
    pipeline_parallel: int
    max_batch_size: int
    session_len: int
    replica: str
    version: str
    adapters: list[str] = field(default_factory=list)   # the LoRA adapters a request may name


def _is_conversation(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) for m in value)


def _is_token_ids(value) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool)
                                                                    for t in value)


def _prompt(value, i: int) -> llm_pb2.Prompt:
    if isinstance(value, str):
        return llm_pb2.Prompt(text=value)
    if _is_conversation(value) or _is_tool_conversation(value):
        messages, tools = (value["messages"], value.get("tools")) if isinstance(value, dict) else (value, None)
        try:
            return llm_pb2.Prompt(chat=llm_pb2.Conversation(
                messages=[_message(m) for m in messages], tools_json=json.dumps(tools) if tools is not None else ""))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"prompts[{i}]: a chat message needs string 'role' and 'content' keys (content may be "
                             f"None beside tool_calls; tools and tool_calls are JSON) ({err})") from None
    if _is_token_ids(value):
        return llm_pb2.Prompt(token_ids=llm_pb2.TokenIds(ids=list(value)))
    raise ValueError(f"prompts[{i}]: expected a string, chat messages [{{'role', 'content'}}, ...] or token ids, "
                     f"got {type(value).__name__}")


def _is_tool_conversation(value) -> bool:
    """{'messages': [...], 'tools': [...]}: a conversation with OpenAI tools (the chat template renders them)."""
    return isinstance(value, dict) and "messages" in value


def _message(m: dict) -> llm_pb2.ChatMessage:
    content = m["content"] if m.get("content") is not None or "tool_calls" not in m else ""
    return llm_pb2.ChatMessage(role=m["role"], content=content,
                               tool_calls_json=json.dumps(m["tool_calls"]) if m.get("tool_calls") else "",
                               tool_call_id=m.get("tool_call_id") or "", name=m.get("name") or "")


def prompt_list(prompts) -> list:
    """A string, a list of strings, one conversation, a list of conversations, or token ids -> a list of prompts."""
    if isinstance(prompts, str) or _is_tool_conversation(prompts) or _is_token_ids(prompts) or (
            _is_conversation(prompts) and not all(_is_tool_conversation(p) for p in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts: expected a string or a list, got {type(prompts).__name__}")
    return list(prompts)


def build_prompts(prompts) -> list[llm_pb2.Prompt]:
    """A string, a list of strings, one conversation, a list of conversations, or token ids -> protos."""
    return [_prompt(p, i) for i, p in enumerate(prompt_list(prompts))]


def build_config(options: dict) -> llm_pb2.GenerationConfig:
    """Generation options by name -> the proto (unset options stay unset, taking the server's defaults)."""
    unknown = sorted(set(options) - GEN_OPTIONS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown generation option; valid ones: {', '.join(sorted(GEN_OPTIONS))}, "
                         "and adapter (the request's LoRA adapter)")
    options = {k: v for k, v in options.items() if v is not None}
    if "stop" in options:
        stop = options.pop("stop")
        options.setdefault("stop_words", [stop] if isinstance(stop, str) else list(stop))
    if "do_sample" in options:  # MII: do_sample=False is greedy; True samples at temperature 1 unless set
        if not options.pop("do_sample"):
            options["temperature"] = 0.0
        elif not options.get("temperature"):
            options["temperature"] = 1.0
    if isinstance(options.get("guided_json"), dict):   # a schema object travels as its JSON text
        options["guided_json"] = json.dumps(options["guided_json"])
    config = llm_pb2.GenerationConfig()
    for name, value in options.items():
        try:
            if name == "logit_bias":
                config.logit_bias.update({int(t): float(b) for t, b in dict(value).items()})
            elif name in _LIST_OPTIONS:
                getattr(config, name).extend([value] if isinstance(value, str) else list(value))
            else:
                setattr(config, name, value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{name}: {value!r} is not a valid value ({err})") from None
    return config


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else $KUBELLM_API_KEY (its first key if it lists several, comma-separated); None: none."""
    if api_key is None:
        api_key = next((k.strip() for k in os.environ.get(API_KEY_ENV, "").split(",") if k.strip()), None)
    if api_key is None:
        return None
    if not isinstance(api_key, str) or not api_key.strip() or any(c in api_key for c in "\r\n\0"):
        raise ValueError("api_key: give the key as a non-empty string on one line (or set $KUBELLM_API_KEY)")
    return api_key.strip()


class Client:
    """A connection to a worker or router at `address` ("host:port"); `api_key` (default $KUBELLM_API_KEY)
    sent on every call; `tls` (system roots) or `ca_file` (implies TLS) for a router serving TLS."""

    def __init__(self, address: str, timeout: float | None = None, options: list | None = None, *,
                 api_key: str | None = None, tls: bool = False, ca_file: str | None = None):
        self.address = address
        self.timeout = timeout
        api_key = resolve_api_key(api_key)
        self.tls = bool(tls or ca_file)
        # One tuple for every call: the key goes nowhere else (not in repr, not in errors).
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        if self.tls:
            self._channel = grpc.secure_channel(address, channel_credentials(ca_file), options=options or [])
        else:
            self._channel = grpc.insecure_channel(address, options=options or [])
        self._stub = llm_pb2_grpc.LLMStub(self._channel)

    def _request(self, prompts, options) -> llm_pb2.GenerateRequest:
        options = dict(options)
        adapter = options.pop("adapter", None)   # the request's own field, not a sampling option
        if adapter is not None and (not isinstance(adapter, str) or not adapter):
            raise ValueError(f"adapter: expected the name of an adapter the server serves (a non-empty string), "
                             f"got {adapter!r}; leave it unset for the base model")
        return llm_pb2.GenerateRequest(prompts=build_prompts(prompts), config=build_config(options),
                                       adapter=adapter or "")

    def generate(self, prompts, timeout: float | None = None, streaming_fn=None, **gen_options) -> list[Response]:
        """One Response per prompt. DeepSpeed-MII's `streaming_fn`: called with a one-item list [Response] for
        each delta as it is generated (`index` says whose); the whole responses are returned at the end too
        (MII returns None). `return_full_text=True`: the text starts with the prompt (text prompts)."""
        if callable(timeout) and streaming_fn is None:   # MII's generate(prompts, streaming_fn) positionally
            timeout, streaming_fn = None, timeout
        if streaming_fn is not None:
            if not callable(streaming_fn):
                raise ValueError(f"streaming_fn: expected a callable taking a list of Responses, got "
                                 f"{type(streaming_fn).__name__}")
            return self._generate_streaming(prompts, timeout, streaming_fn, gen_options)
        options, full = generate_options(gen_options)
        originals = self._check_full_text(prompts, full)
        request = self._request(prompts, options)
        try:
            reply = self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._error(err) from None
        out = [_response(r, reply.replica, logprobs="logprobs" in options and options["logprobs"] is not None,
                         prompt_logprobs=options.get("prompt_logprobs") is not None)
               for r in reply.responses]
        for r in out if full else ():
            r.text = full_text(originals[r.prompt_index], r.text, r.index)
        return out

    __call__ = generate

    def query(self, prompts, **gen_options) -> list[Response]:
        """DeepSpeed-MII's older name for `generate`."""
        return self.generate(prompts, **gen_options)

    @staticmethod
    def _check_full_text(prompts, full: bool) -> list:
        """The caller's prompts, checked up front where return_full_text needs their text."""
        originals = prompt_list(prompts)
        for i, prompt in enumerate(originals if full else ()):
            full_text(prompt, "", i)
        return originals

    def _generate_streaming(self, prompts, timeout, callback, gen_options) -> list[Response]:
        final: dict[int, Response] = {}
        for delta in self.stream(prompts, timeout, **gen_options):
            callback([delta])
            whole = final.setdefault(delta.index, Response("", delta.prompt_length, 0, None, delta.index,
                                                           replica=delta.replica))
            whole.text += delta.text
            whole.token_ids.extend(delta.token_ids)
            whole.generate_token_len = delta.generate_token_len
            whole.finish_reason = delta.finish_reason or whole.finish_reason
        return [final[i] for i in sorted(final)]

    def stream(self, prompts, timeout: float | None = None, **gen_options) -> Iterator[Response]:
        """Deltas for all prompts as they are generated (`index` says whose); stopping early cancels the call.
        `return_full_text=True`: each prompt's first delta starts with the prompt."""
        options, full = generate_options(gen_options)
        originals = self._check_full_text(prompts, full)
        request = self._request(prompts, options)
        call = self._stub.GenerateStream(request, timeout=timeout or self.timeout, metadata=self._metadata)
        started: set[int] = set()
        try:
            for d in call:
                text = d.text
                if full and d.index not in started:
                    text = full_text(originals[d.prompt_index], text, d.index)
                started.add(d.index)
                yield Response(text, d.prompt_length, d.generated_length, d.finish_reason or None, d.index,
                               list(d.token_ids), replica=d.replica, prompt_index=d.prompt_index,
                               cumulative_logprob=d.cumulative_logprob,
                               token_logprobs=[_logprobs(t) for t in d.token_logprobs] or None,
                               prompt_logprobs=[None] + [_logprobs(t) for t in d.prompt_logprobs]
                               if d.prompt_logprobs else None)
        except grpc.RpcError as err:
            raise self._error(err) from None
        finally:
            call.cancel()   # a no-op if the stream ended; frees the server's requests if the caller stopped

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        try:
            r = self._stub.ModelInfo(llm_pb2.ModelInfoRequest(), timeout=timeout or self.timeout,
                                     metadata=self._metadata)
        except grpc.RpcError as err:
            raise self._error(err) from None
        return ModelInfo(r.model, r.architecture, r.tensor_parallel, r.pipeline_parallel, r.max_batch_size,
                         r.session_len, r.replica, r.version, list(r.adapters))

    def terminate_server(self, timeout: float | None = None) -> bool:
        try:
            return self._stub.Terminate(llm_pb2.TerminateRequest(), timeout=timeout or self.timeout,
                                        metadata=self._metadata).accepted
        except grpc.RpcError as err:
            raise self._error(err) from None

    def _error(self, err: grpc.RpcError) -> ClientError:
        error = _error(err)
        if error.code == "UNAUTHENTICATED":   # say which side to fix: no key sent, or one the server refuses
            hint = (f"this client sent no key: give Client(api_key=...) or set ${API_KEY_ENV}"
                    if self._metadata is None else "this client's key was refused")
            return ClientError(error.code, f"{error.message} ({hint})")
        return error

    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _response(r: llm_pb2.Response, replica: str, logprobs: bool, prompt_logprobs: bool) -> Response:
    """A reply's Response; logprobs fields as the pipeline fills them (None where not asked for)."""
    tops = [{t.token_id: t.logprob for t in p.top} for p in r.token_logprobs]
    return Response(r.text, r.prompt_length, r.generated_length, r.finish_reason or None, r.index,
                    list(r.token_ids), list(r.logprobs) if r.logprobs else None,
                    tops if any(tops) else None, replica=replica, prompt_index=r.prompt_index,
                    cumulative_logprob=r.cumulative_logprob,
                    token_logprobs=[_logprobs(t) for t in r.token_logprobs] if logprobs else None,
                    prompt_logprobs=[None] + [_logprobs(t) for t in r.prompt_logprobs] if prompt_logprobs else None)


def _logprobs(p: llm_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(TokenLogprob(p.chosen.token_id, p.chosen.token, p.chosen.logprob),
                         [TokenLogprob(t.token_id, t.token, t.logprob) for t in p.top])


def _error(err: grpc.RpcError) -> ClientError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return ClientError(code.name if code is not None else "UNKNOWN", details or "")

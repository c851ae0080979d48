"""OpenAI's reply shapes for what the workers generated (pure, no torch): choices, logprobs as completions and as
chat give them, tool calls (whole and as stream deltas), usage.

    TokenLogprob("Paris", -0.12, [("Paris", -0.12), (" Lyon", -2.5)])   # a token, its logprob, its top ones
    completion_logprobs(tokens)  -> {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    chat_logprobs(tokens)        -> {"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": None}
"""

from __future__ import annotations

import math
import struct
import uuid
from dataclasses import dataclass, field

from kubellm.runtime.serving.tool_parsers import Call

# JSON has no -infinity: a logprob of a token the sampler ruled out is written as vLLM writes it.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class TokenLogprob:
    token: str                     # the token's text
    logprob: float | None          # None: the first prompt token (nothing before it to predict it)
    top: tuple = ()                # (text, logprob) of the most likely tokens at its position, best first


@dataclass
class Output:
    """One choice as the workers sent it (proto-independent)."""
    index: int                     # the choice's: prompt_index * n + j
    prompt_index: int = 0
    text: str = ""
    finish_reason: str = ""
    prompt_length: int = 0
    generated_length: int = 0
    tokens: list[TokenLogprob] = field(default_factory=list)          # generated, with logprobs where asked
    prompt_tokens: list[TokenLogprob] = field(default_factory=list)   # echo with logprobs: the prompt's


def finite(logprob: float | None) -> float | None:
    """A logprob as JSON writes it: finite, and as short as the float32 it was (-0.1, not -0.10000000149011612)."""
    if logprob is None:
        return None
    if not math.isfinite(logprob):
        return MIN_LOGPROB
    packed = struct.pack("<f", logprob)
    for digits in range(6, 10):
        short = float(f"{logprob:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return logprob


def finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def completion_logprobs(tokens: list[TokenLogprob], offset: int = 0) -> dict:
    """Legacy completions' logprobs: parallel lists, text_offset the character offset of each token in the
    choice's text (from `offset`: where this piece starts in a stream)."""
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t.token)
    return {"tokens": [t.token for t in tokens],
            "token_logprobs": [finite(t.logprob) for t in tokens],
            "top_logprobs": [None if t.logprob is None else {text: finite(lp) for text, lp in t.top}
                             for t in tokens],
            "text_offset": offsets}


def _chat_token(text: str, logprob: float | None) -> dict:
    return {"token": text, "logprob": finite(logprob) if logprob is not None else MIN_LOGPROB,
            "bytes": list(text.encode("utf-8", "surrogatepass"))}


def chat_logprobs(tokens: list[TokenLogprob], top: int) -> dict:
    """Chat's logprobs: one entry per generated token, with its `top` most likely alternatives."""
    return {"content": [{**_chat_token(t.token, t.logprob),
                         "top_logprobs": [_chat_token(text, lp) for text, lp in t.top[:top]]} for t in tokens],
            "refusal": None}


def call_id(mistral: bool = False) -> str:
    """OpenAI's shape (call_ and 24 characters); Mistral's chat templates refuse any id but 9 letters or digits."""
    return uuid.uuid4().hex[:9] if mistral else "call_" + uuid.uuid4().hex[:24]


def tool_calls(calls: list[Call], mistral_ids: bool = False) -> list[dict]:
    return [{"id": call_id(mistral_ids), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in calls]


def tool_call_deltas(call: Call, mistral_ids: bool = False) -> list[dict]:
    """A call as stream deltas, as the openai client accumulates them: id, type and name first, then the arguments."""
    return [{"index": call.index, "id": call_id(mistral_ids), "type": "function",
             "function": {"name": call.name, "arguments": ""}},
            {"index": call.index, "function": {"arguments": call.arguments}}]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

"""The result of one prompt, shared by the in-process pipeline and the gRPC client (no torch).

LMDeploy's names (`input_token_len`, `generate_token_len`, `session_id`) and DeepSpeed-MII's
(`prompt_length`, `generated_length`, `generated_text`) both work. LMDeploy's `logprobs` (a dict of top
alternatives per position) is `top_logprobs` here; `logprobs` holds the chosen tokens' own. `token_logprobs`
holds the same with each token's text (OpenAI's logprobs.content), `prompt_logprobs` the prompt's (vLLM's).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str       # its text, decoded alone
    logprob: float


@dataclass
class TokenLogprobs:
    """One position: its token, and the most likely alternatives, most likely first."""

    chosen: TokenLogprob
    top: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Response:
    """One prompt's result. LMDeploy's and DeepSpeed-MII's field names both work."""

    text: str
    input_token_len: int
    generate_token_len: int
    finish_reason: str | None   # "stop", "length", "abort"; None while streaming
    index: int = 0
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    replica: str = ""           # which worker answered (gRPC client only)
    # LMDeploy's: the engine sequence that ran it, unique within the pipeline (pipeline() only; None from a client)
    session_id: int | None = None
    cumulative_logprob: float | None = None         # the generated tokens' logprobs summed (best_of ranks by it)
    token_logprobs: list[TokenLogprobs] | None = None   # with logprobs: per generated token, with texts
    prompt_logprobs: list[TokenLogprobs | None] | None = None   # with prompt_logprobs: per prompt token (0: None)
    prompt_index: int = 0       # which prompt; `index` is the choice (prompt_index * n + j)

    @property
    def prompt_length(self) -> int:
        return self.input_token_len

    @property
    def generated_length(self) -> int:
        return self.generate_token_len

    @property
    def generated_text(self) -> str:
        return self.text

    def __str__(self) -> str:
        return self.text


def token_logprobs_of(seq, tokenizer) -> list[TokenLogprobs] | None:
    """An engine sequence's generated tokens with their logprobs and alternatives (None without gen.logprobs)."""
    if seq.gen.logprobs is None:
        return None
    generated = seq.token_ids[seq.num_prompt_tokens:]
    tops = seq.top_logprobs
    return [TokenLogprobs(TokenLogprob(generated[k], tokenizer.token_text(generated[k]), lp),
                          [TokenLogprob(t, tokenizer.token_text(t), v) for t, v in tops[k].items()] if k < len(tops)
                          else [])
            for k, lp in enumerate(seq.logprobs)]


def prompt_logprobs_of(seq, tokenizer) -> list[TokenLogprobs | None] | None:
    """An engine sequence's prompt tokens with their logprobs (the first has none: None), or None unasked."""
    if seq.gen.prompt_logprobs is None:
        return None
    ids = seq.token_ids
    return [None] + [TokenLogprobs(TokenLogprob(ids[p + 1], tokenizer.token_text(ids[p + 1]), lp),
                                   [TokenLogprob(t, tokenizer.token_text(t), v) for t, v in top.items()])
                     for p, (lp, top) in enumerate(seq.prompt_logprobs)]

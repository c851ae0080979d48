"""The result of one prompt, shared by the in-process pipeline and the gRPC client (no torch).

LMDeploy's names (`input_token_len`, `generate_token_len`, `session_id`) and DeepSpeed-MII's
(`prompt_length`, `generated_length`, `generated_text`) both work. LMDeploy's `logprobs` (a dict of top
alternatives per position) is `top_logprobs` here; `logprobs` holds the chosen tokens' own.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

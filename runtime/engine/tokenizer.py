"""Tokenizer: prompts and chat messages to ids, ids back to text incrementally."""

from __future__ import annotations

import json
from pathlib import Path

from kubellm.runtime.errors import RequestError


class Tokenizer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(path)
        self.eos_token_ids = self._eos_ids(path)
        self.vocab_size = len(self.hf)

    def _eos_ids(self, path: Path) -> set[int]:
        ids = set()
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            eos = json.loads(gen_file.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.hf.eos_token_id is not None and not ids:
            ids.add(self.hf.eos_token_id)
        return ids

    def encode_prompt(self, prompt, field: str = "prompt") -> list[int]:
        """A string, a list of token ids, or OpenAI-style chat messages -> token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError(f"{field}: empty prompt; give at least one character of text")
            return self.hf.encode(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(t, int) for t in prompt):
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise RequestError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
            return list(prompt)
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.encode_chat(list(prompt), field)
        if isinstance(prompt, (list, tuple)) and not prompt:
            raise RequestError(f"{field}: empty prompt; give text, token ids or chat messages")
        raise RequestError(f"{field}: expected a string, a list of token ids or a list of "
                           f"{{'role', 'content'}} messages, got {type(prompt).__name__}")

    def encode_chat(self, messages: list[dict], field: str = "prompt") -> list[int]:
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RequestError(f"{field}[{i}]: a chat message needs string 'role' and 'content' keys, got {m!r}")
        if not self.hf.chat_template:
            raise RequestError(f"{field}: this model has no chat template; send plain text prompts instead")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template already holds any BOS token it wants.
        return self.hf.encode(text, add_special_tokens=False)

    def word_ids(self, word: str) -> list[list[int]]:
        """Tokenizations of a word as it may appear in text: alone and after a space."""
        variants = {tuple(self.hf.encode(word, add_special_tokens=False)),
                    tuple(self.hf.encode(" " + word, add_special_tokens=False))}
        return [list(v) for v in variants if v]

    def ids_containing(self, word: str) -> list[int]:
        """Every vocabulary token whose text contains `word`."""
        if not hasattr(self, "_token_texts"):
            self._token_texts = self.hf.batch_decode([[i] for i in range(self.vocab_size)])
        return [i for i, text in enumerate(self._token_texts) if word in text]


class IncrementalDetokenizer:
    """Decodes a growing id list to text deltas without re-decoding everything each step.

    A few tokens of context before the new ones keep word-boundary spaces right, and text
    ending in an incomplete UTF-8 character is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool):
        self.tok = tokenizer.hf
        self.skip = skip_special_tokens
        self.prefix_offset = max(len(prompt_ids) - 5, 0)
        self.read_offset = len(prompt_ids)

    def delta(self, all_ids: list[int]) -> str:
        prefix = self.tok.decode(all_ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        text = self.tok.decode(all_ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(all_ids)
        return text[len(prefix):]

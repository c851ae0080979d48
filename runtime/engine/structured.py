"""Structured outputs: a request's JSON schema, regex, choice list or EBNF grammar as a token mask per step.

Built on xgrammar (picked by measurement, docs/structured-outputs.md): a grammar is compiled once per distinct
constraint (JSON schemas here, by their sorted text; the rest by xgrammar's compiler cache), each sequence gets its own matcher, and at every step rank 0's
sampler asks all the batch's matchers for their next-token bitmasks in one call (`SequenceGrammar.fill_rows`:
xgrammar's BatchGrammarMatcher, rows filled in parallel threads into one int32 tensor) and applies them in one op.
A matcher advances only on tokens the engine appends (`accept`), never on a recomputed prefill, so preemption
leaves it where the sequence is. EOS is allowed only where the grammar can end (the tokenizer's stop ids).
"""

from __future__ import annotations

import json
import re
import threading

from kubellm.runtime.config import GenerationConfig
from kubellm.runtime.errors import RequestError

# xgrammar's C++ errors start with a time stamp and a source location: "[19:07:40] /project/cpp/x.cc:94: ..."
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")
# JSON output without a whitespace pattern: compact, as json.dumps writes it. With one, JSON whitespace is allowed,
# at most this many characters in a row, so that a model cannot spend its whole budget on spaces.
_MAX_WHITESPACE = 4


class StructuredOutputs:
    """One engine's grammar machinery: its tokenizer's vocabulary as xgrammar sees it and a caching compiler.
    Made on the first constrained request (xgrammar's vocabulary scan takes about half a second)."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_ids: set[int]):
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size,
                                                       stop_token_ids=sorted(stop_ids) or None)
        self.compiler = xgrammar.GrammarCompiler(info, cache_enabled=True)
        self.vocab_size = vocab_size
        # Special tokens other than the stop ids: xgrammar reads e.g. <|im_start|> as its literal text, which fits
        # inside a JSON string, but they are no text of the output (skip_special_tokens drops them): banned.
        special = set(hf_tokenizer.all_special_ids) | {i for i, t in hf_tokenizer.added_tokens_decoder.items()
                                                       if t.special}
        self.banned_ids = sorted(i for i in special - set(stop_ids) if i < vocab_size)
        self._json_cache: dict = {}   # (schema text, whitespace) -> compiled grammar

    def grammar_for(self, gen: GenerationConfig) -> "SequenceGrammar | None":
        """A fresh matcher for `gen`'s constraint, or None without one. RequestError names the field at fault."""
        compiled = self.compile(gen)
        return None if compiled is None else SequenceGrammar(self._xgr.GrammarMatcher(compiled))

    def compile(self, gen: GenerationConfig):
        """`gen`'s compiled constraint (cached), or None without one. Thread-safe: a server compiles a request's
        constraints off the engine thread before queueing it (LLMEngine.prepare), so that a new schema's compile
        does not hold up every other sequence's steps."""
        fields = gen.guided_fields()
        if not fields:
            return None
        name = fields[0]
        try:
            return self._compile(name, gen)
        except RequestError:
            raise
        except Exception as err:  # noqa: BLE001 - xgrammar raises RuntimeError (and a few of its own) with a reason
            reason = _LOCATION.sub("", str(err).strip()).splitlines()[0] if str(err).strip() else type(err).__name__
            raise RequestError(f"{name}: cannot be compiled: {reason}; fix the {_WHAT[name]}") from None

    def _compile(self, name: str, gen: GenerationConfig):
        c = self.compiler
        if name in ("guided_json", "guided_json_object"):
            schema = _schema_text(gen.guided_json) if name == "guided_json" else '{"type": "object"}'
            return self._compile_json(schema, gen.guided_whitespace_pattern)
        if name == "guided_regex":
            return c.compile_regex(gen.guided_regex)
        if name == "guided_choice":   # each choice a literal of an EBNF alternation (JSON's escapes are EBNF's)
            return c.compile_grammar("root ::= " + " | ".join(json.dumps(s, ensure_ascii=False)
                                                              for s in gen.guided_choice))
        return c.compile_grammar(gen.guided_grammar, root_rule_name="root")

    def _compile_json(self, schema: str, whitespace: str | None):
        """A JSON schema's grammar, compiled once per (schema, whitespace) (the last _CACHED kept)."""
        key = (schema, whitespace)
        if (compiled := self._json_cache.pop(key, None)) is None:
            if whitespace is None:
                options = {"any_whitespace": False}
            elif whitespace == "":
                options = {"any_whitespace": False, "separators": (",", ":")}
            else:
                options = {"any_whitespace": True, "max_whitespace_cnt": _MAX_WHITESPACE}
            ebnf = str(self._xgr.Grammar.from_json_schema(schema, **options))
            for loose in _LOOSE_CHARS:
                ebnf = ebnf.replace(loose, _JSON_CHARS)
            compiled = self.compiler.compile_grammar(ebnf)
        self._json_cache[key] = compiled   # most recently used last
        while len(self._json_cache) > _CACHED:
            self._json_cache.pop(next(iter(self._json_cache)))
        return compiled


# A JSON string's characters as xgrammar 0.2.9 writes them: plain strings as [^\0-\x1f"\\\r\n], which lets UTF-16
# surrogates through (bytes ED A0..BF xx: no UTF-8, decoded as U+FFFD), strings with minLength / maxLength as
# [^"\\\r\n], which also lets control characters through unescaped (RFC 8259 7 forbids both). Replaced by:
_LOOSE_CHARS = ('[^\\0-\\x1f\\"\\\\\\r\\n]', '[^\\"\\\\\\r\\n]')
_JSON_CHARS = '[^\\0-\\x1f\\"\\\\\\r\\n\\uD800-\\uDFFF]'
_CACHED = 256

_WHAT = {"guided_json": "JSON schema", "guided_json_object": "JSON mode", "guided_regex": "regular expression",
         "guided_choice": "choices", "guided_grammar": "EBNF grammar (its start rule is root)"}


def _schema_text(schema: dict | str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise RequestError(f"guided_json: not valid JSON ({err}); send a JSON schema") from None
    if not isinstance(schema, dict):
        raise RequestError(f"guided_json: a JSON schema is an object, got {type(schema).__name__}")
    return json.dumps(schema, sort_keys=True)   # one text per schema, whatever its key order: one cache entry


class SequenceGrammar:
    """One sequence's place in its grammar. The sampler reads its mask (fill_rows); the engine advances it."""

    _batch = None            # one xgrammar BatchGrammarMatcher (its thread pool) for every engine in the process
    _batch_lock = threading.Lock()

    def __init__(self, matcher):
        self.matcher = matcher

    @classmethod
    def fill_rows(cls, grammars: list["SequenceGrammar"], bitmask, rows: list[int]) -> None:
        """Row rows[i] of `bitmask` (int32 [batch, ceil(vocab / 32)], on the host) := grammars[i]'s allowed next
        tokens; all of them in one call, in parallel threads."""
        if cls._batch is None:
            with cls._batch_lock:
                if cls._batch is None:
                    import xgrammar

                    cls._batch = xgrammar.BatchGrammarMatcher(max_threads="auto")
        cls._batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask, rows)

    @staticmethod
    def apply_rows(logits, bitmask, rows: list[int]) -> None:
        """-inf in `logits`' rows `rows` wherever the same row of `bitmask` has the token's bit clear, in place
        (xgrammar's kernel; the sampler uses it for logits on the host)."""
        import xgrammar

        xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=rows)

    def accept(self, token: int) -> bool:
        """Advance past `token` (the engine appended it). False if the grammar refuses it."""
        return self.matcher.accept_token(token)

    @property
    def finished(self) -> bool:
        """The grammar accepted a stop token: nothing may follow."""
        return self.matcher.is_terminated()

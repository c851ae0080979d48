"""Past the trained length: dynamic NTK rotary scaling (rope_scaling_factor, or a checkpoint's own
rope_scaling "dynamic") against transformers, and Qwen's log-n attention scaling (use_logn_attn)
against a direct PyTorch reference of Qwen's formula plugged into transformers' attention.

The tiny Llama is trained for 64 positions (max_position_embeddings); prompts and generations go
past that, so the frequencies change from one step to the next while the keys already in the paged
KV cache keep the rotation they were stored with, as in transformers' own KV cache.
"""

import math

import pytest
import torch

from kubellm.runtime.config import ConfigError, EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.executor.context import AttentionMetadata, PrefillChunk, set_context
from kubellm.runtime.executor.layers.long_context import logn_scale
from kubellm.runtime.executor.layers.rotary import DynamicNTK, RotaryEmbedding

TRAINED = 64
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}
# Prompts of 38 to 129 tokens (two past the trained length already), 40 new tokens each: every one ends past 64.
PROMPTS = [
    "The quick brown fox jumps over the lazy dog and runs into the forest",
    "Please write a short poem about the ocean and the stars. Birds sing in the morning; owls hunt at night.",
    ("Once upon a time, there was a little girl who lived in a village near the forest. " * 3).strip(),
    ("The capital of France is Paris, and the capital of Germany is Berlin. " * 5).strip(),
]
NEW_TOKENS = 40
SHORT = ["Hello", "one two three"]  # + 40 new tokens: within the trained length
LOGPROB_ATOL = 1e-4

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def dynamic_llama(tmp_path_factory):
    from tiny_models import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("dyn"), "llama", max_position_embeddings=TRAINED,
                           rope_scaling=dict(DYNAMIC))


@pytest.fixture(scope="module")
def plain_llama(tmp_path_factory):
    """The same weights (same seed and shapes) without rope_scaling."""
    from tiny_models import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("plain"), "llama", max_position_embeddings=TRAINED)


def _engine(path, **options):
    # One prefill chunk per prompt (a budget of 512 >= the 334 prompt tokens), as transformers' generate computes
    # a whole prompt in one forward pass; the prompts then share every decode step (continuous batching).
    defaults = dict(block_size=4, max_num_batched_tokens=512, num_kv_blocks=256, max_batch_size=8,
                    dtype="float32", device="cpu", session_len=256)
    return LLMEngine(path, EngineConfig.build(**{**defaults, **options}), show_progress=False)


def _generate(engine, prompts_ids, n=NEW_TOKENS):
    gen = GenerationConfig(max_new_tokens=n, logprobs=0, ignore_eos=True)
    try:
        return engine.generate(prompts_ids, [gen] * len(prompts_ids))
    finally:
        engine.destroy()


def _encode(path, prompts):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path)
    return [tokenizer.encode(p) for p in prompts]


def hf_reference(path, prompts_ids, n=NEW_TOKENS, attn_implementation="eager"):
    """transformers' greedy decoding, a fresh model per prompt: its dynamic rotary keeps the longest length
    seen (`max_seq_len_cached`) across generate calls, which would leak one prompt's state into the next."""
    from transformers import AutoModelForCausalLM
    results = []
    for prompt in prompts_ids:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation=attn_implementation).eval()
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, len(prompt):].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
        gaps = [(lambda top: (top[0] - top[1]).item())(step[0].float().topk(2).values) for step in out.logits]
        results.append({"token_ids": tokens, "logprobs": logprobs, "top2_gaps": gaps})
    return results


def assert_same(seqs, refs, prompts_ids):
    for i, (seq, ref) in enumerate(zip(seqs, refs)):
        assert len(prompts_ids[i]) + len(ref["token_ids"]) > TRAINED + 8, "the check must go past the trained length"
        ties = [t for t, gap in enumerate(ref["top2_gaps"]) if gap < 1e-3]
        upto = ties[0] if ties else len(ref["token_ids"])
        assert seq.generated_ids[:upto] == ref["token_ids"][:upto], f"prompt {i}"
        assert seq.logprobs[:upto] == pytest.approx(ref["logprobs"][:upto], abs=LOGPROB_ATOL), f"prompt {i}"
        assert upto > NEW_TOKENS // 2, f"prompt {i}: a near-tie at step {upto} leaves too little compared"


def test_dynamic_ntk_checkpoint_matches_transformers_past_the_trained_length(dynamic_llama, plain_llama):
    ids = _encode(dynamic_llama, PROMPTS)
    assert max(map(len, ids)) > TRAINED + 32 and min(map(len, ids)) < TRAINED
    seqs = _generate(_engine(dynamic_llama), ids)
    assert_same(seqs, hf_reference(dynamic_llama, ids), ids)
    # The scaling did something: transformers without it, on the same weights, gives other logprobs past 64.
    plain = hf_reference(plain_llama, ids)
    assert any(a.logprobs != pytest.approx(b["logprobs"], abs=1e-3) for a, b in zip(seqs, plain))


def test_rope_scaling_factor_option_is_the_checkpoints_dynamic_scaling(dynamic_llama, plain_llama):
    """LMDeploy's rope_scaling_factor on a checkpoint without rope_scaling = HF's rope_scaling dynamic."""
    ids = _encode(plain_llama, PROMPTS)
    option = _generate(_engine(plain_llama, rope_scaling_factor=2.0), ids)
    own = _generate(_engine(dynamic_llama), ids)
    assert [s.generated_ids for s in option] == [s.generated_ids for s in own]
    assert [s.logprobs for s in option] == [s.logprobs for s in own]


def test_within_the_trained_length_dynamic_scaling_changes_nothing(dynamic_llama, plain_llama):
    ids = _encode(plain_llama, SHORT)
    assert all(len(p) + NEW_TOKENS <= TRAINED for p in ids)
    scaled = _generate(_engine(dynamic_llama, session_len=TRAINED), ids)
    plain = _generate(_engine(plain_llama, session_len=TRAINED), ids)
    assert [s.logprobs for s in scaled] == [s.logprobs for s in plain]


def test_decode_steps_take_each_sequences_own_length(dynamic_llama):
    """One forward pass with a decode at 99, a decode at 10 and a prefill chunk ending at 80: each
    token's frequencies are those of its own sequence's length (100, the base ones, 80)."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(dynamic_llama)
    rotary = RotaryEmbedding(config, 16, 256)
    ntk = DynamicNTK(config, 16)
    positions = torch.tensor([99, 10, 77, 78, 79])
    chunk = PrefillChunk(start=2, length=3, context_len=80, block_table=torch.zeros(20, dtype=torch.long))
    set_context(AttentionMetadata(slot_mapping=torch.zeros(5, dtype=torch.long), num_decode=2, prefills=[chunk]))
    try:
        cos, sin = rotary.cos_sin(positions)
    finally:
        set_context(None)
    for row, length in enumerate([100, None, 80, 80, 80]):
        inv_freq = ntk.inv_freq_within() if length is None else ntk.inv_freq_at(torch.tensor([length]))[0]
        angle = positions[row].float() * inv_freq
        assert torch.equal(cos[row], torch.cat([angle, angle]).cos()), row
        assert torch.equal(sin[row], torch.cat([angle, angle]).sin()), row


def test_dynamic_frequencies_are_transformers_own():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for factor, dim in [(2.0, 16), (1.5, 64), (3.7, 128)]:
        config = LlamaConfig(max_position_embeddings=TRAINED, hidden_size=4 * dim, num_attention_heads=4, head_dim=dim,
                             rope_parameters={"rope_type": "dynamic", "factor": factor, "rope_theta": 10000.0})
        ntk = DynamicNTK(config, dim)
        assert torch.equal(ntk.inv_freq_within(), ROPE_INIT_FUNCTIONS["dynamic"](config, torch.device("cpu"))[0])
        lengths = torch.arange(TRAINED + 1, 4 * TRAINED)
        ours = ntk.inv_freq_at(lengths)
        for i, length in enumerate(lengths.tolist()):
            theirs = ROPE_INIT_FUNCTIONS["dynamic"](config, torch.device("cpu"), seq_len=torch.tensor(length))[0]
            # batched float32 pow may round a few units in the last place differently from one sequence's
            torch.testing.assert_close(ours[i], theirs, rtol=1e-6, atol=0)


# -- log-n attention ----------------------------------------------------------------------------------
def qwen_logn(length: int, trained: int) -> list[float]:
    """Qwen's modeling_qwen.py: logn_list = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, ...)]."""
    return [math.log(i, trained) if i > trained else 1 for i in range(1, length + 1)]


def _logn_eager(module, query, key, value, attention_mask, **kwargs):
    """Qwen's scaling in transformers' attention: query positions are the last T of the K keys
    (seq_start = key length - query length), each query times logn_tensor[position]."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    t, k = query.shape[2], key.shape[2]
    logn = torch.tensor(qwen_logn(k, TRAINED)[k - t:k]).type_as(query)[None, None, :, None]
    return eager_attention_forward(module, query * logn.expand_as(query), key, value, attention_mask, **kwargs)


def test_logn_scale_is_qwens_formula():
    positions = torch.arange(0, 300)
    ours = logn_scale(positions, TRAINED)
    assert ours.tolist() == torch.tensor(qwen_logn(300, TRAINED)).tolist()
    assert ours[:TRAINED].eq(1).all() and ours[TRAINED] > 1


def test_logn_attention_matches_a_reference_of_qwens_formula_past_the_trained_length(dynamic_llama):
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    AttentionInterface.register("qwen_logn_eager", _logn_eager)
    AttentionMaskInterface.register("qwen_logn_eager", ALL_MASK_ATTENTION_FUNCTIONS["eager"])  # eager's additive mask
    ids = _encode(dynamic_llama, PROMPTS)
    seqs = _generate(_engine(dynamic_llama, use_logn_attn=True), ids)
    assert_same(seqs, hf_reference(dynamic_llama, ids, attn_implementation="qwen_logn_eager"), ids)
    without = _generate(_engine(dynamic_llama), ids)
    assert any(a.logprobs != pytest.approx(b.logprobs, abs=1e-3) for a, b in zip(seqs, without))


def test_logn_attention_changes_nothing_within_the_trained_length(plain_llama):
    ids = _encode(plain_llama, SHORT)
    assert all(len(p) + NEW_TOKENS <= TRAINED for p in ids)
    with_logn = _generate(_engine(plain_llama, use_logn_attn=True, session_len=TRAINED), ids)
    without = _generate(_engine(plain_llama, session_len=TRAINED), ids)
    assert [s.logprobs for s in with_logn] == [s.logprobs for s in without]


# -- options that cannot apply are refused, naming the option -----------------------------------------
def test_options_that_cannot_apply_are_refused(tmp_path, plain_llama):
    from tiny_models import make_checkpoint
    with pytest.raises(ConfigError, match=r"rope_scaling_factor: .*greater than or equal to 1"):
        EngineConfig.build(rope_scaling_factor=0.5)
    with pytest.raises(ValueError, match=r"session_len: 256 exceeds .* \(64\); .*rope_scaling_factor"):
        _engine(plain_llama)
    gpt2 = make_checkpoint(tmp_path / "gpt2", "gpt2")
    for option in (dict(rope_scaling_factor=2.0), dict(use_logn_attn=True)):
        name = next(iter(option))
        with pytest.raises(ValueError, match=rf"{name}: gpt2 has no rotary embedding"):
            _engine(gpt2, session_len=None, **option)
    llama3 = make_checkpoint(tmp_path / "llama3", "llama3")
    with pytest.raises(ValueError, match=r"rope_scaling_factor: the checkpoint already scales .*'llama3'"):
        _engine(llama3, rope_scaling_factor=2.0)


def test_triton_path_gives_the_reference_tokens_past_the_trained_length(dynamic_llama, monkeypatch):
    """The kernels take the per-token cos/sin and the scaled queries as they take the table's: the Triton
    path (interpreted on CPU) gives the reference path's tokens with dynamic scaling and log-n on."""
    pytest.importorskip("triton")
    from kubellm.kernels import triton_support
    if torch.cuda.is_available() or not triton_support.interpreting():
        pytest.skip("checks the interpreted Triton path on CPU (on a GPU the engine tests run it directly)")
    ids = _encode(dynamic_llama, PROMPTS[2:3])  # 119 tokens, past 64 from the prefill on

    def generate(mode):
        monkeypatch.setenv("KUBELLM_KERNELS", mode)
        seqs = _generate(_engine(dynamic_llama, use_logn_attn=True), ids, n=6)
        return [s.generated_ids for s in seqs], [s.logprobs for s in seqs]

    ref_ids, ref_logprobs = generate("reference")
    from kubellm.kernels import rotary_triton
    calls, kernel = [], rotary_triton.apply_rotary
    monkeypatch.setattr(rotary_triton, "apply_rotary", lambda *a: calls.append(1) or kernel(*a))
    ids_triton, logprobs = generate("triton")
    assert calls and ids_triton == ref_ids
    assert logprobs[0] == pytest.approx(ref_logprobs[0], abs=1e-4)

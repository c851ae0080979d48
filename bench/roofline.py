"""Batch-1 decode speed as a fraction of the memory-bandwidth roofline, on random-weight models.

At batch 1 a decode step must read every weight once (the input embedding excepted: one row
per token) plus the sequence's keys and values; nothing else is close in size. So the fastest
possible step takes (weight bytes + KV bytes) / memory bandwidth, with the bandwidth measured
on this device by a large device-to-device copy. The fraction reported is measured decode
tokens/s over that bound.

The models are built from a config with random weights (EngineConfig.load_format="random"):
a directory with config.json, a small word-level tokenizer and an empty weights file, which
the engine reads like any checkpoint. Nothing is downloaded.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

# Llama-3-8B's config (meta-llama/Meta-Llama-3-8B config.json), and a tiny one with Llama-3.1
# rope scaling for tests on CPU.
RANDOM_MODELS = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
    "llama3-tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}
SPECIAL_TOKENS = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>"]


def make_random_checkpoint(directory: str | Path, name: str) -> Path:
    """A checkpoint directory of the named shape whose weights the engine makes up (load_format=random)."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    from kubellm.bench.workload import WORDS

    if name not in RANDOM_MODELS:
        raise ValueError(f"random model {name!r} is not one of {', '.join(RANDOM_MODELS)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**RANDOM_MODELS[name], rms_norm_eps=1e-5, rope_theta=500000.0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=False, torch_dtype="bfloat16",
                         architectures=["LlamaForCausalLM"])
    config.save_pretrained(directory)
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token=SPECIAL_TOKENS[1],
                            eos_token=SPECIAL_TOKENS[2], pad_token=SPECIAL_TOKENS[0]).save_pretrained(directory)
    save_file({}, directory / "model.safetensors")  # the engine wants a weights file; it stays unread
    return directory


def measure_bandwidth(device: torch.device, size_bytes: int = 2 ** 30, repeats: int = 20) -> float:
    """Bytes/s a decode step can read: on a GPU a large copy (each byte read once and written once); on CPU a
    torch.sum over a 1 GiB buffer (reads only, as a decode step's weights are), the best of `repeats` (2 CPU
    cores shared with other jobs: the best run is the machine's, the others are the neighbours')."""
    if device.type != "cuda":
        return measure_read_bandwidth(size_bytes, min(repeats, 5))
    src = torch.empty(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1e3
    return 2 * size_bytes * repeats / seconds


def measure_read_bandwidth(size_bytes: int = 2 ** 30, repeats: int = 5) -> float:
    """CPU read bandwidth (bytes/s): torch.sum over a float32 buffer of size_bytes, best of `repeats`."""
    buffer = torch.ones(size_bytes // 4, dtype=torch.float32)
    buffer.sum()  # warm-up: pages touched
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - begin)
    return size_bytes / best


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: all of them, except the input embedding (unless the LM head shares
    it). Quantized layers (layers/quantization/) count their packed buffers as stored: a 4-bit weight is a quarter
    of an int8 one, and that is the point of it."""
    from kubellm.runtime.executor.layers.embed_head import ParallelLMHead, VocabParallelEmbedding

    lm_head = getattr(model, "lm_head", None)
    head_tensors = {id(getattr(lm_head, "weight", None)), id(getattr(getattr(lm_head, "quant_method", None), "weight",
                                                                  None))}
    total, seen = 0, set()
    for name, param in model.named_parameters():  # a tied weight is listed once
        if "embed_tokens" in name and id(param) not in head_tensors:
            continue
        seen.add(id(param))
        total += param.numel() * param.element_size()
    for module in model.modules():
        packed = getattr(getattr(module, "quant_method", None), "weight", None)
        if packed is None or not hasattr(packed, "nbytes") or id(packed) in seen:
            continue
        if isinstance(module, VocabParallelEmbedding) and not isinstance(module, ParallelLMHead) \
                and id(packed) not in head_tensors:
            continue   # an untied input embedding: one row per token
        seen.add(id(packed))
        total += packed.nbytes
    return total


def kv_bytes_per_token(runner) -> int:
    layers = runner.attention_layers
    return sum(2 * a.num_kv_heads * a.head_dim for a in layers) * torch.tensor([], dtype=runner.dtype).element_size()


def batch1_decode(engine, prompt_len: int = 512, new_tokens: int = 256, seed: int = 0,
                  bandwidth: float | None = None, rounds: int = 1) -> dict:
    """Decode tokens/s of one sequence (prefill time taken out) and the roofline for it. `bandwidth`: bytes/s
    measured once by the caller (else here); `rounds`: the best of that many (on a shared CPU)."""
    from kubellm.runtime.config import GenerationConfig

    rng = random.Random(seed)
    vocab = len(engine.tokenizer.hf)

    def timed(max_new: int) -> float:
        # A fresh random prompt each time, so no run reuses another's cached prefix.
        prompt = [rng.randrange(len(SPECIAL_TOKENS), vocab) for _ in range(prompt_len)]
        begin = time.perf_counter()
        engine.generate([prompt], [GenerationConfig(max_new_tokens=max_new, ignore_eos=True)])
        return time.perf_counter() - begin

    timed(8)  # warm-up: kernels compiled, allocator settled
    decode_s = min(timed(1 + new_tokens) - timed(1) for _ in range(rounds))
    runner = engine.runner
    bandwidth = bandwidth or measure_bandwidth(runner.device)
    weights = weight_bytes_per_step(runner.model)
    kv = kv_bytes_per_token(runner) * (prompt_len + new_tokens / 2)  # mean context over the decode
    roofline = bandwidth / (weights + kv)
    tok_s = new_tokens / decode_s
    return {"prompt_len": prompt_len, "new_tokens": new_tokens, "decode_tok_s": tok_s,
            "step_ms": 1e3 / tok_s, "bandwidth_GBps": bandwidth / 1e9, "weight_GB": weights / 1e9,
            "kv_GB": kv / 1e9, "roofline_tok_s": roofline, "roofline_fraction": tok_s / roofline,
            "cuda_graphs": runner.decode_graphs is not None}


def format_decode(d: dict) -> str:
    return (f"batch-1 decode {d['decode_tok_s']:8.1f} tok/s ({d['step_ms']:.2f} ms/step, prompt {d['prompt_len']}, "
            f"{d['new_tokens']} new, CUDA graphs {'on' if d['cuda_graphs'] else 'off'})\n"
            f"roofline     {d['roofline_tok_s']:8.1f} tok/s  = {d['bandwidth_GBps']:.0f} GB/s measured / "
            f"({d['weight_GB']:.2f} GB weights + {d['kv_GB'] * 1e3:.1f} MB KV per step)\n"
            f"fraction     {100 * d['roofline_fraction']:8.1f} %  of the memory-bandwidth roofline")

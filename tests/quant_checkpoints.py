"""Quantized copies of the tiny float checkpoints (tiny_models.py), each beside its de-quantized float twin.

    from quant_checkpoints import write_awq, write_gptq, write_gguf
    quantized, reference = write_awq(tiny_llama, tmp_path, group_size=32)

- GGUF: written with the `gguf` package (llama.cpp's Python library): its quantizer (gguf.quants.quantize,
  the format's own algorithm) and its writer, q / k rows permuted as llama.cpp's converter does.
- AWQ / GPTQ: AutoAWQ and GPTQModel need a GPU to quantize (their kernels and calibration) and are not
  installed here, so the weights are quantized by round-to-nearest per group and written in the exact
  on-disk layout those libraries write (AutoAWQ's GEMM packing with its interleaved nibble order;
  GPTQ's v1 layout with zeros stored minus one, g_idx); the packing code is kubellm's own inverse
  (layers/quantization/awq.py's pack_int32).
The reference directory holds float32 weights computed from the stored values exactly as the kernels
de-quantize them (q * scale + min), so kubellm's float path on it is the "de-quantized float reference".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# the decoder linears AutoAWQ / GPTQModel quantize: Llama / Qwen / Gemma, OPT (out_proj, fc1, fc2), Phi (dense),
# Mixtral's experts (w1, w2, w3; the router `gate` stays float, as those libraries keep it)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "fc1", "fc2",
           "dense", "w1", "w2", "w3")


def _state(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _copy_dir(src: Path, dst: Path, skip=("model.safetensors",)) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and any(f".{p}." in name for p in LINEARS)


def _rtn(w, group: int, bits: int = 4, sym: bool = False):
    """Round-to-nearest per group of input columns, as GPTQ's quantizer grids them: (q [N, K] 0..2^bits-1,
    zeros [N, G], scales fp16 [N, G]); `sym`: the grid is centred, every zero (2^bits) / 2."""
    import torch

    n, k = w.shape
    top = 2 ** bits - 1
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scales = ((hi - lo) / top).clamp(min=1e-5).half()
    zeros = torch.full_like(lo, (top + 1) // 2) if sym else torch.round(-lo / scales.float()).clamp(0, top)
    q = torch.clamp(torch.round(g / scales.float().unsqueeze(-1)) + zeros.unsqueeze(-1), 0, top)
    return q.reshape(n, k).to(torch.int32), zeros.to(torch.int32), scales


def _dequantized(q, zeros, scales, group: int):
    """float32 [N, K] as the kernels compute it: q * scale + (-zero * scale)."""
    s = scales.float().repeat_interleave(group, 1)
    return q.float() * s + (-zeros.float() * scales.float()).repeat_interleave(group, 1)


def _write(state: dict, directory: Path, quantization_config: dict | None, src: Path) -> Path:
    from safetensors.torch import save_file

    _copy_dir(src, directory)
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    if quantization_config is not None:
        config = json.loads((directory / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_awq(src: Path, out: Path, group_size: int = 32) -> tuple[Path, Path]:
    from kubellm.runtime.executor.layers.quantization.awq import ORDER, pack_int32

    quantized, reference = {}, {}
    for name, w in _state(src).items():
        if not _is_linear(name):
            quantized[name] = reference[name] = w
            continue
        q, zeros, scales = _rtn(w, group_size)
        base = name.removesuffix(".weight")
        quantized[f"{base}.qweight"] = pack_int32(q.t().contiguous(), ORDER)          # [K, N/8]
        quantized[f"{base}.qzeros"] = pack_int32(zeros.t().contiguous(), ORDER)       # [G, N/8]
        quantized[f"{base}.scales"] = scales.t().contiguous()                         # [G, N] fp16
        reference[name] = _dequantized(q, zeros, scales, group_size)
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return (_write(quantized, out / "awq", config, src), _write(reference, out / "awq-reference", None, src))


# the projections that read one input: real GPTQ orders their columns by one Hessian, so by one permutation
SHARED_INPUT = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "gate_proj": "mlp_in",
                "up_proj": "mlp_in", "w1": "mlp_in", "w3": "mlp_in"}


def _act_order(name: str, k: int, shared: bool, cache: dict):
    """GPTQ's act-order: a permutation of the input columns (its Hessian's descending diagonal; random here)."""
    import torch

    parent, proj = name.split(".")[:-2], name.split(".")[-2]   # the attention / MLP / expert the projection is in
    key = (".".join(parent), SHARED_INPUT.get(proj, proj) if shared else proj)
    if key not in cache:
        cache[key] = torch.randperm(k, generator=torch.Generator().manual_seed(len(cache) + 1))
    return cache[key]


def write_gptq(src: Path, out: Path, group_size: int = 32, desc_act: bool = False, shared_order: bool = True,
               bits: int = 4, sym: bool = False) -> tuple[Path, Path]:
    """`desc_act`: quantize the columns in a random order per input (per projection unless `shared_order`),
    groups of group_size in that order, and write g_idx as GPTQ does (each column's group). `bits` 4 or 8."""
    import torch
    from kubellm.runtime.executor.layers.quantization.awq import pack_int32

    quantized, reference, orders = {}, {}, {}
    for name, w in _state(src).items():
        if not _is_linear(name):
            quantized[name] = reference[name] = w
            continue
        k = w.shape[1]
        group = k if group_size == -1 else group_size   # -1: one group per output channel
        perm = _act_order(name, k, shared_order, orders) if desc_act else torch.arange(k)
        q, zeros, scales = _rtn(w[:, perm], group, bits, sym)
        zeros = zeros.clamp(min=1)   # v1 stores zero - 1; a zero of 0 would wrap to 15 (AutoGPTQ's known quirk)
        inverse = torch.argsort(perm)
        base = name.removesuffix(".weight")
        quantized[f"{base}.qweight"] = pack_int32(q[:, inverse].contiguous(), bits=bits).t().contiguous()  # [K/p, N]
        quantized[f"{base}.qzeros"] = pack_int32((zeros - 1).t().contiguous(), bits=bits)            # [G, N/p]
        quantized[f"{base}.scales"] = scales.t().contiguous()
        quantized[f"{base}.g_idx"] = (inverse // group).to(torch.int32)
        reference[name] = _dequantized(q, zeros, scales, group)[:, inverse]
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
              "checkpoint_format": "gptq"}
    name = ("gptq" if group_size != -1 else "gptq-per-channel") + ("-act-order" if desc_act else "")
    name += ("" if shared_order else "-unshared") + ("" if bits == 4 else f"-{bits}bit") + ("-sym" if sym else "")
    return (_write(quantized, out / name, config, src), _write(reference, out / f"{name}-reference", None, src))


GGUF_LINEARS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def _permute(w, heads: int):
    """llama.cpp's convert_hf_to_gguf permute of q / k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's fallback for a K-quant tensor whose rows are not a multiple of 256 (llama-quant.cpp)
K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def _quantize_q4_k(x):
    """Q4_K blocks of [n, k] float32, round-to-nearest: per 256 columns fp16 d and dmin, and per 32 a 6-bit scale
    and min (w = q * d * sc - dmin * m), laid out as ggml's block_q4_K (gguf-py quantizes no K-quant)."""
    import numpy as np

    n = x.shape[0]
    sub = x.reshape(n, -1, 8, 32)
    low = np.minimum(sub.min(-1), 0)
    scale, minimum = (sub.max(-1) - low) / 15, -low
    d, dmin = (scale.max(-1) / 63).astype(np.float16), (minimum.max(-1) / 63).astype(np.float16)
    sc = _rounded_ratio(scale, d.astype(np.float32)[..., None], 0, 63).astype(np.uint8)
    m = _rounded_ratio(minimum, dmin.astype(np.float32)[..., None], 0, 63).astype(np.uint8)
    step, base = d.astype(np.float32)[..., None] * sc, dmin.astype(np.float32)[..., None] * m
    q = _rounded_ratio(sub + base[..., None], step[..., None], 0, 15).astype(np.uint8).reshape(n, -1, 4, 2, 32)
    scales = np.concatenate([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6), (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
                             (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], axis=-1)
    qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(n, -1, 128)
    return np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), scales, qs], -1).reshape(n, -1)


def _quantize_q6_k(x):
    """Q6_K blocks: per 256 columns an fp16 d, per 16 an int8 scale, 6-bit values (w = (q - 32) * d * sc), laid
    out as ggml's block_q6_K: low nibbles, 2-bit highs, scales, d."""
    import numpy as np

    n = x.shape[0]
    sub = x.reshape(n, -1, 16, 16)
    scale = np.abs(sub).max(-1) / 31
    d = (scale.max(-1) / 127).astype(np.float16)
    sc = _rounded_ratio(scale, d.astype(np.float32)[..., None], -128, 127).astype(np.int8)
    step = d.astype(np.float32)[..., None] * sc
    q = (_rounded_ratio(sub, step[..., None], -32, 31) + 32).astype(np.uint8).reshape(n, -1, 2, 128)
    ql = (q[..., :64] & 15) | ((q[..., 64:] & 15) << 4)
    high = q >> 4
    qh = high[..., :32] | (high[..., 32:64] << 2) | (high[..., 64:96] << 4) | (high[..., 96:] << 6)
    nb = q.shape[1]
    return np.concatenate([ql.reshape(n, nb, 128), qh.reshape(n, nb, 64), sc.view(np.uint8),
                           d[..., None].view(np.uint8)], -1).reshape(n, -1)


def _rounded_ratio(x, step, lo: int, hi: int):
    import numpy as np

    safe = np.where(step != 0, step, 1)
    return np.where(step != 0, np.round(x / safe), 0).clip(lo, hi)


def _gguf_quantize(array, qtype: str):
    """(bytes, the type written): gguf-py's quantizer, or the K-quant writers above (llama.cpp's fallback type
    where the rows are not a multiple of 256)."""
    import gguf

    if qtype in K_FALLBACK and array.shape[-1] % 256:
        qtype = K_FALLBACK[qtype]
    t = gguf.GGMLQuantizationType[qtype]
    writers = {"Q4_K": _quantize_q4_k, "Q6_K": _quantize_q6_k}
    return (writers[qtype](array) if qtype in writers else gguf.quants.quantize(array, t)), t


def write_gguf(src: Path, out: Path, qtype: str = "Q4_0", embedding_qtype: str = "Q8_0",
               mixture: dict[str, str] | None = None, name: str | None = None) -> tuple[Path, Path]:
    """(directory with config.json, tokenizer and model.gguf; its float32 reference from gguf's de-quantizer).
    `mixture`: another type for some projections ({"v_proj": "Q6_K", ...}, as llama.cpp's Q4_K_M mixes Q4_K
    and Q6_K); `name` names the directory (gguf-<name>, default the qtype).
    Llama-family checkpoints are written as llama.cpp's converter writes them: architecture "llama" with q / k
    rows permuted, or "qwen2" / "qwen3" (rows as they are; Qwen2's q / k / v biases and Qwen3's q / k norms
    in F32). The file also carries the tokenizer as llama.cpp's converter writes a byte-level BPE one
    (`tokenizer.ggml.*`: tokens, merges, token types, special ids, chat template), so model.gguf alone is a
    model too, as llama.cpp users have it."""
    import gguf
    import numpy as np
    import torch

    config = json.loads((src / "config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    arch = config["model_type"] if config["model_type"] in ("qwen2", "qwen3") else "llama"
    state = _state(src)
    label = name or qtype
    directory = _copy_dir(src, out / f"gguf-{label}")
    writer = gguf.GGUFWriter(str(directory / "model.gguf"), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["head_dim"])
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, src)
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(config))
    reference = {}

    def add(gguf_name: str, hf: str, w: torch.Tensor, kind: str):
        array = w.float().numpy()
        if kind == "F32":
            writer.add_tensor(gguf_name, array)
            reference[hf] = w.float()
            return
        data, t = _gguf_quantize(array, kind)
        writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=t)
        reference[hf] = torch.from_numpy(gguf.quants.dequantize(data, t).astype(np.float32))

    for name, w in state.items():
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            add("token_embd.weight", name, w, embedding_qtype)
        elif name == "lm_head.weight":
            add("output.weight", name, w, embedding_qtype)
        elif name == "model.norm.weight":
            add("output_norm.weight", name, w, "F32")
        elif parts[:2] == ["model", "layers"]:
            i, module = parts[2], parts[-2]
            if module in GGUF_LINEARS and parts[-1] == "bias":
                add(f"blk.{i}.{GGUF_LINEARS[module]}.bias", name, w, "F32")
            elif module in GGUF_LINEARS:
                gguf_name = f"blk.{i}.{GGUF_LINEARS[module]}.weight"
                kind = (mixture or {}).get(module, qtype)
                if arch == "llama" and module in ("q_proj", "k_proj"):   # permuted; the reference keeps HF order
                    h = heads if module == "q_proj" else kv_heads
                    add(gguf_name, name, _permute(w, h), kind)
                    reference[name] = _permute_back(reference[name], h)
                else:
                    add(gguf_name, name, w, kind)
            else:
                norm = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                        "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}[module]
                add(f"blk.{i}.{norm}.weight", name, w, "F32")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return directory, _write(reference, out / f"gguf-{label}-reference", None, src)


def _llama3_rope_freqs(config: dict):
    """llama.cpp's converter's rope_freqs for Llama 3's rope scaling (LlamaModel.generate_extra_tensors)."""
    import math

    import numpy as np

    scaling, dim = config["rope_scaling"], config["head_dim"]
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi / (1.0 / config["rope_theta"] ** (i / dim))
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _add_tokenizer(writer, src: Path) -> None:
    """llama.cpp's converter's `tokenizer.ggml.*` for a byte-level BPE tokenizer.json (its `_set_vocab_gpt2`)."""
    import gguf

    tokenizer = json.loads((src / "tokenizer.json").read_text())
    settings = json.loads((src / "tokenizer_config.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    special = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab.update(special)
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = tokenizer["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(special[settings["bos_token"]])
    writer.add_eos_token_id(special[settings["eos_token"]])
    writer.add_pad_token_id(special[settings["pad_token"]])
    writer.add_add_bos_token(False)
    if settings.get("chat_template"):
        writer.add_chat_template(settings["chat_template"])


def _permute_back(w, heads: int):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_compressed_tensors(src: Path, out: Path, fmt: str = "pack-quantized", bits: int = 4, kind: str = "int",
                             strategy: str = "group", group_size: int = 32, symmetric: bool = True,
                             actorder: str | None = None, ignore: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A compressed-tensors checkpoint written by the library itself (llm-compressor's last steps): its
    QuantizationConfig applied to the transformers model, each Linear's scales / zero points from its own
    calculate_qparams on the weight's min / max (round-to-nearest; llm-compressor's GPTQ would search
    better values, in the same layout), then its ModelCompressor compresses and saves. The reference is
    the same model after the library's own decompress_model: float weights it de-quantized.
    (compressed-tensors 0.20 no longer writes actorder 'group' / weight_g_idx; kubellm still reads it.)"""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, type=kind, symmetric=symmetric, strategy=strategy,
                            group_size=group_size if strategy == "group" else None, actorder=actorder)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                ignore=["lm_head", *ignore], format=fmt)
    apply_quantization_config(model, config)
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        w = module.weight.data
        n, k = w.shape
        if strategy == "group":
            grouped = w.reshape(n, k // group_size, group_size)
            lo, hi = grouped.amin(-1), grouped.amax(-1)
        elif strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        else:
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        scale, zero = calculate_qparams(lo, hi, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    name = f"ct-{fmt}-{kind}{bits}-{strategy}" + ("" if symmetric else "-asym") + (f"-{actorder}" if actorder else "")
    name += f"-ignore{len(ignore)}" if ignore else ""
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    model.save_pretrained(out / name)
    compressor.update_config(out / name)
    _copy_dir(src, out / name, skip=[f.name for f in (out / name).iterdir()])   # the tokenizer
    compressor.decompress_model(model)
    reference = {k: v for k, v in model.state_dict().items() if not k.rsplit(".", 1)[-1].startswith("weight_")}
    directory = _copy_dir(src, out / f"{name}-reference")
    save_file({k: v.float().contiguous() for k, v in reference.items()}, str(directory / "model.safetensors"))
    return out / name, directory


FP8_MAX = 448.0   # float8 e4m3's largest value


def write_fp8(src: Path, out: Path, block: tuple[int, int] | None = (16, 16)) -> tuple[Path, Path]:
    """transformers' FP8 layout (`quant_method: fp8`; FineGrainedFP8 cannot quantize without a GPU, so written
    here as it writes): each linear's weight in float8 e4m3, scaled per block of `block` (rows, columns) so
    the block's largest magnitude is 448, `weight_scale_inv` [ceil(N / rows), ceil(K / columns)] the factor
    that multiplies it back (the last block of a row or column may be partial). `block` None: AutoFP8's
    layout, one `weight_scale` per tensor (0-d) and a static `input_scale` beside it."""
    import torch

    quantized, reference = {}, {}
    for name, w in _state(src).items():
        if not _is_linear(name):
            quantized[name] = reference[name] = w
            continue
        base, (n, k) = name.removesuffix(".weight"), w.shape
        if block is None:
            scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
            expanded = scale
            quantized[f"{base}.weight_scale"] = scale.float()
            quantized[f"{base}.input_scale"] = torch.tensor(0.02)
        else:
            rows, cols = block
            rb, cb = -(-n // rows), -(-k // cols)
            padded = torch.zeros(rb * rows, cb * cols)
            padded[:n, :k] = w.abs()
            scale = (padded.reshape(rb, rows, cb, cols).amax((1, 3)) / FP8_MAX).clamp(min=1e-12)
            expanded = scale.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]
            quantized[f"{base}.weight_scale_inv"] = scale.float()
        q = (w / expanded).to(torch.float8_e4m3fn)
        quantized[name] = q
        reference[name] = q.float() * expanded
    config = {"quant_method": "fp8", "activation_scheme": "dynamic" if block else "static"}
    config["weight_block_size"] = list(block) if block else None
    name = "fp8-" + (f"block{block[0]}x{block[1]}" if block else "tensor")
    return (_write(quantized, out / name, config, src), _write(reference, out / f"{name}-reference", None, src))


# llama.cpp's metadata for families whose converter stores every tensor as it is (no permutation, no offset),
# under gguf's own name map: what transformers de-quantizes and kubellm serves float.
def _rotary_dims(config) -> int:
    factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
    return int(factor * (config.hidden_size // config.num_attention_heads))


def _stablelm_metadata(writer, config):
    writer.add_rope_dimension_count(_rotary_dims(config))
    writer.add_parallel_residual(bool(config.use_parallel_residual))
    writer.add_layer_norm_eps(config.layer_norm_eps)


def _phi3_metadata(writer, config):
    writer.add_rope_dimension_count(_rotary_dims(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)


NAME_MAP_FAMILIES = {"stablelm": ("STABLELM", _stablelm_metadata), "phi3": ("PHI3", _phi3_metadata)}


def write_gguf_by_name_map(src: Path, out: Path, qtype: str = "Q8_0") -> tuple[Path, Path]:
    """(model.gguf alone in a directory, the float32 twin of its de-quantized values) for a StableLM or Phi-3
    checkpoint: every 2-D weight in `qtype`, norms and biases F32, names from gguf's tensor map for the
    architecture, metadata and tokenizer as llama.cpp's converter writes them."""
    import gguf
    import numpy as np
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(src)
    arch_name, metadata = NAME_MAP_FAMILIES[config.model_type]
    arch = gguf.MODEL_ARCH[arch_name]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    directory = out / f"gguf-{config.model_type}-{qtype}"
    directory.mkdir(parents=True)
    writer = gguf.GGUFWriter(str(directory / "model.gguf"), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    metadata(writer, config)
    _add_tokenizer(writer, src)
    reference = {}
    for name, w in _state(src).items():
        base, suffix = name.rsplit(".", 1)
        gguf_name = f"{names.get_name(base)}.{suffix}"
        if w.dim() == 2:
            data, t = _gguf_quantize(w.float().numpy(), qtype)
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=t)
            reference[name] = torch.from_numpy(gguf.quants.dequantize(data, t).astype(np.float32))
        else:
            writer.add_tensor(gguf_name, w.float().numpy())
            reference[name] = w.float()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return directory / "model.gguf", _write(reference, out / f"gguf-{config.model_type}-{qtype}-reference", None, src)


def write_q4_k_m(out: Path) -> tuple[Path, Path]:
    """A tiny Llama 256 wide (a K-quant's rows are multiples of 256) as llama.cpp's Q4_K_M mixes its types: Q4_K,
    with Q6_K for attn_v, ffn_down and the token embedding (untied: the output too)."""
    from tiny_models import make_checkpoint

    # initializer_range 0.1: the tiny models' gain per layer at 4x their width (0.2 * sqrt(64) = 0.1 * sqrt(256))
    src = make_checkpoint(out / "llama-256", "llama", hidden_size=256, intermediate_size=512, head_dim=64,
                          initializer_range=0.1)
    return write_gguf(src, out, "Q4_K", embedding_qtype="Q6_K", mixture={"v_proj": "Q6_K", "down_proj": "Q6_K"},
                      name="Q4_K_M")

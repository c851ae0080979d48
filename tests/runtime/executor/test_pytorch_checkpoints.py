"""PyTorch `.bin` checkpoints (PiPPy's and older Hub models): `pytorch_model.bin`, and shards named by
`pytorch_model.bin.index.json`. Greedy tokens equal to transformers and to the safetensors copy, under
tensor parallel 2 and pipeline parallel 2 (both split policies read the shapes); each rank reads only
its tensors (its rows / columns, never another stage's shard), through a memory map, not a read.

transformers 5 writes safetensors whatever `safe_serialization` says, so the `.bin` copies are written
here as transformers 4's `save_pretrained(safe_serialization=False)` wrote them: `torch.save` of each
shard of the state dict (split by huggingface_hub, as transformers did) plus the index.
"""

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from kubellm.runtime.config import EngineConfig, GenerationConfig
from kubellm.runtime.engine.engine import LLMEngine
from kubellm.runtime.executor import parallel
from kubellm.runtime.executor.checkpoint import find_checkpoint
from kubellm.runtime.executor.loader import ModelDirError, check_model_dir, load_hf_config, load_weights
from kubellm.runtime.executor.models import model_class
from kubellm.runtime.executor.stages import PipelineStage, checkpoint_sizes

PROMPTS = ["Hello", "The quick brown fox jumps over the lazy dog, and then",
           "Once upon a time, there was a little girl who lived in a village near the forest.",
           "What is the meaning of life?"]


def save_bin(source, dest, max_shard_size=None, legacy=False):
    """A copy of the safetensors checkpoint `source` as PyTorch .bin file(s) in `dest`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import load_file

    dest.mkdir(parents=True, exist_ok=True)
    state_dict = {}
    for item in source.iterdir():
        if item.suffix == ".safetensors":
            state_dict.update(load_file(item))
        elif not item.name.startswith("model.safetensors"):
            shutil.copy(item, dest / item.name)
    split = split_torch_state_dict_into_shards(state_dict, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size=max_shard_size or "10GB")
    for name, tensors in split.filename_to_tensors.items():
        torch.save({t: state_dict[t].contiguous() for t in tensors}, dest / name,
                   _use_new_zipfile_serialization=not legacy)
    if split.is_sharded:
        (dest / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
    return dest


@pytest.fixture(scope="module")
def bin_llama(tiny_llama, tmp_path_factory):
    return save_bin(tiny_llama, tmp_path_factory.mktemp("bin_llama"))


@pytest.fixture(scope="module")
def bin_llama_sharded(tiny_llama, tmp_path_factory):
    # ~60 kB shards: each decoder layer's tensors spread over their own files
    return save_bin(tiny_llama, tmp_path_factory.mktemp("bin_llama_sharded"), max_shard_size=60_000)


def _generate(path, **options):
    config = EngineConfig(device="cpu", block_size=4, num_kv_blocks=96, max_num_batched_tokens=16, session_len=128,
                          **options)
    engine = LLMEngine(path, config, show_progress=False)
    try:
        gens = [GenerationConfig(max_new_tokens=8 + i, ignore_eos=True) for i in range(len(PROMPTS))]
        return [s.token_ids for s in engine.generate(PROMPTS, gens)]
    finally:
        engine.destroy()


# -- the files ------------------------------------------------------------------------------------
def test_found_as_pytorch_and_safetensors_is_preferred(tiny_llama, bin_llama, bin_llama_sharded, tmp_path):
    single, sharded = find_checkpoint(bin_llama), find_checkpoint(bin_llama_sharded)
    assert single.format == "pytorch" and [f.name for f in single.files] == ["pytorch_model.bin"]
    assert sharded.format == "pytorch" and len(sharded.files) > 4 and sharded.weight_map
    # Both formats: safetensors is read; a broken .bin beside it is never opened.
    both = shutil.copytree(tiny_llama, tmp_path / "both")
    (both / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    assert find_checkpoint(both).format == "safetensors"
    assert _generate(both) == _generate(tiny_llama)


def test_a_directory_without_weights_names_both_formats(bin_llama, tmp_path):
    empty = shutil.copytree(bin_llama, tmp_path / "empty", ignore=shutil.ignore_patterns("*.bin"))
    with pytest.raises(ModelDirError, match=r"no weights; add model.safetensors .* or PyTorch's pytorch_model.bin "
                                            r"\(or shards with pytorch_model.bin.index.json\)"):
        check_model_dir(empty)
    check_model_dir(bin_llama)


def test_an_index_naming_a_missing_shard_is_refused(bin_llama_sharded, tmp_path):
    broken = shutil.copytree(bin_llama_sharded, tmp_path / "broken")
    (broken / "pytorch_model-00002-of-{:05d}.bin".format(len(find_checkpoint(broken).files))).unlink()
    with pytest.raises(ModelDirError, match=r"pytorch_model.bin.index.json .* names shards that are not there: "
                                            r"pytorch_model-00002-of-"):
        check_model_dir(broken)


def test_pickled_code_is_refused_and_a_legacy_file_still_loads(bin_llama, tiny_llama, tmp_path):
    hostile = shutil.copytree(bin_llama, tmp_path / "hostile")
    state_dict = torch.load(bin_llama / "pytorch_model.bin", weights_only=True)
    torch.save({**state_dict, "extra": print}, hostile / "pytorch_model.bin")  # a callable: code on unpickling
    with pytest.raises(ModelDirError, match=r"pytorch_model.bin cannot be read as a PyTorch checkpoint with "
                                            r"weights_only=True .* Re-save it as safetensors"):
        _generate(hostile)
    legacy = save_bin(tiny_llama, tmp_path / "legacy", legacy=True)  # torch's pre-1.6 format: no memory map
    assert _generate(legacy) == _generate(tiny_llama)


# -- the same tokens --------------------------------------------------------------------------------
@pytest.mark.model
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_greedy_tokens_match_transformers_and_the_safetensors_copy(layout, bin_llama, bin_llama_sharded, tiny_llama):
    from parity import assert_matches_hf, encode, engine_for, run

    path = bin_llama if layout == "single" else bin_llama_sharded
    engine = engine_for(path, max_num_batched_tokens=16)  # chunked prefill mixed into decodes
    ids = encode(engine, PROMPTS)
    seqs = run(engine, ids)
    engine.destroy()
    assert_matches_hf(path, ids, seqs)  # transformers reads the .bin files itself
    safetensors = engine_for(tiny_llama, max_num_batched_tokens=16)
    assert [s.generated_ids for s in run(safetensors, ids)] == [s.generated_ids for s in seqs]
    safetensors.destroy()


@pytest.mark.multiprocess
def test_tensor_parallel_2_reads_bin_shards(bin_llama_sharded, tiny_llama):
    assert _generate(bin_llama_sharded, tensor_parallel=2) == _generate(tiny_llama)


@pytest.mark.multiprocess
@pytest.mark.parametrize("split", ["equal_size", "threshold"])
def test_pipeline_parallel_2_reads_bin_shards(bin_llama_sharded, tiny_llama, split):
    layers, first, last = checkpoint_sizes(bin_llama_sharded, 2)
    assert (layers, first, last) == checkpoint_sizes(tiny_llama, 2)  # the planner's sizes, from the .bin shapes
    options = {} if split == "equal_size" else dict(pipeline_split="threshold",
                                                     pipeline_stage_bytes=(first + layers[0]) * 4)
    assert _generate(bin_llama_sharded, pipeline_parallel=2, **options) == _generate(tiny_llama)


# -- what each rank reads ----------------------------------------------------------------------------------
def _model(path, stage=None):
    hf_config = load_hf_config(path)
    with torch.device("cpu"):
        return model_class(hf_config)(hf_config, 128, stage)


def _param_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_a_pipeline_stage_reads_only_its_layers_and_skips_other_stages_shards(bin_llama_sharded):
    report = load_weights(_model(bin_llama_sharded, PipelineStage(1, 2, 1, 2)), bin_llama_sharded, show_progress=False)
    assert report.tensors and all(".layers.1." in n or n in ("model.norm.weight", "lm_head.weight")
                                  for n in report.tensors), report.tensors
    index = find_checkpoint(bin_llama_sharded).weight_map
    never_opened = {f for f in set(index.values()) if all(".layers.0." in n or "embed_tokens" in n
                                                          for n, g in index.items() if g == f)}
    assert never_opened and set(report.files_skipped) == never_opened
    first = load_weights(_model(bin_llama_sharded, PipelineStage(0, 2, 0, 1)), bin_llama_sharded, show_progress=False)
    assert not set(first.tensors) & set(report.tensors)
    assert sorted(first.tensors + report.tensors) == sorted(index)  # together, every tensor once


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_a_tensor_rank_takes_only_its_rows_and_columns(layout, bin_llama, bin_llama_sharded, monkeypatch):
    path = bin_llama if layout == "single" else bin_llama_sharded
    whole = load_weights(_model(path), path, show_progress=False)
    assert whole.bytes_read == whole.checkpoint_bytes
    # Tensor rank 1 of 2 (the state torch.distributed would give it; loading runs no collective).
    monkeypatch.setattr(parallel, "_state", parallel.ParallelState(tp=2, pp=1, rank=1))
    model = _model(path)
    report = load_weights(model, path, show_progress=False)
    assert report.checkpoint_bytes == whole.checkpoint_bytes  # every tensor visited ...
    assert report.bytes_read == _param_bytes(model) < 0.6 * whole.bytes_read  # ... for its half only


def test_a_stage_maps_the_file_instead_of_reading_it(tmp_path):
    """Bytes read through read() by a process loading the second of two stages from a 17 MB .bin:
    with the memory map only the pickled metadata, not the weights (torch.load without mmap, the
    control, reads all of it)."""
    from tiny_models import make_checkpoint
    source = make_checkpoint(tmp_path / "wide", "llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=4, head_dim=64)
    path = save_bin(source, tmp_path / "wide_bin")
    size = (path / "pytorch_model.bin").stat().st_size
    script = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from kubellm.runtime.executor.loader import load_hf_config, load_weights
        from kubellm.runtime.executor.models import model_class
        from kubellm.runtime.executor.stages import PipelineStage

        def rchar():
            return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])

        path = Path({str(path)!r})
        hf_config = load_hf_config(path)
        model = model_class(hf_config)(hf_config, 64, PipelineStage(1, 2, 2, 4))
        before = rchar()
        if sys.argv[1] == "mmap":
            load_weights(model, path, show_progress=False)
        else:
            torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        print(rchar() - before)
    """)
    read = {how: int(subprocess.run([sys.executable, "-c", script, how], check=True, capture_output=True,
                                    text=True).stdout.split()[-1]) for how in ("mmap", "read")}
    assert size > 15e6 and read["read"] >= size, (size, read)
    assert read["mmap"] < 0.02 * size, (size, read)

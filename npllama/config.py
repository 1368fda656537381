"""Model configuration: the one source of truth for every size in the model, and for the names
of its weights.

Every checkpoint format builds the same `ModelArgs` from its own metadata (params.json,
config.json, GGUF keys: npllama/formats/). Nothing in npllama hard-codes a size: the notebook's 17
tokens, `head // 4`, `/ 128 ** 0.5` and `range(64) / 64` are all derived from here.
`LAYER_TENSORS` and `GLOBAL_TENSORS` name each weight in every format npllama reads; the readers,
the shape checks and the forward pass derive their names from this one table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

from .errors import ConfigError, PromptTooLongError


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

    @property
    def q_width(self) -> int:
        """Rows of wq: every query head's head_dim outputs, side by side."""
        return self.n_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Rows of wk and wv: one head_dim block per key/value head."""
        return self.n_kv_heads * self.head_dim

    def shape_of(self, tensor: Tensor) -> tuple[int, ...]:
        return tuple(getattr(self, size) for size in tensor.shape)

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Meta's name and shape of every weight this configuration implies."""
        shapes = {t.meta: self.shape_of(t) for t in GLOBAL_TENSORS
                  if not (t is OUTPUT and self.tie_embeddings)}
        for i in range(self.n_layers):
            shapes.update({layer_name(t.meta, i): self.shape_of(t) for t in LAYER_TENSORS})
        return shapes


def fits(n_cached: int, n_new: int, context: int, generating: bool = False) -> bool:
    """The one rule for what fits: every token, cached, fed in, or generated next, needs a
    position below the context length. `generating`: the prompt must leave one for a new token."""
    return n_cached + n_new + generating <= context


def check_fits(n_cached: int, n_new: int, context: int, generating: bool = False) -> None:
    if not fits(n_cached, n_new, context, generating):
        raise PromptTooLongError(
            f"{n_cached + n_new + generating} positions needed ({n_new} new tokens"
            f"{f' after {n_cached} cached ones' if n_cached else ''}"
            f"{', and 1 to generate' if generating else ''}) but max_seq_len is {context}: shorten the "
            "prompt, load the model with a larger max_seq_len (--max-seq-len), or pass --truncate to "
            "keep only the prompt's end")


class Tensor(NamedTuple):
    """One weight of a Llama, as each checkpoint format names it."""

    meta: str  # Meta's name; per-layer names follow LAYER_PREFIX
    shape: tuple[str, ...]  # the ModelArgs sizes of its axes: [out, in] for a matrix
    split_axis: int | None  # the axis Meta's model-parallel shards split it on (None: replicated)
    gguf: str  # llama.cpp's name
    hf: str  # Hugging Face's name

    @property
    def key(self) -> str:
        """The short name the forward pass uses: wq, w2, attention_norm..."""
        return self.meta.split(".")[-2]


# Per layer. Meta splits column-parallel layers (wq, wk, wv, w1, w3) by output rows and
# row-parallel ones (wo, w2) by input columns, each followed by an all-reduce; norms are replicated.
# The order is the one random test checkpoints draw their values in.
LAYER_TENSORS = (
    #      Meta                      shape                  split  GGUF                  Hugging Face
    Tensor("attention.wq.weight",    ("q_width", "dim"),    0,     "attn_q.weight",      "self_attn.q_proj.weight"),
    Tensor("attention.wk.weight",    ("kv_width", "dim"),   0,     "attn_k.weight",      "self_attn.k_proj.weight"),
    Tensor("attention.wv.weight",    ("kv_width", "dim"),   0,     "attn_v.weight",      "self_attn.v_proj.weight"),
    Tensor("attention.wo.weight",    ("dim", "q_width"),    1,     "attn_output.weight", "self_attn.o_proj.weight"),
    Tensor("feed_forward.w1.weight", ("hidden_dim", "dim"), 0,     "ffn_gate.weight",    "mlp.gate_proj.weight"),
    Tensor("feed_forward.w2.weight", ("dim", "hidden_dim"), 1,     "ffn_down.weight",    "mlp.down_proj.weight"),
    Tensor("feed_forward.w3.weight", ("hidden_dim", "dim"), 0,     "ffn_up.weight",      "mlp.up_proj.weight"),
    Tensor("attention_norm.weight",  ("dim",),              None,  "attn_norm.weight",   "input_layernorm.weight"),
    Tensor("ffn_norm.weight",        ("dim",),              None,  "ffn_norm.weight",    "post_attention_layernorm.weight"),
)
# Whole model. Llama 3 splits the embedding by vocabulary rows (Llama 2 split it by columns).
GLOBAL_TENSORS = (
    Tensor("tok_embeddings.weight",  ("vocab_size", "dim"), 0,     "token_embd.weight",  "model.embed_tokens.weight"),
    Tensor("norm.weight",            ("dim",),              None,  "output_norm.weight", "model.norm.weight"),
    Tensor("output.weight",          ("vocab_size", "dim"), 0,     "output.weight",      "lm_head.weight"),
)
# Where a layer's index goes in each format's names: layers.3.attention.wq.weight, blk.3.attn_q.weight.
LAYER_PREFIX = {"meta": "layers.{i}.", "gguf": "blk.{i}.", "hf": "model.layers.{i}."}
EMBEDDING, NORM, OUTPUT = GLOBAL_TENSORS  # by role; the output may reuse the embedding (tied)
# What the derived sizes are made of, for messages about a tensor of the wrong shape.
SIZE_ORIGINS = {"q_width": "n_heads * head_dim", "kv_width": "n_kv_heads * head_dim",
                "hidden_dim": "from dim, multiple_of and ffn_dim_multiplier"}


def explain_shape(tensor: Tensor) -> str:
    """e.g. "(hidden_dim, dim); hidden_dim from dim, multiple_of and ffn_dim_multiplier"."""
    origins = [f"{size} {'= ' * (not SIZE_ORIGINS[size].startswith('from'))}{SIZE_ORIGINS[size]}"
               for size in tensor.shape if size in SIZE_ORIGINS]
    return f"({', '.join(tensor.shape)})" + "".join(f"; {o}" for o in origins)


def layer_name(name: str, i: int, fmt: str = "meta") -> str:
    return LAYER_PREFIX[fmt].format(i=i) + name


def _name_pattern(fmt: str) -> re.Pattern:
    prefix = re.escape(LAYER_PREFIX[fmt]).replace(re.escape("{i}"), r"(\d+)")
    return re.compile(prefix + "(.+)")


_LAYER_PATTERNS = {fmt: _name_pattern(fmt) for fmt in LAYER_PREFIX}


def split_layer_name(name: str, fmt: str = "meta") -> tuple[int, Tensor] | tuple[None, Tensor] | None:
    """(layer index, table row) of a tensor name in format `fmt`; (None, row) for a global
    tensor; None if it is not a Llama weight."""
    for t in GLOBAL_TENSORS:
        if getattr(t, fmt) == name:
            return None, t
    m = _LAYER_PATTERNS[fmt].fullmatch(name)
    if m:
        for t in LAYER_TENSORS:
            if getattr(t, fmt) == m[2]:
                return int(m[1]), t
    return None


def meta_name(name: str, fmt: str) -> str | None:
    """Meta's name for a tensor named `name` in format fmt ("gguf", "hf"); None if not a Llama weight."""
    found = split_layer_name(name, fmt)
    if found is None:
        return None
    i, t = found
    return t.meta if i is None else layer_name(t.meta, i)



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

import numpy as np

from .errors import ConfigValueError, PromptTooLongError, shown


# Limits no real model comes near (Llama 3.1 405B: dim 16384, 126 layers, 128 heads, FFN width
# 53248; vocabularies up to 256k tokens; contexts up to 128k), checked before any value sizes
# anything, so that a 1 KB config cannot make npllama build a billion-entry table.
LIMITS = {"dim": 1 << 16, "n_layers": 1 << 10, "n_heads": 1 << 10, "n_kv_heads": 1 << 10,
          "vocab_size": 1 << 22, "multiple_of": 1 << 16, "ffn_hidden_dim": 1 << 20,
          "max_seq_len": 1 << 20, "rope_scaling.original_max_seq_len": 1 << 20}
MAX_FFN_DIM_MULTIPLIER = 16.0
MAX_ROPE_SCALING_FACTOR = 1e4


def checked_int(field: str, value, low: int = 1) -> int:
    """An int (a bool is not one) in [low, LIMITS[field]], or ConfigValueError naming the field."""
    high = LIMITS[field]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigValueError(f"{{{field}}} is {shown(value)}; it must be an integer from {low} to {high}")
    if not low <= value <= high:
        raise ConfigValueError(f"{{{field}}} is {shown(value)}; it must be from {low} to {high} (no real "
                               "model comes near that limit)")
    return value


def checked_float(field: str, value, low: float, high: float, low_open: bool = True) -> float:
    """A finite number in (low, high] ([low, high] unless low_open), as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigValueError(f"{{{field}}} is {shown(value)}; it must be a number")
    value = float(value)
    if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
        raise ConfigValueError(f"{{{field}}} is {shown(value)}; it must be a finite number in "
                               f"{'(' if low_open else '['}{low:g}, {high:g}]")
    return value


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's long-context RoPE frequency scaling (Meta's `apply_scaling`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self):
        for name, high in (("factor", MAX_ROPE_SCALING_FACTOR), ("low_freq_factor", 1e4),
                           ("high_freq_factor", 1e4)):
            object.__setattr__(self, name, checked_float(f"rope_scaling.{name}", getattr(self, name), 0, high))
        checked_int("rope_scaling.original_max_seq_len", self.original_max_seq_len)
        if not self.high_freq_factor > self.low_freq_factor:  # the band between them is divided by this
            raise ConfigValueError(f"{{rope_scaling.high_freq_factor}} ({self.high_freq_factor:g}) must be "
                                   f"above {{rope_scaling.low_freq_factor}} ({self.low_freq_factor:g})")


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
        """Every value is checked for its type and range before anything is sized by it; a file's
        reader rewrites the field names in the message into the file's own keys."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len"):
            checked_int(name, getattr(self, name))
        if self.ffn_hidden_dim is not None:
            checked_int("ffn_hidden_dim", self.ffn_hidden_dim)
        # eps is added to a mean of squares: 1 or more would swamp any activation.
        object.__setattr__(self, "norm_eps", checked_float("norm_eps", self.norm_eps, 0, 1, low_open=True))
        object.__setattr__(self, "rope_theta", checked_float("rope_theta", self.rope_theta, 0, 1e30))
        if self.ffn_dim_multiplier is not None:
            object.__setattr__(self, "ffn_dim_multiplier", checked_float(
                "ffn_dim_multiplier", self.ffn_dim_multiplier, 0, MAX_FFN_DIM_MULTIPLIER))
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigValueError(f"{{tie_embeddings}} is {shown(self.tie_embeddings)}; it must be true or false")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigValueError(f"{{rope_scaling}} is {shown(self.rope_scaling)}, not a RoPE scaling")
        if self.dim % self.n_heads:
            raise ConfigValueError(f"{{dim}} ({self.dim}) must be divisible by {{n_heads}} ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ConfigValueError(f"{{n_heads}} ({self.n_heads}) must be a multiple of {{n_kv_heads}} "
                                   f"({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ConfigValueError(f"head_dim = {{dim}} / {{n_heads}} = {self.head_dim} must be even for RoPE")
        if self.hidden_dim > LIMITS["ffn_hidden_dim"]:
            raise ConfigValueError(f"the feed-forward width from {{dim}}, {{multiple_of}} and "
                                   f"{{ffn_dim_multiplier}} is {self.hidden_dim}, above {LIMITS['ffn_hidden_dim']}")
        self._check_rope_frequencies()

    def _check_rope_frequencies(self) -> None:
        """RoPE's frequencies are theta^(-2i/head_dim) in float32, then divided by the scaling
        factor: a theta of 1e-300 or a factor of 1e30 would make them 0 or infinite, and every
        logit NaN."""
        with np.errstate(over="ignore", under="ignore", divide="ignore"):
            theta = np.float32(self.rope_theta)
            slowest = np.float32(np.float64(self.rope_theta) ** (-(self.head_dim - 2) / self.head_dim))
            if self.rope_scaling is not None:
                slowest = np.float32(slowest / np.float32(self.rope_scaling.factor))
        if not (np.isfinite(theta) and theta > 0 and np.isfinite(slowest) and slowest > 0):
            raise ConfigValueError(f"{{rope_theta}} = {self.rope_theta:g} gives RoPE frequencies that are 0 "
                                   "or infinite in float32; Llama 3 uses 500000")

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



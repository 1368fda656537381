"""The math of a Llama 3 layer, one small pure function per concept.

Shapes: T = new tokens, S = positions attended over (cache + new), D = dim,
H = query heads, KV = key/value heads, hd = head_dim, F = SwiGLU hidden width.
Per-head arrays are heads-first, [H, T, hd], so that every head's attention is one
batched matmul and no Python loop over heads is ever needed.

Everything here is float32 in, float32 out. The oracle (oracle/reference.py) has a
torch function of the same name for each of these.
"""

from __future__ import annotations

import numpy as np

from .config import RopeScaling


def embed(tokens: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Row lookup; only the T rows used are read (and upcast) from a memory-mapped table."""
    return np.asarray(table[tokens], dtype=np.float32)  # [T] -> [T, D]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis."""
    ms = np.mean(x * x, axis=-1, keepdims=True)  # [T, D] -> [T, 1]
    return x / np.sqrt(ms + np.float32(eps)) * weight  # [T, D]


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x W^T with W stored [out, in] as in Meta's checkpoints (BLAS reads W^T without a copy)."""
    return x @ w.T  # [T, in] @ [in, out] -> [T, out]


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> np.ndarray:
    """theta^(-2i/hd) for each of the hd/2 rotating pairs, in float32 as Meta computes them (the
    angles pos * freq are float32 in Meta's reference: matching it matters at long contexts).
    The power is taken in float64 and rounded once: NumPy's float32 `**` can be an ulp off, and
    one ulp of a frequency is 0.004 rad of angle by position 32k."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # [hd/2]
    powers = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)  # [hd/2]
    freqs = np.float32(1.0) / powers  # [hd/2]
    return freqs if scaling is None else scale_rope_frequencies(freqs, scaling)  # [hd/2]


def scale_rope_frequencies(freqs: np.ndarray, s: RopeScaling) -> np.ndarray:
    """Llama 3.1's `apply_scaling`: long wavelengths are slowed down by `factor`, short ones kept,
    and the band in between interpolated smoothly, so the model can reach 128k positions."""
    wavelen = np.float32(2 * np.pi) / freqs  # [hd/2]
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, freqs / np.float32(s.factor), freqs)  # [hd/2]
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)  # [hd/2]
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)  # [hd/2]
    blended = (1 - smooth) * scaled / np.float32(s.factor) + smooth * scaled  # [hd/2]
    return np.where(in_band, blended, scaled).astype(np.float32)  # [hd/2]


def rope_tables(freqs: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of every angle pos * freq, for the positions a forward pass uses: computed per
    call, not for the whole context at load, so a long context costs nothing until it is used."""
    angles = np.outer(np.asarray(positions, dtype=np.float32), freqs)  # [T, hd/2]
    return np.cos(angles), np.sin(angles)  # [T, hd/2] each


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by its angle pos * freq_i.

    Meta's checkpoints pair adjacent dimensions (its reference uses view_as_complex), so the
    pairs are x[..., 0::2] and x[..., 1::2], not the two halves of the vector as in HF's layout.
    """
    even, odd = x[..., 0::2], x[..., 1::2]  # [H, T, hd/2] each
    out = np.empty_like(x)  # [H, T, hd]
    out[..., 0::2] = even * cos - odd * sin  # [H, T, hd/2]
    out[..., 1::2] = even * sin + odd * cos  # [H, T, hd/2]
    return out  # [H, T, hd]


def causal_mask(n_new: int, start_pos: int) -> np.ndarray:
    """0 where query i (at absolute position start_pos + i) may see key j, -inf where j is later."""
    query_pos = start_pos + np.arange(n_new)[:, None]  # [T, 1]
    key_pos = np.arange(start_pos + n_new)[None, :]  # [1, S]
    return np.where(key_pos > query_pos, -np.inf, 0.0).astype(np.float32)  # [T, S]


def attention_scores(q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """q.k / sqrt(hd) for every head. Grouped-query attention: the n_rep query heads of a group
    are stacked against their one key head, so keys are shared, never copied per query head."""
    n_heads, n_new, head_dim = q.shape
    n_kv_heads, n_keys, _ = k.shape
    q_groups = q.reshape(n_kv_heads, n_heads // n_kv_heads * n_new, head_dim)  # [KV, rep*T, hd]
    if n_new == 1:  # decoding, bound by reading the keys: the same dot products as (k q^T)^T,
        # the orientation in which OpenBLAS streams a long cache fastest.
        scores = (k @ q_groups.transpose(0, 2, 1)).transpose(0, 2, 1)  # [KV, S, rep] -> [KV, rep, S]
    else:
        scores = q_groups @ k.transpose(0, 2, 1)  # [KV, rep*T, hd] @ [KV, hd, S] -> [KV, rep*T, S]
    scores = scores / np.float32(np.sqrt(head_dim))  # [KV, rep*T, S]
    return scores.reshape(n_heads, n_new, n_keys)  # [H, T, S]


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; subtracting the row max keeps exp() from overflowing."""
    e = x - np.max(x, axis=-1, keepdims=True)  # [..., S]
    np.exp(e, out=e)  # in place: a prompt's [H, T, S] is the largest array of a layer
    e /= np.sum(e, axis=-1, keepdims=True)
    return e  # [..., S]


def attention_output(probs: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Each head's probability-weighted sum of its group's values, heads concatenated."""
    n_heads, n_new, n_keys = probs.shape
    n_kv_heads, _, head_dim = v.shape
    p_groups = probs.reshape(n_kv_heads, n_heads // n_kv_heads * n_new, n_keys)  # [KV, rep*T, S]
    # (v^T p^T)^T: with the cache's values stored transposed, v^T is contiguous [hd, S] rows,
    # which BLAS streams faster than p @ v over a long cache (see KVCache).
    out = v.transpose(0, 2, 1) @ p_groups.transpose(0, 2, 1)  # [KV, hd, S] @ [KV, S, rep*T]
    out = out.transpose(0, 2, 1).reshape(n_heads, n_new, head_dim)  # [KV, rep*T, hd] -> [H, T, hd]
    return out.transpose(1, 0, 2).reshape(n_new, n_heads * head_dim)  # [T, H*hd]


def keep(name: str, x: np.ndarray) -> np.ndarray:
    """The default `step`: names an intermediate and passes it on untouched. The model passes a
    `step` that records intermediates (trace) or rounds them to bf16 (the notebook's dtype flow)."""
    return x


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, step=keep) -> np.ndarray:
    """Causal grouped-query attention of T new queries over S keys, all heads at once."""
    scores = step("scores", attention_scores(q, k))  # [H, T, S]
    masked = step("masked_scores", scores + mask)  # [H, T, S] + [T, S]
    probs = step("probs", softmax(masked))  # [H, T, S]
    return attention_output(probs, v)  # [T, H*hd]


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + exp(-x))."""
    with np.errstate(over="ignore"):  # exp(-x) = inf below x = -88, and x / inf = -0 is the limit
        d = np.exp(-x)  # [...]
    d += 1
    return np.divide(x, d, out=d)  # [...]


def feed_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray, step=keep) -> np.ndarray:
    """SwiGLU: w2(silu(w1 x) * w3 x). The gate decides, per hidden unit, how much of `up` passes."""
    gate = step("gate", linear(x, w1))  # [T, D] -> [T, F]
    up = step("up", linear(x, w3))  # [T, D] -> [T, F]
    hidden = step("hidden", step("silu_gate", silu(gate)) * up)  # [T, F]
    return linear(hidden, w2)  # [T, F] -> [T, D]

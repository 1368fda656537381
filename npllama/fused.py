"""The fast path: model.py's forward pass in fewer, in-place NumPy calls.

A decode step of a small model spends about as long in NumPy's per-call cost (microseconds and
an allocation each) as in its matmuls. model.transformer_block makes some sixty calls a layer,
each step named so that a student can follow it; this one makes about half as many, on the
same numbers:

- q|k|v and w1|w3 stacked by rows where the weights are float32-resident (LayerWeights.fuse):
  one matmul each, into buffers made once for decoding;
- RoPE of q and k together as one complex multiplication: the pair (x[2i], x[2i+1]) read as
  x[2i] + i x[2i+1], times cos + i sin, is model.py's rotation, the same four products;
- rms_norm as a sum of squares and one scaled multiply; silu(gate) * up and both residual
  additions in place; no mask added when one new token attends to every earlier one.

Llama.forward takes it for float32 passes without a trace; the bf16 flow and traces take
model.py's path. tests/test_model.py proves the two equal to float32 rounding.

Shapes as in layers.py: T new tokens, S positions attended, D dim, H and KV heads, hd head_dim,
F the SwiGLU width.
"""

from __future__ import annotations

import numpy as np

from .config import ModelArgs
from .layers import causal_mask, embed, rope_tables, softmax
from .progress import Progress
from .resident_or_streamed import LayerWeights


def linear(x: np.ndarray, w, out: np.ndarray | None = None) -> np.ndarray:
    """out = x @ w.T, for a float32 matrix or one that computes the product itself (streamed
    by tiles, or split over processes: tensor_parallel.py)."""
    if isinstance(w, np.ndarray):
        return np.matmul(x, w.T, out=out)  # [T, in] @ [in, out] -> [T, out]
    return w.matmul_transposed(x, out)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, as layers.rms_norm, in two calls and one buffer."""
    ms = np.einsum("td,td->t", x, x)[:, None] / np.float32(x.shape[1])  # [T, 1]
    np.multiply(x, weight, out=out)  # [T, D]
    out /= np.sqrt(ms + np.float32(eps))  # [T, D]
    return out


def rope_cis(freqs: np.ndarray, start: int, n_new: int) -> np.ndarray:
    """cos + i sin of every angle pos * freq: the rotations as unit complex numbers."""
    cos, sin = rope_tables(freqs, np.arange(start, start + n_new))  # [T, hd/2] each
    cis = np.empty(cos.shape, np.complex64)  # [T, hd/2]
    cis.real, cis.imag = cos, sin
    return cis


class Decode:
    """Buffers for one-token steps, made once per model and reused by every step and layer."""

    def __init__(self, args: ModelArgs):
        q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.h, self.xn, self.proj = (np.empty((1, args.dim), np.float32) for _ in range(3))  # [1, D]
        self.qkv = np.empty((1, q + 2 * kv), np.float32)  # [1, (H+2KV)*hd]
        self.attn = np.empty((1, q), np.float32)  # [1, H*hd]
        self.gate_up = np.empty((1, 2 * args.hidden_dim), np.float32)  # [1, 2F]
        self.silu = np.empty((1, args.hidden_dim), np.float32)  # [1, F]


def forward(model, tokens: np.ndarray, start_pos: int, cache, last_only: bool) -> np.ndarray:
    """Logits [T, V] (or [1, V] if last_only) of tokens at start_pos.., as model.forward's."""
    args, n_new = model.args, len(tokens)
    buf = model.decode_buffers if n_new == 1 else None
    cis = rope_cis(model.rope_freqs, start_pos, n_new)  # [T, hd/2]
    mask = None if n_new == 1 else causal_mask(n_new, start_pos)  # [T, S]: a lone token sees all
    h = embed(tokens, model.embedding)  # [T, D]
    with Progress(f"prefill of {n_new} tokens", args.n_layers, "layers", model.verbose and n_new > 1) as progress:
        for i, layer in enumerate(model.layers):
            h = block(h, layer, args, cis, mask, cache.k[i], cache.v[i], start_pos, buf)  # [T, D]
            progress.update(i + 1)
    if last_only:
        h = h[-1:]  # [1, D]
    hn = rms_norm(h, model.norm, args.norm_eps, np.empty_like(h))  # [T, D]
    return linear(hn, model.output, np.empty((len(hn), model.output.shape[0]), np.float32))  # [T, V]


def block(x: np.ndarray, w: LayerWeights, args: ModelArgs, cis: np.ndarray, mask: np.ndarray | None,
          cache_k: np.ndarray, cache_v: np.ndarray, start_pos: int, buf: Decode | None) -> np.ndarray:
    """model.transformer_block: x + attention(norm(x)), then + feed_forward(norm(.)). x is
    updated in place and returned: [T, D]."""
    n_new, (H, KV, hd) = len(x), (args.n_heads, args.n_kv_heads, args.head_dim)
    q_end, k_end = H * hd, (H + KV) * hd
    xn = rms_norm(x, w.attention_norm, args.norm_eps, buf.xn if buf else np.empty_like(x))  # [T, D]
    qkv = buf.qkv if buf else np.empty((n_new, k_end + KV * hd), np.float32)  # [T, (H+2KV)*hd]
    if w.wqkv is not None:
        linear(xn, w.wqkv, qkv)
    else:  # streamed weights are not stacked: three products into the same buffer
        for part, m in ((slice(0, q_end), w.wq), (slice(q_end, k_end), w.wk), (slice(k_end, None), w.wv)):
            qkv[:, part] = linear(xn, m, np.empty((n_new, m.shape[0]), np.float32))
    qk = qkv[:, :k_end].view(np.complex64).reshape(n_new, H + KV, hd // 2)  # [T, H+KV, hd/2]
    qk *= cis[:, None, :]  # RoPE of q and k at once
    q = qkv[:, :q_end].reshape(n_new, H, hd).transpose(1, 0, 2)  # [H, T, hd]
    end = start_pos + n_new
    cache_k[:, start_pos:end] = qkv[:, q_end:k_end].reshape(n_new, KV, hd).transpose(1, 0, 2)  # [KV, T, hd]
    cache_v[:, :, start_pos:end] = qkv[:, k_end:].reshape(n_new, KV, hd).transpose(1, 2, 0)  # [KV, hd, T]
    attn = attention(q, cache_k[:, :end], cache_v[:, :, :end], mask, buf.attn if buf else None)  # [T, H*hd]
    x += linear(attn, w.wo, buf.proj if buf else np.empty_like(x))  # [T, D]

    xn = rms_norm(x, w.ffn_norm, args.norm_eps, xn)  # [T, D]
    f = w.w1.shape[0]
    gate_up = buf.gate_up if buf else np.empty((n_new, 2 * f), np.float32)  # [T, 2F]
    if w.w13 is not None:
        linear(xn, w.w13, gate_up)
    else:
        linear(xn, w.w1, gate_up[:, :f])
        linear(xn, w.w3, gate_up[:, f:])
    gate, up = gate_up[:, :f], gate_up[:, f:]  # [T, F] each
    hidden = silu_times(gate, up, buf.silu if buf else np.empty_like(gate))  # [T, F]
    x += linear(hidden, w.w2, buf.proj if buf else np.empty_like(x))  # [T, D]
    return x


def silu_times(gate: np.ndarray, up: np.ndarray, out: np.ndarray) -> np.ndarray:
    """silu(gate) * up = gate / (1 + exp(-gate)) * up, in one buffer (layers.silu's formula)."""
    with np.errstate(over="ignore"):  # exp(-gate) = inf below gate = -88: gate / inf = -0, the limit
        np.negative(gate, out=out)
        np.exp(out, out=out)
    out += 1
    np.divide(gate, out, out=out)
    out *= up
    return out  # [T, F]


def attention(q: np.ndarray, keys: np.ndarray, values_t: np.ndarray, mask: np.ndarray | None,
              out: np.ndarray | None) -> np.ndarray:
    """layers.attention over the cache's own layouts: q [H, T, hd], keys [KV, S, hd], values
    stored transposed [KV, hd, S]; grouped-query, each group's queries against its one key head."""
    n_heads, n_new, head_dim = q.shape
    n_kv_heads, n_keys, _ = keys.shape
    q_groups = q.reshape(n_kv_heads, n_heads // n_kv_heads * n_new, head_dim)  # [KV, rep*T, hd]
    if n_new == 1:  # decoding: the orientation BLAS streams a long cache in fastest (layers.py)
        scores = (keys @ q_groups.transpose(0, 2, 1)).transpose(0, 2, 1)  # [KV, rep, S]
    else:
        scores = q_groups @ keys.transpose(0, 2, 1)  # [KV, rep*T, S]
    scores /= np.float32(np.sqrt(head_dim))
    scores = scores.reshape(n_heads, n_new, n_keys)  # [H, T, S]
    if mask is not None:
        scores += mask
    probs = softmax(scores).reshape(n_kv_heads, -1, n_keys)  # [KV, rep*T, S]
    o = (values_t @ probs.transpose(0, 2, 1)).transpose(0, 2, 1)  # [KV, hd, rep*T] -> [KV, rep*T, hd]
    o = o.reshape(n_heads, n_new, head_dim).transpose(1, 0, 2).reshape(n_new, n_heads * head_dim)  # [T, H*hd]
    if out is None:
        return o
    np.copyto(out, o)
    return out

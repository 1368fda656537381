"""The runtime forward pass: one engine under every feature.

model.py's forward pass is the one a student reads, one named step at a time, with a trace. This
is the same math, written once for everything that runs a model: one sequence or a batch of
rows (`Llama.forward`, generation, chat, perplexity, the server), weights resident, tiered or
streamed, float32 or the notebook's bf16 flow, a whole model or one rank's share of it under
mpiexec. tests/test_engine.py holds it to the plain pass in every combination.

- Rows: tokens [N, T], right-padded; row b's lengths[b] real tokens sit at positions starts[b]..
  Each row has its own RoPE angles and causal mask, so a pad never reaches a real position: a
  real query at position p sees keys 0..p of its own row only, and the keys a pad writes lie
  beyond every real query of its row (the row's next token overwrites the first of them).
- Fewer NumPy calls than model.py (a small model's decode step costs as much in per-call
  overhead as in matmuls): q|k|v and w1|w3 are one product each (LayerWeights stacks them),
  RoPE of q and k is one complex multiply (the pair (x[2i], x[2i+1]) read as x[2i] + i x[2i+1],
  times cos + i sin, is layers.apply_rope's rotation), norms, silu and residuals work in place
  in buffers reused from step to step.
- The bf16 flow rounds where the plain pass does (layers.rounded_in_bf16_flow), in place.

Shapes as in layers.py, with N rows: T new tokens per row, S positions attended, D dim, H and
KV heads, hd head_dim, F the SwiGLU width, V the vocabulary, P the cache's positions.
"""

from __future__ import annotations

import numpy as np

from .config import ModelArgs
from .errors import ArgumentError
from .layers import embed, keep, rope_tables, softmax
from .progress import Progress

MANY_ROWS = 32  # up to this many rows, (W x^T)^T beats x W^T (see linear)
REUSED_ROWS = 64  # token rows whose intermediates live in reused buffers (decode steps)


class KVCache:
    """Keys and values of every position seen so far, for `rows` sequences (slots), preallocated
    for max_seq_len positions. One sequence is a cache of one row.

    Heads-first, so that each head's part is one contiguous block the attention matmul reads
    without a copy: keys [B, KV, P, hd], values transposed [B, KV, hd, P]. At long contexts
    decoding is bound by reading this cache, and these are the layouts BLAS streams fastest for
    q k^T and probs v (see attention). `order[slot]` is the sequence a slot holds: generation
    keeps the rows still going in the first slots (`swap`), so a step reads only those."""

    def __init__(self, args: ModelArgs, max_seq_len: int, rows: int = 1):
        kv, hd = args.n_kv_heads, args.head_dim
        self.max_seq_len, self.order = max_seq_len, list(range(rows))
        try:  # zeros are pages the OS maps on first write, but the address space is reserved now
            self.k = [np.zeros((rows, kv, max_seq_len, hd), np.float32) for _ in range(args.n_layers)]  # [B, KV, P, hd]
            self.v = [np.zeros((rows, kv, hd, max_seq_len), np.float32) for _ in range(args.n_layers)]  # [B, KV, hd, P]
        except MemoryError:
            gb = 2 * args.n_layers * rows * kv * hd * 4 * max_seq_len / 2**30
            raise ArgumentError(f"a KV cache of {rows} row(s) of {max_seq_len} positions takes {gb:.1f} GB, more than "
                                "this machine can give: use a shorter context (-c) or fewer rows") from None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def swap(self, a: int, b: int, used: int | None = None) -> None:
        """Exchange two slots' sequences (their keys and values, in every layer): the first `used`
        positions, those either of them has written (a server's cache is long, its rows short)."""
        p = slice(0, used)
        for k, v in zip(self.k, self.v):
            k[[a, b], :, p], v[[a, b], :, :, p] = k[[b, a], :, p], v[[b, a], :, :, p]
        self.order[a], self.order[b] = self.order[b], self.order[a]

    def clear(self, slots=(), starts=(), ends=()) -> None:
        """Zero positions starts[i]..ends[i]-1 of slots[i], in every layer: positions a pass wrote
        that hold no token of the sequence (guesses rejected, pads), left as if never written."""
        spans = [(slot, p) for slot, a, b in zip(slots, starts, ends) for p in range(a, b)]
        if not spans:
            return
        rows, positions = np.array(spans).T  # [n] each
        for k, v in zip(self.k, self.v):
            k[rows, :, positions], v[rows, :, :, positions] = 0, 0


class Buffers:
    """Arrays a pass of at most REUSED_ROWS token rows writes its intermediates into, made once
    and reused by every later pass and layer (a pass of more rows, a prefill, makes its own)."""

    def __init__(self, args: ModelArgs):
        self.widths = {"xn": args.dim, "proj": args.dim, "qkv": (args.n_heads + 2 * args.n_kv_heads) * args.head_dim,
                       "attn": args.n_heads * args.head_dim, "gate_up": 2 * args.hidden_dim, "hidden": args.hidden_dim}
        self.reused = {}  # made at the first use: np.empty takes no RAM until written

    def __call__(self, n: int) -> dict[str, np.ndarray]:
        """Buffers for n token rows: [n, width] each."""
        if n > REUSED_ROWS:
            return {name: np.empty((n, width), np.float32) for name, width in self.widths.items()}
        if not self.reused:
            self.reused = {name: np.empty((REUSED_ROWS, width), np.float32) for name, width in self.widths.items()}
        return {name: array[:n] for name, array in self.reused.items()}


def forward(model, tokens: np.ndarray, lengths: np.ndarray, starts: np.ndarray, cache: KVCache,
            positions: str | slice = "last", first_slot: int = 0) -> np.ndarray:
    """Logits of N rows of right-padded tokens [N, T] through the cache's slots first_slot..
    first_slot+N-1 (rows joining a batch already going in the slots before them).

    positions="last": [N, V], each row's last real token's logits; "all": [N, T, V] (a pad's
    logits mean nothing); a slice: [N, len(slice), V], those positions of every row only (the
    output matrix is the largest product of a pass over a long window)."""
    args, step = model.args, model.bf16_step
    n_rows, n_new = tokens.shape
    pos = starts[:, None] + np.arange(n_new)  # [N, T] each token's position in its row
    cis = rope_cis(model.rope_freqs, pos.reshape(-1))  # [N*T, hd/2]
    mask = causal_mask(pos)  # [N, T, S] or None
    n = n_rows * n_new  # token rows
    buf = model.buffers(n)
    slots = slice(first_slot, first_slot + n_rows)
    h = step("embedding", embed(tokens.reshape(-1), model.embedding))  # [N*T, D]
    with Progress(f"prefill of {n} tokens", args.n_layers, "layers", model.verbose and n > 1) as progress:
        for i, layer in enumerate(model.layers):
            h = block(h, layer, args, cis, mask, cache.k[i][slots], cache.v[i][slots], pos, buf, step)  # [N*T, D]
            progress.update(i + 1)
    h = h.reshape(n_rows, n_new, -1)  # [N, T, D]
    if positions == "last":
        h = h[np.arange(n_rows), lengths - 1]  # [N, D]
    elif isinstance(positions, slice):
        h = h[:, positions]  # [N, T', D]
    hn = h.reshape(-1, args.dim)  # [N*T', D]: the output matrix multiplies rows, whatever their origin
    hn = step("norm", rms_norm(hn, model.norm, args.norm_eps, np.empty_like(hn)))  # [N*T', D]
    # Logits stay float32 in both dtypes, as in Meta's reference (`self.output(h).float()`).
    logits = step("logits", linear(hn, model.output, np.empty((len(hn), model.output.shape[0]), np.float32)))
    return logits.reshape(*h.shape[:-1], -1)  # [N, V] or [N, T', V]


def block(x: np.ndarray, w, args: ModelArgs, cis: np.ndarray, mask: np.ndarray | None, cache_k: np.ndarray,
          cache_v: np.ndarray, pos: np.ndarray, buf: dict, step=keep) -> np.ndarray:
    """model.transformer_block for N rows: x + attention(norm(x)), then + feed_forward(norm(.)).
    x [N*T, D] is updated in place and returned."""
    (n_rows, n_new), (H, KV, hd) = pos.shape, (args.n_heads, args.n_kv_heads, args.head_dim)
    q_end, k_end = H * hd, (H + KV) * hd
    xn = step("attention_norm", rms_norm(x, w.attention_norm, args.norm_eps, buf["xn"]))  # [N*T, D]
    qkv = step("q", linear(xn, w.wqkv, buf["qkv"]))  # [N*T, (H+2KV)*hd]; q, k and v round alike
    qk = qkv[:, :k_end].view(np.complex64).reshape(n_rows * n_new, H + KV, hd // 2)  # [N*T, H+KV, hd/2]
    qk *= cis[:, None, :]  # RoPE of q and k at once
    q = qkv[:, :q_end].reshape(n_rows, n_new, H, hd).transpose(0, 2, 1, 3)  # [N, H, T, hd]
    k = qkv[:, q_end:k_end].reshape(n_rows, n_new, KV, hd)  # [N, T, KV, hd]
    v = qkv[:, k_end:].reshape(n_rows, n_new, KV, hd)  # [N, T, KV, hd]
    if n_rows == 1:  # one sequence: its positions are one slice of the cache
        start, end = pos[0, 0], pos[0, -1] + 1
        cache_k[0, :, start:end] = k[0].transpose(1, 0, 2)  # [KV, T, hd]
        cache_v[0, :, :, start:end] = v[0].transpose(1, 2, 0)  # [KV, hd, T]
    else:
        rows = np.arange(n_rows)[:, None]  # [N, 1]
        cache_k[rows, :, pos] = k  # [N, T, KV, hd] at each row's positions
        cache_v[rows, :, :, pos] = v  # [N, T, KV, hd]
    n_keys = int(pos.max()) + 1
    attn = attention(q, cache_k[:, :, :n_keys], cache_v[:, :, :, :n_keys], mask, buf["attn"], step)  # [N*T, H*hd]
    x += step("attention_out", linear(attn, w.wo, buf["proj"]))  # [N*T, D]
    step("residual", x)

    xn = step("ffn_norm", rms_norm(x, w.ffn_norm, args.norm_eps, xn))  # [N*T, D]
    gate_up = step("gate", linear(xn, w.w13, buf["gate_up"]))  # [N*T, 2F]; gate and up round alike
    x += step("ffn_out", linear(swiglu(gate_up, buf["hidden"], step), w.w2, buf["proj"]))  # [N*T, D]
    return step("out", x)


def attention(q: np.ndarray, keys: np.ndarray, values_t: np.ndarray, mask: np.ndarray | None,
              out: np.ndarray, step=keep) -> np.ndarray:
    """Causal grouped-query attention over the cache's own layouts, layers.attention with a row
    axis: q [N, H, T, hd], keys [N, KV, S, hd], values stored transposed [N, KV, hd, S]. The
    n_rep query heads of a group are stacked against their one key head, never copied."""
    n_rows, n_heads, n_new, head_dim = q.shape
    n_kv_heads, n_keys = keys.shape[1], keys.shape[2]
    q_groups = q.reshape(n_rows, n_kv_heads, n_heads // n_kv_heads * n_new, head_dim)  # [N, KV, rep*T, hd]
    if n_new == 1:  # decoding, bound by reading the keys: (k q^T)^T, the orientation in which
        # OpenBLAS streams a long cache fastest.
        scores = (keys @ q_groups.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # [N, KV, rep, S]
    else:
        scores = q_groups @ keys.transpose(0, 1, 3, 2)  # [N, KV, rep*T, S]
    scores /= np.float32(np.sqrt(head_dim))
    scores = scores.reshape(n_rows, n_heads, n_new, n_keys)  # [N, H, T, S]
    if mask is not None:
        scores += mask[:, None]  # [N, 1, T, S]
    probs = step("probs", softmax(scores)).reshape(n_rows, n_kv_heads, -1, n_keys)  # [N, KV, rep*T, S]
    o = (values_t @ probs.transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)  # [N, KV, hd, rep*T] -> [N, KV, rep*T, hd]
    o = o.reshape(n_rows, n_heads, n_new, head_dim).transpose(0, 2, 1, 3)  # [N, T, H, hd]
    np.copyto(out.reshape(n_rows, n_new, n_heads, head_dim), o)  # heads concatenated: [N*T, H*hd]
    return step("attention", out)


def causal_mask(pos: np.ndarray) -> np.ndarray | None:
    """0 where the query at position pos[b, t] may see key j (j <= pos[b, t]), -inf where j is
    later: [N, T, S]. None when every query sees every key (each row's one new token at the
    same, last, position)."""
    n_keys = int(pos.max()) + 1
    if pos.min() == n_keys - 1:
        return None
    return np.where(np.arange(n_keys) > pos[:, :, None], -np.inf, 0).astype(np.float32)  # [N, T, S]


def rope_cis(freqs: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """cos + i sin of every angle pos * freq (layers.rope_tables): the rotations as complex numbers."""
    cos, sin = rope_tables(freqs, positions)  # [N*T, hd/2] each
    cis = np.empty(cos.shape, np.complex64)  # [N*T, hd/2]
    cis.real, cis.imag = cos, sin
    return cis


def linear(x: np.ndarray, w, out: np.ndarray | None = None) -> np.ndarray:
    """out = x @ w.T (layers.linear), x [n, in] -> [n, out], for a float32 matrix or one that
    computes the product itself (streamed by tiles, or split over processes: tensor_parallel.py).

    OpenBLAS's gemm is tiled for many rows: given 2 to 32 (a batch's decode step), it runs far
    below the memory bandwidth (16 rows by SmolLM2's w1|w3 took 4.7x one row's time). With the
    weight on the left, (W x^T)^T, the same product takes 0.6x as long; from about 64 rows the
    two are equal, and beyond, the plain order is faster (benchmarks/batch.py measures it)."""
    if not isinstance(w, np.ndarray):
        return w.matmul_transposed(x, out)
    out = np.empty((len(x), len(w)), np.float32) if out is None else out  # [n, out]
    if 2 <= len(x) <= MANY_ROWS:
        np.matmul(w, x.T, out=out.T)  # [out, in] @ [in, n] -> [out, n]
        return out
    return np.matmul(x, w.T, out=out)  # [n, in] @ [in, out] -> [n, out]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight (layers.rms_norm), in three calls and one buffer."""
    ms = np.einsum("nd,nd->n", x, x)[:, None] / np.float32(x.shape[1])  # [n, 1]
    np.divide(x, np.sqrt(ms + np.float32(eps)), out=out)  # [n, D]
    out *= weight  # [n, D]
    return out


def swiglu(gate_up: np.ndarray, out: np.ndarray, step=keep) -> np.ndarray:
    """silu(gate) * up (layers.feed_forward before w2), gate_up = [gate | up] [n, 2F] -> [n, F]."""
    f = out.shape[1]
    gate, up = gate_up[:, :f], gate_up[:, f:]  # [n, F] each
    with np.errstate(over="ignore"):  # exp(-gate) = inf below gate = -88: gate / inf = -0, the limit
        np.exp(np.negative(gate, out=out), out=out)
    out += 1
    step("silu_gate", np.divide(gate, out, out=out))  # layers.silu, in place: gate / (1 + exp(-gate))
    out *= up
    return step("hidden", out)  # [n, F]

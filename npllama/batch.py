"""Many sequences at once: a forward pass over B rows of tokens, each row its own length and
position, and generation for a list of prompts (Meta's `generate(prompt_tokens: List[List[int]])`).

In a decode step every weight is read once for all the rows, so B sequences cost little more
than one while the model is bound by reading its weights. model.py's forward stays the single
sequence a student reads; this module adds only what a batch needs, a row axis, and takes its
math from layers.py:

- tokens [B, T], right-padded: row b's lengths[b] real tokens sit at positions starts[b]..;
- RoPE angles and the causal mask per row, so a padded position never influences a real one:
  a real query at position p sees keys 0..p of its own row only, and the keys a pad writes lie
  beyond every real query of its row (the row's next token overwrites the first of them);
- a KV cache with a row axis (`BatchCache`), whose active rows are always its first slots: a
  finished sequence is swapped to the end, so later steps neither compute nor read it.

Shapes: B rows (N of them active), T new tokens per row, S positions attended, D dim, H and KV
heads, hd head_dim, V the vocabulary.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .config import LIMITS, ModelArgs, check_fits
from .errors import ArgumentError, shown
from .generate import Sampler, check_finite
from .layers import apply_rope, embed, feed_forward, linear, rms_norm, rope_tables, silu, softmax


class BatchCache:
    """Keys [B, KV, P, hd] and values transposed [B, KV, hd, P] for each layer (the layouts of
    model.KVCache with a row axis). `order[slot]` is the sequence a slot holds."""

    def __init__(self, args: ModelArgs, batch: int, max_seq_len: int):
        if not 1 <= max_seq_len <= LIMITS["max_seq_len"]:
            raise ArgumentError(f"max_seq_len is {shown(max_seq_len)}; it must be from 1 to {LIMITS['max_seq_len']}")
        kv, hd = args.n_kv_heads, args.head_dim
        self.max_seq_len, self.order = max_seq_len, list(range(batch))
        try:
            self.k = [np.zeros((batch, kv, max_seq_len, hd), np.float32) for _ in range(args.n_layers)]
            self.v = [np.zeros((batch, kv, hd, max_seq_len), np.float32) for _ in range(args.n_layers)]
        except MemoryError:
            gb = 2 * args.n_layers * batch * kv * hd * 4 * max_seq_len / 2**30
            raise ArgumentError(f"a KV cache of {batch} rows of {max_seq_len} positions takes {gb:.1f} GB, "
                                "more than this machine can give: use fewer rows or a shorter context") from None

    def swap(self, a: int, b: int) -> None:
        """Exchange two slots' sequences (their caches, in every layer)."""
        for k, v in zip(self.k, self.v):
            k[[a, b]], v[[a, b]] = k[[b, a]], v[[b, a]]
        self.order[a], self.order[b] = self.order[b], self.order[a]


def forward(model, tokens: np.ndarray, lengths: np.ndarray, starts: np.ndarray, cache: BatchCache,
            positions: str | slice = "last") -> np.ndarray:
    """Logits of N rows of right-padded tokens [N, T] through the cache's first N slots.

    positions="last": [N, V], each row's last real token's logits; "all": [N, T, V] (a pad's
    logits mean nothing); a slice: [N, len(slice), V], those positions of every row only (the
    output matrix is the largest product of a pass over a long window)."""
    args = model.args
    n_rows, n_new = tokens.shape
    if n_rows > len(cache.order) or np.any(lengths < 1) or np.any(lengths > n_new):
        raise ArgumentError(f"{n_rows} rows of {n_new} tokens with lengths {lengths.tolist()} do not fit a "
                            f"cache of {len(cache.order)} rows")
    for start in starts:
        check_fits(int(start), n_new, min(args.max_seq_len, cache.max_seq_len))
    with model.threads.applied():
        pos = starts[:, None] + np.arange(n_new)  # [N, T] each token's position in its row
        cos, sin = rope_tables(model.rope_freqs, pos.reshape(-1))  # [N*T, hd/2] each
        rope = cos.reshape(n_rows, 1, n_new, -1), sin.reshape(n_rows, 1, n_new, -1)  # [N, 1, T, hd/2]
        n_keys = int(pos.max()) + 1
        mask = np.where(np.arange(n_keys) > pos[:, :, None], -np.inf, 0).astype(np.float32)  # [N, T, S]
        h = embed(tokens.reshape(-1), model.embedding)  # [N*T, D]
        for i, layer in enumerate(model.layers):
            h = block(h, layer, args, rope, mask, cache.k[i][:n_rows], cache.v[i][:n_rows], pos)  # [N*T, D]
        h = h.reshape(n_rows, n_new, -1)  # [N, T, D]
        if positions == "last":
            h = h[np.arange(n_rows), lengths - 1]  # [N, D]
        elif isinstance(positions, slice):
            h = h[:, positions]  # [N, T', D]
        out = rows_linear(rms_norm(h, model.norm, args.norm_eps), model.output)  # [N, V] or [N, T, V]
    return out.astype(np.float32, copy=False)


def rows_linear(x: np.ndarray, w) -> np.ndarray:
    """layers.linear for a decode step's few rows, x [N, in] -> [N, out]. OpenBLAS's gemm is
    tiled for many rows: given 2 to 32, it runs far below the memory bandwidth (measured here,
    16 rows by SmolLM2's w1|w3 took 1.9 ms a layer, 4.7x one row's time). With the weight on the
    left, (W x^T)^T, the same product takes 0.6x as long; from about 64 rows the two are equal,
    and beyond, the plain order is faster."""
    if isinstance(w, np.ndarray) and x.ndim == 2 and 2 <= len(x) <= 32:
        return np.ascontiguousarray((w @ x.T).T)  # [out, in] @ [in, N] -> [N, out]
    return linear(x, w)  # [N, out]


def block(x: np.ndarray, w, args: ModelArgs, rope, mask: np.ndarray, cache_k: np.ndarray,
          cache_v: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """model.transformer_block with a row axis: x [N*T, D] -> [N*T, D]."""
    (n_rows, n_new), (H, KV, hd) = pos.shape, (args.n_heads, args.n_kv_heads, args.head_dim)
    xn = rms_norm(x, w.attention_norm, args.norm_eps)  # [N*T, D]
    if w.wqkv is not None:  # resident weights: q|k|v stacked, one product (fused.py)
        qkv = rows_linear(xn, w.wqkv)  # [N*T, (H+2KV)*hd]
        q, k, v = qkv[:, :H * hd], qkv[:, H * hd:(H + KV) * hd], qkv[:, (H + KV) * hd:]
    else:
        q, k, v = (rows_linear(xn, w.wq), rows_linear(xn, w.wk),
                   rows_linear(xn, w.wv))  # [N*T, H*hd], [N*T, KV*hd] x 2
    q = q.reshape(n_rows, n_new, H, hd).transpose(0, 2, 1, 3)  # [N, H, T, hd]
    k = k.reshape(n_rows, n_new, KV, hd).transpose(0, 2, 1, 3)  # [N, KV, T, hd]
    v = v.reshape(n_rows, n_new, KV, hd)  # [N, T, KV, hd]
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # [N, H|KV, T, hd]
    rows = np.arange(n_rows)[:, None]  # [N, 1]
    cache_k[rows, :, pos] = k.transpose(0, 2, 1, 3)  # [N, T, KV, hd] at each row's positions
    cache_v[rows, :, :, pos] = v  # [N, T, KV, hd]
    n_keys = mask.shape[-1]
    keys, values_t = cache_k[:, :, :n_keys], cache_v[:, :, :, :n_keys]  # [N, KV, S, hd], [N, KV, hd, S]
    q_groups = q.reshape(n_rows, KV, H // KV * n_new, hd)  # [N, KV, rep*T, hd]
    scores = q_groups @ keys.transpose(0, 1, 3, 2) / np.float32(np.sqrt(hd))  # [N, KV, rep*T, S]
    scores = scores.reshape(n_rows, H, n_new, n_keys) + mask[:, None]  # [N, H, T, S]
    probs = softmax(scores).reshape(n_rows, KV, -1, n_keys)  # [N, KV, rep*T, S]
    attn = probs @ values_t.transpose(0, 1, 3, 2)  # [N, KV, rep*T, hd]
    attn = attn.reshape(n_rows, H, n_new, hd).transpose(0, 2, 1, 3).reshape(n_rows * n_new, H * hd)  # [N*T, H*hd]
    h = x + rows_linear(attn, w.wo)  # [N*T, D]
    hn = rms_norm(h, w.ffn_norm, args.norm_eps)  # [N*T, D]
    if w.w13 is None:
        return h + feed_forward(hn, w.w1, w.w2, w.w3)  # [N*T, D]
    gate_up, f = rows_linear(hn, w.w13), w.w1.shape[0]  # [N*T, 2F]
    return h + rows_linear(silu(gate_up[:, :f]) * gate_up[:, f:], w.w2)  # [N*T, D]


# --- Generation -----------------------------------------------------------------------------

@dataclass
class Completion:
    """One prompt's continuation, as Meta's CompletionPrediction: the new tokens (after the
    prompt's, with echo), and with logprobs each token's log-probability under the model."""

    tokens: list[int]
    logprobs: list[float] | None = None  # None for a prompt's first token, which nothing predicts
    stop_reason: str = ""  # "stop_token", "max_new_tokens" or "max_seq_len"
    prompt_tokens: int = 0
    new_tokens: int = field(default=0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of every token, in float64 as next_token_probs computes p."""
    z = logits.astype(np.float64)  # [..., V]
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # [..., V]


def per_row(value, n: int, name: str) -> list:
    """A value given once for every row, or a list of one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ArgumentError(f"{name} has {len(value)} entries for {n} prompts; give one, or one per prompt")
        return list(value)
    return [value] * n


def row_samplers(samplers, n: int) -> list[Sampler]:
    """One sampler per row, each with its own state: a single Sampler is cloned with seeds
    seed, seed+1, ... (rows with the same seed would draw the same numbers)."""
    if isinstance(samplers, (list, tuple)):
        return per_row(samplers, n, "samplers")
    base = samplers or Sampler()
    return [replace(base, seed=None if base.seed is None else base.seed + i) for i in range(n)]


def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens=256, samplers=None,
             stop_ids=None, echo: bool = False, logprobs: bool = False) -> list[Completion]:
    """Continue every prompt at once, each row with its own sampler, stop tokens and limit, as
    model.generate continues one; a row that stops leaves the batch. Returns the completions in
    the prompts' order."""
    try:
        prompts = [[operator.index(t) for t in p] for p in prompts]
    except TypeError:
        raise ArgumentError("prompts must be a list of sequences of integer token ids") from None
    n = len(prompts)
    if n == 0 or any(not p for p in prompts):
        raise ArgumentError("every prompt needs at least one token (e.g. the BOS token)")
    limits = per_row(max_new_tokens, n, "max_new_tokens")
    if any(not isinstance(m, int) or isinstance(m, bool) or m < 0 for m in limits):
        raise ArgumentError(f"max_new_tokens is {shown(max_new_tokens)}; it must be integers >= 0")
    samplers = row_samplers(samplers, n)
    default_stops = model.tokenizer.stop_ids if model.tokenizer is not None else ()
    per_row_stops = isinstance(stop_ids, list) and all(s is None or isinstance(s, Iterable) for s in stop_ids)
    stops = [set(default_stops if s is None else s)
             for s in (per_row(stop_ids, n, "stop_ids") if per_row_stops and stop_ids else [stop_ids] * n)]
    for p in prompts:
        check_fits(0, len(p), model.args.max_seq_len, generating=True)
    size = max(len(p) + max(m, 1) for p, m in zip(prompts, limits))
    cache = BatchCache(model.args, n, min(model.args.max_seq_len, size))
    out = [Completion(list(p) if echo else [], [] if logprobs else None, prompt_tokens=len(p)) for p in prompts]

    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((n, lengths.max()), np.int64)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    want_prompt = echo and logprobs
    logits = forward(model, tokens, lengths, np.zeros(n, np.int64), cache, "all" if want_prompt else "last")
    if want_prompt:
        for i, p in enumerate(prompts):
            lp = log_softmax(logits[i, :len(p) - 1])  # [L-1, V]
            out[i].logprobs += [None] + [float(lp[j, t]) for j, t in enumerate(p[1:])]
        logits = logits[np.arange(n), lengths - 1]  # [n, V]

    pos = lengths.copy()  # where each row's next token goes
    active = n  # rows in slots 0..active-1 continue; cache.order maps slots to rows
    slot_logits = logits
    for slot in reversed(range(n)):  # rows asked for no tokens are done before the first
        if limits[cache.order[slot]] == 0:
            out[cache.order[slot]].stop_reason = "max_new_tokens"
            active -= 1
            cache.swap(slot, active)
            slot_logits[[slot, active]] = slot_logits[[active, slot]]
    while active:
        rows = list(cache.order[:active])
        for slot, row in enumerate(rows):
            check_finite(slot_logits[slot], int(pos[row]) - 1)
        # Rank 0's choices (over several processes the others take them: tensor_parallel.py).
        chosen = [samplers[row](slot_logits[slot]) for slot, row in enumerate(rows)]
        next_tokens = model.group.bcast(np.array(chosen, np.int64))  # [active]
        for slot, row in enumerate(rows):
            token = int(next_tokens[slot])
            out[row].tokens.append(token)
            out[row].new_tokens += 1
            if logprobs:
                out[row].logprobs.append(float(log_softmax(slot_logits[slot])[token]))
        # Rows that are done leave the batch: their slots are swapped to the end.
        slot = 0
        while slot < active:
            row = cache.order[slot]
            reason = stop_reason(out[row], next_tokens[slot], stops[row], limits[row], int(pos[row]),
                                 min(model.args.max_seq_len, cache.max_seq_len))
            if reason:
                out[row].stop_reason = reason
                active -= 1
                cache.swap(slot, active)
                next_tokens[[slot, active]] = next_tokens[[active, slot]]
                continue
            slot += 1
        if not active:
            break
        rows = cache.order[:active]
        slot_logits = forward(model, next_tokens[:active, None], np.ones(active, np.int64), pos[rows], cache)
        pos[rows] += 1
    return out


def stop_reason(done: Completion, token: int, stops: set, limit: int, pos: int, context: int) -> str:
    """Why a row stops after choosing `token` for position `pos`, or "" if it goes on."""
    if token in stops:
        return "stop_token"
    if done.new_tokens >= limit:
        return "max_new_tokens"
    if pos + 1 >= context:  # no position left for another token
        return "max_seq_len"
    return ""


def decode_rows(tokenizer, completions: Iterable[Completion], stops: set) -> list[str]:
    """Each completion's text, stop tokens left out."""
    return [tokenizer.decode([t for t in c.tokens if t not in stops]) for c in completions]

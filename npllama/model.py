"""The Llama 3 transformer: weights, KV cache, and the forward pass read top to bottom.

tokens -> embedding -> n_layers x [rms_norm -> attention with RoPE -> residual
-> rms_norm -> SwiGLU -> residual] -> rms_norm -> logits
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import engine
from .config import EMBEDDING, LIMITS, NORM, OUTPUT, ModelArgs, check_fits
from .engine import KVCache
from .errors import ArgumentError, shown
from .generate import generate, generate_batch
from .layers import (apply_rope, attention, causal_mask, embed, feed_forward, keep, linear,
                     rms_norm, rope_frequencies, rope_tables)
from .resident_or_streamed import (BF16, LayerWeights, StreamedWeight, TilePool, default_weights_budget,
                                   layer_float32_bytes, round_to_bf16, stack_float32, stored_bytes, to_float32)
from .progress import Progress
from .tensor_parallel import Group
from .threads import Threads

DTYPES = ("float32", "bfloat16")

# Every intermediate a trace records, in the order the forward pass computes it.
# Per-layer names are prefixed "layers.{i}." in the trace.
LAYER_TRACE_NAMES = (
    "attention_norm",  # [T, D]      rms_norm(x) * attention_norm.weight
    "q", "k", "v",     # [H|KV, T, hd] projections split into heads
    "q_rot", "k_rot",  # [H|KV, T, hd] after RoPE
    "scores",          # [H, T, S]   q.k / sqrt(hd)
    "masked_scores",   # [H, T, S]   scores + causal mask (-inf above the diagonal)
    "probs",           # [H, T, S]   softmax over keys
    "attention",       # [T, H*hd]   probs @ v, heads concatenated
    "attention_out",   # [T, D]      after wo
    "residual",        # [T, D]      x + attention_out
    "ffn_norm",        # [T, D]
    "gate", "up",      # [T, F]      w1 x, w3 x
    "silu_gate",       # [T, F]      silu(gate)
    "hidden",          # [T, F]      silu_gate * up
    "ffn_out",         # [T, D]      w2 (gate * up)
    "out",             # [T, D]      residual + ffn_out: the layer's output
)
# The notebook rotates q and k in float32 and never casts them back, so the scores, the masked
# scores (and the cached keys) stay float32 in its bf16 flow; softmax's output is cast to bf16.
FLOAT32_IN_BF16_MODE = ("q_rot", "k_rot", "scores", "masked_scores")
TRACE_NAMES = ("embedding", *(f"layers.{{i}}.{n}" for n in LAYER_TRACE_NAMES), "norm", "logits")


def rounded_to_bf16(name: str, dtype: str) -> bool:
    """Whether the intermediate `name` (a TRACE_NAMES entry, layer prefix or not) holds bf16
    values in this compute dtype: everything in the bf16 flow but FLOAT32_IN_BF16_MODE."""
    return dtype == "bfloat16" and name.rsplit(".", 1)[-1] not in FLOAT32_IN_BF16_MODE


class Llama:
    """A loaded model: configuration, weights, tokenizer and the forward pass.

    Weights arrive as they are stored (bf16 memory maps for Meta checkpoints). Layers whose
    float32 copy fits `weights_budget` bytes are upcast once here (resident); the rest stay
    mapped and are streamed through the matmul in float32 tiles (resident_or_streamed.py), so an
    8B model runs from its 16 GB of mapped bf16 with little more RAM than its KV cache.

    `forward` with a trace runs the plain pass below, the one a student reads; without one, and
    for every batch, generation and score, the runtime engine (engine.py) computes the same math.
    """

    def __init__(self, args: ModelArgs, weights: Mapping[str, np.ndarray], tokenizer=None,
                 dtype: str = "float32", weights_budget: int | None = None, source: str = "",
                 threads: int | None = None, verbose: bool = False, group: Group | None = None,
                 streamed: Mapping[str, np.ndarray] | None = None):
        if dtype not in DTYPES:
            raise ArgumentError(f"dtype is {shown(dtype)}; it must be one of {', '.join(DTYPES)}")
        if weights_budget is not None and (not isinstance(weights_budget, (int, float)) or
                                           isinstance(weights_budget, bool) or not 0 <= weights_budget < 2**62):
            raise ArgumentError(f"weights_budget is {shown(weights_budget)}; it must be a number of bytes >= 0")
        self.args, self.tokenizer, self.dtype, self.source = args, tokenizer, dtype, source
        self.weights = weights  # as stored: memory maps, never modified
        self.threads, self.verbose = Threads(threads), verbose
        # The processes this model is split over (tensor_parallel.py); alone, a Group changes nothing.
        self.group = group = group or Group()
        # In bf16 mode weights are rounded to bf16 too: a float32 checkpoint then behaves like the
        # notebook's bf16 one (and bf16 ones are unchanged, the round trip is exact).
        bf16 = dtype == "bfloat16"
        vector = round_to_bf16 if bf16 else to_float32
        pool = TilePool(self.threads)

        def resident(parts):
            return stack_float32(parts, rounded=bf16)

        def streaming(parts):  # streaming upcasts exactly; other dtypes are rounded tile by tile
            return StreamedWeight(parts, pool, round_to_bf16=bf16 and any(p.dtype != BF16 for p in parts))

        # Streamed matrices are read from `streamed` where it has them (an int16 copy,
        # formats/int16.py), float32 copies are always made from the weights as stored.
        stream_from = {**weights, **streamed} if streamed else weights
        self.streamed_as = ("streamed through the matmul as int16 (a copy made once)" if streamed else
                            "memory-mapped, streamed through the matmul in tiles")

        # Tiered residency: layers get a float32 copy, in order, while it fits the budget; the
        # rest (and the output matrix, if it does not fit) stay mapped and are streamed.
        budget = default_weights_budget(stored_bytes(weights)) if weights_budget is None else weights_budget
        output_name = (EMBEDDING if args.tie_embeddings else OUTPUT).meta
        spent = 4 * weights[output_name].size  # the output first: every token reads all of it
        self.output_resident = spent <= budget
        spent = spent if self.output_resident else 0
        self.layers, self.resident_layers = [], 0
        with Progress("making the float32 copy of the weights", args.n_layers, "layers", verbose) as progress:
            for i in range(args.n_layers):
                cost = layer_float32_bytes(weights, i)
                form = resident if spent + cost <= budget else streaming
                if form is resident:
                    spent, self.resident_layers = spent + cost, self.resident_layers + 1
                layer = LayerWeights.from_checkpoint(weights if form is resident else stream_from, i, vector, form)
                layer.wo, layer.w2 = group.row_parallel(layer.wo), group.row_parallel(layer.w2)
                self.layers.append(layer)
                progress.update(i + 1)
        self.resident = self.output_resident and self.resident_layers == args.n_layers
        self.norm = vector(weights[NORM.meta])  # [D]
        self.output = group.vocab_gathered(resident([weights[output_name]]) if self.output_resident else
                                           streaming([stream_from[output_name]]))  # [V, D]
        self.embedding = group.vocab_parallel(weights[EMBEDDING.meta], args)  # [V, D]
        self.rope_freqs = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)  # [hd/2]
        self.buffers = engine.Buffers(args)
        self.bf16_step = bf16_rounding if bf16 else keep

    def new_cache(self, max_seq_len: int | None = None, rows: int = 1) -> KVCache:
        """A KV cache for `rows` sequences of max_seq_len positions (default: the model's context)."""
        n = self.args.max_seq_len if max_seq_len is None else max_seq_len
        for name, value, high in (("max_seq_len", n, LIMITS["max_seq_len"]), ("rows", rows, 1 << 16)):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
                raise ArgumentError(f"{name} is {shown(value)}; it must be an integer from 1 to {high}")
        return KVCache(self.args, n, rows)

    def context_length(self, cache: KVCache | None = None) -> int:
        """Positions a sequence may use: the model's max_seq_len, or the cache's if smaller."""
        return min(self.args.max_seq_len, cache.max_seq_len if cache else self.args.max_seq_len)

    def generate(self, prompt, max_new_tokens: int = 256, sampler=None, **kwargs):
        """An iterator of new token ids: see npllama.generate.generate."""
        return generate(self, prompt, max_new_tokens, sampler, **kwargs)

    def generate_batch(self, prompts, max_new_tokens=256, samplers=None, **kwargs):
        """Completions of a list of prompts, computed together: see npllama.generate.generate_batch."""
        return generate_batch(self, prompts, max_new_tokens, samplers, **kwargs)

    def forward(self, tokens, start_pos: int = 0, cache: KVCache | None = None,
                trace: dict | None = None, last_only: bool = False) -> np.ndarray:
        """Logits [T, vocab_size] (float32) for T new tokens at positions start_pos.. start_pos+T-1.

        With a cache, keys and values of earlier positions come from it (its first row) and this
        call's are written into it; without one the tokens are the whole sequence. `trace`, a
        dict, receives every intermediate of TRACE_NAMES. `last_only` computes logits of the
        last position only.
        """
        tokens = self.check_tokens(tokens, start_pos, cache)
        cache = cache or self.new_cache(len(tokens))
        if trace is None:
            logits = self.forward_rows(tokens[None], np.array([len(tokens)]), np.array([start_pos]), cache,
                                       "last" if last_only else "all")
            return logits if last_only else logits[0]  # [1, V] or [T, V]
        with self.threads.applied():
            return self._forward(tokens, start_pos, cache, trace, last_only)

    def forward_rows(self, tokens: np.ndarray, lengths: np.ndarray, starts: np.ndarray, cache: KVCache,
                     positions: str | slice = "last", first_slot: int = 0, batch_size: int | None = None) -> np.ndarray:
        """Logits of N rows of right-padded tokens [N, T], each row its own length and first
        position, through the cache's slots first_slot..first_slot+N-1: see engine.forward.
        batch_size (llama.cpp's -b): at most that many positions of each row a pass, the passes
        one after another through the cache."""
        tokens, lengths, starts = np.asarray(tokens), np.asarray(lengths), np.asarray(starts)
        n_rows, n_new = tokens.shape
        if not (0 <= first_slot and first_slot + n_rows <= len(cache.order) and lengths.shape == starts.shape == (n_rows,) and
                np.all((1 <= lengths) & (lengths <= n_new)) and np.all(starts >= 0)):
            raise ArgumentError(f"{n_rows} rows of {n_new} tokens with lengths {lengths.tolist()} and starts "
                                f"{starts.tolist()} do not fit slots {first_slot}.. of a cache of {len(cache.order)} rows")
        check_vocabulary(tokens, self.args.vocab_size)
        check_fits(int(starts.max()), n_new, self.context_length(cache))
        size = n_new if batch_size is None else batch_size
        if not (isinstance(size, int) and size >= 1):
            raise ArgumentError(f"batch_size (-b, --batch-size) is {shown(batch_size)}; it must be an integer >= 1")
        with self.threads.applied():
            if size >= n_new:
                return engine.forward(self, tokens, lengths, starts, cache, positions, first_slot)
            return self._forward_in_passes(tokens, lengths, starts, cache, positions, first_slot, size)

    def _forward_in_passes(self, tokens, lengths, starts, cache, positions, first_slot, size) -> np.ndarray:
        """forward_rows in passes of `size` positions: each pass reads the keys and values the
        ones before it wrote. A row whose tokens ended in an earlier pass is fed pads, as rows
        shorter than the longest are in one pass; those logits are not kept."""
        n_rows, n_new = tokens.shape
        last = np.empty((n_rows, self.args.vocab_size), np.float32) if positions == "last" else None  # [N, V]
        parts = []  # with "all" or a slice: each pass's positions of it, [N, T', V]
        for a in range(0, n_new, size):
            width = min(size, n_new - a)
            wanted = positions if positions in ("all", "last") else \
                slice(min(max(positions.start - a, 0), width), min(max(positions.stop - a, 0), width))
            if isinstance(wanted, slice) and wanted.start == wanted.stop:
                wanted = "last"  # a pass that only writes the cache: its few logits are not kept
            logits = engine.forward(self, tokens[:, a:a + width], np.clip(lengths - a, 1, width), starts + a, cache,
                                    wanted, first_slot)  # [N, V] or [N, T', V]
            if isinstance(wanted, slice) or positions == "all":
                parts.append(logits)
            elif last is not None:  # a row's last token is in this pass if its length ends within it
                ends_here = (lengths > a) & (lengths <= a + width)  # [N]
                last[ends_here] = logits[ends_here]
        return last if last is not None else np.concatenate(parts, axis=1)  # [N, V] or [N, T, V]

    def _step(self, trace: dict):
        """The hook each named intermediate of the plain pass goes through: rounded to bf16 in the
        notebook's dtype flow, where rounded_to_bf16 says (the engine rounds at the same names),
        and recorded into `trace`."""
        def step(name, x):
            if rounded_to_bf16(name, self.dtype):
                x = round_to_bf16(x)
            trace[name] = x
            return x
        return step

    def _forward(self, tokens: np.ndarray, start_pos: int, cache: KVCache, trace: dict,
                 last_only: bool) -> np.ndarray:
        """The plain pass, traced: model.py's and layers.py's functions, one named step at a time."""
        args, n_new = self.args, len(tokens)
        step = self._step(trace)
        cos, sin = rope_tables(self.rope_freqs, np.arange(start_pos, start_pos + n_new))  # [T, hd/2] each
        mask = causal_mask(n_new, start_pos)  # [T, S]

        h = step("embedding", embed(tokens, self.embedding))  # [T, D]
        for i, layer in enumerate(self.layers):
            layer_step = prefixed(step, f"layers.{i}.")
            h = transformer_block(h, layer, args, cos, sin, mask,
                                  cache.k[i][0], cache.v[i][0], start_pos, layer_step)  # [T, D]
        if last_only:
            h = h[-1:]  # [1, D]
        h = step("norm", rms_norm(h, self.norm, args.norm_eps))  # [T, D]
        # Logits stay float32 in both modes, as in Meta's reference (`self.output(h).float()`).
        return step("logits", linear(h, self.output)).astype(np.float32)  # [T, V]

    def check_tokens(self, tokens, start_pos: int, cache: KVCache | None, generating: bool = False) -> np.ndarray:
        """tokens as an array, if they can be fed at start_pos through `cache` (and leave a position
        to generate into); else ArgumentError or PromptTooLongError."""
        tokens = np.asarray(tokens)
        if tokens.ndim != 1 or len(tokens) == 0 or not np.issubdtype(tokens.dtype, np.integer):
            raise ArgumentError(f"tokens must be a non-empty 1-D sequence of ints, got shape {tokens.shape} "
                                f"of {tokens.dtype}")
        check_vocabulary(tokens, self.args.vocab_size)
        if not isinstance(start_pos, (int, np.integer)) or isinstance(start_pos, bool) or start_pos < 0:
            raise ArgumentError(f"start_pos is {shown(start_pos)}; it must be an integer >= 0")
        if cache is None and start_pos != 0:
            raise ArgumentError("start_pos > 0 needs the cache that holds positions 0..start_pos-1")
        if cache is not None and not isinstance(cache, KVCache):
            raise ArgumentError(f"cache is {shown(cache)}; pass the KVCache that model.new_cache() made")
        check_fits(start_pos, len(tokens), self.context_length(cache), generating)
        return tokens


def check_vocabulary(tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)][0]
        raise ArgumentError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def bf16_rounding(name: str, x: np.ndarray) -> np.ndarray:
    """The engine's step in the bf16 flow: x rounded to bf16 in place where the plain pass rounds."""
    if rounded_to_bf16(name, "bfloat16"):
        np.copyto(x, x.astype(BF16))
    return x


def prefixed(step, prefix: str):
    return lambda name, x: step(prefix + name, x)


def split_heads(x: np.ndarray, n_heads: int) -> np.ndarray:
    n_new, width = x.shape
    return x.reshape(n_new, n_heads, width // n_heads).transpose(1, 0, 2)  # [T, H*hd] -> [H, T, hd]


def transformer_block(x, w: LayerWeights, args: ModelArgs, cos, sin, mask,
                      cache_k, cache_v, start_pos: int, step=keep) -> np.ndarray:
    """One layer: x + attention(norm(x)), then + feed_forward(norm(.)). x: [T, D] -> [T, D]."""
    n_new = x.shape[0]
    xn = step("attention_norm", rms_norm(x, w.attention_norm, args.norm_eps))  # [T, D]
    q, k, v = linear(xn, w.wq), linear(xn, w.wk), linear(xn, w.wv)  # [T, H*hd], [T, KV*hd] x 2
    q = step("q", split_heads(q, args.n_heads))  # [T, H*hd] -> [H, T, hd]
    k = step("k", split_heads(k, args.n_kv_heads))  # [T, KV*hd] -> [KV, T, hd]
    v = step("v", split_heads(v, args.n_kv_heads))  # [T, KV*hd] -> [KV, T, hd]
    q = step("q_rot", apply_rope(q, cos, sin))  # [H, T, hd]
    k = step("k_rot", apply_rope(k, cos, sin))  # [KV, T, hd]

    # Attend over every position so far, [0, start_pos + T): earlier ones from the cache.
    end = start_pos + n_new
    cache_k[:, start_pos:end] = k  # [KV, T, hd] into [KV, P, hd]
    cache_v[:, :, start_pos:end] = v.transpose(0, 2, 1)  # [KV, hd, T] into [KV, hd, P]
    keys, values = cache_k[:, :end], cache_v[:, :, :end].transpose(0, 2, 1)  # [KV, S, hd] each
    attn = step("attention", attention(q, keys, values, mask, step))  # [T, H*hd]
    h = step("residual", x + step("attention_out", linear(attn, w.wo)))  # [T, D]

    hn = step("ffn_norm", rms_norm(h, w.ffn_norm, args.norm_eps))  # [T, D]
    return step("out", h + step("ffn_out", feed_forward(hn, w.w1, w.w2, w.w3, step)))  # [T, D]

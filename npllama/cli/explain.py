"""`python -m npllama explain`: the notebook's walk through the forward pass, on a real model.

Every array shown is the forward pass's own intermediate, taken from the trace of one call to
`model.forward` (a view into it, never a second computation that could disagree with it), and
every size comes from `model.args`. The steps carry the notebook's variable names
(`q_per_token`, `freqs_cis`, `qk_per_token_after_masking`...) so that a student can read the two
side by side; where the notebook loops over 32 heads one by one, npllama computes all heads in
one batched matmul and `explain` shows one head's slice of it.

`explain_steps` is pure (model, tokens, trace, layer, head -> [Step]); `format_steps` prints.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ArgumentError
from ..generate import next_token_probs, top_tokens
from ..layers import rope_tables
from ..model import Llama, rounded_to_bf16
from .common import add_one_prompt_options, load_for_prompt

TOP_K = 5  # next-token candidates listed in the last step


@dataclass(frozen=True)
class Step:
    """One step of the walk: the notebook's name, one line of math, and the array it produced."""

    name: str  # the notebook's variable name, e.g. "qk_per_token_after_masking"
    math: str  # one line, with the model's own sizes
    array: np.ndarray  # the trace's array (or a view into it); derived only where noted in `source`
    source: str  # where `array` comes from, e.g. "trace['layers.0.q'][3]"
    note: str = ""
    bf16: bool = False  # values rounded to bf16 (held in a float32 array), the notebook's dtype flow
    details: tuple[str, ...] = field(default=())  # extra lines: the tokens, each layer, the top-k


def check_layer_head(args, layer: int, head: int) -> None:
    """ValueError naming the option, the model's range and what to pass instead."""
    if not 0 <= layer < args.n_layers:
        raise ValueError(f"--layer {layer} is out of range: this model has {args.n_layers} layers, "
                         f"numbered 0..{args.n_layers - 1}")
    if not 0 <= head < args.n_heads:
        raise ValueError(f"--head {head} is out of range: this model has {args.n_heads} attention heads "
                         f"per layer, numbered 0..{args.n_heads - 1}")


def residual_rms(trace: dict, n_layers: int) -> np.ndarray:
    """RMS of the residual stream per token after the embedding and after each layer: [L+1, T]."""
    stream = [trace["embedding"]] + [trace[f"layers.{i}.out"] for i in range(n_layers)]  # (L+1) x [T, D]
    return np.stack([np.sqrt(np.mean(np.square(h, dtype=np.float64), axis=-1)) for h in stream])  # [L+1, T]


def explain_steps(model: Llama, tokens, trace: dict, layer: int = 0, head: int = 0) -> list[Step]:
    """The notebook's steps for `layer` and `head`, from the trace of model.forward(tokens, trace=...)."""
    a = model.args
    check_layer_head(a, layer, head)
    tokens = np.asarray(tokens)
    n_tokens, hd, kv_head = len(tokens), a.head_dim, head // a.n_rep
    cols = slice(head * hd, (head + 1) * hd)  # head h's columns in the heads-concatenated [T, H*hd]
    piece = model.tokenizer.piece
    p = f"layers.{layer}."

    def from_trace(name, math, key, index=(), note="", **kw):
        array = trace[key][index] if index != () else trace[key]
        where = f"trace[{key!r}]" + (f"[{describe_index(index)}]" if index != () else "")
        bf16 = rounded_to_bf16(key, model.dtype)
        return Step(name, math, array, where, note, bf16, **kw)

    pieces = tuple(f"{i:>5} {int(t):>8}  {piece(int(t))!r}" for i, t in enumerate(tokens))
    rms = residual_rms(trace, a.n_layers)  # [L+1, T]
    probs = next_token_probs(trace["logits"][-1])  # [V]
    best = top_tokens(probs, TOP_K)  # [k]
    cos, sin = rope_tables(model.rope_freqs, np.arange(n_tokens))  # [T, hd/2] each
    freqs_cis = cos + 1j * sin  # [T, hd/2] complex

    group = f"kv head {kv_head} of {a.n_kv_heads}, shared by query heads " \
            f"{kv_head * a.n_rep}..{(kv_head + 1) * a.n_rep - 1} (grouped-query attention)"
    steps = [
        Step("tokens", "tokens = tokenizer.encode(prompt): byte-level BPE ids"
             + (f", {piece(int(tokens[0]))} first" if tokens[0] == model.tokenizer.bos_id else ""),
             tokens, "the forward pass's input", f"{n_tokens} tokens", details=pieces),
        from_trace("token_embeddings_unnormalized",
                   f"x = tok_embeddings.weight[tokens]: one row of {a.dim} per token", "embedding"),
        from_trace("token_embeddings",
                   f"rms_norm(x) = x / sqrt(mean(x**2) + {a.norm_eps:g}) * attention_norm.weight",
                   p + "attention_norm", note=f"layer {layer}'s input, normalized"),
        from_trace("q_per_token", f"q = rms_norm(x) @ wq.T, split into {a.n_heads} heads of {hd}; "
                   f"head {head}", p + "q", head),
        from_trace("k_per_token", f"k = rms_norm(x) @ wk.T, split into {a.n_kv_heads} heads of {hd}; "
                   f"kv head {kv_head}", p + "k", kv_head, note=group),
        from_trace("v_per_token", f"v = rms_norm(x) @ wv.T, split into {a.n_kv_heads} heads of {hd}; "
                   f"kv head {kv_head}", p + "v", kv_head, note=group),
        Step("freqs_cis", f"freqs_cis[pos, k] = cos(pos * f_k) + i sin(pos * f_k), "
             f"f_k = {a.rope_theta:g}^(-2k/{hd}), k < {hd // 2}: one rotation per pair of dimensions"
             + (" (f_k then Llama 3.1-scaled)" if a.rope_scaling else ""), freqs_cis,
             "cos + 1j * sin of rope_tables(model.rope_freqs, positions), as the forward pass computes them",
             "pair k is the adjacent dims (2k, 2k+1), as in Meta's checkpoints"),
        from_trace("q_per_token_rotated", "q_rot: each pair (q[2i], q[2i+1]) as a complex number "
                   "times freqs_cis[pos, i] (RoPE)", p + "q_rot", head),
        from_trace("k_per_token_rotated", "k_rot: the same rotation applied to k", p + "k_rot", kv_head),
        from_trace("qk_per_token", f"scores = q_rot @ k_rot.T / sqrt({hd})", p + "scores", head,
                   note="row: query position, column: key position"),
        from_trace("qk_per_token_after_masking", "masked = scores + mask, mask = -inf where key "
                   "position > query position (a token sees only the past)", p + "masked_scores", head),
        from_trace("qk_per_token_after_masking_after_softmax", "probs = softmax(masked) over keys: "
                   "each row sums to 1, exp(-inf) = 0", p + "probs", head),
        from_trace("qkv_attention", f"probs @ v: head {head}'s weighted sum of values", p + "attention",
                   (slice(None), cols), note=f"columns {cols.start}..{cols.stop - 1} of the next step"),
        from_trace("stacked_qkv_attention", f"all {a.n_heads} heads at once (one batched matmul, no loop), "
                   f"concatenated: {a.n_heads} x {hd} = {a.n_heads * hd}", p + "attention"),
        from_trace("embedding_delta", f"attention_out = stacked_qkv_attention @ wo.T: back to {a.dim}",
                   p + "attention_out"),
        from_trace("embedding_after_edit", "h = x + embedding_delta (residual connection)", p + "residual"),
        from_trace("embedding_after_edit_normalized", "rms_norm(h) * ffn_norm.weight", p + "ffn_norm"),
        from_trace("gate", f"gate = rms_norm(h) @ w1.T: {a.dim} -> {a.hidden_dim} (SwiGLU)", p + "gate"),
        from_trace("silu_gate", "silu(gate) = gate * sigmoid(gate)", p + "silu_gate"),
        from_trace("up", f"up = rms_norm(h) @ w3.T: {a.dim} -> {a.hidden_dim}", p + "up"),
        from_trace("hidden", "hidden = silu(gate) * up: the gate decides how much of up passes",
                   p + "hidden"),
        from_trace("output", f"output = hidden @ w2.T: {a.hidden_dim} -> {a.dim}, the feed-forward's delta",
                   p + "ffn_out"),
        from_trace(f"layer_{layer}_embedding", f"layer_{layer}_embedding = h + output: the layer's output",
                   p + "out"),
        Step("residual_stream_rms", f"h = layer_i(h) for i in 0..{a.n_layers - 1}, the same steps with "
             "each layer's weights; rms(h) = sqrt(mean(h**2))", rms,
             "rms of trace['embedding'] and of each trace['layers.{i}.out'], per token",
             "row 0: the embedding, row i + 1: layer i's output; columns: tokens",
             details=tuple(f"{'embedding' if i == 0 else f'layer {i - 1:>3}':>10}  rms {rms_row(r):>10.4g}   "
                           f"last token {r[-1]:>10.4g}" + ("   <- shown above" if i - 1 == layer else "")
                           for i, r in enumerate(rms))),
        from_trace("final_embedding", "rms_norm(h) * norm.weight, after the last layer", "norm"),
        from_trace("logits", f"logits = final_embedding @ output.weight.T: one score per each of "
                   f"{a.vocab_size} tokens" + (" (tied: output.weight = tok_embeddings.weight)"
                                               if a.tie_embeddings else ""), "logits",
                   note="the last row predicts the token after the prompt"),
        Step("next_token", f"p = softmax(logits[-1]); next_token = argmax(p); top {TOP_K}:", probs[best],
             "softmax of trace['logits'][-1], in float64", f"next_token = {int(best[0])}",
             details=tuple(f"{int(t):>8}  {piece(int(t))!r:<20} p = {probs[t]:.4f}" for t in best)),
    ]
    return steps


def rms_row(per_token_rms: np.ndarray) -> float:
    """The RMS over all of a layer's [T, D] output, from the per-token RMS values."""
    return float(np.sqrt(np.mean(np.square(per_token_rms))))


def describe_index(index) -> str:
    """An index as it is written inside [], e.g. 3 or ':, 40:48'."""
    if isinstance(index, tuple):
        return ", ".join(describe_index(i) for i in index)
    if isinstance(index, slice):
        return ":" if index == slice(None) else f"{index.start}:{index.stop}"
    return str(index)


def checksum(array: np.ndarray) -> int | float | complex:
    """Sum of the finite elements (the masked scores hold -inf): a fingerprint of the whole array."""
    a = np.asarray(array)
    if np.iscomplexobj(a):
        return complex(np.sum(a, dtype=np.complex128))
    if np.issubdtype(a.dtype, np.integer):
        return int(np.sum(a, dtype=np.int64))
    a = a.astype(np.float64)
    return float(np.sum(a[np.isfinite(a)]))


def format_value(v) -> str:
    if np.iscomplexobj(v):
        return f"{v.real:.3f}{v.imag:+.3f}j"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{v:.4g}"


def format_corner(array: np.ndarray, rows: int = 3, cols: int = 4) -> str:
    """The top-left corner of a 1-D or 2-D array, numpy style, `...` where it is cut."""
    a = np.asarray(array)
    if a.ndim == 1:
        n = cols + 2  # a 1-D array has room for a few more values on its one line
        return "[" + " ".join(f"{format_value(v):>10}" for v in a[:n]) + (" ..." if len(a) > n else "") + "]"
    lines = []
    for r in range(min(rows, a.shape[0])):
        row = " ".join(f"{format_value(v):>10}" for v in a[r, :cols]) + (" ..." if a.shape[1] > cols else "")
        lines.append(("[[" if r == 0 else " [") + row + "]")
    return "\n".join(lines) + (("\n  ...]" if a.shape[0] > rows else "]"))


def format_shape(array: np.ndarray) -> str:
    return "[" + ", ".join(str(n) for n in np.shape(array)) + "]"


def format_dtype(step: Step) -> str:
    return f"{step.array.dtype} (bf16-rounded values)" if step.bf16 else str(step.array.dtype)


def format_step(number: int, step: Step) -> str:
    values = format_corner(step.array).replace("\n", "\n" + " " * 4)
    total = format_value(checksum(step.array))
    lines = [f"[{number}] {step.name}",
             f"    {step.math}",
             f"    shape {format_shape(step.array)}  {format_dtype(step)}  sum {total}  from {step.source}"]
    if step.note:
        lines.append(f"    ({step.note})")
    lines.append("    " + values)
    lines.extend("    " + d for d in step.details)
    return "\n".join(lines)


def format_steps(steps: list[Step]) -> str:
    return "\n\n".join(format_step(i + 1, s) for i, s in enumerate(steps))


def write_figures(directory, model: Llama, tokens, trace: dict, layer: int, head: int) -> list:
    """The four figures of the walk, drawn from the same trace; returns each figure's drawn data."""
    from . import plots

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    piece = model.tokenizer.piece
    pieces = [piece(int(t)) for t in tokens]
    position = len(tokens) - 1  # the last prompt position: the one whose query predicts the next token
    p = f"layers.{layer}."
    probs = next_token_probs(trace["logits"][-1])  # [V]
    best = top_tokens(probs, plots.TOP_K_BARS)  # [k]
    return [
        plots.plot_rope(directory / "rope.png", *(t[0] for t in rope_tables(model.rope_freqs, [position])), position,
                        model.args.rope_theta),
        plots.plot_attention(directory / "attention.png", trace[p + "scores"][head],
                             trace[p + "masked_scores"][head], trace[p + "probs"][head], pieces, layer, head),
        plots.plot_residual_rms(directory / "residual_rms.png", residual_rms(trace, model.args.n_layers),
                                pieces),
        plots.plot_top_k(directory / "next_token.png", probs[best], [piece(int(t)) for t in best], pieces),
    ]


HELP = "the forward pass step by step, as the notebook tells it (--plots for its figures)"
DESCRIPTION = ("Walk through one forward pass step by step, in the notebook's order and with its names: every "
               "array shown is the forward pass's own intermediate.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_one_prompt_options(p)
    p.add_argument("--layer", type=int, default=0, help="the layer to show in detail")
    p.add_argument("--head", type=int, default=0, help="the attention head to show in detail")
    p.add_argument("--plots", type=Path, metavar="DIR", help="also write PNG figures into DIR "
                   "(needs matplotlib: pip install \"npllama[plot]\")")


def run(args) -> int:
    if args.plots is not None:
        from .plots import require_matplotlib
        require_matplotlib()  # before the forward pass, not after it
    model, tokens = load_for_prompt(args)
    try:
        check_layer_head(model.args, args.layer, args.head)
    except ValueError as e:
        raise ArgumentError(str(e)) from None
    trace = {}
    model.forward(tokens, trace=trace)
    a = model.args
    print(f"explain: {model.source}, {model.dtype}; layer {args.layer} of {a.n_layers}, head {args.head} "
          f"of {a.n_heads}\n")
    print(format_steps(explain_steps(model, tokens, trace, args.layer, args.head)))
    if args.plots is not None:
        for fig in write_figures(args.plots, model, tokens, trace, args.layer, args.head):
            print(f"wrote {fig.path}", file=sys.stderr)
    return 0

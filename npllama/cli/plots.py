"""The explain command's figures, drawn with matplotlib (an optional extra: npllama[plot]).

Each function takes exactly the arrays it draws and returns a `Plot` whose `data` is read back
from the figure's own artists (the heatmaps' values, the arrows' components, the bars'
lengths), so a test can check that what was drawn is the forward pass's trace, not a lookalike.

Figures are built with matplotlib's object API on an Agg canvas: no pyplot, no global backend
switch, nothing left open, safe to call from a notebook or a server.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import NpllamaError

TOP_K_BARS = 10  # candidates in the next-token bar chart
MAX_TICK_LABELS = 40  # beyond this many tokens, label every n-th one so labels stay readable
DPI = 130


class PlotDependencyError(NpllamaError, ImportError):
    """matplotlib, needed only for --plots, is not installed."""


@dataclass
class Plot:
    path: Path
    title: str
    data: dict[str, np.ndarray] = field(default_factory=dict)  # what the figure shows, from its artists


def require_matplotlib():
    """matplotlib's Figure and Agg canvas, or an error that says how to install them."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotDependencyError('--plots needs matplotlib: pip install "npllama[plot]" '
                                  "(or pip install matplotlib)") from None
    return Figure, FigureCanvasAgg


def new_figure(width: float, height: float):
    Figure, FigureCanvasAgg = require_matplotlib()
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # Token pieces in scripts DejaVu Sans lacks (CJK, Hangul...) are drawn as boxes; one
        # warning per missing glyph would bury the command's output.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font", category=UserWarning)
        fig.savefig(path, format="png", dpi=DPI)
    return path


def token_label(piece: str, width: int = 14) -> str:
    """A token piece as a tick label: quoted so leading spaces show, long ones shortened."""
    text = repr(piece)
    return text if len(text) <= width else text[:width - 1] + "…"


def thinned_ticks(n: int) -> np.ndarray:
    """Positions to label: all of them up to MAX_TICK_LABELS, else every k-th and the last."""
    step = max(1, math.ceil(n / MAX_TICK_LABELS))
    ticks = np.arange(0, n, step)
    return ticks if ticks[-1] == n - 1 else np.append(ticks, n - 1)


def plot_rope(path, cos: np.ndarray, sin: np.ndarray, position: int, theta: float) -> Plot:
    """The notebook's freqs_cis plot: freqs_cis[position] as hd/2 unit vectors, one per frequency pair,
    pair i rotated by the angle position * theta^(-2i/hd)."""
    from matplotlib import cm
    from matplotlib.colors import Normalize

    n_pairs = len(cos)
    title = f"RoPE: freqs_cis[{position}], the rotation of each of the {n_pairs} dimension pairs"
    fig = new_figure(7.5, 6.5)
    ax = fig.add_subplot()
    norm = Normalize(0, n_pairs - 1)
    circle = np.linspace(0, 2 * np.pi, 361)
    ax.plot(np.cos(circle), np.sin(circle), color="0.85", lw=1, zorder=0)
    arrows = ax.quiver(np.zeros(n_pairs), np.zeros(n_pairs), cos, sin, np.arange(n_pairs), cmap="viridis",
                       norm=norm, angles="xy", scale_units="xy", scale=1, width=0.006)
    ax.set_xlim(-1.15, 1.15)
    ax.set_ylim(-1.15, 1.15)
    ax.set_aspect("equal")
    ax.axhline(0, color="0.7", lw=0.6, zorder=0)
    ax.axvline(0, color="0.7", lw=0.6, zorder=0)
    ax.set_xlabel("real part: cos(position * freq_i)")
    ax.set_ylabel("imaginary part: sin(position * freq_i)")
    ax.set_title(f"{title}\nfreq_i = {theta:g}^(-2i/{2 * n_pairs}): pair 0 turns fastest", fontsize=10)
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, shrink=0.8)
    bar.set_label("pair index i")
    save(fig, path)
    return Plot(Path(path), title, {"cos": np.asarray(arrows.U), "sin": np.asarray(arrows.V)})


def plot_attention(path, scores: np.ndarray, masked_scores: np.ndarray, probs: np.ndarray,
                   pieces: list[str], layer: int, head: int) -> Plot:
    """One head's scores, masked scores and softmax probabilities, [T, S] each, side by side;
    the masked (-inf) cells are drawn dark grey, distinct from any finite value."""
    from matplotlib import colormaps

    n_queries, n_keys = probs.shape
    title = f"layer {layer}, head {head}: attention of each token (row) to the tokens before it (column)"
    side = min(max(3.2, 0.24 * n_keys + 1.5), 9.0)  # each panel grows with the prompt, up to a cap
    fig = new_figure(3 * side + 1.5, side * n_queries / n_keys + 1.6)
    axes = fig.subplots(1, 3, sharey=True)
    ticks_x, ticks_y = thinned_ticks(n_keys), thinned_ticks(n_queries)
    key_pieces, query_pieces = pieces[len(pieces) - n_keys:], pieces[len(pieces) - n_queries:]
    fontsize = 8 if max(n_keys, n_queries) <= 24 else 6.5
    drawn = {}
    panels = (("scores", "qk_per_token: q.k / sqrt(head_dim)", scores, "coolwarm"),
              ("masked_scores", "qk_per_token_after_masking", masked_scores, "coolwarm"),
              ("probs", "..._after_softmax: probabilities", probs, "viridis"))
    finite_scores = scores[np.isfinite(scores)]
    limit = float(np.max(np.abs(finite_scores), initial=1e-9))
    for ax, (key, label, values, cmap_name) in zip(axes, panels):
        cmap = colormaps[cmap_name].with_extremes(bad="0.25")  # masked (-inf): dark grey, in neither map
        shown = np.ma.masked_invalid(values)
        kwargs = dict(vmin=0.0, vmax=1.0) if key == "probs" else dict(vmin=-limit, vmax=limit)
        im = ax.imshow(shown, cmap=cmap, interpolation="nearest", aspect="auto", **kwargs)
        ax.set_title(label, fontsize=10)
        ax.set_xticks(ticks_x, [token_label(key_pieces[i]) for i in ticks_x], rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks_y, [token_label(query_pieces[i]) for i in ticks_y], fontsize=fontsize)
        ax.set_xlabel("key token")
        bar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
        bar.set_label("probability" if key == "probs" else "score (dark grey: -inf, masked)", fontsize=8)
        drawn[key] = np.ma.getdata(im.get_array()).copy()
        drawn[key][np.ma.getmaskarray(im.get_array())] = -np.inf  # masked_invalid cells were -inf
    axes[0].set_ylabel("query token")
    fig.suptitle(title, fontsize=11)
    save(fig, path)
    return Plot(Path(path), title, drawn)


def plot_residual_rms(path, rms: np.ndarray, pieces: list[str]) -> Plot:
    """RMS of the residual stream after the embedding (0) and after each layer (1..L), [L+1, T]:
    one thin line per token, the RMS over all tokens bold."""
    from matplotlib import colormaps

    n_rows, n_tokens = rms.shape
    title = f"the residual stream's RMS through the {n_rows - 1} layers"
    fig = new_figure(8.5, 5.0)
    ax = fig.add_subplot()
    x = np.arange(n_rows)
    colors = colormaps["plasma"](np.linspace(0, 0.85, n_tokens))
    per_token = [ax.plot(x, rms[:, t], color=colors[t], lw=0.9, alpha=0.6)[0] for t in range(n_tokens)]
    overall = np.sqrt(np.mean(np.square(rms), axis=1))  # [L+1]: RMS over all of each [T, D] output
    ax.plot(x, overall, color="black", lw=2.4, marker="o", ms=3.5, label="all tokens")
    for t, name in ((0, "first"), (n_tokens - 1, "last")):
        per_token[t].set_label(f"{name} token {token_label(pieces[t])}")
        per_token[t].set_alpha(1.0)
        per_token[t].set_linewidth(1.6)
    if np.max(rms) / max(np.min(rms), 1e-12) > 20:
        ax.set_yscale("log")
    ax.set_xticks(x if n_rows <= 34 else thinned_ticks(n_rows),
                  ["emb"] + [str(i) for i in range(n_rows - 1)] if n_rows <= 34 else None)
    ax.set_xlabel("after layer (emb: the token embeddings)")
    ax.set_ylabel("RMS = sqrt(mean(h**2)) over the model dimension")
    ax.set_title(f"{title}; thin lines: one per token", fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, path)
    return Plot(Path(path), title, {"rms": np.stack([line.get_ydata() for line in per_token], axis=1)})


def plot_top_k(path, probs: np.ndarray, candidates: list[str], pieces: list[str]) -> Plot:
    """The k most probable next tokens as horizontal bars, most probable on top."""
    k = len(probs)
    prompt_end = "".join(pieces[-6:])
    title = f"next token after …{prompt_end!r}: top {k}"
    fig = new_figure(8.0, 0.42 * k + 1.6)
    ax = fig.add_subplot()
    y = np.arange(k)
    bars = ax.barh(y, probs, color="tab:blue")
    bars[0].set_color("tab:orange")
    ax.set_yticks(y, [token_label(c, 24) for c in candidates])
    ax.invert_yaxis()
    for rect, p in zip(bars, probs):
        ax.text(rect.get_width(), rect.get_y() + rect.get_height() / 2, f" {p:.3g}", va="center", fontsize=8)
    ax.set_xlim(0, min(1.0, float(np.max(probs)) * 1.2 + 1e-9))
    ax.set_xlabel("probability (softmax of the last position's logits)")
    ax.set_ylabel("candidate token")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    save(fig, path)
    return Plot(Path(path), title, {"probs": np.array([b.get_width() for b in bars])})

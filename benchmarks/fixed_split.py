"""What thread-count-independent products would cost: a decode step's weight products (one row
times every matrix of a model's shape, float32) computed four ways, in one process:

  openblas N threads      each product one call, split by OpenBLAS between its N threads (npllama's
                          resident weights; the sums depend on N);
  openblas 1 thread       each product one call, single-threaded;
  fixed halves            each product cut into 2 fixed row blocks (boundaries at multiples of 16),
                          one single-threaded call each, on npllama's 2 tile threads (TilePool): the
                          same bits on 1 or 2 threads, as streamed weights are multiplied;
  fixed halves, 1 thread  the same blocks, both on one thread (what one free core gives).

    python benchmarks/fixed_split.py [--models smollm2,1b] [--rounds 3] [--under-load]

Milliseconds a decode step's products, median of --rounds rounds (each the median of 15 steps).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from harness import Quiet, parser, rounds, stat, table, write
from threadpoolctl import threadpool_limits

from npllama.resident_or_streamed import TilePool
from npllama.threads import Threads

# dim, hidden, layers, vocab, query width, key/value width
SHAPES = {"smollm2": (576, 1536, 30, 49152, 576, 192), "1b": (2048, 8192, 16, 128256, 2048, 512)}


def matrices(shape) -> list[np.ndarray]:
    dim, hidden, layers, vocab, q, kv = shape
    rng = np.random.default_rng(0)
    per_layer = [(q + 2 * kv, dim), (dim, q), (2 * hidden, dim), (dim, hidden)]  # q|k|v, wo, w1|w3, w2
    return [rng.standard_normal(s, dtype=np.float32) for _ in range(layers) for s in per_layer] + \
        ([rng.standard_normal((vocab, dim), dtype=np.float32)] if vocab else [])


def step_ms(fn, reps: int = 15) -> float:
    """Median milliseconds of fn() after a warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def ways(ws: list[np.ndarray], threads: int = 2) -> dict:
    """way: (BLAS threads, or None to leave them, and one decode step's products)."""
    xs = {w.shape[1]: np.ones((1, w.shape[1]), np.float32) for w in ws}
    ys = {w.shape[0]: np.empty((1, w.shape[0]), np.float32) for w in ws}

    def whole():
        for w in ws:
            np.matmul(xs[w.shape[1]], w.T, out=ys[w.shape[0]])

    def halves(pool: TilePool):  # npllama's worker threads, as streamed weights are multiplied
        def step():
            for w in ws:
                x, y, cut = xs[w.shape[1]], ys[w.shape[0]], min(len(w), (len(w) // 2 + 15) // 16 * 16)
                pool.run(lambda b: np.matmul(x, w[b[0]:b[1]].T, out=y[:, b[0]:b[1]]), [(0, cut), (cut, len(w))])
        return step
    return {f"openblas {threads} threads": (threads, whole), "openblas 1 thread": (1, whole),
            "fixed halves": (None, halves(TilePool(Threads(threads)))),
            "fixed halves, 1 thread": (None, halves(TilePool(Threads(1))))}


def measure(a, name: str, forms: dict, scale: float = 1.0, reps: int = 15) -> list[dict]:
    """Rounds of every form (name: (BLAS threads or None, step)) under every load: ms a decode step."""
    def run(case):
        threads, fn = forms[case["form"]]
        with threadpool_limits(threads, user_api="blas"):
            return {"ms": scale * step_ms(fn, reps)}
    cases = [{"model": name, "form": f, "load": load} for load in a.loads for f in forms]
    return rounds(cases, run, a.rounds, Quiet(a.max_wait), tag=name)


def report(a, cases: list[dict], title: str, ratios: dict) -> None:
    """One table a load: a row a model, a column a form, then the ratios (label: load -> (form, form))."""
    ms = {(c["load"], c["model"], c["form"]): stat(c, "ms", "ms")["median"] for c in cases}
    forms, body = list(dict.fromkeys(c["form"] for c in cases)), []
    for load in a.loads:
        models = dict.fromkeys(m for ld, m, _ in ms if ld == load)
        body += [f"{load}:", "", table(["model", *forms, *ratios], [
            [m, *(f"{ms[load, m, f]:.1f}" for f in forms),
             *(f"{ms[(load, m, top)] / ms[(load, m, bottom)]:.2f}x" for top, bottom in (r(load) for r in ratios.values()))]
            for m in models]), ""]
    write(a.out, f"{title}: ms a decode step's weight products, median of {a.rounds} rounds "
          "(busy: beside a busy loop on one core)", "\n".join(body), {"rounds": a.rounds, "runs": cases})


def main() -> None:
    p = parser(__doc__, "fixed_split")
    p.add_argument("--models", default="smollm2,1b")
    a = p.parse_args()
    cases = [c for name in a.models.split(",") for c in measure(a, name, ways(matrices(SHAPES[name])))]
    # Against what npllama does: both threads when idle, one beside a busy core.
    report(a, cases, "Fixed row blocks against OpenBLAS's own split", {"fixed halves / openblas": lambda load: (
        ("fixed halves", "openblas 2 threads") if load == "idle" else ("fixed halves, 1 thread", "openblas 1 thread"))})


if __name__ == "__main__":
    main()

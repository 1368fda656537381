"""What thread-count-independent products would cost: a decode step's weight products (one row
times every matrix of a model's shape, float32) computed four ways, in one process:

  openblas N threads   each product one call, split by OpenBLAS between its N threads (what
                       npllama does for resident weights; its sums depend on N);
  openblas 1 thread    each product one call, single-threaded;
  fixed halves         each product cut into 2 fixed row blocks (boundaries at multiples of 16,
                       whatever the thread count), one single-threaded call each, on npllama-style
                       worker threads (the main thread and one more): the same bits on 1 or 2
                       threads, as streamed weights are multiplied;
  fixed halves, 1      the same blocks, all on the main thread (what one free core gives).

    python benchmarks/fixed_split.py [--models smollm2,1b] [--rounds 3] [--under-load]

Milliseconds per decode step's products, median of --rounds rounds (each the median of 15 steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

HERE = Path(__file__).resolve().parent
SHAPES = {"smollm2": (576, 1536, 30, 49152, 576, 192), "1b": (2048, 8192, 16, 128256, 2048, 512)}


class Halves:
    """The main thread and one worker, each computing its own blocks of every product."""

    def __init__(self):
        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.job = None
        threading.Thread(target=self.work, daemon=True).start()

    def work(self):
        while True:
            self.go.acquire()
            fn, blocks = self.job
            for b in blocks:
                fn(b)
            self.done.release()

    def run(self, fn, blocks, threads: int):
        if threads == 1:
            for b in blocks:
                fn(b)
            return
        self.job = (fn, blocks[1::2])
        self.go.release()
        for b in blocks[0::2]:
            fn(b)
        self.done.acquire()


def matrices(shape) -> list[np.ndarray]:
    dim, hidden, layers, vocab, q, kv = shape
    rng = np.random.default_rng(0)
    per_layer = [(q + 2 * kv, dim), (dim, q), (2 * hidden, dim), (dim, hidden)]  # q|k|v, wo, w1|w3, w2
    return [rng.standard_normal(s, dtype=np.float32) for _ in range(layers) for s in per_layer] + \
        [rng.standard_normal((vocab, dim), dtype=np.float32)]


def halves(n: int) -> list[tuple[int, int]]:
    cut = min(n, (n // 2 + 15) // 16 * 16)
    return [(0, cut), (cut, n)]


def step_ms(fn, reps: int = 15) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure(ws: list[np.ndarray], threads: int, pool: Halves) -> dict[str, float]:
    xs = {w.shape[1]: np.ones((1, w.shape[1]), np.float32) for w in ws}
    ys = {w.shape[0]: np.empty((1, w.shape[0]), np.float32) for w in ws}

    def whole():
        for w in ws:
            np.matmul(xs[w.shape[1]], w.T, out=ys[w.shape[0]])

    def split(n_threads):
        def run():
            for w in ws:
                x, y = xs[w.shape[1]], ys[w.shape[0]]
                pool.run(lambda b: np.matmul(x, w[b[0]:b[1]].T, out=y[:, b[0]:b[1]]), halves(len(w)), n_threads)
        return run

    out = {}
    with threadpool_limits(threads, user_api="blas"):
        out[f"openblas {threads} threads"] = step_ms(whole)
    with threadpool_limits(1, user_api="blas"):
        out["openblas 1 thread"] = step_ms(whole)
        out["fixed halves"] = step_ms(split(threads))
        out["fixed halves, 1 thread"] = step_ms(split(1))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,1b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--under-load", action="store_true", help="with a busy loop on one core (machine.Spinner)")
    a = p.parse_args()
    sys.path.insert(0, str(HERE))
    from machine import Spinner, products_title
    pool, threads = Halves(), 2
    spinner = Spinner() if a.under_load else None
    try:
        results = {}
        for name in a.models.split(","):
            ws = matrices(SHAPES[name])
            rounds = [measure(ws, threads, pool) for _ in range(a.rounds)]
            results[name] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    finally:
        if spinner:
            spinner.stop()
    print(products_title(a.under_load, a.rounds))
    keys = list(next(iter(results.values())))
    print("| model | " + " | ".join(keys) + " | fixed halves / openblas |")
    print("|---" * (len(keys) + 2) + "|")
    for name, r in results.items():
        base = r["openblas 1 thread" if a.under_load else f"openblas {threads} threads"]
        best = r["fixed halves, 1 thread" if a.under_load else "fixed halves"]
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + f" | {best / base:.2f}x |")


if __name__ == "__main__":
    main()

"""A decode step's weight products (one row times every matrix of a model's shape), ms a step.

Storage (results/storage): a float32 copy (OpenBLAS's threads), int16 streamed by npllama's tiles,
or bf16 streamed as stored, on npllama's adaptive threads. 8b: 4 of its 32 layers, scaled to 32,
without the output matrix. Then why: G elements/s of casting a tile of each storage to float32. --fixed-split (results/fixed_split): float32 products by OpenBLAS on 2
and 1 threads against fixed row halves on npllama's tile threads (2 and 1), whose sums do not
depend on the thread count.

    python benchmarks/storage.py [--fixed-split] [--models smollm2,1b,8b] [--rounds 3] [--under-load]
"""

from __future__ import annotations

import statistics
import timeit

import ml_dtypes
import numpy as np
from harness import HERE, parser, rounds, stat, table, write
from threadpoolctl import threadpool_limits

from npllama.formats.int16 import Int16Matrix, to_int16
from npllama.resident_or_streamed import StreamedWeight, TilePool
from npllama.threads import Threads

# dim, hidden, layers, vocab (0: no output matrix), query width, key/value width
SHAPES = {"smollm2": (576, 1536, 30, 49152, 576, 192), "1b": (2048, 8192, 16, 128256, 2048, 512),
          "8b": (4096, 14336, 4, 0, 4096, 1024)}
LAYER_SCALE = {"8b": 32 / 4}
FIXED_SPLIT = dict(models="smollm2,1b", out=HERE / "results" / "fixed_split")


def matrices(shape) -> list[np.ndarray]:
    dim, hidden, layers, vocab, q, kv = shape
    rng = np.random.default_rng(0)
    per_layer = [(q + 2 * kv, dim), (dim, q), (2 * hidden, dim), (dim, hidden)]  # q|k|v, wo, w1|w3, w2
    return [rng.standard_normal(s, dtype=np.float32) for _ in range(layers) for s in per_layer] + \
        ([rng.standard_normal((vocab, dim), dtype=np.float32)] if vocab else [])


def step_ms(fn, reps: int) -> float:
    """Median milliseconds of fn() after a warm-up call."""
    fn()
    return 1e3 * statistics.median(timeit.repeat(fn, number=1, repeat=reps))


def storages(ws: list[np.ndarray]) -> dict:
    """form: (BLAS threads, None to leave them, and one decode step's products), on npllama's threads."""
    threads = Threads()
    pool = TilePool(threads)
    by_form = {"float32 copy": ws, "int16 streamed": [StreamedWeight(Int16Matrix(*to_int16(w)), pool) for w in ws],
               "bf16 streamed": [StreamedWeight(w.astype(ml_dtypes.bfloat16), pool) for w in ws]}
    x = {w.shape[1]: np.ones((1, w.shape[1]), np.float32) for w in ws}

    def step(mats):
        def run():
            with threads.applied():
                for m in mats:
                    x[m.shape[1]] @ m.T
        return run
    return {form: (None, step(mats)) for form, mats in by_form.items()}


def cast_rates(reps: int = 50) -> dict:
    """G elements/s of casting a 128 x 4096 tile (npllama's, in cache) of each storage to float32."""
    w = np.random.default_rng(0).standard_normal((128, 4096), dtype=np.float32)  # [128, in]
    q, tile = to_int16(w)[0], np.empty_like(w)  # [128, in] int16, float32
    stored = {"bf16": w.astype(ml_dtypes.bfloat16), "float16": w.astype(np.float16), "int16": q,
              "int8": (q >> 8).astype(np.int8)}
    return {name: w.size / 1e9 / min(timeit.repeat(lambda m=m: np.copyto(tile, m), number=1, repeat=reps))
            for name, m in stored.items()}


def fixed_split(ws: list[np.ndarray], threads: int = 2) -> dict:
    """The four ways of the docstring: (BLAS threads, or None to leave them, and one step's products)."""
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


def measure(a, name: str, forms: dict, scale: float, reps: int) -> list[dict]:
    """Rounds of every form under every load: ms a decode step."""
    def run(case):
        threads, fn = forms[case["form"]]
        with threadpool_limits(threads, user_api="blas"):
            return {"ms": scale * step_ms(fn, reps)}
    cases = [{"model": name, "form": f, "load": load} for load in a.loads for f in forms]
    return rounds(cases, run, a.rounds, tag=name)


def report(a, cases: list[dict], title: str, ratios: dict, more: str = "", results=None) -> None:
    """One table a load: a row a model, a column a form, then the ratios (label: load -> (form, form))."""
    ms = {(c["load"], c["model"], c["form"]): stat(c, "ms", "ms")["median"] for c in cases}
    forms, body = list(dict.fromkeys(c["form"] for c in cases)), []
    for load in a.loads:
        body += [f"{load}:", "", table(["model", *forms, *ratios], [
            [m, *(f"{ms[load, m, f]:.1f}" for f in forms),
             *(f"{ms[(load, m, top)] / ms[(load, m, bottom)]:.2f}x" for top, bottom in (r(load) for r in ratios.values()))]
            for m in a.models]), ""]
    write(a.out, f"{title}: ms a decode step's weight products, median of {a.rounds} rounds "
          "(busy: beside a busy loop on one core)", "\n".join(body) + more, {"rounds": a.rounds, "runs": cases,
                                                                            **(results or {})})


def main(argv=None) -> None:
    p = parser(__doc__, "storage", models="smollm2,1b,8b")
    p.preset("--fixed-split", FIXED_SPLIT, "fixed row blocks against OpenBLAS's own split", action="store_true")
    a = p.parse_args(argv)
    if a.fixed_split:  # against what npllama does: both threads when idle, one beside a busy core
        cases = [c for name in a.models for c in measure(a, name, fixed_split(matrices(SHAPES[name])), 1, reps=15)]
        report(a, cases, "Fixed row blocks against OpenBLAS's own split", {"fixed halves / openblas": lambda load: (
            ("fixed halves", "openblas 2 threads") if load == "idle" else ("fixed halves, 1 thread", "openblas 1 thread"))})
    else:
        cases = [c for name in a.models
                 for c in measure(a, name, storages(matrices(SHAPES[name])), LAYER_SCALE.get(name, 1), reps=5)]
        casts = cast_rates()
        report(a, cases, "Weight storage", {"int16 / float32": lambda load: ("int16 streamed", "float32 copy"),
                                            "int16 / bf16": lambda load: ("int16 streamed", "bf16 streamed")},
               "\n" + table(["storage", "a tile cast to float32, one core (G elements/s)"],
                            [[name, f"{rate:.2f}"] for name, rate in casts.items()]),
               {"casts_g_elements_s": casts})


if __name__ == "__main__":
    main()

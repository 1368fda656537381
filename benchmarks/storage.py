"""A decode step's weight products (one row times every matrix of a model's shape), ms a step: from a
float32 copy (OpenBLAS's threads), int16 streamed by npllama's tiles, or bf16 streamed as stored, on
npllama's adaptive threads (8b: 4 of its 32 layers, scaled to 32, without the output matrix); then
why: G elements/s of casting a tile of each storage to float32, on one core.

    python benchmarks/storage.py [--models smollm2,1b,8b] [--rounds 3] [--under-load]
"""

from __future__ import annotations

import statistics
import timeit

import ml_dtypes
import numpy as np
from harness import parser, rounds, stat, table, write

from npllama.formats.int16 import Int16Matrix, to_int16
from npllama.resident_or_streamed import StreamedWeight, TilePool
from npllama.threads import Threads

# dim, hidden, layers, vocab (0: no output matrix), query width, key/value width
SHAPES = {"smollm2": (576, 1536, 30, 49152, 576, 192), "1b": (2048, 8192, 16, 128256, 2048, 512),
          "8b": (4096, 14336, 4, 0, 4096, 1024)}
LAYER_SCALE = {"8b": 32 / 4}


def matrices(shape) -> list[np.ndarray]:
    dim, hidden, layers, vocab, q, kv = shape
    rng = np.random.default_rng(0)
    per_layer = [(q + 2 * kv, dim), (dim, q), (2 * hidden, dim), (dim, hidden)]  # q|k|v, wo, w1|w3, w2
    return [rng.standard_normal(s, dtype=np.float32) for _ in range(layers) for s in per_layer] + \
        ([rng.standard_normal((vocab, dim), dtype=np.float32)] if vocab else [])


def storages(ws: list[np.ndarray]) -> dict:
    """form: one decode step's products, on npllama's threads."""
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
    return {form: step(mats) for form, mats in by_form.items()}


def cast_rates(reps: int = 50) -> dict:
    """G elements/s of casting a 128 x 4096 tile (npllama's, in cache) of each storage to float32."""
    w = np.random.default_rng(0).standard_normal((128, 4096), dtype=np.float32)  # [128, in]
    q, tile = to_int16(w)[0], np.empty_like(w)  # [128, in] int16, float32
    stored = {"bf16": w.astype(ml_dtypes.bfloat16), "float16": w.astype(np.float16), "int16": q,
              "int8": (q >> 8).astype(np.int8)}
    return {name: w.size / 1e9 / min(timeit.repeat(lambda m=m: np.copyto(tile, m), number=1, repeat=reps))
            for name, m in stored.items()}


def step_ms(fn, scale: float, reps: int = 5) -> dict:
    """Median milliseconds of fn() after a warm-up call, times `scale`."""
    fn()
    return {"ms": scale * 1e3 * statistics.median(timeit.repeat(fn, number=1, repeat=reps))}


def main(argv=None) -> None:
    a = parser(__doc__, "storage", models="smollm2,1b,8b").parse_args(argv)
    cases = []
    for name in a.models:
        forms = storages(matrices(SHAPES[name]))
        cases += rounds([{"model": name, "form": f, "load": load} for load in a.loads for f in forms],
                        lambda c: step_ms(forms[c["form"]], LAYER_SCALE.get(name, 1)), a.rounds, tag=name)
    ms = {(c["load"], c["model"], c["form"]): stat(c, "ms", "ms")["median"] for c in cases}
    casts, body = cast_rates(), []
    for load in a.loads:
        body += [f"{load}:", "", table(["model", "float32 copy", "int16 streamed", "bf16 streamed", "int16 / float32",
                                        "int16 / bf16"], [
            [m, *(f"{ms[load, m, f]:.1f}" for f in ("float32 copy", "int16 streamed", "bf16 streamed")),
             *(f"{ms[load, m, 'int16 streamed'] / ms[load, m, f]:.2f}x" for f in ("float32 copy", "bf16 streamed"))]
            for m in a.models]), ""]
    body.append(table(["storage", "a tile cast to float32, one core (G elements/s)"],
                      [[name, f"{rate:.2f}"] for name, rate in casts.items()]))
    write(a.out, f"Weight storage: ms a decode step's weight products, median of {a.rounds} rounds (busy: beside a "
          "busy loop on one core)", "\n".join(body), {"rounds": a.rounds, "runs": cases, "casts_g_elements_s": casts})


if __name__ == "__main__":
    main()

"""Which storage a decode step's weight products are fastest from: a float32 copy in RAM
(OpenBLAS's own threads), int16 streamed by npllama's tiles (NumPy's cast, then the row scales:
formats/int16.py), or bf16 streamed as stored (ml_dtypes' cast); each at its own RAM cost (4, 2
and 2 bytes a weight).

    python benchmarks/storage.py [--models smollm2,1b,8b] [--rounds 3] [--under-load]

One row times every matrix of a model's shape (8b: 4 of its 32 layers, scaled to 32, without
the output matrix), milliseconds per decode step, median of --rounds rounds of 5 steps each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from fixed_split import SHAPES, matrices, step_ms  # noqa: E402
from npllama.formats.int16 import Int16Matrix, to_int16  # noqa: E402
from npllama.resident_or_streamed import StreamedWeight, TilePool  # noqa: E402
from npllama.threads import Threads  # noqa: E402

SHAPES = {**SHAPES, "8b": (4096, 14336, 4, 0, 4096, 1024)}  # 4 layers, no output matrix
LAYER_SCALE = {"8b": 32 / 4}


def forms(ws: list[np.ndarray], pool: TilePool) -> dict:
    return {"float32 copy": ws,
            "int16 streamed": [StreamedWeight(Int16Matrix(*to_int16(w)), pool) for w in ws],
            "bf16 streamed": [StreamedWeight(w.astype(ml_dtypes.bfloat16), pool) for w in ws]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,1b,8b")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--under-load", action="store_true", help="with a busy loop on one core (machine.Spinner)")
    a = p.parse_args()
    from machine import Spinner, products_title
    threads = Threads()  # adaptive, as npllama runs: one thread beside a busy core
    pool = TilePool(threads)
    spinner = Spinner() if a.under_load else None
    results = {}
    try:
        for name in a.models.split(","):
            ws = [w for w in matrices(SHAPES[name]) if w.size]
            x = {w.shape[1]: np.ones((1, w.shape[1]), np.float32) for w in ws}
            by_form = forms(ws, pool)
            del ws
            rounds = []
            for _ in range(a.rounds):
                row = {}
                for form, mats in by_form.items():
                    with threads.applied():
                        row[form] = LAYER_SCALE.get(name, 1) * step_ms(
                            lambda mats=mats: [x[m.shape[1]] @ m.T for m in mats], reps=5)
                rounds.append(row)
            results[name] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
            del by_form
    finally:
        if spinner:
            spinner.stop()
    print(products_title(a.under_load, a.rounds))
    keys = list(next(iter(results.values())))
    print("| model | " + " | ".join(keys) + " | int16 / float32 | int16 / bf16 |")
    print("|---" * (len(keys) + 3) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in keys) +
              f" | {r['int16 streamed'] / r['float32 copy']:.2f}x | {r['int16 streamed'] / r['bf16 streamed']:.2f}x |")


if __name__ == "__main__":
    main()

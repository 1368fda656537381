"""Which storage a decode step's weight products are fastest from: a float32 copy in RAM (OpenBLAS's
threads), int16 streamed by npllama's tiles (NumPy's cast, then the row scales: formats/int16.py),
or bf16 streamed as stored (ml_dtypes' cast); each at its own RAM cost (4, 2 and 2 bytes a weight).
npllama's adaptive threads, as it runs: one thread beside a busy core.

    python benchmarks/storage.py [--models smollm2,1b,8b] [--rounds 3] [--under-load]

One row times every matrix of a model's shape (8b: 4 of its 32 layers, scaled to 32, without the
output matrix): ms a decode step, median of --rounds rounds of 5 steps each.
"""

from __future__ import annotations

import ml_dtypes
from fixed_split import SHAPES, matrices, measure, report
from harness import parser

from npllama.formats.int16 import Int16Matrix, to_int16
from npllama.resident_or_streamed import StreamedWeight, TilePool
from npllama.threads import Threads

SHAPES = {**SHAPES, "8b": (4096, 14336, 4, 0, 4096, 1024)}  # 4 layers, no output matrix
LAYER_SCALE = {"8b": 32 / 4}


def forms(ws: list, threads: Threads) -> dict:
    pool = TilePool(threads)
    by_form = {"float32 copy": ws, "int16 streamed": [StreamedWeight(Int16Matrix(*to_int16(w)), pool) for w in ws],
               "bf16 streamed": [StreamedWeight(w.astype(ml_dtypes.bfloat16), pool) for w in ws]}
    x = {w.shape[1]: w[:1] * 0 + 1 for w in ws}  # [1, in] ones

    def step(mats):
        def run():
            with threads.applied():
                for m in mats:
                    x[m.shape[1]] @ m.T
        return run
    return {form: (None, step(mats)) for form, mats in by_form.items()}


def main() -> None:
    p = parser(__doc__, "storage")
    p.add_argument("--models", default="smollm2,1b,8b")
    a = p.parse_args()
    threads = Threads()
    cases = [c for name in a.models.split(",")
             for c in measure(a, name, forms(matrices(SHAPES[name]), threads), LAYER_SCALE.get(name, 1), reps=5)]
    report(a, cases, "Weight storage", {"int16 / float32": lambda load: ("int16 streamed", "float32 copy"),
                                        "int16 / bf16": lambda load: ("int16 streamed", "bf16 streamed")})


if __name__ == "__main__":
    main()

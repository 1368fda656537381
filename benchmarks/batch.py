"""Batched decode: aggregate tok/s of B rows decoding together (generate_batch, batch 1, 4, 16) beside
the single-sequence path (model.generate), each measurement in a fresh process.

    python benchmarks/batch.py [--models smollm2,1b] [--batches 1,4,16] [--tokens 32] [--rounds 3] [--under-load]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from harness import Quiet, cell, parser, rounds, run_once, stat, table, write

PROMPT_TOKENS = 16


def decode_rate(model_path: str, rows: int, tokens: int, budget: int | None = None, tree: str | None = None) -> dict:
    """Decode tok/s after 16-token random prompts, in npllama from `tree` (default: this one). rows 0:
    model.generate's rate; else generate_batch's over that many rows, B x (n - 1) tokens over the time
    of n tokens less that of 1 (the prefill), so that only decode counts."""
    sys.path[:0] = [tree] if tree else []
    import numpy as np

    import npllama
    assert tree is None or Path(npllama.__file__).resolve().is_relative_to(Path(tree).resolve()), npllama.__file__
    model = npllama.load(model_path, max_seq_len=PROMPT_TOKENS + tokens + 1,
                         **({} if budget is None else {"weights_budget": budget}))
    prompts = np.random.default_rng(0).integers(0, model.tokenizer.n_words, (max(rows, 1), PROMPT_TOKENS)).tolist()
    if rows == 0:
        stats = npllama.GenerationStats()
        list(model.generate(prompts[0], tokens + 1, stop_ids=(), stats=stats))
        return {"tok_s": stats.decode_tok_s}
    model.generate_batch(prompts, 2, stop_ids=())  # warm-up
    seconds = []
    for n in (1, tokens):
        t0 = time.perf_counter()
        model.generate_batch(prompts, n, stop_ids=())
        seconds.append(time.perf_counter() - t0)
    return {"tok_s": rows * (tokens - 1) / (seconds[1] - seconds[0])}


def main() -> None:
    p = parser(__doc__, "batch")
    p.add_argument("--models", default="smollm2,1b")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()
    from prepare import default_cache_dir, prepare  # not in the workers, which need no torch
    paths = {name: prepare(name, default_cache_dir())["path"] for name in a.models.split(",")}
    cases = [{"model": m, "rows": b, "load": load} for load in a.loads for m in paths
             for b in [0, *map(int, a.batches.split(","))]]
    rounds(cases, lambda c: run_once("batch", "decode_rate", model_path=paths[c["model"]], rows=c["rows"],
                                     tokens=a.tokens), a.rounds, Quiet(a.max_wait), tag="batch")
    for c in cases:
        c["tok_s"] = stat(c, "tok/s", "tok_s")
    one = {(c["model"], c["load"]): c["tok_s"]["median"] for c in cases if c["rows"] == 1}
    rows = [[c["model"], c["load"], f"batch {c['rows']}" if c["rows"] else "model.generate (one sequence)",
             cell(c["tok_s"]), f"{c['tok_s']['median'] / one[c['model'], c['load']]:.2f}" if one else "-"] for c in cases]
    write(a.out, f"Batched decode: aggregate tok/s, {a.tokens} tokens a row after a {PROMPT_TOKENS}-token prompt, "
          f"median (min-max) of {a.rounds} rounds", table(["model", "load", "path", "tok/s", "x batch 1"], rows),
          {"tokens": a.tokens, "rounds": a.rounds, "runs": cases})


if __name__ == "__main__":
    main()

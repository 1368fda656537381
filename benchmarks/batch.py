"""Batched decode: aggregate tok/s of B rows decoding together (generate_batch, batch 1, 4, 16) beside
the single-sequence path (model.generate), each measurement a fresh process importing npllama with its
default threads, as a user runs it. With --base, for a change that must not slow anything down: the
same with the npllama of a git revision (exported with `git archive`) beside the working tree's,
interleaved, writing results/commits.

    python benchmarks/batch.py [--models smollm2,1b] [--batches 1,4,16] [--tokens 32] [--rounds 3] [--under-load]
    python benchmarks/batch.py --base f33bc22 [--models smollm2,1b]    # decode, beside a busy core, batch 16

The 8b models decode a quarter of --tokens, with model.generate alone.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import HERE, ROOT, Quiet, cell, listed, parser, rounds, run_once, stat, table, write

PROMPT_TOKENS = 16
AGAINST_BASE = dict(batches="16", tokens=64, loads="idle,busy", out=HERE / "results" / "commits")


def decode_rate(model_path: str, rows: int, tokens: int, budget: int | None, tree: str) -> dict:
    """Decode tok/s after 16-token random prompts, in npllama from `tree`. rows 0: model.generate's
    rate; else generate_batch's over that many rows, B x (n - 1) tokens over the time of n tokens less
    that of 1 (the prefill), so that only decode counts."""
    sys.path.insert(0, tree)
    import numpy as np

    import npllama
    assert Path(npllama.__file__).resolve().is_relative_to(Path(tree).resolve()), npllama.__file__
    model = npllama.load(model_path, max_seq_len=PROMPT_TOKENS + tokens + 1,  # a base from before weights_budget:
                         **({} if budget is None else {"weights_budget": budget}))  # not passed unless set
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


def export(rev: str, into: str) -> str:
    """npllama as of git revision `rev`, written into `into`; the revision's full hash."""
    git = lambda *args, **kw: subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=True, **kw)  # noqa
    commit = git("rev-parse", rev, text=True).stdout.strip()
    subprocess.run(["tar", "-x", "-C", into], input=git("archive", commit, "npllama").stdout, check=True)
    return commit


def main() -> None:
    from prepare import check_models, model_options, prepare  # not in the workers, which need no torch
    p = parser(__doc__, "batch", models="smollm2,1b", tokens=32)
    model_options(p)
    p.add_argument("--batches", type=listed(int), default="1,4,16", help="rows decoding together [%(default)s]")
    p.preset("--base", AGAINST_BASE, "a git revision: its npllama against the working tree's")
    a = p.parse_args()
    check_models(p, a)
    specs = {m: prepare(m, a.cache_dir) for m in a.models}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": str(ROOT), **({"base": tmp} if a.base else {})}
        base = a.base and export(a.base, tmp)
        cases = [{"model": m, "rows": b, "load": load, "version": v} for load in a.loads for m in specs
                 for b in [0, *a.batches] if not (m.startswith("8b") and b) for v in trees]
        rounds(cases, lambda c: run_once(
            "batch", "decode_rate", model_path=specs[c["model"]]["path"], rows=c["rows"], tree=trees[c["version"]],
            budget=specs[c["model"]]["weights_budget"], tokens=a.tokens // 4 if c["model"].startswith("8b") else a.tokens),
            a.rounds, Quiet(a.max_wait, a.wait_budget), tag="batch")
    for c in cases:
        c["tok_s"] = stat(c, "tok/s", "tok_s")
    by = {(c["model"], c["rows"], c["load"], c["version"]): c["tok_s"] for c in cases}

    def ratio(key: tuple, to: tuple, digits: int = 2) -> str:
        return f"{by[key]['median'] / by[to]['median']:.{digits}f}" if to in by else "-"
    rows = [[m, load, f"batch {b}" if b else "model.generate (one sequence)", *(cell(by[m, b, load, v]) for v in trees),
             ratio((m, b, load, v), (m, 1, load, v)), *([ratio((m, b, load, v), (m, b, load, "base"), 3)] if base else [])]
            for m, b, load, v in by if v == "this"]
    write(a.out, f"Batched decode{f' against {base[:10]}' if base else ''}: aggregate tok/s, {a.tokens} tokens a row "
          f"(8b: a quarter) after a {PROMPT_TOKENS}-token prompt, median (min-max) of {a.rounds} interleaved rounds",
          table(["model", "load", "path", *(f"tok/s, {v}" for v in trees), "x batch 1", *(["this / base"] if base else [])],
                rows), {"base": base, "tokens": a.tokens, "rounds": a.rounds, "runs": cases})


if __name__ == "__main__":
    main()

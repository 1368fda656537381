"""Batched decode: aggregate tok/s of generate_batch at batch 1, 4, 16 beside model.generate, a fresh
process a measurement (the 8b models: model.generate alone, a quarter of --tokens). --base REV:
the same with the npllama of a git revision beside the working tree's, interleaved (results/commits)."""

import gc
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

import numpy as np
from harness import HERE, ROOT, cell, listed, parser, preset, rounds, run_once, stat, table, write

PROMPT_TOKENS = 16
AGAINST_BASE = dict(batches="16", tokens=64, loads="idle,busy", out=HERE / "results" / "commits")


def decode_rate(model_path: str, rows: int, tokens: int, budget: int | None, tree: str) -> dict:
    """Decode tok/s after 16-token random prompts, in npllama from `tree`: model.generate's (rows 0), or
    generate_batch's, rows x (n - 1) tokens over the time of n tokens less that of 1 (the prefill), each
    the fastest of 3 runs: one run each, a few steps apart, could take a hiccup as a negative rate."""
    sys.path.insert(0, tree)
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
    one, n = (min(timeit.repeat(lambda n=n: model.generate_batch(prompts, n, stop_ids=()), setup=gc.enable, number=1,
                                repeat=3)) for n in (1, tokens))  # garbage collected as in a user's run
    return {"tok_s": rows * (tokens - 1) / (n - one)}


def export(rev: str, into: str) -> str:
    """npllama as of git revision `rev`, written into `into`; the revision's full hash."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.check_output([*git, "rev-parse", rev], text=True).strip()
    archive = subprocess.check_output([*git, "archive", commit, "npllama"])
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    return commit


def main() -> None:
    from prepare import check_models, model_options, prepare  # not in the workers, which need no torch
    p = parser(__doc__, "batch", models="smollm2,1b", tokens=32)
    model_options(p)
    p.add_argument("--batches", type=listed(int), default="1,4,16", help="rows decoding together [%(default)s]")
    preset(p, "--base", AGAINST_BASE, "a git revision: its npllama against the working tree's")
    a = p.parse_args()
    check_models(p, a)
    specs = {m: prepare(m, a.cache_dir) for m in a.models}
    tokens = {m: a.tokens // 4 if m.startswith("8b") else a.tokens for m in specs}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": str(ROOT), **({"base": tmp} if a.base else {})}
        base = a.base and export(a.base, tmp)
        cases = [{"model": m, "rows": b, "load": load, "version": v} for load in a.loads for m in specs
                 for b in [0, *a.batches] if not (m.startswith("8b") and b) for v in trees]
        rounds(cases, lambda c: run_once("batch", "decode_rate", model_path=specs[c["model"]]["path"], rows=c["rows"],
                                         tokens=tokens[c["model"]], budget=specs[c["model"]]["weights_budget"],
                                         tree=trees[c["version"]]), a.rounds, tag="batch")
    for c in cases:
        c["tok_s"] = stat(c, "tok/s", "tok_s")
    by = {(c["model"], c["rows"], c["load"], c["version"]): c["tok_s"] for c in cases}

    def ratio(tok_s: dict, to: dict | None, digits: int = 2) -> str:
        return f"{tok_s['median'] / to['median']:.{digits}f}" if to else "-"
    rows = [[m, load, f"batch {b}" if b else "model.generate (one sequence)", *(cell(by[m, b, load, v]) for v in trees),
             ratio(tok_s, by.get((m, 1, load, "this"))), *([ratio(tok_s, by[m, b, load, "base"], 3)] if base else [])]
            for (m, b, load, version), tok_s in by.items() if version == "this"]
    header = ["model", "load", "path", *(f"tok/s, {v}" for v in trees), "x batch 1", *(["this / base"] if base else [])]
    write(a.out, f"Batched decode{f' against {base[:10]}' if base else ''}: aggregate tok/s, {a.tokens} tokens a row "
          f"(8b: a quarter) after a {PROMPT_TOKENS}-token prompt, median (min-max) of {a.rounds} interleaved rounds",
          table(header, rows), {"base": base, "tokens": a.tokens, "rounds": a.rounds, "runs": cases})


if __name__ == "__main__":
    main()

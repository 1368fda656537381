"""Batched decode measured: aggregate tok/s of generate_batch at batch 1, 4 and 16, beside the
single-sequence path (model.generate), on SmolLM2 and the 1B shape.

    python benchmarks/batch.py [--models smollm2,1b] [--batches 1,4,16] [--tokens 32] [--rounds 3]

Each measurement runs in a fresh process (benchmarks/prepare.py's models, their default threads):
B prompts of 16 random tokens are prefilled together, then --tokens tokens decoded for every row
with no stop token, and the decode steps' time gives B x tokens / seconds. Rounds interleave the
configurations, so a change in the machine's load hits all alike. Results go to
benchmarks/results/batch.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PROMPT_TOKENS = 16


def worker(model_path: str, batch: int, n_tokens: int) -> None:
    """One configuration: print the decode's aggregate tok/s as JSON. batch 0: model.generate."""
    import npllama
    model = npllama.load(model_path, max_seq_len=PROMPT_TOKENS + n_tokens + 1)
    rng = np.random.default_rng(0)
    rows = max(batch, 1)
    prompts = rng.integers(0, model.args.vocab_size, (rows, PROMPT_TOKENS))
    if batch == 0:
        stats = npllama.GenerationStats()
        list(model.generate(prompts[0].tolist(), n_tokens + 1, stop_ids=(), stats=stats))
        print(json.dumps({"tok_s": stats.decode_tok_s}))
        return
    cache = model.new_cache(PROMPT_TOKENS + n_tokens + 1, rows=rows)
    logits = model.forward_rows(prompts, np.full(rows, PROMPT_TOKENS), np.zeros(rows, np.int64), cache)
    pos = np.full(rows, PROMPT_TOKENS)
    t0 = time.perf_counter()
    for step in range(n_tokens):
        tokens = logits.argmax(axis=-1)[:, None]  # [N, 1] greedy
        logits = model.forward_rows(tokens, np.ones(rows, np.int64), pos + step, cache)
    print(json.dumps({"tok_s": rows * n_tokens / (time.perf_counter() - t0)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,1b")
    p.add_argument("--batches", default="1,4,16")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "BATCH", "TOKENS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker[0], int(a.worker[1]), int(a.worker[2]))

    from machine import machine_info
    from prepare import default_cache_dir, prepare
    from stats import progress, summary
    specs = {name: prepare(name, default_cache_dir()) for name in a.models.split(",")}
    configs = [0] + [int(b) for b in a.batches.split(",")]  # 0: the single-sequence path
    runs = {(name, b): [] for name in specs for b in configs}
    for r in range(a.rounds):
        for name, spec in specs.items():
            for b in configs:
                done = subprocess.run([sys.executable, __file__, "--worker", spec["path"], str(b), str(a.tokens)],
                                      capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                tok_s = json.loads(done.stdout.strip().splitlines()[-1])["tok_s"]
                runs[name, b].append(tok_s)
                progress("batch", f"round {r + 1}, {name}, {'generate' if b == 0 else f'batch {b}'}: {tok_s:.1f} tok/s")
    results = {"machine": machine_info(), "tokens": a.tokens, "rounds": a.rounds,
               "models": {name: spec["label"] for name, spec in specs.items()},
               "runs": [{"model": name, "batch": b, "tok_s": summary(samples, "tok/s")}
                        for (name, b), samples in runs.items()]}
    out = HERE / "results" / "batch"
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    lines = [f"# Batched decode: aggregate tok/s, {results['tokens']} tokens per row after a {PROMPT_TOKENS}-token "
             f"prompt, median of {results['rounds']} rounds (min-max)", "",
             "| model | path | tok/s | x the batch-1 rate |", "|---|---|---|---|"]
    for name in results["models"]:
        rows = [run for run in results["runs"] if run["model"] == name]
        one = next(run["tok_s"]["median"] for run in rows if run["batch"] == 1)
        for run in rows:
            t = run["tok_s"]
            path = "model.generate (one sequence)" if run["batch"] == 0 else f"generate_batch, batch {run['batch']}"
            lines.append(f"| {name} | {path} | {t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f}) "
                         f"| {t['median'] / one:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

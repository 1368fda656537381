"""Two versions of npllama measured side by side: the working tree against a git revision.

    python benchmarks/commits.py --base f33bc22                       # smollm2 and 1b
    python benchmarks/commits.py --base f33bc22 --with-8b --models smollm2,1b,8b

For a change that must not slow anything down: the same figures for both versions, in the same
rounds. Every measurement runs in a fresh process that imports npllama from one tree only (the
base revision is exported with `git archive` into a temporary directory), with npllama's default
threads, as a user runs it. Rounds interleave the versions, alternating which goes first, so a
change in the machine's load falls on both alike. The figures (tok/s, higher is better):

  decode        model.generate's decode rate, --tokens tokens after a 16-token prompt;
  under load    the same while a busy loop holds one core (machine.Spinner);
  batch 16      generate_batch's aggregate decode rate over 16 rows: B * (n - 1) tokens over the
                time of n tokens less the time of 1 (the prefill), so that only decode counts.

Models from benchmarks/prepare.py (smollm2, 1b, and with --with-8b the 8b, bf16 streamed). The
table, with each figure's median (min-max) and the ratio of the medians, goes to stdout and to
benchmarks/results/commits.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT_TOKENS = 16
# (model, figure) -> (what the worker runs, rows); 8b decodes fewer tokens (seconds each).
FIGURES = {"decode": ("generate", 1), "under load": ("generate", 1), "batch 16": ("generate_batch", 16)}


def worker(tree: str, model_path: str, budget: str, what: str, rows: int, n_tokens: int) -> None:
    """One measurement, in npllama from `tree`: print {"tok_s": ...}."""
    sys.path.insert(0, tree)
    import numpy as np

    import npllama
    assert Path(npllama.__file__).resolve().is_relative_to(Path(tree).resolve()), npllama.__file__
    kwargs = {} if budget == "default" else {"weights_budget": int(budget)}
    model = npllama.load(model_path, max_seq_len=PROMPT_TOKENS + n_tokens + 1, **kwargs)
    prompts = np.random.default_rng(0).integers(0, model.tokenizer.n_words, (rows, PROMPT_TOKENS)).tolist()
    if what == "generate":
        stats = npllama.GenerationStats()
        list(model.generate(prompts[0], n_tokens + 1, stop_ids=(), stats=stats))
        tok_s = stats.decode_tok_s
    else:
        model.generate_batch(prompts, 2, stop_ids=())  # warm-up
        seconds = []
        for n in (1, n_tokens):
            t0 = time.perf_counter()
            model.generate_batch(prompts, n, stop_ids=())
            seconds.append(time.perf_counter() - t0)
        tok_s = rows * (n_tokens - 1) / (seconds[1] - seconds[0])
    print(json.dumps({"tok_s": tok_s}))


def export(rev: str, into: Path) -> Path:
    """The npllama package of git revision `rev`, in a directory of its own."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "npllama"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def measure(tree: Path, spec: dict, figure: str, n_tokens: int) -> float:
    from machine import Spinner
    what, rows = FIGURES[figure]
    budget = "default" if spec["weights_budget"] is None else str(spec["weights_budget"])
    spinner = Spinner() if figure == "under load" else None
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", str(tree), spec["path"], budget, what, str(rows),
                               str(n_tokens)], capture_output=True, text=True, cwd=tempfile.gettempdir())
    finally:
        if spinner:
            spinner.stop()
    if done.returncode:
        raise SystemExit(f"{tree}: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["tok_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="the git revision to compare the working tree with (required)")
    p.add_argument("--models", default="smollm2,1b", help="comma-separated, from benchmarks/prepare.py")
    p.add_argument("--figures", default=",".join(FIGURES), help="comma-separated: " + ", ".join(FIGURES))
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement (8b: a quarter)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--with-8b", action="store_true", help="allow the 8b model (writes a 16 GB file once)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "commits")
    p.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        tree, path, budget, what, rows, n = a.worker
        return worker(tree, path, budget, what, int(rows), int(n))
    if not a.base:
        p.error("--base REV is required")

    sys.path[:0] = [str(ROOT), str(HERE)]
    from machine import code_info, machine_info
    from prepare import BIG_MODELS, default_cache_dir, prepare
    from stats import progress, summary
    models = a.models.split(",")
    if any(m in BIG_MODELS for m in models) and not a.with_8b:
        p.error("the 8b models write a 16 GB file: pass --with-8b")
    specs = {name: prepare(name, default_cache_dir()) for name in models}
    cases = [(m, f) for m in models for f in a.figures.split(",") if not (m.startswith("8b") and f == "batch 16")]
    base_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", a.base], capture_output=True, text=True,
                              check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"base": export(base_rev, Path(tmp)), "this": ROOT}
        runs = {(case, version): [] for case in cases for version in trees}
        for r in range(a.rounds):
            for i, (model, figure) in enumerate(cases):
                order = list(trees) if (r + i) % 2 == 0 else list(reversed(trees))
                for version in order:
                    n = a.tokens // 4 if model.startswith("8b") else a.tokens
                    tok_s = measure(trees[version], specs[model], figure, n)
                    runs[(model, figure), version].append(tok_s)
                    progress("commits", f"round {r + 1}, {model} {figure}, {version}: {tok_s:.2f} tok/s")
    results = {"machine": machine_info(), "code": code_info(), "base": base_rev, "tokens": a.tokens,
               "rounds": a.rounds, "models": {name: spec["label"] for name, spec in specs.items()},
               "runs": [{"model": m, "figure": f, "version": v, "tok_s": summary(samples, "tok/s")}
                        for ((m, f), v), samples in runs.items()]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(report(results))
    print(report(results))


def report(results: dict) -> str:
    m, code = results["machine"], results["code"]
    lines = [f"# npllama {(code['commit'] or '?')[:10]}{' + changes' if code['dirty'] else ''} against "
             f"{results['base'][:10]}: tok/s, median (min-max) of {results['rounds']} interleaved rounds", "",
             f"{m.get('cpu', '?')}, {m['cores_available']} cores; {results['tokens']} tokens a measurement "
             "(8b: a quarter), after a 16-token prompt.", "",
             "| model | figure | base | this | this / base |", "|---|---|---|---|---|"]
    by = {(r["model"], r["figure"], r["version"]): r["tok_s"] for r in results["runs"]}
    for model, figure in dict.fromkeys((r["model"], r["figure"]) for r in results["runs"]):
        base, this = by[model, figure, "base"], by[model, figure, "this"]
        lines.append(f"| {model} | {figure} | {cell(base)} | {cell(this)} | {this['median'] / base['median']:.3f} |")
    return "\n".join(lines) + "\n"


def cell(t: dict) -> str:
    return f"{t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})"


if __name__ == "__main__":
    main()

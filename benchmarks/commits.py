"""Two versions of npllama side by side, for a change that must not slow anything down: the working
tree against a git revision (exported with `git archive`), each measurement a fresh process importing
npllama from one tree only, with its default threads, as a user runs it (batch.py's decode_rate).

    python benchmarks/commits.py --base f33bc22 [--models smollm2,1b] [--tokens 64] [--rounds 3]

Figures, tok/s: decode (model.generate; 8b: a quarter of --tokens), under load (the same beside a busy
core), batch 16 (generate_batch over 16 rows).
"""

from __future__ import annotations

import subprocess
import tempfile

from harness import ROOT, Quiet, cell, parser, rounds, run_once, stat, table, write

FIGURES = {"decode": (0, "idle"), "under load": (0, "busy"), "batch 16": (16, "idle")}  # rows, load


def main() -> None:
    p = parser(__doc__, "commits")
    p.add_argument("--base", required=True, help="the git revision to compare the working tree with")
    p.add_argument("--models", default="smollm2,1b", help="comma-separated, from benchmarks/prepare.py")
    p.add_argument("--figures", default=",".join(FIGURES), help="comma-separated: " + ", ".join(FIGURES))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--with-8b", action="store_true", help="allow the 8b models (they write multi-GB files once)")
    a = p.parse_args()
    from prepare import BIG_MODELS, default_cache_dir, prepare
    if set(a.models.split(",")) & set(BIG_MODELS) and not a.with_8b:
        p.error("the 8b models write multi-GB files: pass --with-8b")
    specs = {m: prepare(m, default_cache_dir()) for m in a.models.split(",")}
    git = lambda *args, **kw: subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, check=True, **kw)  # noqa
    base = git("rev-parse", a.base, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["tar", "-x", "-C", tmp], input=git("archive", base, "npllama").stdout, check=True)
        trees = {"base": tmp, "this": str(ROOT)}
        cases = [{"model": m, "figure": f, "version": v, "load": FIGURES[f][1]} for m in specs
                 for f in a.figures.split(",") if not (m.startswith("8b") and f == "batch 16") for v in trees]
        rounds(cases, lambda c: run_once(
            "batch", "decode_rate", cwd=tmp, tree=trees[c["version"]], model_path=specs[c["model"]]["path"],
            budget=specs[c["model"]]["weights_budget"], rows=FIGURES[c["figure"]][0],
            tokens=a.tokens // 4 if c["model"].startswith("8b") else a.tokens), a.rounds, Quiet(a.max_wait), tag="commits")
    by = {(c["model"], c["figure"], c["version"]): stat(c, "tok/s", "tok_s") for c in cases}
    rows = [[m, f, cell(by[m, f, "base"]), cell(by[m, f, "this"]), f"{by[m, f, 'this']['median'] / b['median']:.3f}"]
            for (m, f, v), b in by.items() if v == "base"]
    write(a.out, f"npllama (working tree) against {base[:10]}: tok/s, median (min-max) of {a.rounds} interleaved rounds",
          f"{a.tokens} tokens a measurement (8b: a quarter) after a 16-token prompt.\n\n" +
          table(["model", "figure", "base", "this", "this / base"], rows),
          {"base": base, "tokens": a.tokens, "rounds": a.rounds, "runs": cases})


if __name__ == "__main__":
    main()

"""Speculative decoding measured: what a pass over several positions costs, and decode tok/s with
and without guesses, on SmolLM2 and the 8B shape streamed, idle and beside a busy core.

    python benchmarks/speculative.py [--models smollm2,8b] [--tokens 64] [--rounds 2] [--8b-tokens 32] [--8b-rounds 1]

One worker process a model (benchmarks/prepare.py's models; the 8B's bf16 file streamed as its
int16 copy, npllama's default) measures:
- pass cost: after a 256-token prefill, a pass over T = 1, 2, 4, 8, 16 new positions, best of
  several, as a multiple of T = 1: what one step with T - 1 guesses costs;
- decode, greedy, --tokens new tokens, plain against speculative, on (a) copying: a passage, then
  its first words again (the model goes on repeating it), and (b) open-ended: a story prompt, where
  guesses mostly fail. Methods: prompt lookup; on the 8B a random Llama-3.2-1B-shaped draft model
  (streamed too; random weights agree with nothing, so it shows what failing guesses cost); and
  "replay", guesses taken from the plain run's own output: every guess right, the ceiling a
  copying task approaches (random weights do not copy a passage, a trained model does).
  Every speculative run's tokens are checked equal to the plain run's.
Rounds interleave plain and speculative runs, idle then beside a busy core (machine.Spinner), so a
drift in the machine's load hits both. Writes benchmarks/results/speculative.{json,md}.
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
from npllama.speculative import PASS_COST, Drafter, Guesses  # noqa: E402

PASS_WIDTHS = (1, 2, 4, 8, 16)
PREFILL = 256
OPEN_PROMPT = "Once upon a time, in a small village by the sea,"


def copying_prompt() -> str:
    """A passage of plain prose (the docstring of Python's subprocess module), then its first words
    again: SmolLM2 goes on repeating it nearly word for word."""
    import subprocess
    passage = subprocess.__doc__[:900]
    passage = passage[:passage.rfind(".") + 1]
    return passage + "\n\n" + passage[:60].rsplit(" ", 1)[0]


class Replay(Drafter):
    """A drafter whose guesses are a known greedy output: every guess right."""

    def __init__(self, prompt: list[int], output: list[int], draft_max: int):
        self.sequence, self.draft_max, self.cost = prompt + output, draft_max, PASS_COST

    def guess(self, rows, wanted):
        return [Guesses(self.sequence[row.pos + 1:row.pos + 1 + k]) for row, k in zip(rows, wanted)]


def pass_costs(model, reps: int) -> dict:
    cache = model.new_cache(PREFILL + max(PASS_WIDTHS))
    tokens = np.random.default_rng(0).integers(0, model.args.vocab_size, (1, PREFILL + max(PASS_WIDTHS)))
    model.forward_rows(tokens[:, :PREFILL], np.array([PREFILL]), np.array([0]), cache)
    seconds = {}
    for width in PASS_WIDTHS:
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model.forward_rows(tokens[:, PREFILL:PREFILL + width], np.array([width]), np.array([PREFILL]), cache,
                               "all" if width > 1 else "last")
            runs.append(time.perf_counter() - t0)
        seconds[width] = min(runs)
    return {w: {"seconds": s, "ratio": s / seconds[1]} for w, s in seconds.items()}


def decode(model, prompt: list[int], n: int, drafter=None, **speculation) -> dict:
    from npllama.generate import Batch, Completion, GenerationStats, Row, Sampler
    if drafter is None:
        stats = GenerationStats()
        out = list(model.generate(prompt, n, stop_ids=(), stats=stats, **speculation))
        return {"tokens": out, "tok_s": stats.decode_tok_s, "drafted": stats.drafted, "accepted": stats.accepted}
    row = Row(prompt, n, Sampler(), set(), done=Completion([]))
    batch = Batch(model, model.new_cache(len(prompt) + n), drafter=drafter)
    batch.add(row)
    batch.step()  # the prefill, not timed (as decode_tok_s leaves it out)
    t0 = time.perf_counter()
    while batch:
        batch.step()
    return {"tokens": row.done.tokens, "tok_s": (n - 1) / (time.perf_counter() - t0),
            "drafted": row.drafting.drafted, "accepted": row.drafting.accepted}


def worker(name: str, n_tokens: int, rounds: int) -> None:
    import npllama
    from machine import Spinner
    from prepare import default_cache_dir, prepare
    from stats import progress
    spec = prepare(name, default_cache_dir())
    budget = spec["weights_budget"]
    model = npllama.load(spec["path"], weights_budget=budget)
    model.verbose = False
    result = {"label": spec["label"], "pass_cost": pass_costs(model, 3 if name == "8b" else 10), "runs": []}
    progress("speculative", f"{name} pass cost: " + ", ".join(f"{w}: {c['ratio']:.2f}x" for w, c in result["pass_cost"].items()))
    draft = None
    if name == "8b":
        draft = npllama.load(prepare("1b", default_cache_dir())["path"], weights_budget=0)
        draft.verbose = False
    tasks = {"copying": model.tokenizer.encode(copying_prompt()), "open-ended": model.tokenizer.encode(OPEN_PROMPT)}
    for r in range(rounds):
        for load in ("idle", "busy"):
            spinner = Spinner() if load == "busy" else None
            try:
                for task, prompt in tasks.items():
                    plain = decode(model, prompt, n_tokens)
                    methods = {"lookup": lambda: decode(model, prompt, n_tokens, lookup=True),
                               "replay": lambda: decode(model, prompt, n_tokens, Replay(prompt, plain["tokens"], 8))}
                    if draft is not None:
                        methods["draft model"] = lambda: decode(model, prompt, n_tokens, draft=draft)
                    for method, run in methods.items():
                        got = run()
                        assert got["tokens"] == plain["tokens"], f"{method} changed the greedy output of {task}"
                        result["runs"].append({"round": r, "load": load, "task": task, "method": method,
                                               "plain_tok_s": plain["tok_s"], "tok_s": got["tok_s"],
                                               "drafted": got["drafted"], "accepted": got["accepted"]})
                        progress("speculative", f"{name} round {r + 1} {load} {task} {method}: {got['tok_s']:.2f} "
                                 f"tok/s vs plain {plain['tok_s']:.2f} ({got['accepted']}/{got['drafted']} kept)")
            finally:
                if spinner:
                    spinner.stop()
    print(json.dumps(result))


def report(res: dict) -> str:
    m = res["machine"]
    lines = [f"# Speculative decoding ({m.get('cpu')}, {m.get('cpu_count')} cores; " +
             "; ".join(f"{n}: {r['tokens']} greedy tokens, {r['rounds']} round(s)" for n, r in res["models"].items()) +
             "; busy = a busy loop on one core)", "",
             "## A pass over T new positions, as a multiple of T = 1 (after a 256-token prefill)", "",
             "| model | " + " | ".join(f"T={w}" for w in PASS_WIDTHS) + " |", "|---" * (len(PASS_WIDTHS) + 1) + "|"]
    for name, r in res["models"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['pass_cost'][str(w)]['ratio']:.2f}x" for w in PASS_WIDTHS) + " |")
    lines += ["", "## Decode with and without guesses (speedup = median over rounds of speculative / plain tok/s, "
              "each pair measured back to back)", "",
              "| model | task | method | load | plain tok/s | speculative tok/s | speedup | kept / guessed |",
              "|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        keys = dict.fromkeys((x["task"], x["method"], x["load"]) for x in r["runs"])
        for task, method, load in keys:
            runs = [x for x in r["runs"] if (x["task"], x["method"], x["load"]) == (task, method, load)]
            plain, spec = (np.median([x[k] for x in runs]) for k in ("plain_tok_s", "tok_s"))
            speedup = np.median([x["tok_s"] / x["plain_tok_s"] for x in runs])
            kept, guessed = sum(x["accepted"] for x in runs), sum(x["drafted"] for x in runs)
            lines.append(f"| {name} | {task} | {method} | {load} | {plain:.2f} | {spec:.2f} | {speedup:.2f}x | "
                         f"{kept} / {guessed} |")
    lines += ["", "Models: " + "; ".join(f"{n}: {r['label']}" for n, r in res["models"].items()) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,8b")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--8b-tokens", dest="tokens_8b", type=int, default=32, help="--tokens of the 8B (2 s a token)")
    p.add_argument("--8b-rounds", dest="rounds_8b", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results" / "speculative"))
    p.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.tokens, a.rounds)
    from machine import code_info, machine_info
    res = {"machine": machine_info(), "code": code_info(), "models": {}}
    for name in a.models.split(","):
        tokens, rounds = (a.tokens_8b, a.rounds_8b) if name == "8b" else (a.tokens, a.rounds)
        done = subprocess.run([sys.executable, __file__, "--worker", name, "--tokens", str(tokens), "--rounds",
                               str(rounds)], stdout=subprocess.PIPE, text=True)
        if done.returncode:
            raise SystemExit(f"the {name} worker failed ({done.returncode})")
        res["models"][name] = {**json.loads(done.stdout.strip().splitlines()[-1]), "tokens": tokens, "rounds": rounds}
    Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(a.out).with_suffix(".md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()

"""Speculative decoding: what a pass over several positions costs, and decode tok/s with and without
guesses, on SmolLM2 and the 8B shape streamed (its int16 copy), idle and beside a busy core.

    python benchmarks/speculative.py [--models smollm2,8b] [--tokens 64] [--rounds 2] [--8b-tokens 32] [--8b-rounds 1]

One worker process a model measures the pass cost (after a 256-token prefill, a pass over T = 1, 2,
4, 8, 16 new positions, best of several, as a multiple of T = 1: one step with T - 1 guesses), then
in each round a plain greedy decode of --tokens tokens and, right after it, each method's: prompt
lookup; on the 8B a random Llama-3.2-1B-shaped draft model (its guesses fail: what failing costs);
"replay", the plain run's own output as guesses (all right: the ceiling a copying task approaches).
Two tasks: copying (a passage, then its first words again) and open-ended (a story prompt). Every
speculative run's tokens must equal the plain run's.
"""

from __future__ import annotations

import statistics
import subprocess
import time
import timeit

import numpy as np
from harness import Quiet, Worker, parser, rounds, table, write

from npllama.speculative import PASS_COST, Drafter, Guesses

PASS_WIDTHS = (1, 2, 4, 8, 16)
PREFILL = 256
# A passage of plain prose (the docstring of Python's subprocess module), then its first words again:
# SmolLM2 goes on repeating it nearly word for word.
PASSAGE = subprocess.__doc__[:subprocess.__doc__[:900].rfind(".") + 1]
TASKS = {"copying": PASSAGE + "\n\n" + PASSAGE[:60].rsplit(" ", 1)[0],
         "open-ended": "Once upon a time, in a small village by the sea,"}


class Replay(Drafter):
    """Guesses from a known greedy output: every guess right."""

    def __init__(self, sequence: list[int], draft_max: int = 8):
        self.sequence, self.draft_max, self.cost = sequence, draft_max, PASS_COST

    def guess(self, rows, wanted):
        return [Guesses(self.sequence[row.pos + 1:row.pos + 1 + k]) for row, k in zip(rows, wanted)]


class Speculation:
    """One model (and on the 8B a draft model), measured one call at a time in a worker process."""

    def __init__(self, name: str):
        import npllama
        from prepare import prepare
        spec = prepare(name)
        self.label, self.model = spec["label"], npllama.load(spec["path"], weights_budget=spec["weights_budget"])
        self.draft = npllama.load(prepare("1b")["path"], weights_budget=0) if name == "8b" else None
        for model in (self.model, self.draft):
            if model is not None:
                model.verbose = False

    def pass_costs(self, reps: int) -> dict:
        model, end = self.model, PREFILL + max(PASS_WIDTHS)
        cache = model.new_cache(end)
        tokens = np.random.default_rng(0).integers(0, model.args.vocab_size, (1, end))
        model.forward_rows(tokens[:, :PREFILL], np.array([PREFILL]), np.array([0]), cache)
        seconds = {str(width): min(timeit.repeat(lambda: model.forward_rows(
            tokens[:, PREFILL:PREFILL + width], np.array([width]), np.array([PREFILL]), cache,
            "all" if width > 1 else "last"), number=1, repeat=reps)) for width in PASS_WIDTHS}
        return {"label": self.label, "pass_cost": {w: {"seconds": s, "ratio": s / seconds["1"]} for w, s in seconds.items()}}

    def decode(self, prompt: list[int], n: int, drafter=None, **speculation) -> dict:
        from npllama.generate import Batch, Completion, GenerationStats, Row, Sampler
        if drafter is None:
            stats = GenerationStats()
            out = list(self.model.generate(prompt, n, stop_ids=(), stats=stats, **speculation))
            return {"tokens": out, "tok_s": stats.decode_tok_s, "drafted": stats.drafted, "accepted": stats.accepted}
        row = Row(prompt, n, Sampler(), set(), done=Completion([]))
        batch = Batch(self.model, self.model.new_cache(len(prompt) + n), drafter=drafter)
        batch.add(row)
        batch.step()  # the prefill, not timed (as decode_tok_s leaves it out)
        t0 = time.perf_counter()
        while batch:
            batch.step()
        return {"tokens": row.done.tokens, "tok_s": (n - 1) / (time.perf_counter() - t0),
                "drafted": row.drafting.drafted, "accepted": row.drafting.accepted}

    def compare(self, task: str, tokens: int) -> dict:
        """A plain decode, then each method's right after it: tok/s and guesses kept."""
        prompt = self.model.tokenizer.encode(TASKS[task])
        plain = self.decode(prompt, tokens)
        methods = {"lookup": lambda: self.decode(prompt, tokens, lookup=True),
                   "replay": lambda: self.decode(prompt, tokens, Replay(prompt + plain["tokens"]))}
        if self.draft is not None:
            methods["draft model"] = lambda: self.decode(prompt, tokens, draft=self.draft)
        out = {}
        for method, run in methods.items():
            got = run()
            assert got["tokens"] == plain["tokens"], f"{method} changed the greedy output of {task}"
            out[method] = {k: got[k] for k in ("tok_s", "drafted", "accepted")}
        return {"plain_tok_s": plain["tok_s"], "methods": out}


def main() -> None:
    p = parser(__doc__, "speculative", loads="idle,busy", n_rounds=2, models="smollm2,8b", tokens=64)
    p.add_argument("--8b-tokens", dest="tokens_8b", type=int, default=32, help="--tokens of the 8B (2 s a token)")
    p.add_argument("--8b-rounds", dest="rounds_8b", type=int, default=1)
    a = p.parse_args()
    models, quiet, rows = {}, Quiet(a.max_wait, a.wait_budget), []
    for name in a.models:
        tokens, n = (a.tokens_8b, a.rounds_8b) if name == "8b" else (a.tokens, a.rounds)
        worker = Worker(f"speculative/{name}", "speculative")
        worker.ask("Speculation", name=name)
        costs = worker.ask("pass_costs", reps=3 if name == "8b" else 10)
        cases = rounds([{"task": t, "load": load} for load in a.loads for t in TASKS],
                       lambda c: worker.ask("compare", task=c["task"], tokens=tokens), n, quiet, lambda: [worker.pid], name)
        models[name] = dict(worker.close(), **(costs or {}), tokens=tokens, rounds=n, runs=cases)
        for c in cases:
            for method in c["runs"][0]["methods"] if c.get("runs") else ():
                runs = [(x["plain_tok_s"], x["methods"][method]) for x in c["runs"]]
                rows.append([name, c["task"], method, c["load"], f"{statistics.median(p for p, _ in runs):.2f}",
                             f"{statistics.median(m['tok_s'] for _, m in runs):.2f}",
                             f"{statistics.median(m['tok_s'] / p for p, m in runs):.2f}x",
                             f"{sum(m['accepted'] for _, m in runs)} / {sum(m['drafted'] for _, m in runs)}"])
    costs = [[name, *(f"{m['pass_cost'][str(w)]['ratio']:.2f}x" for w in PASS_WIDTHS)]
             for name, m in models.items() if "pass_cost" in m]
    write(a.out, "Speculative decoding (busy: beside a busy loop on one core)", "\n".join([
        f"## A pass over T new positions, as a multiple of T = 1 (after a {PREFILL}-token prefill)", "",
        table(["model", *(f"T={w}" for w in PASS_WIDTHS)], costs), "",
        "## Decode with and without guesses (speedup: median over rounds of speculative / plain tok/s, each pair "
        "measured back to back)", "", table(["model", "task", "method", "load", "plain tok/s", "speculative tok/s",
                                             "speedup", "kept / guessed"], rows), "",
        "Models: " + "; ".join(f"{n}: {m.get('label')}, {m['tokens']} greedy tokens, {m['rounds']} round(s)"
                               for n, m in models.items()) + "."]), {"models": models})


if __name__ == "__main__":
    main()

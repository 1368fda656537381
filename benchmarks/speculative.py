"""Speculative decoding on SmolLM2 and the 8B shape (streamed), idle and beside a busy core: what a pass over T = 1-16
new positions costs, and decode tok/s plain against prompt lookup, a random 1B-shaped draft model (8B: what failing
guesses cost) and "replay" (the plain output as guesses: the ceiling), on a copying and an open-ended task.

    python benchmarks/speculative.py [--models smollm2,8b] [--tokens 64] [--rounds 2] [--8b-tokens 32] [--8b-rounds 1]
"""

import statistics
import subprocess
import time
import timeit

import numpy as np
from harness import Worker, parser, rounds, table, write

import npllama
from npllama.generate import Row, Sampler, decode
from npllama.speculative import PASS_COST, Drafter, Guesses, drafter_for

PASS_WIDTHS = (1, 2, 4, 8, 16)
PREFILL = 256
# A passage of plain prose (the docstring of Python's subprocess module), then its first words again:
# SmolLM2 goes on repeating it nearly word for word.
PASSAGE = subprocess.__doc__[:subprocess.__doc__[:900].rfind(".") + 1]
TASKS = {"copying": PASSAGE + "\n\n" + PASSAGE[:60].rsplit(" ", 1)[0],
         "open-ended": "Once upon a time, in a small village by the sea,"}


class Replay(Drafter):
    """Guesses from a known greedy output: every guess right."""

    def __init__(self, sequence: list[int]):
        self.sequence, self.draft_max, self.cost = sequence, 8, PASS_COST

    def guess(self, rows, wanted):
        return [Guesses(self.sequence[row.pos + 1:row.pos + 1 + k]) for row, k in zip(rows, wanted)]


class Speculation:
    """One model (and on the 8B a draft model), measured one call at a time in a worker process."""

    def __init__(self, name: str):
        from prepare import prepare  # it imports torch: here, in the worker, alone
        spec = prepare(name)
        self.label, self.model = spec["label"], npllama.load(spec["path"], weights_budget=spec["weights_budget"])
        self.draft = npllama.load(prepare("1b")["path"], weights_budget=0) if name == "8b" else None

    def pass_costs(self, reps: int) -> dict:
        """Seconds of a pass over each width of new positions after the prefill (the best of `reps`), and x one's."""
        model, end = self.model, PREFILL + max(PASS_WIDTHS)
        cache = model.new_cache(end)
        tokens = np.random.default_rng(0).integers(0, model.args.vocab_size, (1, end))
        model.forward_rows(tokens[:, :PREFILL], [PREFILL], [0], cache)
        seconds = {str(width): min(timeit.repeat(lambda: model.forward_rows(
            tokens[:, PREFILL:PREFILL + width], [width], [PREFILL], cache, "all" if width > 1 else "last"),
            number=1, repeat=reps)) for width in PASS_WIDTHS}
        return {"label": self.label,
                "pass_cost": {width: {"seconds": s, "ratio": s / seconds["1"]} for width, s in seconds.items()}}

    def greedy(self, prompt: list[int], n: int, replay: list[int] | None = None, **speculation) -> tuple[Row, float]:
        """n greedy tokens after `prompt`, guessed from `replay` or drafter_for(**speculation): the row, tok/s."""
        cache, row = self.model.new_cache(len(prompt) + n), Row(prompt, n, Sampler(), set())
        drafter = Replay(replay) if replay else drafter_for(self.model, cache, **speculation)
        steps = decode(self.model, [row], cache, drafter)
        next(steps)  # the prefill, not timed
        t0 = time.perf_counter()
        list(steps)  # the rest
        return row, (n - 1) / (time.perf_counter() - t0)

    def compare(self, task: str, tokens: int) -> dict:
        """A plain decode, then each method's right after it, which must give the same tokens: tok/s, guesses kept."""
        prompt = self.model.tokenizer.encode(TASKS[task])
        plain, plain_tok_s = self.greedy(prompt, tokens)
        methods = {"lookup": {"lookup": True}, "replay": {"replay": prompt + plain.done.tokens},
                   **({"draft model": {"draft": self.draft}} if self.draft is not None else {})}
        out = {}
        for method, speculation in methods.items():
            row, tok_s = self.greedy(prompt, tokens, **speculation)
            assert row.done.tokens == plain.done.tokens, f"{method} changed the greedy output of {task}"
            out[method] = {"tok_s": tok_s, "drafted": row.drafting.drafted, "accepted": row.drafting.accepted}
        return {"plain_tok_s": plain_tok_s, "methods": out}


def main() -> None:
    p = parser(__doc__, "speculative", loads="idle,busy", n_rounds=2, models="smollm2,8b", tokens=64)
    p.add_argument("--8b-tokens", dest="tokens_8b", type=int, default=32, help="--tokens of the 8B (2 s a token)")
    p.add_argument("--8b-rounds", dest="rounds_8b", type=int, default=1)
    a = p.parse_args()
    models, rows = {}, []
    for name in a.models:
        tokens, n = (a.tokens_8b, a.rounds_8b) if name == "8b" else (a.tokens, a.rounds)
        worker = Worker(f"speculative/{name}", "speculative")
        worker.ask("Speculation", name=name)
        costs = worker.ask("pass_costs", reps=3 if name == "8b" else 10)
        cases = rounds([{"task": t, "load": load} for load in a.loads for t in TASKS],
                       lambda c: worker.ask("compare", task=c["task"], tokens=tokens), n, lambda: [worker.pid], name)
        models[name] = dict(worker.close(), **(costs or {}), tokens=tokens, rounds=n, runs=cases)
        for c in (c for c in cases if c.get("runs")):
            for method in c["runs"][0]["methods"]:
                runs = [(x["plain_tok_s"], x["methods"][method]) for x in c["runs"]]
                rows.append([name, c["task"], method, c["load"], f"{statistics.median(p for p, _ in runs):.2f}",
                             f"{statistics.median(m['tok_s'] for _, m in runs):.2f}",
                             f"{statistics.median(m['tok_s'] / p for p, m in runs):.2f}x",
                             f"{sum(m['accepted'] for _, m in runs)} / {sum(m['drafted'] for _, m in runs)}"])
    costs = [[name, *(f"{m['pass_cost'][str(w)]['ratio']:.2f}x" for w in PASS_WIDTHS)]
             for name, m in models.items() if "pass_cost" in m]
    headers = ["model", "task", "method", "load", "plain tok/s", "speculative tok/s", "speedup", "kept / guessed"]
    write(a.out, "Speculative decoding (busy: beside a busy loop on one core)", "\n\n".join([
        f"## A pass over T new positions, as a multiple of T = 1 (after a {PREFILL}-token prefill)",
        table(["model", *(f"T={w}" for w in PASS_WIDTHS)], costs), "## Decode with and without guesses (speedup: "
        "median over rounds of speculative / plain tok/s, each pair measured back to back)", table(headers, rows),
        "Models: " + "; ".join(f"{name}: {m.get('label')}, {m['tokens']} greedy tokens, {m['rounds']} round(s)"
                               for name, m in models.items()) + "."]), {"models": models})


if __name__ == "__main__":
    main()

"""Tensor parallelism: decode on 1 and 2 MPI ranks (one BLAS thread each; an `mpiexec -n N` run a measurement),
resident and streamed, with its time in collectives."""

import sys
import time
from pathlib import Path

import numpy as np
from harness import cell, listed, memory_mb, parser, rounds, run_once, stat, table, write

PROMPT_TOKENS = 16
MPIEXEC = [str(Path(sys.executable).with_name("mpiexec")), "-n"]
FIGURE_UNITS = {"decode_tok_s": "tok/s", "ms_per_token": "ms", "weight_gb_s": "GB/s", "collective_ms_per_token": "ms"}


def decode(model_path: str, tokens: int, weights: str) -> dict | None:
    """One rank's decode (resident: a float32 copy; streamed: bf16 from the map); rank 0 replies for every rank."""
    import npllama
    from engines import weight_bytes
    model = npllama.load(model_path, max_seq_len=PROMPT_TOKENS + tokens + 1, threads=1,
                         weights_budget=0 if weights == "streamed" else None)
    group, cache = model.group, model.new_cache()
    logits = model.forward(list(np.random.default_rng(0).integers(0, model.args.vocab_size, PROMPT_TOKENS)), 0, cache)
    group.node_barrier()  # the ranks start together
    seconds0, count0, t0 = group.collective_seconds, group.collectives, time.perf_counter()
    for pos in range(PROMPT_TOKENS, PROMPT_TOKENS + tokens):
        logits = model.forward([group.bcast(int(np.argmax(logits[-1])))], pos, cache, last_only=True)
    seconds = time.perf_counter() - t0
    mine = {"decode_tok_s": tokens / seconds, "ms_per_token": 1e3 * seconds / tokens,
            "weight_gb_s": weight_bytes(model, lambda w: getattr(w, "w", w)) * tokens / seconds / 1e9,  # unwrapped
            "collective_ms_per_token": 1e3 * (group.collective_seconds - seconds0) / tokens,
            "collectives_per_token": (group.collectives - count0) / tokens, "rss_anon_mb": memory_mb()["RssAnon"]}
    ranks = group.comm.gather(mine, 0) if group.size > 1 else [mine]
    return {**ranks[0], "ranks": ranks} if group.rank == 0 else None


def main() -> None:
    from prepare import prepare  # not in the ranks: torch would weigh on their memory
    p = parser(__doc__, "tensor_parallel", tokens=64)
    p.add_argument("--model", default="1b", help="a benchmarks/prepare.py model [%(default)s]")
    p.add_argument("--ranks", type=listed(int), default="1,2", help="MPI processes [%(default)s]")
    p.add_argument("--weights", type=listed(), default="resident,streamed", help="resident, streamed [%(default)s]")
    a = p.parse_args()
    spec = prepare(a.model)
    cases = [{"weights": w, "load": load, "ranks": n} for w in a.weights for load in a.loads for n in a.ranks]
    rounds(cases, lambda c: run_once("tensor_parallel", "decode", MPIEXEC + [str(c["ranks"])], model_path=spec["path"],
                                     tokens=a.tokens, weights=c["weights"]), a.rounds, tag="tp")
    for c in cases:
        c.update({key: stat(c, unit, key) for key, unit in FIGURE_UNITS.items()})
    text = table(["weights", "load", "ranks", "decode tok/s", "ms/token", "weights read per rank, GB/s",
                  "in collectives, ms/token", "collectives/token", "RssAnon per rank, MB"],
                 [[c["weights"], c["load"], c["ranks"], *(cell(c[key]) for key in FIGURE_UNITS),
                   f"{c['runs'][-1]['collectives_per_token']:.0f}",
                   ", ".join(f"{r['rss_anon_mb']:.0f}" for r in c["runs"][-1]["ranks"])] for c in cases])
    write(a.out, f"Tensor parallelism: {spec['label']}, {a.tokens} tokens after a {PROMPT_TOKENS}-token prompt, one "
          f"BLAS thread a rank, median (min-max) of {a.rounds} rounds", text,
          {"model": spec["label"], "tokens": a.tokens, "rounds": a.rounds, "runs": cases})


if __name__ == "__main__":
    main()

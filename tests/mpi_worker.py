"""Run under `mpiexec -n N python tests/mpi_worker.py MODEL OUT` by tests/test_tensor_parallel.py
(and with N = 1, or no mpiexec, for the single-process reference).

Every rank loads MODEL through npllama.load, as a user's script would, and computes the logits
of a prompt, 32 greedy tokens and 32 sampled ones; rank 0 saves them to OUT (.npz). Each rank
writes OUT.rank{r}.json: the group it ran in, its heads, and the bytes of the weight matrices it
holds in RAM (arrays that own their memory, not views of a file's memory map).
"""

import json
import sys
from dataclasses import fields

import numpy as np

import npllama

PROMPT = "the answer to the ultimate question of life, the universe, and everything is "


def main(model_path: str, out: str) -> None:
    model = npllama.load(model_path, max_seq_len=128)
    group = model.group
    tokens = model.tokenizer.encode(PROMPT)
    logits = model.forward(tokens)  # [T, V]
    greedy = list(model.generate(tokens, 32, stop_ids=()))
    sampled = list(model.generate(tokens, 32, npllama.Sampler(temperature=1.0, top_p=0.95, seed=7), stop_ids=()))
    batch = model.generate_batch([tokens, tokens[:5]], 8, npllama.Sampler(temperature=0.8, seed=3), stop_ids=())
    with open(f"{out}.rank{group.rank}.json", "w") as f:
        json.dump({"rank": group.rank, "size": group.size, "resident_bytes": resident_bytes(model),
                   "n_heads": model.args.n_heads, "n_kv_heads": model.args.n_kv_heads,
                   "cache_bytes": model.new_cache(16).nbytes}, f)
    if group.rank == 0:
        np.savez(out, logits=logits, greedy=greedy, sampled=sampled,
                 batch=np.array([c.tokens for c in batch]))


def resident_bytes(model) -> int:
    """Bytes of the distinct arrays the model's weight matrices own (a memory map's views own none)."""
    owners = {}
    weights = [getattr(layer, f.name) for layer in model.layers for f in fields(layer)] + [model.output]
    for w in weights:
        a = getattr(w, "w", w)  # unwrap a row-parallel or vocabulary-gathered weight
        while isinstance(a, np.ndarray) and isinstance(a.base, np.ndarray):
            a = a.base
        if isinstance(a, np.ndarray) and a.base is None and a.ndim == 2:
            owners[id(a)] = a.nbytes
    return sum(owners.values())


if __name__ == "__main__":
    main(*sys.argv[1:])

"""Run under `mpiexec -n N python tests/engine_worker.py MODEL OUT` by tests/test_engine.py: every
runtime path of the engine in every combination of dtype and weight mode, on this rank's share
of MODEL. Rank 0 saves what each returned to OUT (.npz), keyed "{dtype}/{weights}/{what}".

The inputs are test_engine.py's (PROMPTS, the passage, N_CTX, the weight modes), passed in as
JSON, so that the two compute the same things; the budgets are per rank: "half" keeps half of
this rank's share float32."""

import json
import sys

import numpy as np

import npllama
from npllama import perplexity as P
from npllama.chat import chat_format_for
from npllama.generate import Sampler


def main(model_path: str, out: str, inputs: str) -> None:
    spec = json.loads(inputs)
    prompts, n_ctx = spec["prompts"], spec["n_ctx"]
    results = {}
    reference = npllama.load(model_path, max_seq_len=64)  # float32 resident: the KL's reference
    whole = sum(4 * w.size for w in reference.weights.values())  # this rank's share, float32
    budgets = {"all": None, "half": whole // 2, "none": 0}
    for dtype in ("float32", "bfloat16"):
        for weights, (budget, form) in spec["weights"].items():
            if (dtype, form) == ("bfloat16", "int16"):
                continue  # refused: the bf16 flow computes with the weights as stored
            model = npllama.load(model_path, dtype=dtype, weights_budget=budgets[budget], max_seq_len=64, weights=form)
            for what, value in run_all(model, reference, prompts, spec["text"], n_ctx).items():
                results[f"{dtype}/{weights}/{what}"] = value
    if model.group.rank == 0:
        np.savez(out, **results)


def run_all(model, reference, prompts: list[list[int]], text: str, n_ctx: int) -> dict:
    """What each runtime path returns, as arrays."""
    out = {"forward": model.forward(prompts[2])}
    sequence, cache = prompts[2] + prompts[0], model.new_cache(32)
    steps = [model.forward(sequence[:5], 0, cache)] + [model.forward([t], pos, cache)
                                                        for pos, t in enumerate(sequence[5:], 5)]
    out["cached_decode"] = np.concatenate(steps)
    lengths = np.array([len(p) for p in prompts])
    tokens = np.zeros((len(prompts), lengths.max()), np.int64)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    out["ragged"] = model.forward_rows(tokens, lengths, np.zeros(len(prompts), np.int64),
                                       model.new_cache(32, rows=len(prompts)), "all")
    out["generate"] = np.array(list(model.generate(prompts[0], 10, Sampler(0), stop_ids=())))
    done = model.generate_batch(prompts, [8, 3, 6, 8], Sampler(0), stop_ids=(), logprobs=True)
    for i, d in enumerate(done):
        out[f"batch{i}"], out[f"batch{i}_logprobs"] = np.array(d.tokens), np.array(d.logprobs)
    fmt = chat_format_for(model.tokenizer)
    dialog = fmt.encode_dialog([{"role": "user", "content": "hello"}])
    out["chat"] = np.array(list(model.generate(dialog, 6, Sampler(0), stop_ids=fmt.stop_ids)))
    chunks = P.windows(model.tokenizer.encode(text), n_ctx, model.tokenizer.bos_id)
    totals = list(P.evaluate(chunks, P.model_logits(model, 3)))[-1]
    out["perplexity"] = np.array(totals.perplexity()[0])
    totals = list(P.evaluate(chunks, P.model_logits(model, 2), P.model_logits(reference, 2)))[-1]
    out["mean_kl"] = np.array(totals.kl_summary()["mean_kl"])
    return out


if __name__ == "__main__":
    main(*sys.argv[1:])

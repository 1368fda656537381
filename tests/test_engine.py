"""One engine under every feature: every runtime path, in every combination of dtype and weight
mode, held to the plain traced forward pass of the same model and dtype (model.py + layers.py).

The combinations: dtype {float32, bfloat16} x weights {resident, tiered, streamed as stored,
streamed as int16, tiered with int16} x {forward, cached decode, ragged batch, generate,
generate_batch, chat, perplexity, KL}; the same under `mpiexec -n 2`. Bounds:

- float32: within 1e-5 x max|logit| of the plain pass on the weights as stored (summation order
  is all that differs); 1e-4 with int16 weights, which do not hold a bf16 weight 128 times smaller
  than its row's largest exactly (formats/int16.py);
- bf16 (a model of 3 layers, where the flow moves the logits by about 1e-2 of their max): closer
  to the plain bf16 pass than to the plain float32 one (root mean square over the logits), so a
  path that drops the flow fails. Not closer than that: the bf16 flow is chaotic under a change
  of summation order (a float32 sum in another order flips a bf16 rounding, whose step then
  moves every product it enters, and the next layer flips more): computed in another order,
  streamed tiles, a batch's rows or a decode step move the logits by 0.2 to 0.9 of the flow's
  own effect on this model, as two schedules of the plain pass do (prefill 5 tokens, or 18);
- perplexity: float32 within 1e-4 relative of exp(mean NLL) of the plain pass over the same
  windows; bf16 within 30% of the gap between the plain bf16 and float32 perplexities.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama import cli
from npllama import perplexity as P
from npllama.chat import chat_format_for
from npllama.formats import describe
from npllama.generate import GenerationStats, Sampler, log_softmax
from oracle.checkpoints import tiny_args

ARGS = tiny_args(dim=256, n_layers=3, n_heads=8, n_kv_heads=2)  # grouped-query: 4 query heads a kv head
DTYPES = ("float32", "bfloat16")
# Each weight mode: its budget (all float32, half of it, none) and how the rest is streamed.
WEIGHTS = {"resident": ("all", "auto"), "tiered": ("half", "exact"), "streamed": ("none", "exact"),
           "int16": ("none", "int16"), "tiered-int16": ("half", "auto")}
BOUND = {"int16": 1e-4, "tiered-int16": 1e-4}  # of max|logit| in float32; else 1e-5
PASSAGE = Path(__file__).parent / "data" / "passage.txt"
PROMPTS = [[128000, 791, 4320, 311, 279, 17139], [128000],
           [128000, 9906, 11, 1917, 0, 3639, 374, 264, 3280, 30, 1226, 2574], [5, 6]]
N_CTX = 32  # perplexity's window


@pytest.fixture(scope="module")
def path(random_checkpoint):
    return random_checkpoint(ARGS, seed=21)


def budget_of(path, weights: str) -> int | None:
    """weights_budget for a weight mode: None (all float32), half the float32 size, or 0."""
    kind = WEIGHTS[weights][0]
    if kind == "all":
        return None
    whole = npllama.load(path)
    return 0 if kind == "none" else sum(4 * w.size for w in whole.weights.values()) // 2


@pytest.fixture(scope="module")
def load(path):
    """load(dtype, weights): the model in that combination, made once per module."""
    @lru_cache(maxsize=None)
    def make(dtype: str, weights: str):
        model = npllama.load(path, dtype=dtype, weights_budget=budget_of(path, weights), max_seq_len=64,
                             weights=WEIGHTS[weights][1])
        layers = {"all": model.args.n_layers, "none": 0}.get(WEIGHTS[weights][0], model.resident_layers)
        assert model.resident_layers == layers and (model.resident == (layers == model.args.n_layers))
        assert 0 < model.resident_layers < model.args.n_layers or WEIGHTS[weights][0] != "half"  # some of each
        form = WEIGHTS[weights][1]  # "auto" streams int16 in float32 compute only (bf16: as stored)
        assert ("int16" in model.streamed_as) == (form == "int16" or form == "auto" and dtype == "float32"
                                                  and WEIGHTS[weights][0] != "all")
        return model
    return make


@pytest.fixture(scope="module")
def plain(load):
    """plain(dtype, tokens, weights="resident"): logits [T, V] of the plain traced pass, on the
    weights as stored (resident) or on a weight mode's own."""
    @lru_cache(maxsize=None)
    def run(dtype: str, tokens: tuple, weights: str) -> np.ndarray:
        return load(dtype, weights).forward(list(tokens), trace={})

    def of(dtype: str, tokens, weights: str = "resident") -> np.ndarray:
        return run(dtype, tuple(int(t) for t in tokens), "resident")
    return of


def assert_like_plain(actual: np.ndarray, dtype: str, tokens, plain, select=lambda logits: logits,
                      weights: str = "resident"):
    """`actual` against select(plain logits of `tokens`): the bound of the module docstring."""
    if dtype == "float32":
        reference = select(plain(dtype, tokens))
        err = np.abs(actual - reference).max()
        assert err <= BOUND.get(weights, 1e-5) * np.abs(reference).max(), f"{err:.3g} from the plain pass"
        return
    assert_closer_to_bf16(actual, select(plain(dtype, tokens, weights)), select(plain("float32", tokens)))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def assert_closer_to_bf16(actual: np.ndarray, bf16: np.ndarray, float32: np.ndarray) -> None:
    assert rms(float32 - bf16) > 1e-4 * rms(bf16)  # 1000 times float32 rounding: the test can tell them apart
    to_bf16, to_float32 = rms(actual - bf16), rms(actual - float32)
    assert to_bf16 < to_float32, f"rms {to_bf16:.3g} from the plain bf16 pass, {to_float32:.3g} from float32"


# The bf16 flow computes with bf16 weights exactly: int16 weights with it are refused (below).
combinations = pytest.mark.parametrize("dtype, weights", [(d, w) for d in DTYPES for w in WEIGHTS
                                                          if (d, w) != ("bfloat16", "int16")])


# --- forward passes -----------------------------------------------------------------------------

@pytest.mark.slow
@combinations
def test_forward(load, plain, dtype, weights):
    model = load(dtype, weights)
    tokens = PROMPTS[2]
    assert_like_plain(model.forward(tokens), dtype, tokens, plain, weights=weights)
    assert_like_plain(model.forward(tokens, last_only=True), dtype, tokens, plain, lambda x: x[-1:], weights=weights)


@pytest.mark.slow
@combinations
def test_cached_decode(load, plain, dtype, weights):
    """A prefill, then one token at a time through the cache: each step's logits are the plain
    pass's at that position."""
    model = load(dtype, weights)
    tokens = PROMPTS[2] + PROMPTS[0]
    cache = model.new_cache(32)
    steps = [model.forward(tokens[:5], 0, cache)]
    steps += [model.forward([t], pos, cache) for pos, t in enumerate(tokens[5:], 5)]
    assert_like_plain(np.concatenate(steps), dtype, tokens, plain, weights=weights)


@pytest.mark.slow
@combinations
def test_ragged_batch(load, plain, dtype, weights):
    """Right-padded rows of their own lengths: each row's logits at its real positions are the
    plain pass's of that prompt alone; then one step of every row at its own position; then
    only some positions of every row (perplexity's slice)."""
    model = load(dtype, weights)
    lengths = np.array([len(p) for p in PROMPTS])
    tokens = np.zeros((len(PROMPTS), lengths.max()), np.int64)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = p
    cache = model.new_cache(32, rows=len(PROMPTS))
    logits = model.forward_rows(tokens, lengths, np.zeros(len(PROMPTS), np.int64), cache, "all")
    for i, p in enumerate(PROMPTS):
        assert_like_plain(logits[i, :len(p)], dtype, p, plain, weights=weights)
    step = model.forward_rows(np.array([[7], [8], [9], [10]]), np.ones(4, np.int64), lengths, cache)
    for i, p in enumerate(PROMPTS):
        assert_like_plain(step[i], dtype, p + [7 + i], plain, lambda x: x[-1], weights=weights)
    full = np.array([PROMPTS[2], PROMPTS[2][::-1]])  # [2, 12]
    some = model.forward_rows(full, np.full(2, 12), np.zeros(2, np.int64), model.new_cache(12, rows=2), slice(6, 11))
    for row, p in zip(some, full):
        assert_like_plain(row, dtype, p, plain, lambda x: x[6:11], weights=weights)


# --- generation ---------------------------------------------------------------------------------

def assert_greedy_like_plain(prompt, new, dtype, plain, weights):
    """Each greedy token is the plain pass's best, up to the bound: no token the plain pass
    ranks lower than its best by more than the error the engine is allowed."""
    logits = plain(dtype, prompt + new[:-1], weights)[len(prompt) - 1:]  # [n, V]: what each token was chosen from
    chosen = logits[np.arange(len(new)), new]  # [n]
    scale = np.abs(logits).max()
    slack = 2 * BOUND.get(weights, 1e-5) * scale if dtype == "float32" else 0.6 * np.abs(plain("float32", prompt + new[:-1]) -
                                                                 plain(dtype, prompt + new[:-1], weights)).max()
    assert (logits.max(-1) - chosen <= slack).all(), (weights, new)


def assert_cache_like_plain(model, exact, cache, sequence, dtype, bound=1e-5, slot=0):
    """The keys and values a generation left in the cache are the plain pass's k_rot and v of
    the same sequence, position by position (float32: 1e-5 of their largest; bf16: the values
    are bf16 values, and the keys the rotation of bf16 values)."""
    trace = {}
    exact.forward(sequence, trace=trace)  # the plain pass on the weights as stored
    for i in range(model.args.n_layers):
        keys = cache.k[i][slot][:, :len(sequence)]  # [KV, S, hd]
        values = cache.v[i][slot][:, :, :len(sequence)].transpose(0, 2, 1)  # [KV, S, hd]
        for ours, theirs in ((keys, trace[f"layers.{i}.k_rot"]), (values, trace[f"layers.{i}.v"])):
            assert np.abs(ours - theirs).max() <= (bound if dtype == "float32" else 1e-2) * np.abs(theirs).max()
    if dtype == "bfloat16":  # rounded where the plain pass rounds: every value is a bf16 value
        values = cache.v[0][slot][:, :, :len(sequence)]
        np.testing.assert_array_equal(values, npllama.model.round_to_bf16(values))


@pytest.mark.slow
@combinations
def test_generate(load, plain, dtype, weights):
    model = load(dtype, weights)
    prompt, cache, stats = PROMPTS[0], model.new_cache(32), GenerationStats()
    new = list(model.generate(prompt, 10, Sampler(0), stop_ids=(), stats=stats, cache=cache))
    assert len(new) == 10 and stats.cached_positions == len(prompt) + 9
    assert_greedy_like_plain(prompt, new, dtype, plain, weights)
    assert_cache_like_plain(model, load(dtype, "resident"), cache, prompt + new[:-1], dtype, BOUND.get(weights, 1e-5))


@pytest.mark.slow
@combinations
def test_generate_batch(load, plain, dtype, weights):
    """Ragged prompts, each row its own limit, greedy and sampled: the tokens' log-probabilities
    are the plain pass's, and a sampled row draws what it draws alone."""
    model = load(dtype, weights)
    limits = [8, 3, 6, 8]
    out = model.generate_batch(PROMPTS, limits, Sampler(0), stop_ids=(), logprobs=True)
    for p, done, limit in zip(PROMPTS, out, limits):
        assert done.new_tokens == limit and done.stop_reason == "max_new_tokens"
        assert_greedy_like_plain(p, done.tokens, dtype, plain, weights)
        expected = log_softmax(plain(dtype, p + done.tokens[:-1], weights)[len(p) - 1:])[np.arange(limit), done.tokens]
        if dtype == "float32":
            assert np.abs(np.array(done.logprobs) - expected).max() <= 10 * BOUND.get(weights, 1e-5)
        else:
            as_float32 = log_softmax(plain("float32", p + done.tokens[:-1])[len(p) - 1:])[np.arange(limit), done.tokens]
            assert_closer_to_bf16(np.array(done.logprobs), expected, as_float32)
    sampled = model.generate_batch(PROMPTS[:2], 6, [Sampler(0.9, seed=5), Sampler(0.9, seed=6)], stop_ids=())
    for p, seed, done in zip(PROMPTS, (5, 6), sampled):
        assert done.tokens == list(model.generate(p, 6, Sampler(0.9, seed=seed), stop_ids=()))


@pytest.mark.slow
@combinations
def test_chat(load, path, capsys, dtype, weights):
    """`--chat -p` with the combination's options prints generate's greedy answer to the dialog
    (which test_generate holds to the plain pass)."""
    model = load(dtype, weights)
    fmt = chat_format_for(model.tokenizer)
    tokens = fmt.encode_dialog([{"role": "user", "content": "hello"}])
    answer = list(model.generate(tokens, 6, Sampler(0), stop_ids=fmt.stop_ids))
    code = cli.main(["-m", str(path), "--chat", "-p", "hello", "-n", "6", "--dtype", dtype, "-c", "64",
                     *budget_options(path, weights)])
    out, err = capsys.readouterr()
    assert code == 0
    assert_loaded_as(err, model)
    assert out == model.tokenizer.decode([t for t in answer if t not in fmt.stop_ids]) + "\n"


def assert_loaded_as(err: str, model) -> None:
    """The command's model was loaded in the combination's dtype and weight mode: its load line
    says what `model` (loaded here with the same options) is."""
    assert f"{model.dtype} compute, weights {describe(model).split(', weights ')[1]}" in err


def budget_options(path, weights: str) -> list[str]:
    """The command line's spelling of a weight mode (resident: the default budget)."""
    budget = budget_of(path, weights)
    return ["--weights", WEIGHTS[weights][1]] + ([] if budget is None else ["--weights-budget-gb", str(budget / 2**30)])


# --- perplexity and KL ------------------------------------------------------------------------

def windows_of(model) -> np.ndarray:
    tok = model.tokenizer
    return P.windows(tok.encode(PASSAGE.read_text()), N_CTX, tok.bos_id)


def plain_logits(plain, dtype):
    """A perplexity reference that runs the plain traced pass on each window."""
    def run(chunk):
        return np.stack([plain(dtype, window)[P.scored(N_CTX)] for window in chunk])
    run.batch = 1
    return run


def plain_perplexity(plain, dtype, chunks, weights="resident") -> float:
    nll = []
    for window in chunks:
        logits = plain(dtype, window, weights).astype(np.float64)  # [n_ctx, V]
        for j in range(N_CTX // 2, N_CTX - 1):
            z = logits[j] - logits[j].max()
            nll.append(math.log(np.exp(z).sum()) - z[window[j + 1]])
    return math.exp(np.mean(nll))


@pytest.mark.slow
@combinations
def test_perplexity(load, plain, path, capsys, dtype, weights):
    """The command's perplexity (3 windows a pass, the combination's options) against exp(mean
    NLL) of the plain pass over the same windows."""
    chunks = windows_of(load(dtype, weights))
    code = cli.main(["perplexity", "-m", str(path), "-f", str(PASSAGE), "-c", str(N_CTX), "-np", "3", "--dtype", dtype,
                     *budget_options(path, weights)])
    out, err = capsys.readouterr()
    assert code == 0, out
    assert_loaded_as(err, load(dtype, weights))
    ppl = float(out.split("Final estimate: PPL = ")[1].split()[0])
    expected = plain_perplexity(plain, dtype, chunks, weights)
    if dtype == "float32":
        assert ppl == pytest.approx(expected, rel=1e-4)
    else:
        gap = abs(plain_perplexity(plain, "float32", chunks) - expected)
        assert gap > 1e-3 * expected and abs(ppl - expected) <= 0.3 * gap


@pytest.mark.slow
@combinations
def test_kl_divergence(load, plain, dtype, weights):
    """KL(plain float32 || this combination), by npllama.perplexity, against the same divergence
    of the plain passes worked out here: the KL table's rows measure what they say."""
    model = load(dtype, weights)
    chunks = windows_of(model)
    totals = list(P.evaluate(chunks, P.model_logits(model, 2), plain_logits(plain, "float32")))[-1]
    kl, expected = totals.kl_summary()["mean_kl"], kl_by_hand(plain, dtype, chunks, weights)
    if dtype == "float32":
        assert expected == 0 and kl < (1e-8 if "int16" in weights else 1e-9)
    else:
        assert expected > 1e-6 and abs(kl - expected) <= 0.3 * expected


def kl_by_hand(plain, dtype: str, chunks, weights: str = "resident") -> float:
    """Mean KL(plain float32 || plain dtype) over the scored positions of every window."""
    by_hand = []
    for window in chunks:
        p = log_softmax(plain("float32", window)[P.scored(N_CTX)])  # [n, V] reference
        q = log_softmax(plain(dtype, window, weights)[P.scored(N_CTX)])  # [n, V]
        by_hand.append((np.exp(p) * (p - q)).sum(-1))
    return float(np.concatenate(by_hand).mean())


def test_out_of_vocabulary_ids_are_refused_on_every_path(load):
    """A negative id would wrap to the table's last rows, one at vocab_size raise an IndexError:
    forward, forward_rows, generate and generate_batch each name the id instead."""
    model = load("float32", "resident")
    v = model.args.vocab_size
    for bad in (-1, v):
        for call in (lambda: model.forward([1, bad]), lambda: list(model.generate([1, bad], 2)),
                     lambda: model.generate_batch([[1, 2], [1, bad]], 2),
                     lambda: model.forward_rows(np.array([[1, bad]]), np.array([2]), np.array([0]), model.new_cache(4))):
            with pytest.raises(npllama.errors.ArgumentError, match=f"token id {bad} is outside the vocabulary"):
                call()


# --- the plain pass itself, and what the engine rounds ---------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_last_only_is_the_last_position(load, dtype):
    """The traced pass's last_only keeps the last position's logits (the one generation reads):
    the same, up to the output product's summation order for one row."""
    model = load(dtype, "resident")
    full = model.forward(PROMPTS[2], trace={})
    last = model.forward(PROMPTS[2], trace={}, last_only=True)
    assert last.shape == (1, model.args.vocab_size)
    assert np.abs(last - full[-1:]).max() <= 1e-5 * np.abs(full).max() if dtype == "float32" else \
        rms(last - full[-1:]) < 0.3 * rms(full[-1:] - full[-2:-1])  # far from any other position


def test_the_engine_rounds_only_trace_names_and_the_plain_pass_every_one(load):
    """The one bf16 rule, two passes: every name the engine rounds at is a trace name whose
    plain value is bf16 too, and each rounded step of the plain pass has its place in the engine
    (q, k, v as one stacked product; gate and up likewise)."""
    model = load("bfloat16", "resident")
    seen = []

    def recording(name, x):
        seen.append(name)
        return npllama.model.bf16_rounding(name, x)

    model.bf16_step = recording
    try:
        model.forward(PROMPTS[0])
    finally:
        model.bf16_step = npllama.model.bf16_rounding
    layer_names = set(npllama.model.LAYER_TRACE_NAMES) | {"embedding", "norm", "logits"}
    assert set(seen) <= layer_names
    rounded = {n for n in layer_names if npllama.model.rounded_to_bf16(n, "bfloat16")}
    assert rounded - set(seen) == {"k", "v", "up"}  # rounded within the stacked q|k|v and gate|up


def test_the_bf16_flow_moves_with_the_summation_order(random_checkpoint):
    """Why the bf16 bound is "closer to the plain bf16 pass than to float32" and no tighter: the
    plain pass itself, over the same first 5 tokens prefilled alone or within 18, gives logits a
    large part of the flow's own effect apart on a 3-layer model of dim 64 (matmuls of 5 and 18
    rows sum in other orders; each flipped bf16 rounding moves every product it enters)."""
    model = npllama.load(random_checkpoint(tiny_args(n_layers=3, n_kv_heads=2), seed=21), dtype="bfloat16")
    tokens = PROMPTS[2] + PROMPTS[0]
    whole, first = model.forward(tokens, trace={})[:5], model.forward(tokens[:5], trace={})
    as_float32 = npllama.load(random_checkpoint(tiny_args(n_layers=3, n_kv_heads=2), seed=21)).forward(tokens[:5])
    print(f"\nreordered / flow: {rms(first - whole) / rms(as_float32 - whole):.2f}")
    assert rms(first - whole) > 0.2 * rms(as_float32 - whole)
    assert_closer_to_bf16(first, whole, as_float32)


@pytest.mark.slow
def test_streamed_logits_do_not_depend_on_the_thread_count(path):
    """Streamed weights are cut into tiles at fixed rows: one thread or three, the same bits
    (a decode step: its attention products are vectors, which BLAS does not split)."""
    logits = []
    for threads in (1, 2, 3):
        model = npllama.load(path, weights_budget=0, threads=threads, max_seq_len=32)
        cache = model.new_cache(32)
        model.forward(PROMPTS[0], 0, cache)
        logits.append(model.forward([7], len(PROMPTS[0]), cache))
    for other in logits[1:]:
        np.testing.assert_array_equal(other, logits[0])


# --- the same under mpiexec -n 2 --------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).with_name("mpiexec")


def mpiexec(*command: str) -> subprocess.CompletedProcess:
    assert MPIEXEC.exists(), f"{MPIEXEC} is missing: the test extra installs mpi4py and mpich"
    return subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, *command], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def split(path, tmp_path_factory):
    """What tests/engine_worker.py computed on 2 ranks, each holding half of every layer."""
    out = tmp_path_factory.mktemp("engine-mpi") / "results"
    inputs = json.dumps({"prompts": PROMPTS, "text": PASSAGE.read_text(), "n_ctx": N_CTX, "weights": WEIGHTS})
    done = mpiexec(str(REPO / "tests" / "engine_worker.py"), str(path), str(out), inputs)
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(f"{out}.npz") as results:
        return dict(results)


@pytest.mark.slow  # mpiexec
@combinations
def test_two_ranks_compute_what_the_plain_pass_does(split, load, plain, dtype, weights):
    """Every path, on 2 ranks, held to the plain pass by the bounds one process is held to; in
    float32, the tokens are one process's own."""
    got = {key.split("/")[2]: value for key, value in split.items() if key.startswith(f"{dtype}/{weights}/")}
    assert_like_plain(got["forward"], dtype, PROMPTS[2], plain, weights=weights)
    assert_like_plain(got["cached_decode"], dtype, PROMPTS[2] + PROMPTS[0], plain, weights=weights)
    for i, p in enumerate(PROMPTS):
        assert_like_plain(got["ragged"][i, :len(p)], dtype, p, plain, weights=weights)
    model, limits = load(dtype, weights), [8, 3, 6, 8]
    assert_greedy_like_plain(PROMPTS[0], got["generate"].tolist(), dtype, plain, weights)
    for i, p in enumerate(PROMPTS):
        assert_greedy_like_plain(p, got[f"batch{i}"].tolist(), dtype, plain, weights)
    fmt = chat_format_for(model.tokenizer)
    dialog = fmt.encode_dialog([{"role": "user", "content": "hello"}])
    assert_greedy_like_plain(dialog, got["chat"].tolist(), dtype, plain, weights)
    chunks = windows_of(model)
    expected = plain_perplexity(plain, dtype, chunks, weights)
    if dtype == "float32":
        assert got["generate"].tolist() == list(model.generate(PROMPTS[0], 10, Sampler(0), stop_ids=()))
        alone = model.generate_batch(PROMPTS, limits, Sampler(0), stop_ids=(), logprobs=True)
        for i, done in enumerate(alone):
            assert got[f"batch{i}"].tolist() == done.tokens
            assert np.abs(got[f"batch{i}_logprobs"] - done.logprobs).max() <= 1e-4
        assert float(got["perplexity"]) == pytest.approx(expected, rel=1e-4)
        assert float(got["mean_kl"]) < (1e-8 if "int16" in weights else 1e-9)
    else:
        gap = abs(plain_perplexity(plain, "float32", chunks) - expected)
        assert abs(float(got["perplexity"]) - expected) <= 0.3 * gap
        assert float(got["mean_kl"]) > 0.5 * float(kl_by_hand(plain, dtype, chunks, weights))


@pytest.mark.slow  # mpiexec
def test_the_perplexity_command_on_two_ranks(path, capsys):
    """`mpiexec -n 2 python -m npllama perplexity`, with the output matrix streamed: one
    process's numbers, printed once."""
    argv = ["perplexity", "-m", str(path), "-f", str(PASSAGE), "-c", str(N_CTX), "-np", "2", "--weights-budget-gb", "0"]
    assert cli.main(argv) == 0
    alone = capsys.readouterr().out
    done = mpiexec("-m", "npllama", *argv)
    assert done.returncode == 0, done.stderr[-3000:]
    final = [line for line in done.stdout.splitlines() if line.startswith("Final estimate")]
    assert len(final) == 1
    ppl = float(final[0].split("PPL = ")[1].split()[0])
    assert ppl == pytest.approx(float(alone.split("PPL = ")[1].split()[0]), rel=1e-4)


@pytest.mark.slow  # mpiexec
def test_the_oracle_as_reference_is_refused_under_mpiexec(path):
    """The torch oracle needs the whole model in one process: refused in one line, before loading."""
    done = mpiexec("-m", "npllama", "perplexity", "-m", str(path / "not-even-there"), "-f", str(PASSAGE),
                   "--kl-divergence")
    assert done.returncode != 0
    assert "--reference oracle runs the torch oracle on the whole model, in one process" in done.stderr
    assert "Traceback" not in done.stderr

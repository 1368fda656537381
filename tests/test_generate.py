"""Generation: the KV cache against full recomputation, greedy decoding against the torch
oracle, the sampler's distributions, why and where generation stops, continuing a
conversation from the cache, Llama 3.1's scaled RoPE at long range, streaming UTF-8,
and the command line."""

import ast
import copy
import math
from dataclasses import replace
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import npllama
import npllama.formats
import npllama.cli
import npllama.generate
import npllama.tokenizer
from npllama.cli import run
from npllama.config import ModelArgs, RopeScaling
from npllama.generate import GenerationStats, Sampler, top_k_filter, top_p_filter
from npllama.layers import rope_frequencies, rope_tables
from npllama.model import Llama
from npllama.formats.meta import read_bpe_ranks
from npllama.tokenizer import StreamDecoder
from oracle.checkpoints import llama3_tokenizer_path, random_state_dict, tiny_args
from oracle.reference import Oracle

SEED = 1  # weights of the tiny checkpoint
# Smallest gap between the two best logits that greedy comparisons accept: float32 logits of
# the same sequence computed two ways differ by ~1e-6, which cannot flip a 1e-3 gap.
MIN_MARGIN = 1e-3


def float_weights(state_dict):
    return {name: t.float().numpy() for name, t in state_dict.items()}


def small_model(seed=0, **overrides):
    """A Llama built in memory (no tokenizer) with a small vocabulary, and its torch weights."""
    args = tiny_args(**{"vocab_size": 256, **overrides})
    state = random_state_dict(args, seed)
    return Llama(args, float_weights(state)), state


def assert_close(actual, reference, rel=1e-5):
    """max|actual - reference| <= rel * max|reference|: float32 noise, nothing more."""
    err, scale = np.abs(actual - reference).max(), np.abs(reference).max()
    assert err <= rel * scale, f"max|diff| = {err:.3g} > {rel:g} * max|ref| = {rel * scale:.3g}"


def top2_margins(logits):
    """Gap between the best and second-best logit of each row."""
    top2 = np.sort(logits, axis=-1)[:, -2:]  # [T, 2]
    return top2[:, 1] - top2[:, 0]  # [T]


def assert_clear_cut(model, prompt, out):
    """Precondition of comparing two greedy runs: no step of `out` was a near-tie."""
    logits = model.forward(list(prompt) + list(out[:-1]))[len(prompt) - 1:]  # [len(out), V]
    assert list(np.argmax(logits, axis=-1)) == list(out)
    assert top2_margins(logits).min() > MIN_MARGIN


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    """A tiny Llama 3 in Meta's on-disk format with the real 128256-token tokenizer."""
    return random_checkpoint(tiny_args(), SEED)


@pytest.fixture(scope="module")
def model(checkpoint):
    return npllama.load(checkpoint)


@pytest.fixture(scope="module")
def prompt(model, seed_prompt):
    return model.tokenizer.encode(seed_prompt)


# ---- the KV cache ------------------------------------------------------------------------

CACHE_CONFIGS = {
    "mha": dict(dim=64, n_heads=4, n_kv_heads=4),
    "gqa-4:1": dict(dim=64, n_heads=8, n_kv_heads=2),
    "odd-dims": dict(dim=42, n_heads=3, n_kv_heads=1, ffn_hidden_dim=37, vocab_size=397, n_layers=3),
}
# How the sequence is fed through the cache: chunk lengths, each at start_pos = sum of the earlier.
SCHEDULES = {
    "prefill-then-decode": [9] + [1] * 14,
    "mixed-chunks": [1, 4, 1, 1, 3, 2, 1, 5, 1, 2, 2],
}


@pytest.mark.parametrize("config", CACHE_CONFIGS.values(), ids=CACHE_CONFIGS.keys())
def test_kv_cache_equals_full_recomputation(config):
    """Every logit computed through the cache, in chunks at start_pos > 0, equals the one a
    fresh forward pass over the whole sequence up to that token gives."""
    model, _ = small_model(**config)
    tokens = np.random.default_rng(0).integers(0, model.args.vocab_size, 23)
    # The reference: for each step t, recompute the whole sequence tokens[:t+1] from scratch.
    reference = np.stack([model.forward(tokens[:t + 1])[-1] for t in range(len(tokens))])  # [T, V]
    assert_close(model.forward(tokens), reference)  # one causal pass gives every step at once
    for schedule in SCHEDULES.values():
        assert sum(schedule) == len(tokens)
        cache, pos, chunks = model.new_cache(32), 0, []
        for n in schedule:
            chunks.append(model.forward(tokens[pos:pos + n], pos, cache))  # [n, V]
            pos += n
        assert_close(np.concatenate(chunks), reference)
    # last_only (what generate uses) is the last row of the same computation.
    cache = model.new_cache(32)
    model.forward(tokens[:10], 0, cache)
    last = model.forward(tokens[10:15], 10, cache, last_only=True)
    assert last.shape == (1, model.args.vocab_size)
    assert_close(last[0], reference[14])


# ---- greedy decoding against the oracle --------------------------------------------------

def test_greedy_matches_oracle():
    """64 greedy tokens equal the torch oracle's, token for token."""
    model, state = small_model(seed=1, vocab_size=512, max_seq_len=128)
    prompt = [1, 5, 9, 200, 7]
    ours = list(model.generate(prompt, 64, Sampler(temperature=0), stop_ids=()))
    theirs = Oracle(model.args, state, max_seq_len=128).greedy(prompt, 64)
    # Precondition: random weights could put two logits within rounding of each other, and then
    # either choice would be right. On these weights the smallest top-2 gap along the path
    # (~7e-3, logits of size ~3) is over 100x what the two implementations disagree by, so a
    # different token means different math.
    sequence = prompt + ours[:-1]
    logits = model.forward(sequence)[len(prompt) - 1:]  # [64, V]: the logits each token came from
    oracle_logits = Oracle(model.args, state, max_seq_len=128).forward(sequence)[len(prompt) - 1:]
    disagreement = np.abs(logits - oracle_logits).max()
    assert list(np.argmax(logits, axis=-1)) == ours
    assert top2_margins(logits).min() > max(MIN_MARGIN, 100 * disagreement)
    assert ours == theirs
    assert len(set(ours)) > 16  # a real continuation, not one token repeated


# ---- the sampler -------------------------------------------------------------------------

def test_temperature_zero_is_argmax():
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.normal(size=1000).astype(np.float32)
        assert Sampler(temperature=0, top_p=0.5, top_k=3, seed=1)(logits) == np.argmax(logits)
    assert Sampler()(np.array([1.0, 3.0, 3.0, 2.0], np.float32)) == 1  # ties: the lowest id


def draws(sampler, logits, n):
    return [sampler(logits) for _ in range(n)]


def test_seed_fixes_the_draws():
    logits = np.zeros(1000, np.float32)  # flat: every draw is a fresh uniform choice
    logits[:10] = 0.5
    same = [draws(Sampler(temperature=1.0, seed=7), logits, 50) for _ in range(2)]
    assert same[0] == same[1]
    assert draws(Sampler(temperature=1.0, seed=8), logits, 50) != same[0]
    assert len(set(same[0])) > 40


def test_sampler_leaves_numpy_global_state_alone():
    np.random.seed(1234)
    before = np.random.get_state()
    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    for sampler in (Sampler(0.8, 0.9, 20, seed=3), Sampler(1.0), Sampler(0)):
        draws(sampler, logits, 20)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


@st.composite
def distributions(draw):
    """Strictly positive probabilities (ties likely), and a threshold p: anywhere in (0, 1],
    or exactly on a cumulative mass of the sorted probabilities, the boundary case."""
    weights = draw(st.lists(st.one_of(st.floats(1e-3, 1.0), st.sampled_from([0.05, 0.1, 0.25])),
                            min_size=1, max_size=40))
    probs = np.array(weights) / np.sum(weights)
    cumulative = np.cumsum(np.sort(probs)[::-1])
    p = draw(st.one_of(st.floats(1e-6, 1.0), st.sampled_from([float(c) for c in cumulative if c <= 1])))
    return probs, p


@st.composite
def dyadic_distributions(draw):
    """Probabilities n_i / 2^m: every partial sum is exact in float64, so p can sit exactly on
    a boundary and the property holds with no rounding allowance at all."""
    counts = draw(st.lists(st.integers(1, 64), min_size=1, max_size=40))
    denominator = 1 << (sum(counts) - 1).bit_length()
    if denominator > sum(counts):
        counts.append(denominator - sum(counts))
    probs = np.array(counts, dtype=np.float64) / denominator
    cumulative = np.cumsum(np.sort(probs)[::-1])
    p = draw(st.one_of(st.sampled_from([float(c) for c in cumulative]), st.floats(1e-6, 1.0)))
    return probs, p


# Sums of up to 40 float64 probabilities, added in different orders, differ by ~1e-16.
ROUNDING = 1e-12


@settings(max_examples=200, deadline=None)
@given(dist=st.one_of(distributions().map(lambda d: (*d, ROUNDING)),
                      dyadic_distributions().map(lambda d: (*d, 0.0))))
def test_top_p_keeps_the_smallest_sufficient_set(dist):
    probs, p, rounding = dist
    out = top_p_filter(probs, p)
    kept = out > 0
    assert np.array_equal(out[kept], probs[kept])  # kept probabilities are not altered
    assert kept.any()
    if not kept.all():
        assert probs[kept].min() >= probs[~kept].max()  # the most probable tokens are the ones kept
    mass = math.fsum(probs[kept])
    assert mass >= p - rounding  # enough mass...
    assert mass - probs[kept].min() < p + rounding  # ...and without its least probable token, not enough


@settings(max_examples=200, deadline=None)
@given(weights=st.lists(st.floats(1e-3, 1.0), min_size=2, max_size=40), data=st.data())
def test_top_k_keeps_exactly_k(weights, data):
    probs = np.array(weights) / np.sum(weights)
    k = data.draw(st.integers(1, len(probs) - 1))
    out = top_k_filter(probs, k)
    kept = out > 0
    assert kept.sum() == k
    assert np.array_equal(out[kept], probs[kept])
    assert probs[kept].min() >= probs[~kept].max()
    assert np.array_equal(top_k_filter(probs, 0), probs)  # 0 disables
    assert np.array_equal(top_k_filter(probs, len(probs) + 5), probs)


def test_sampler_probabilities_combine_temperature_top_k_top_p():
    logits = np.log(np.array([0.05, 0.4, 0.25, 0.15, 0.1, 0.05])).astype(np.float32)
    probs = Sampler(temperature=0.5, top_k=4).probabilities(logits)
    expected = np.array([0, 0.4, 0.25, 0.15, 0.1]) ** 2  # temperature 0.5 squares, top-4 keeps ids 1..4
    np.testing.assert_allclose(probs, np.append(expected / expected.sum(), 0), rtol=1e-6)
    # top-p alone at temperature 1: 0.4 + 0.25 = 0.65 < 0.7 <= 0.8, so three tokens stay.
    probs = Sampler(temperature=1.0, top_p=0.7).probabilities(logits)
    np.testing.assert_allclose(probs, np.array([0, 0.4, 0.25, 0.15, 0, 0]) / 0.8, rtol=1e-6)


def test_top_p_applies_to_what_top_k_kept():
    """top-k 2 keeps 0.5 and 0.3, renormalised to 0.625 and 0.375; top-p 0.6 then keeps one token.
    Without renormalising between the filters, 0.5 < 0.6 would keep both."""
    logits = np.log(np.array([0.5, 0.3, 0.2])).astype(np.float32)
    probs = Sampler(temperature=1.0, top_k=2, top_p=0.6).probabilities(logits)
    np.testing.assert_array_equal(probs, [1.0, 0.0, 0.0])


@pytest.mark.parametrize("logit, temperature", [(80.0, 0.1), (1e4, 0.5), (3e38, 1.0)])
def test_sampling_survives_huge_scaled_logits(logit, temperature):
    """logit / temperature far beyond exp()'s range: the distribution is still one-hot on the
    largest logit, never NaN (which would silently draw token 0)."""
    logits = np.zeros(10, np.float32)
    logits[7] = logit
    sampler = Sampler(temperature=temperature, seed=0)
    probs = sampler.probabilities(logits)
    assert np.isfinite(probs).all() and probs[7] == 1.0
    assert {sampler(logits) for _ in range(20)} == {7}


def chi_square(counts, expected_probs):
    n = counts.sum()
    support = expected_probs > 0
    assert counts[~support].sum() == 0, "drew a token that has probability 0"
    expected = n * expected_probs[support]
    return float(((counts[support] - expected) ** 2 / expected).sum())


@pytest.mark.slow
@pytest.mark.parametrize("temperature, top_k", [(0.5, 0), (1.5, 4)])
def test_sample_frequencies_follow_the_distribution(temperature, top_k):
    """20k draws: their histogram fits softmax(logits / T) (restricted to the top k, renormalized)
    and does not fit the distribution without temperature scaling."""
    q = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    logits = np.log(q).astype(np.float32)
    target = q ** (1 / temperature)
    if top_k:
        target[top_k:] = 0
    target /= target.sum()
    sampler = Sampler(temperature=temperature, top_k=top_k, seed=42)
    counts = np.bincount(draws(sampler, logits, 20_000), minlength=len(q))
    # 5 degrees of freedom: chi2 > 40 has probability < 1e-7 when the draws follow `target`.
    assert chi_square(counts, target) < 40
    unscaled = q.copy()
    unscaled[top_k or len(q):] = 0
    assert chi_square(counts, unscaled / unscaled.sum()) > 400  # the test tells the two apart


@pytest.mark.parametrize("kwargs", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.01),
                                    dict(top_p=-1), dict(top_k=-1)])
def test_invalid_sampler_parameters(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        Sampler(**kwargs)


def test_nan_temperature_is_rejected():
    with pytest.raises(ValueError, match="temperature"):
        Sampler(temperature=float("nan"))


def test_repeat_penalty_is_llama_cpps():
    """llama.cpp's llama_sampler_penalties: a token in the window, however often, has its logit
    divided by the penalty if positive and multiplied if not; the window is the last n accepted."""
    logits = np.array([2.0, -1.0, 0.5, 3.0, -2.0, 0.0], np.float32)
    sampler = Sampler(repeat_penalty=2.0, repeat_last_n=3)
    sampler.accept([0, 1, 1, 4, 5])  # the window: 1, 4, 5; token 0 has left it
    np.testing.assert_array_equal(sampler.penalized(logits), [2.0, -2.0, 0.5, 3.0, -4.0, 0.0])
    everything = Sampler(repeat_penalty=2.0, repeat_last_n=-1)
    everything.accept([0, 1, 1, 4, 5])
    np.testing.assert_array_equal(everything.penalized(logits), [1.0, -2.0, 0.5, 3.0, -4.0, 0.0])
    for off in (Sampler(repeat_penalty=2.0, repeat_last_n=0), Sampler(repeat_penalty=1.0)):
        off.accept([0, 3])
        np.testing.assert_array_equal(off.penalized(logits), logits)
    greedy = Sampler(repeat_penalty=1.6)
    greedy.accept([3])
    assert greedy(logits) == 0  # 3.0 / 1.6 < 2.0: greedy decoding is penalised too


def penalised_by_hand(model, prompt, n, penalty, last_n):
    """Greedy decoding recomputing every logit from the whole sequence, the penalty applied to
    the distinct tokens among the last last_n of prompt + output."""
    seq = list(prompt)
    for _ in range(n):
        z = model.forward(seq)[-1].copy()  # [V]
        for t in set(seq[-last_n:]):
            z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
        seq.append(int(np.argmax(z)))
    return seq[len(prompt):]


def test_repeat_penalty_in_generation_is_by_hand():
    """generate with --repeat-penalty 1.5 over the last 6 tokens is the by-hand loop, on a prompt
    whose own last tokens hold the unpenalised first choice: the window counts the prompt."""
    model, _ = small_model(seed=3)
    rng = np.random.default_rng(0)
    prompt = next(p for p in (list(rng.integers(0, 256, 10)) for _ in range(1000))
                  if np.argmax(model.forward(p)[-1]) in p[-6:])
    plain = list(model.generate(prompt, 16, Sampler(0), stop_ids=()))
    expected = penalised_by_hand(model, prompt, 16, 1.5, 6)
    assert expected[0] != plain[0]  # the prompt's tokens are penalised from the first choice
    assert list(model.generate(prompt, 16, Sampler(repeat_penalty=1.5, repeat_last_n=6), stop_ids=())) == expected


# ---- stopping ----------------------------------------------------------------------------

def test_stops_at_a_stop_id_and_yields_it(model, prompt):
    free = list(model.generate(prompt, 12, Sampler(0), stop_ids=()))
    stop = free[5]
    first = free.index(stop)
    stats = GenerationStats()
    out = list(model.generate(prompt, 12, Sampler(0), stop_ids={stop}, stats=stats))
    assert out == free[:first + 1] and out[-1] == stop
    assert stats.stop_reason == "stop_token"


def test_default_stop_ids_are_the_tokenizers():
    model, _ = small_model()
    free = list(model.generate([1, 2, 3], 12, Sampler(0), stop_ids=()))
    model.tokenizer = SimpleNamespace(stop_ids=frozenset({free[6]}))  # generate reads only this
    stats = GenerationStats()
    out = list(model.generate([1, 2, 3], 12, Sampler(0), stats=stats))
    assert out == free[:free.index(free[6]) + 1] and stats.stop_reason == "stop_token"


def test_stops_at_max_new_tokens_with_stats(model, prompt):
    stats = GenerationStats()
    out = list(model.generate(prompt, 7, Sampler(0), stop_ids=(), stats=stats))
    assert len(out) == 7
    assert stats.stop_reason == "max_new_tokens"
    assert (stats.prompt_tokens, stats.new_tokens) == (len(prompt), 7)
    # The last token was chosen but not fed back: the cache holds the prompt and 6 new tokens.
    assert stats.cached_positions == len(prompt) + 6
    assert 0 < stats.prefill_seconds and 0 < stats.decode_seconds
    assert stats.prefill_tok_s == len(prompt) / stats.prefill_seconds
    assert stats.decode_tok_s == 6 / stats.decode_seconds  # 7 tokens, 6 of them from decode steps
    assert "tok/s" in stats.summary() and "max_new_tokens" in stats.summary()
    stats = GenerationStats()
    assert list(model.generate(prompt, 0, Sampler(0), stop_ids=(), stats=stats)) == []
    assert stats.cached_positions == len(prompt)  # prefilled, nothing chosen: a follow-up starts after it


class Clock:
    """A perf_counter that moves only when the model computes: one second per forward pass."""

    def __init__(self, model):
        self.now, forward = 0.0, model.forward_rows

        def ticking_forward(*args, **kwargs):
            self.now += 1.0
            return forward(*args, **kwargs)
        model.forward_rows = ticking_forward

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("n_new", [1, 2, 7])
def test_timings_count_each_forward_pass_once(monkeypatch, n_new):
    """Prefill is one forward pass over the prompt; each new token after the first is one decode
    step. With a clock that ticks once per pass, the rates are exact."""
    model, _ = small_model()
    clock = Clock(model)
    monkeypatch.setattr(npllama.generate.time, "perf_counter", clock)
    stats = GenerationStats()
    out = list(model.generate([1, 2, 3, 4, 5], n_new, Sampler(0), stop_ids=(), stats=stats))
    assert len(out) == stats.new_tokens == n_new
    assert (stats.prefill_seconds, stats.decode_seconds) == (1.0, n_new - 1)
    assert stats.prefill_tok_s == 5.0
    assert stats.decode_tok_s == (1.0 if n_new > 1 else 0.0)
    assert f"{n_new} new tokens at {stats.decode_tok_s:.1f} tok/s" in stats.summary()


@pytest.mark.parametrize("where", ["model", "cache"])
def test_stops_when_the_context_is_full(where):
    """16 positions: after a 5-token prompt, 11 new tokens take positions 5..15. The last is
    chosen from position 14's logits and never fed back: the cache then holds 15 positions."""
    if where == "model":
        model, _ = small_model(max_seq_len=16)
        cache = None
    else:
        model, _ = small_model()
        cache = model.new_cache(16)
    stats = GenerationStats()
    out = list(model.generate([1, 2, 3, 4, 5], 100, Sampler(0), stop_ids=(), stats=stats, cache=cache))
    assert stats.stop_reason == "max_seq_len"
    assert stats.cached_positions == 15
    assert len(out) == 11


def test_cache_larger_than_model_context_stops_cleanly():
    model, _ = small_model(max_seq_len=16)
    stats = GenerationStats()
    list(model.generate([1, 2, 3], 100, Sampler(0), stop_ids=(), stats=stats, cache=model.new_cache(32)))
    assert stats.stop_reason == "max_seq_len"


def test_prompt_too_long_is_a_clear_error():
    model, _ = small_model(max_seq_len=16)
    for n in (16, 40):  # 16 fills the context and leaves no position for a new token
        with pytest.raises(npllama.PromptTooLongError, match=f"{n + 1} positions needed .* max_seq_len is 16"):
            list(model.generate(list(range(n)), 4, Sampler(0), stop_ids=()))
    assert len(list(model.generate(list(range(15)), 4, Sampler(0), stop_ids=()))) == 1
    model.forward(list(range(16)))  # a forward pass may use every position
    with pytest.raises(npllama.PromptTooLongError, match="max_seq_len is 16"):
        model.forward(list(range(17)))  # not an IndexError from the RoPE tables
    with pytest.raises(npllama.PromptTooLongError, match="16"):  # cached positions count too
        list(model.generate([1, 2], 4, Sampler(0), stop_ids=(), cache=model.new_cache(), start_pos=14))


# ---- continuing a conversation from the cache --------------------------------------------

@pytest.mark.parametrize("stop_at", [None, 4], ids=["max_new_tokens", "stop_token"])
def test_continuation_from_cache_equals_generation_from_scratch(model, prompt, stop_at):
    """Three turns through one cache, each fed only the tokens not yet in it, give the tokens
    a fresh generation over the whole history gives."""
    tok = model.tokenizer
    stop_ids = ()
    if stop_at is not None:
        stop_ids = {list(model.generate(prompt, 10, Sampler(0), stop_ids=()))[stop_at]}
    cache, history, start, new = model.new_cache(256), [], 0, prompt
    for turn in (" and then?", " Tell me more, please."):
        stats = GenerationStats()
        out = list(model.generate(new, 10, Sampler(0), stop_ids=stop_ids, stats=stats,
                                  cache=cache, start_pos=start))
        history += new
        assert_clear_cut(model, history, out)
        assert out == list(model.generate(history, 10, Sampler(0), stop_ids=stop_ids))
        if stop_at is not None and start == 0:
            assert len(out) == stop_at + 1 and stats.stop_reason == "stop_token"
        # Every token but the last generated one is in the cache; that one starts the next turn.
        history += out[:-1]
        assert stats.cached_positions == len(history)
        start, new = stats.cached_positions, [out[-1], *tok.encode(turn, bos=False)]


# ---- Llama 3.1's scaled RoPE -------------------------------------------------------------

def meta_rope_functions():
    """apply_scaling and precompute_freqs_cis, taken verbatim from Meta's llama_models/llama3/
    model.py (the module itself imports fairscale, so only these two functions are run)."""
    path = Path(str(resources.files("llama_models") / "llama3" / "model.py"))
    tree = ast.parse(path.read_text())
    wanted = [n for n in tree.body if isinstance(n, ast.FunctionDef)
              and n.name in ("apply_scaling", "precompute_freqs_cis")]
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return namespace["precompute_freqs_cis"]


@pytest.mark.parametrize("head_dim", [128, 64, 16])
def test_scaled_rope_tables_match_meta(head_dim):
    freqs_cis = meta_rope_functions()(head_dim, 32768, 500000.0, use_scaled=True)  # [P, hd/2] complex
    cos, sin = rope_tables(rope_frequencies(head_dim, 500000.0, RopeScaling()), np.arange(32768))
    np.testing.assert_allclose(cos, freqs_cis.real.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, freqs_cis.imag.numpy(), rtol=0, atol=1e-6)


def test_scaled_rope_matches_oracle_at_long_range():
    """3072 tokens through a 1-layer model with Llama 3.1's RoPE scaling: npllama's logits equal
    the oracle's to 1e-5, while without scaling they are far off, so the comparison sees it."""
    n = 3072
    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=32,
                     norm_eps=1e-5, rope_theta=500000.0, rope_scaling=RopeScaling(), max_seq_len=n)
    state = random_state_dict(args, seed=3)
    tokens = np.random.default_rng(3).integers(0, args.vocab_size, n)
    reference = Oracle(args, state, max_seq_len=n).forward(tokens)  # [n, V]
    scaled = Llama(args, float_weights(state)).forward(tokens)
    assert_close(scaled, reference)
    unscaled = Llama(replace(args, rope_scaling=None), float_weights(state)).forward(tokens)
    tolerance = 1e-5 * np.abs(reference).max()
    assert np.abs(unscaled[-256:] - reference[-256:]).max() > 1000 * tolerance
    assert np.abs(unscaled[0] - reference[0]).max() <= tolerance  # position 0 is not rotated at all


# ---- streaming UTF-8 ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def byte_ids():
    """The id of each single-byte token: a text as one token per byte splits every multi-byte
    character across tokens."""
    ranks = read_bpe_ranks(llama3_tokenizer_path())
    return [ranks[bytes([b])] for b in range(256)]


STREAM_TEXTS = ["漢字と日本語のテキスト", "🦙 llama 👨‍👩‍👧 family 🇫🇷", "𠮷野家 龘 naïve café ß", "mixed: 한국어 + 😀!"]


def test_the_real_tokenizer_splits_some_characters(tok):
    """The streaming tests' premise: Llama 3's own tokens cut some of these characters."""
    split = [text for text in STREAM_TEXTS
             if any("\ufffd" in tok.decode([i]) for i in tok.encode(text, bos=False))]
    assert len(split) >= 2


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_cli_stream_never_prints_half_a_character(text, tok, byte_ids, capsys):
    eot = tok.id_of("<|eot_id|>")
    one_byte_each = [byte_ids[b] for b in text.encode()]  # every non-ASCII character split
    for ids in (tok.encode(text, bos=False), one_byte_each):
        stats = GenerationStats(stop_reason="stop_token")
        out = run.stream(SimpleNamespace(tokenizer=tok), iter([*ids, eot]), stats)
        printed = capsys.readouterr()
        assert out == [*ids, eot]
        assert printed.out == text + "\n"  # the special stop token is not printed
        assert "\ufffd" not in printed.out
        assert "tok/s" in printed.err


CHARS = st.characters(exclude_categories=("Cs",), exclude_characters="\ufffd")


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.one_of(CHARS, st.sampled_from("漢字🦙👨‍👩‍👧𠮷é")), max_size=30))
def test_stream_decoder_releases_each_character_once_complete(text, tok, byte_ids):
    """Fed one byte per token, the decoder's output so far is always exactly the characters whose
    bytes have all arrived: nothing held back longer than needed, no U+FFFD ever."""
    data = text.encode()
    decoder, printed = StreamDecoder(tok), ""
    for i, b in enumerate(data):
        printed += decoder.push(byte_ids[b])
        assert printed == data[:i + 1].decode("utf-8", errors="ignore")  # drops only the unfinished tail
    assert printed + decoder.flush() == text


# ---- batches -----------------------------------------------------------------------------

def test_batch_rows_stop_at_the_context_limit_as_alone():
    """max_seq_len 16 and more new tokens asked than fit: each row's new tokens fill positions
    len(prompt)..15, so 16 - len(prompt) of them (one for a 15-token prompt), and it stops with
    "max_seq_len", the tokens and the reason model.generate gives the prompt alone."""
    model, _ = small_model(max_seq_len=16)
    prompts = [[1, 2, 3, 4, 5], [7], list(range(10, 25))]
    out = model.generate_batch(prompts, 100, Sampler(0), stop_ids=())
    for p, row in zip(prompts, out):
        stats = GenerationStats()
        alone = list(model.generate(p, 100, Sampler(0), stop_ids=(), stats=stats))
        assert len(row.tokens) == row.new_tokens == 16 - len(p)
        assert (row.tokens, row.stop_reason) == (alone, stats.stop_reason) == (alone, "max_seq_len")


def test_batch_stop_token_that_is_also_the_last_allowed_is_a_stop():
    """The k-th greedy token is a stop id and max_new_tokens is k: both limits are reached at
    once, and the row reports the stop token, as model.generate does."""
    model, _ = small_model()
    free = list(model.generate([1, 2, 3], 12, Sampler(0), stop_ids=()))
    k = next(i for i in range(3, 12) if free.index(free[i]) == i) + 1  # free[k-1] appears first there
    [row] = model.generate_batch([[1, 2, 3]], k, Sampler(0), stop_ids={free[k - 1]})
    stats = GenerationStats()
    list(model.generate([1, 2, 3], k, Sampler(0), stop_ids={free[k - 1]}, stats=stats))
    assert row.tokens == free[:k] and row.stop_reason == stats.stop_reason == "stop_token"


def with_stop_ids(model, stop_ids):
    """The same model, its tokenizer's stop tokens replaced by `stop_ids`."""
    tok = model.tokenizer
    other = copy.copy(model)
    other.tokenizer = npllama.tokenizer.Tokenizer(tok.name, npllama.tokenizer.LLAMA3_PAT_STR,
                                                  read_bpe_ranks(llama3_tokenizer_path()), tok.special_tokens,
                                                  bos_id=tok.bos_id, eos_id=tok.eos_id, stop_ids=stop_ids,
                                                  add_bos=tok.add_bos)
    return other


def test_batch_default_stop_ids_are_the_tokenizers(model, prompt):
    """Without stop_ids, a row stops at its tokenizer's stop tokens (here one the greedy
    continuation reaches at its 5th token), as model.generate does."""
    free = list(model.generate(prompt, 12, Sampler(0), stop_ids=()))
    stopping = with_stop_ids(model, {free[4]})
    [row] = stopping.generate_batch([prompt], 12, Sampler(0))
    assert row.tokens == free[:free.index(free[4]) + 1] and row.stop_reason == "stop_token"


def test_batch_logprobs_are_of_the_sampled_tokens():
    """Sampled at temperature 1, each token's logprob is the log-softmax of the logits it was
    drawn from, at that token: among them tokens that were not the most likely."""
    model, _ = small_model()
    prompts = [[1, 2, 3], [9, 8]]
    out = model.generate_batch(prompts, 8, Sampler(1.0, seed=5), stop_ids=(), logprobs=True)
    not_top = 0
    for p, row in zip(prompts, out):
        logits = model.forward(p + row.tokens[:-1])[len(p) - 1:].astype(np.float64)  # [8, V]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))  # [8, V]
        np.testing.assert_allclose(row.logprobs, logp[np.arange(8), row.tokens], rtol=0, atol=1e-4)
        not_top += int((np.array(row.tokens) != logits.argmax(-1)).sum())
    assert not_top >= 3  # sampled, not greedy: a most-likely token's logprob would not do


@pytest.mark.slow
def test_cli_batch_prints_what_each_prompt_alone_generates(checkpoint, capsys, tmp_path, monkeypatch):
    """--batch, greedy, the tokenizer's own stop tokens: each completion printed is the text
    model.generate gives its prompt alone. A stop token is added where the first prompt's
    greedy continuation reaches its 3rd token, so that row must end early there too."""
    prompts = ["the answer is", "Once upon a time", "hello"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    real_load = npllama.formats.load
    base = real_load(checkpoint)
    free = list(base.generate(base.tokenizer.encode(prompts[0]), 5, Sampler(0), stop_ids=()))
    stops = base.tokenizer.stop_ids | {free[2]}
    monkeypatch.setattr(npllama.formats, "load", lambda *a, **kw: with_stop_ids(real_load(*a, **kw), stops))
    code = npllama.cli.main(["-m", str(checkpoint), "-f", str(tmp_path / "prompts.txt"), "--batch", "-n", "5"])
    out = capsys.readouterr().out
    model = with_stop_ids(base, stops)
    tok = model.tokenizer
    alone = [list(model.generate(tok.encode(p), 5, Sampler(0))) for p in prompts]
    # Precondition: the added stop token ends the first prompt's text early.
    assert len(alone[0]) < 5 and tok.decode(free) != tok.decode(alone[0])
    assert code == 0
    for i, (p, ids) in enumerate(zip(prompts, alone), 1):
        assert f"[{i}] {p}{tok.decode([t for t in ids if t not in stops])}\n" in out

"""Many sequences at once: each row of a batch equals the same prompt run alone, whatever the
other rows' lengths, limits and stop tokens; the oracle, run batched Meta's way, agrees."""

from __future__ import annotations

import numpy as np
import pytest

import npllama
from npllama.generate import Sampler
from oracle.checkpoints import random_state_dict, tiny_args
from oracle.reference import Oracle

PROMPTS = [[128000, 791, 4320, 311, 279, 17139], [128000],
           [128000, 9906, 11, 1917, 0, 3639, 374, 264, 3280, 30, 1226, 2574], [5, 6]]


@pytest.fixture(scope="module")
def model(random_checkpoint):
    return npllama.load(random_checkpoint(tiny_args(n_kv_heads=2), seed=4), max_seq_len=64)


def test_every_row_of_a_forward_pass_equals_its_sequence_alone(model):
    """Ragged prompts, right-padded: each row's logits at its real positions are the single
    sequence's, and so are the caches the rows leave for the next step."""
    lengths = np.array([len(p) for p in PROMPTS])
    tokens = np.zeros((len(PROMPTS), lengths.max()), np.int64)
    for i, p in enumerate(PROMPTS):
        tokens[i, :len(p)] = p
    cache = model.new_cache(32, rows=len(PROMPTS))
    logits = model.forward_rows(tokens, lengths, np.zeros(len(PROMPTS), np.int64), cache, "all")
    for i, p in enumerate(PROMPTS):
        alone = model.forward(p)
        np.testing.assert_allclose(logits[i, :len(p)], alone, rtol=0, atol=1e-5 * np.abs(alone).max())
    # A second step, each row at its own position, through the same caches.
    step = model.forward_rows(np.array([[7], [8], [9], [10]]), np.ones(4, np.int64), lengths, cache)
    for i, p in enumerate(PROMPTS):
        alone = model.forward(p + [7 + i])[-1]
        np.testing.assert_allclose(step[i], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_greedy_rows_equal_greedy_alone_with_their_own_limits_and_stops(model):
    alone = [list(model.generate(p, 12, Sampler(0), stop_ids=())) for p in PROMPTS]
    stop = alone[0][3]  # row 0 stops early, at its 4th token; the others do not have it as a stop
    limits = [12, 1, 7, 0]
    stops = [{stop}, set(), set(), set()]
    out = model.generate_batch(PROMPTS, limits, Sampler(0), stop_ids=stops)
    assert out[0].tokens == alone[0][:alone[0].index(stop) + 1] and out[0].stop_reason == "stop_token"
    assert out[1].tokens == alone[1][:1] and out[1].stop_reason == "max_new_tokens"
    assert out[2].tokens == alone[2][:7]
    assert out[3].tokens == [] and out[3].stop_reason == "max_new_tokens"


@pytest.mark.slow
def test_sampled_rows_each_keep_their_own_seed(model):
    samplers = [Sampler(0.9, top_p=0.95, seed=s) for s in (3, 4, 5, 6)]
    out = model.generate_batch(PROMPTS, 8, samplers, stop_ids=())
    for p, s, o in zip(PROMPTS, (3, 4, 5, 6), out):
        assert o.tokens == list(model.generate(p, 8, Sampler(0.9, top_p=0.95, seed=s), stop_ids=()))
    # One sampler for all rows: cloned with seeds seed, seed + 1, ...
    shared = model.generate_batch(PROMPTS, 8, Sampler(0.9, top_p=0.95, seed=3), stop_ids=())
    assert [o.tokens for o in shared] == [o.tokens for o in out]


def test_finished_rows_stop_costing_compute(model, monkeypatch):
    rows_per_step = []
    forward = model.forward_rows

    def counting(tokens, *args, **kwargs):
        rows_per_step.append(len(tokens))
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward_rows", counting)
    model.generate_batch(PROMPTS, [6, 2, 4, 1], Sampler(0), stop_ids=())
    assert rows_per_step == [4, 3, 2, 2, 1, 1]  # the prefill, then only the rows still going


def test_echo_and_logprobs_follow_metas_completion(model):
    [out] = model.generate_batch([PROMPTS[0]], 3, Sampler(0), stop_ids=(), echo=True, logprobs=True)
    assert out.tokens[:len(PROMPTS[0])] == PROMPTS[0] and len(out.tokens) == len(PROMPTS[0]) + 3
    full = model.forward(out.tokens[:-1])  # every position's logits
    lp = full - full.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp.astype(np.float64)).sum(-1, keepdims=True))
    expected = [None] + [lp[i, t] for i, t in enumerate(out.tokens[1:])]
    assert out.logprobs[0] is None
    np.testing.assert_allclose(out.logprobs[1:], expected[1:], atol=1e-4)


def test_the_oracle_run_batched_the_meta_way_agrees(model, random_checkpoint):
    oracle = Oracle(model.args, random_state_dict(model.args, seed=4), max_seq_len=64)
    theirs = oracle.greedy_batch(PROMPTS, 10)
    ours = model.generate_batch(PROMPTS, 10, Sampler(0), stop_ids=())
    assert [o.tokens for o in ours] == theirs


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "at least one token"), ([[1], []], {}, "at least one token"),
    ([[1], [2]], {"max_new_tokens": [1, 2, 3]}, "max_new_tokens has 3 entries for 2 prompts"),
    ([[1]], {"max_new_tokens": -1}, "max_new_tokens"), ([[1.5]], {}, "integer token ids"),
])
def test_bad_arguments_are_named(model, prompts, kwargs, message):
    with pytest.raises(npllama.errors.ArgumentError, match=message):
        model.generate_batch(prompts, **kwargs)


def test_cli_batch_prints_each_completion_under_its_number(random_checkpoint, capsys, tmp_path):
    from npllama import cli
    path = random_checkpoint(tiny_args(n_kv_heads=2), seed=4)
    (tmp_path / "prompts.txt").write_text("the answer is\n\nOnce upon a time\nhello\n")
    code = cli.main(["-m", str(path), "-f", str(tmp_path / "prompts.txt"), "--batch", "-n", "5"])
    out, err = capsys.readouterr()
    model = npllama.load(path)
    prompts = ["the answer is", "Once upon a time", "hello"]
    expected = model.generate_batch([model.tokenizer.encode(p) for p in prompts], 5, Sampler(0))
    stops = model.tokenizer.stop_ids
    assert code == 0 and "[3 prompts, " in err
    for i, (p, c) in enumerate(zip(prompts, expected), 1):
        assert f"[{i}] {p}{model.tokenizer.decode([t for t in c.tokens if t not in stops])}\n" in out

"""Speculative decoding (npllama/speculative.py): greedy text token for token the text without
speculation, with prompt lookup, a draft model or a scripted drafter, through rejections, stop
tokens, the context's end and the limit; the KV caches a rejection leaves equal to the
unspeculated run's; sampled tokens distributed exactly as without speculation (a chi-square test
against the distribution computed from the model's logits); seeded runs reproducible; drafts of
another vocabulary refused; batches, the command line and mpiexec; the prompt-lookup index and the
per-row guess length."""

from __future__ import annotations

import copy
import math
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import npllama
import npllama.formats
import npllama.generate
from npllama import cli
from npllama.config import OUTPUT, layer_name, split_layer_name
from npllama.errors import ArgumentError
from npllama.generate import Batch, GenerationStats, Row, Sampler, decode
from npllama.model import Llama
from npllama.speculative import PASS_COST, DraftModel, Drafter, Drafting, Guesses, Lookup, NgramIndex, drafter_for, verify
from oracle.checkpoints import (TINY_RANKS, TINY_SPECIALS, tiny_args, tiny_gguf, tiny_gguf_metadata,
                                tiny_model_files, write_gguf_file, write_model_files)

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).with_name("mpiexec")
BYTE_VOCAB = len(TINY_RANKS) + len(TINY_SPECIALS)  # the tiny byte-level vocabulary: 265 tokens
# A prompt whose answer copies it (prompt lookup guesses right), and one it cannot foresee.
COPY = "Repeat this list exactly: apple, banana, cherry, date, elderberry, fig, grape. Repeat: apple, banana,"
OPEN = "Once upon a time, in a small village,"
# Random models of three shapes (multi-head, grouped-query 4:1, multi-query; 1 to 3 layers) with
# the byte-level vocabulary, where random text repeats tokens and prompt lookup finds them.
SHAPES = [dict(dim=32, n_heads=4, n_kv_heads=4, n_layers=3), dict(), dict(dim=48, n_heads=6, n_kv_heads=1, n_layers=1)]


# ---- models, drafters and runs ------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(default_model_path):
    return npllama.load(default_model_path, max_seq_len=512)


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory):
    """byte_level(**shape): a random GGUF model of tiny_args' shape with these overrides and the
    byte-level vocabulary, written and loaded once per module (its context: 64 positions)."""
    made = {}

    def make(**shape):
        key = tuple(sorted(shape.items()))
        if key not in made:
            path = tiny_gguf(tmp_path_factory.mktemp("byte") / "model.gguf", tiny_args(vocab_size=BYTE_VOCAB, **shape))
            made[key] = npllama.load(path)
        return made[key]
    return make


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny byte-level GGUF model (dim 16): the chi-square tests sample thousands of rows of it."""
    return npllama.load(write_model_files(tmp_path_factory.mktemp("tiny"), tiny_model_files("gguf")))


@pytest.fixture(scope="module")
def llama3(random_checkpoint):
    """Two random checkpoints with the real Llama 3 vocabulary, of other shapes: a model and a draft."""
    model = npllama.load(random_checkpoint(tiny_args(n_heads=8, n_kv_heads=4), seed=21), max_seq_len=64)
    draft = npllama.load(random_checkpoint(tiny_args(dim=32, n_heads=4, n_kv_heads=1, n_layers=1), seed=22))
    return model, draft


def sharpened(model, factor: float, **args) -> Llama:
    """The model with its output matrix times `factor` (and `args` replaced): the same argmax, far
    more sure of it, so that as a draft it guesses past p_min (random models' distributions are
    flat); its top-k tokens are the model's, at other probabilities."""
    output = np.asarray(model.weights[OUTPUT.meta], np.float32) * factor
    return Llama(replace(model.args, **args), {**model.weights, OUTPUT.meta: output}, tokenizer=model.tokenizer)


class Eager(Drafting):
    """Guesses as many tokens as the row can take at every step, whatever its last step got."""

    def wanted(self) -> int:
        return self.draft_max


@pytest.fixture
def eager(monkeypatch):
    """Rows guess at every step: the adaptive guess length (Drafting) pauses a row whose guesses
    fail, and a model as large as its draft rarely pays for guessing at all."""
    monkeypatch.setattr(npllama.generate, "Drafting", Eager)


class Scripted(Drafter):
    """A drafter whose guesses for a row are script(row, k), k the tokens it may guess: the known
    greedy continuation, or wrong tokens. Rows always guess as many as fit (Eager); `asked` holds
    every k the batch asked for."""

    def __init__(self, script, draft_max: int = 8):
        self.script, self.draft_max, self.cost, self.asked = script, draft_max, PASS_COST, []

    def guess(self, rows, wanted):
        self.asked += wanted
        return [Guesses(list(self.script(row, k)) if k else []) for row, k in zip(rows, wanted)]

    def join(self, rows, first_slot):
        for row in rows:
            row.drafting = Eager(self.draft_max, self.cost)


def following(reference, right=None):
    """The script guessing reference's next tokens, the first `right` of each guess run right and
    the rest wrong (right=None: all right)."""
    def script(row, k):
        n = row.done.new_tokens
        ahead = reference[n:n + k]
        return [t if right is None or j < right else (t - 1 if t else 1) for j, t in enumerate(ahead)]
    return script


def greedy(model, prompt, n, stats=None, **kwargs):
    kwargs.setdefault("stop_ids", ())
    return list(model.generate(prompt, n, Sampler(0), stats=stats, **kwargs))


def run(model, prompt, n, drafter=None, stops=(), cache=None):
    """Greedy generation through one Batch (generate's loop) with `drafter` guessing: the row
    and the cache."""
    cache = cache if cache is not None else model.new_cache(len(prompt) + n)
    row = Row(list(prompt), n, Sampler(0), set(stops))
    for _ in decode(model, [row], cache, drafter):
        pass
    return row, cache


def assert_same_cache(cache, plain, positions: int, zeroed: bool = True) -> None:
    """Keys and values at positions 0..positions-1 within float32 noise (1e-5 of the largest) of
    the unspeculated run's; with `zeroed`, every position after them zero in both (rejected
    guesses zeroed)."""
    assert positions > 0
    for layer, (k, v, pk, pv) in enumerate(zip(cache.k, cache.v, plain.k, plain.v)):
        # k [rows, KV, P, hd]; v [rows, KV, hd, P]: positions on axis 2 of both, v swapped.
        for name, a, b in (("k", k, pk), ("v", np.swapaxes(v, 2, 3), np.swapaxes(pv, 2, 3))):
            np.testing.assert_allclose(a[:, :, :positions], b[:, :, :positions], rtol=0,
                                       atol=1e-5 * np.abs(b).max(), err_msg=f"layer {layer} {name}")
            if not zeroed:
                continue
            assert not b[:, :, positions:].any()
            beyond = np.flatnonzero(np.abs(a[:, :, positions:]).max(axis=(0, 1, 3)))  # positions not zero
            assert beyond.size == 0, f"layer {layer} {name}: positions {(beyond + positions).tolist()} not zeroed"


def assert_draft_holds(draft: DraftModel, slot: int, zeroed: bool = True) -> None:
    """The draft's cache slot holds the keys and values a fresh pass of the draft over the tokens
    it says the slot holds computes (and zeros after them)."""
    held = draft.held[slot]
    fresh = draft.model.new_cache(draft.cache.max_seq_len)
    draft.model.forward(held, cache=fresh)
    mine = SimpleNamespace(k=[k[slot:slot + 1] for k in draft.cache.k], v=[v[slot:slot + 1] for v in draft.cache.v])
    assert_same_cache(mine, fresh, len(held), zeroed)


def distinct_stop(reference, lo: int, hi: int) -> int:
    """An index k in [lo, hi) whose token does not occur before it: stopping on it stops there."""
    return next(k for k in range(lo, hi) if reference[k] not in reference[:k])


def gguf_tensors(path, scale_output: float = 1.0) -> dict[str, np.ndarray]:
    """The GGUF's weights as float32, by their GGUF names, the output matrix times scale_output."""
    model = npllama.load(path)
    tensors = {}
    for name, w in model.weights.items():
        i, tensor = split_layer_name(name)
        gguf = tensor.gguf if i is None else layer_name(tensor.gguf, i, "gguf")
        tensors[gguf] = np.asarray(w, np.float32) * (scale_output if name == OUTPUT.meta else 1)
    return tensors


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# ---- 1. greedy: the text without speculation ----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("text", [COPY, OPEN])
def test_greedy_smollm2_text_is_unchanged_by_lookup_and_a_draft(smollm2, text, monkeypatch):
    """On the default model: prompt lookup (its adaptive guess length) and the model as its own
    draft (guessing at every step: each guess is the model's own argmax, so all are kept) give
    the unspeculated tokens; on the copying prompt lookup's guesses are kept too."""
    prompt = smollm2.tokenizer.encode(text, bos=None)
    plain = greedy(smollm2, prompt, 24, stop_ids=None)
    looked = GenerationStats()
    assert greedy(smollm2, prompt, 24, looked, stop_ids=None, lookup=True) == plain
    if text == COPY:
        assert looked.accepted > 0
    monkeypatch.setattr(npllama.generate, "Drafting", Eager)
    drafted = GenerationStats()
    assert greedy(smollm2, prompt, 24, drafted, stop_ids=None, draft=smollm2) == plain
    assert drafted.drafted > 0 and drafted.accepted == drafted.drafted


@pytest.mark.parametrize("shape", SHAPES, ids=["mha-3-layers", "gqa-4-to-1", "mqa-1-layer"])
def test_greedy_text_of_random_models_is_unchanged(byte_level, shape, eager):
    """Random models of three shapes: prompt lookup (guessing often right: their text repeats),
    the model sharpened as its draft (every guess kept), and a random model of another shape
    sharpened as its draft (guesses mostly rejected, the first of a run at once): the same tokens."""
    model = byte_level(**shape)
    other = byte_level(**SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)])
    prompt = model.tokenizer.encode("in the ", bos=None)
    plain = greedy(model, prompt, 40)
    for kwargs, kept in (({"lookup": True}, "some"), ({"draft": sharpened(model, 1000)}, "all"),
                         ({"draft": sharpened(other, 1000)}, "few")):
        stats = GenerationStats()
        assert greedy(model, prompt, 40, stats, **kwargs) == plain, kwargs
        assert stats.drafted > 0
        assert {"some": 0 < stats.accepted, "all": stats.accepted == stats.drafted,
                "few": stats.accepted < stats.drafted}[kept], (kwargs, stats)


@pytest.mark.slow
def test_greedy_text_of_a_llama3_vocabulary_model_is_unchanged(llama3, eager):
    """The real vocabulary (128256 tokens): a random draft of another shape and seed, and the
    model sharpened as its own draft."""
    model, other = llama3
    prompt = model.tokenizer.encode("the cat sat on the mat. the cat sat on the")
    plain = greedy(model, prompt, 24)
    for draft, all_kept in ((sharpened(other, 1000), False), (sharpened(model, 1000), True)):
        stats = GenerationStats()
        assert greedy(model, prompt, 24, stats, draft=draft) == plain
        assert stats.drafted > 0 and (stats.accepted == stats.drafted) == all_kept


@pytest.mark.parametrize("right", [0, 2, None], ids=["first-rejected", "two-kept", "all-kept"])
def test_scripted_guesses_give_the_greedy_text_in_fewer_passes(llama3, right, monkeypatch):
    """A drafter that guesses the greedy continuation (all kept), or its first two tokens then a
    wrong one, or a wrong token first: the same tokens, right + 1 of them a pass (9 when all are
    right, draft_max being 8), each pass asking for as many guesses as leave one token to choose."""
    model, _ = llama3
    prompt, n = model.tokenizer.encode("hello world"), 24
    plain = greedy(model, prompt, n)
    passes, forward = [], model.forward_rows

    def counted(tokens, *args, **kwargs):
        passes.append(tokens.shape)
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward_rows", counted)
    drafter = Scripted(following(plain, right))
    row, _ = run(model, prompt, n, drafter)
    assert row.done.tokens == plain and row.done.stop_reason == "max_new_tokens"
    assert len(passes) == 1 + math.ceil((n - 1) / (9 if right is None else right + 1))  # the prefill, then guesses
    left, asked = n - 1, []  # tokens still to choose after the prefill's
    for k in drafter.asked:
        asked.append(min(8, left - 1))
        left -= (k if right is None else min(right, k)) + 1
    assert drafter.asked == asked and left == 0
    assert row.drafting.accepted == sum(k if right is None else min(right, k) for k in asked)


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_a_draft_longer_than_the_tokens_left(llama3, byte_level, n, eager):
    """-n 1 to 6 against draft_max 8: one pass after the prefill's, asked for the n - 1 tokens left
    less the one it chooses itself, and the output the limit's tokens; so with lookup and a draft."""
    model, _ = llama3
    prompt = model.tokenizer.encode("hello world")
    plain = greedy(model, prompt, n)
    drafter = Scripted(following(greedy(model, prompt, n + 8)))
    row, _ = run(model, prompt, n, drafter)
    assert row.done.tokens == plain and row.done.stop_reason == "max_new_tokens"
    assert drafter.asked == ([n - 2] if n > 1 else [])
    model = byte_level()
    base = model.tokenizer.encode("in the ", bos=None)
    prompt = base + greedy(model, base, 30)  # its own text, which repeats: lookup finds it
    plain = greedy(model, prompt, n)
    for kwargs in ({"lookup": True}, {"draft": sharpened(model, 1000)}):
        stats = GenerationStats()
        assert greedy(model, prompt, n, stats, **kwargs) == plain and stats.new_tokens == n
        assert stats.drafted == max(n - 2, 0), kwargs


def test_each_kept_guess_counts_in_the_next_positions_repeat_penalty(byte_level):
    """Greedy with a repeat penalty, every guess right: verify must penalise position j+1 by the
    guesses kept up to j (they are the row's tokens by then), or it rejects the right guess."""
    model = byte_level()
    base = model.tokenizer.encode("in the ", bos=None)
    prompt = base + greedy(model, base, 30)  # its own text, which repeats: the penalty bites
    sampler = lambda: Sampler(repeat_penalty=1.8, repeat_last_n=12)  # noqa: E731
    reference = list(model.generate(prompt, 16, sampler(), stop_ids=()))
    assert reference != greedy(model, prompt, 16)  # the penalty changes this text
    row = Row(list(prompt), 16, sampler(), set())
    for _ in decode(model, [row], model.new_cache(len(prompt) + 16), Scripted(following(reference))):
        pass
    assert row.done.tokens == reference and row.drafting.accepted >= 8


def test_a_stop_token_inside_a_run_of_kept_guesses_stops_there(llama3):
    """The greedy continuation guessed 8 at a time with a stop token among them: the output
    ends at the stop token as without speculation, and the cache holds nothing after it."""
    model, _ = llama3
    prompt = model.tokenizer.encode("hello world")
    reference = greedy(model, prompt, 16)
    k = distinct_stop(reference, 3, 8)  # the second pass guesses tokens 1..8
    stops = {reference[k]}
    plain, plain_cache = run(model, prompt, 16, stops=stops)
    assert plain.done.tokens == reference[:k + 1] and plain.done.stop_reason == "stop_token"
    row, cache = run(model, prompt, 16, Scripted(following(reference)), stops=stops)
    assert row.done.tokens == plain.done.tokens and row.done.stop_reason == "stop_token"
    assert row.pos == plain.pos
    assert_same_cache(cache, plain_cache, row.pos)


def test_stop_tokens_with_lookup_and_a_draft(byte_level, eager):
    """stop_ids holding a token the greedy text produces mid-way: lookup and a draft stop on it
    as the plain run does."""
    model = byte_level()
    prompt = model.tokenizer.encode("in the ", bos=None)
    reference = greedy(model, prompt, 40)
    stops = {reference[distinct_stop(reference, 20, 40)]}
    plain = greedy(model, prompt, 40, stop_ids=stops)
    assert len(plain) < 40
    for kwargs in ({"lookup": True}, {"draft": sharpened(model, 1000)}):
        stats = GenerationStats()
        assert greedy(model, prompt, 40, stats, stop_ids=stops, **kwargs) == plain
        assert stats.stop_reason == "stop_token" and stats.drafted > 0


@pytest.mark.parametrize("room", [1, 2, 4])
def test_the_context_limit_stops_as_without_speculation(llama3, byte_level, room, eager):
    """A cache of only `room` positions beyond the prompt and -n 10: the same tokens and the stop
    reason max_seq_len, guessing the greedy continuation, by lookup and with a draft."""
    model, _ = llama3
    prompt = model.tokenizer.encode("hello world")
    reference = greedy(model, prompt, 10)
    plain, _ = run(model, prompt, 10, cache=model.new_cache(len(prompt) + room))
    assert plain.done.stop_reason == "max_seq_len" and plain.done.tokens == reference[:room]
    row, _ = run(model, prompt, 10, Scripted(following(reference)), cache=model.new_cache(len(prompt) + room))
    assert row.done.tokens == plain.done.tokens and row.done.stop_reason == "max_seq_len"

    model = byte_level()
    prompt = model.tokenizer.encode("in the in the in the ", bos=None)
    plain_stats = GenerationStats()
    plain = greedy(model, prompt, 10, plain_stats, cache=model.new_cache(len(prompt) + room))
    for kwargs in ({"lookup": True}, {"draft": sharpened(model, 1000)}):
        stats = GenerationStats()
        assert greedy(model, prompt, 10, stats, cache=model.new_cache(len(prompt) + room), **kwargs) == plain
        assert stats.stop_reason == plain_stats.stop_reason == "max_seq_len"


def test_a_draft_with_a_shorter_context_than_the_model(byte_level, eager):
    """A draft model loaded with a context of 16 positions, the model's 64: near the draft's end it
    stops guessing (DraftModel's context is the smaller), and the text is the text without it."""
    model = byte_level()
    prompt = model.tokenizer.encode("in the ", bos=None)
    plain = greedy(model, prompt, 40)
    stats = GenerationStats()
    assert greedy(model, prompt, 40, stats, draft=sharpened(model, 1000, max_seq_len=16)) == plain
    assert stats.drafted > 0


def test_a_draft_model_kept_across_a_conversation_guesses_in_every_turn(byte_level, eager):
    """Two turns through one cache and one DraftModel (as --chat runs them): the second turn's
    prompt starts where the first turn's cached positions end, and the draft, which holds the first
    turn, guesses in the second too; the text is the unspeculated conversation's."""
    model = byte_level()
    first, second = (model.tokenizer.encode(t, bos=None) for t in ("in the ", " and then the"))

    def conversation(draft):
        cache, replies, drafted = model.new_cache(64), [], []
        start = 0
        for prompt in (first, second):
            stats = GenerationStats()
            replies.append(greedy(model, prompt, 8, stats, cache=cache, start_pos=start, draft=draft))
            start, drafted = stats.cached_positions, drafted + [stats.drafted]
        return replies, drafted

    plain, _ = conversation(None)
    replies, drafted = conversation(DraftModel(model, sharpened(model, 1000), 1, 64))
    assert replies == plain
    assert drafted[0] > 0 and drafted[1] > 0, f"drafted per turn: {drafted}"


# ---- 2. the KV cache after rejections ----------------------------------------------------

def truncated(cache, positions: int):
    """The cache with every position from `positions` on zeroed: a finished run's cache as it was
    when `positions` tokens were in it."""
    earlier = copy.deepcopy(cache)
    for k, v in zip(earlier.k, earlier.v):
        k[:, :, positions:], v[:, :, :, positions:] = 0, 0
    return earlier


@pytest.mark.parametrize("right", [0, 1, 3])
def test_the_cache_after_rejected_guesses_is_the_unspeculated_cache(llama3, right):
    """Guesses wrong from the first, or after 1 or 3 right ones, at every step: after each step
    the model's cache equals the unspeculated run's at every position before the newest token,
    and is zero from it on (the rejected guesses' positions zeroed)."""
    model, _ = llama3
    prompt = model.tokenizer.encode("the cat sat on the mat")
    reference = greedy(model, prompt, 20)
    plain, plain_cache = run(model, prompt, 20, cache=model.new_cache(40))
    cache, row = model.new_cache(40), Row(list(prompt), 20, Sampler(0), set())
    batch = Batch(model, cache, drafter=Scripted(following(reference, right)))
    batch.add(row)
    while batch:
        batch.step()
        assert_same_cache(cache, truncated(plain_cache, row.pos), row.pos)
    assert row.done.tokens == reference and row.drafting.drafted > row.drafting.accepted
    assert_same_cache(cache, plain_cache, plain.pos)


def test_the_caches_after_a_draft_models_rejections(byte_level, eager):
    """A draft of another shape (its guesses mostly rejected) through generate(cache=...): after
    each step the model's cache equals the unspeculated run's before the newest token and is zero
    from it on, and the draft's own cache holds exactly the tokens it says it holds (a prefix of
    the text) as a fresh pass of the draft over them computes them, zero after them."""
    model, other = byte_level(), byte_level(**SHAPES[0])
    prompt = model.tokenizer.encode("in the ", bos=None)
    plain_cache, plain_stats = model.new_cache(48), GenerationStats()
    plain = greedy(model, prompt, 40, plain_stats, cache=plain_cache)
    cache, stats = model.new_cache(48), GenerationStats()
    draft = DraftModel(model, sharpened(other, 1000), 1, 48)
    tokens = []
    for token in model.generate(prompt, 40, Sampler(0), stop_ids=(), stats=stats, cache=cache, draft=draft):
        tokens.append(token)
        assert_same_cache(cache, truncated(plain_cache, stats.cached_positions), stats.cached_positions)
        [held] = draft.held
        assert held == (prompt + plain)[:len(held)]
        assert_draft_holds(draft, 0)
    assert tokens == plain and stats.cached_positions == plain_stats.cached_positions
    assert 0 < stats.drafted and stats.accepted < stats.drafted and len(held) > len(prompt)
    assert_same_cache(cache, plain_cache, plain_stats.cached_positions)


@pytest.mark.slow
def test_the_cache_after_lookup_on_smollm2(smollm2):
    """Prompt lookup on the default model, guesses kept and rejected: after each step the cache of
    the unspeculated run, zero from the newest token on."""
    prompt = smollm2.tokenizer.encode(COPY, bos=None)
    plain_cache, plain_stats = smollm2.new_cache(len(prompt) + 24), GenerationStats()
    plain = greedy(smollm2, prompt, 24, plain_stats, stop_ids=None, cache=plain_cache)
    cache, stats = smollm2.new_cache(len(prompt) + 24), GenerationStats()
    tokens = []
    for token in smollm2.generate(prompt, 24, Sampler(0), stats=stats, cache=cache, lookup=True):
        tokens.append(token)
        assert_same_cache(cache, truncated(plain_cache, stats.cached_positions), stats.cached_positions)
    assert tokens == plain and 0 < stats.accepted < stats.drafted
    assert_same_cache(cache, plain_cache, plain_stats.cached_positions)


# ---- 3. sampling: distributed exactly as without speculation ------------------------------

ROWS = 4000  # rows sampled at once: 27 cells, the rarest expected ~70 times
SAMPLER = Sampler(temperature=1.0, top_k=3, seed=20240601)


def exact_joint(model, sampler: Sampler, prompt: list[int], n: int) -> dict[tuple[int, ...], float]:
    """Each sequence of n new tokens with its probability without speculation: the product of
    the sampler's distributions after the prompt and after each prefix."""
    joint = {(): 1.0}
    for _ in range(n):
        joint = {seq + (int(t),): pr * p[t] for seq, pr in joint.items()
                 for p in [sampler.probabilities(model.forward(prompt + list(seq), last_only=True)[-1])]
                 for t in np.flatnonzero(p)}
    return joint


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square with df degrees of freedom > x), by the Wilson-Hilferty approximation."""
    z = ((x / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def assert_distributed_as(completions, joint) -> None:
    counts = Counter(tuple(c.tokens) for c in completions)
    assert set(counts) <= set(joint), f"sequences the sampler cannot draw: {set(counts) - set(joint)}"
    cells = sorted(joint)
    expected = np.array([joint[c] for c in cells]) * len(completions)
    assert expected.min() >= 5  # the chi-square approximation holds
    observed = np.array([counts[c] for c in cells])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    p = chi2_sf(chi2, len(cells) - 1)
    worst = np.argsort(-(observed - expected) ** 2 / expected)[:3]
    assert p > 1e-3, (f"chi2 = {chi2:.1f} on {len(cells) - 1} degrees of freedom, p = {p:.2g}; worst cells "
                      f"(sequence, observed, expected): {[(cells[i], observed[i], round(expected[i])) for i in worst]}")


@pytest.fixture(scope="module")
def copying(tiny):
    """A prompt of the tiny model's own greedy text, which repeats: lookup finds the new tokens'
    n-grams in it. The first new token comes from the prefill, with no guess; the second and
    third are where guesses are checked (kept: the third is the pass's own token; rejected: the
    second is drawn from max(0, p - q))."""
    base = tiny.tokenizer.encode("in the ", bos=None)
    prompt = base + greedy(tiny, base, 40)
    return prompt, exact_joint(tiny, SAMPLER, prompt, 3)


@pytest.mark.slow
def test_sampling_with_lookup_draws_the_unspeculated_distribution(tiny, copying):
    """ROWS seeds at once (generate_batch seeds row i with seed + i), temperature 1, top-k 3: the
    first 3 new tokens' joint distribution with prompt lookup is the exact one (chi-square,
    p > 0.001), guesses having been kept and rejected."""
    prompt, joint = copying
    stats = GenerationStats()
    out = tiny.generate_batch([prompt] * ROWS, 3, SAMPLER, stop_ids=(), lookup=True, stats=stats)
    assert 0 < stats.accepted < stats.drafted
    assert_distributed_as(out, joint)


@pytest.mark.slow
def test_sampling_with_a_draft_model_draws_the_unspeculated_distribution(tiny, copying, eager):
    """The same with a draft model whose distribution is the model's sharpened (output x 5: the
    same top 3 tokens, the likeliest at over p_min where the model has it at ~0.4), guessing
    at every step: guesses kept and rejected, the exact distribution."""
    prompt, joint = copying
    stats = GenerationStats()
    out = tiny.generate_batch([prompt] * ROWS, 3, SAMPLER, stop_ids=(), draft=sharpened(tiny, 5), stats=stats)
    assert 0 < stats.accepted < stats.drafted
    assert_distributed_as(out, joint)


@pytest.mark.slow
@pytest.mark.parametrize("q", [None, [0.1, 0.8, 0.1], [0.6, 0.2, 0.2], [0.0, 0.5, 0.5]],
                         ids=["certain", "surer", "other", "partial-support"])
def test_verify_gives_the_models_distribution_from_a_drafts_guess(q):
    """verify on fixed logits (p = 0.5, 0.3, 0.2 after the newest token, 0.1, 0.1, 0.8 after the
    guess), the guess drawn from a draft's q (None: certain, token 1, as lookup's): the first token
    is distributed as p, and when the guess is kept the second as the next position's p."""
    p, after = np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.1, 0.8])
    logits = np.log(np.stack([p, after])).astype(np.float32)
    sampler, draws, n = Sampler(1.0, seed=3), np.random.default_rng(4), 6000
    firsts, seconds = [], []
    for _ in range(n):
        guess = 1 if q is None else int(draws.choice(3, p=q))
        out = verify(sampler, logits, Guesses([guess], None if q is None else np.array([q])))
        assert len(out) == 2 and out[0] == guess or len(out) == 1
        firsts.append(out[0])
        seconds += out[1:]
    sigma = np.sqrt(p * (1 - p) / n)
    assert (np.abs(np.bincount(firsts, minlength=3) / n - p) < 5 * sigma).all(), np.bincount(firsts) / n
    sigma = np.sqrt(after * (1 - after) / len(seconds))
    assert (np.abs(np.bincount(seconds, minlength=3) / len(seconds) - after) < 5 * sigma).all()


# ---- 4. seeded runs reproduce ----------------------------------------------------------

def test_seeded_sampling_with_speculation_is_reproducible(byte_level, eager):
    """The same seed twice: the same tokens, with lookup and with a draft, alone and in a batch;
    another seed: other tokens."""
    model = byte_level()
    prompt = model.tokenizer.encode("in the in the ", bos=None)
    sampler = Sampler(0.8, top_k=10, seed=11)
    for kwargs in ({"lookup": True}, {"draft": sharpened(model, 5)}):
        runs = [list(model.generate(prompt, 24, replace(sampler), stop_ids=(), **kwargs)) for _ in range(3)]
        assert runs[0] == runs[1], kwargs
        assert runs[2] != list(model.generate(prompt, 24, replace(sampler, seed=12), stop_ids=(), **kwargs))
        batches = [[c.tokens for c in model.generate_batch([prompt, prompt[:3]], 16, sampler, stop_ids=(), **kwargs)]
                   for _ in range(2)]
        assert batches[0] == batches[1], kwargs


# ---- 5. a draft of another vocabulary ----------------------------------------------------

def test_a_draft_of_another_vocabulary_is_refused(smollm2, llama3, tmp_path):
    """SmolLM2 (49152 tokens) with a Llama 3 draft (128256), and a byte-level model with a draft
    of as many tokens, two of them swapped: ArgumentError naming the vocabulary."""
    model, draft = llama3
    with pytest.raises(ArgumentError, match="vocabulary"):
        list(smollm2.generate([1, 2, 3], 4, draft=draft))
    with pytest.raises(ArgumentError, match="vocabulary"):
        smollm2.generate_batch([[1, 2, 3]], 4, draft=draft)
    args = tiny_args(vocab_size=BYTE_VOCAB)
    path = tiny_gguf(tmp_path / "model.gguf", args)
    metadata = tiny_gguf_metadata(args)
    tokens = list(metadata["tokenizer.ggml.tokens"])
    tokens[97], tokens[98] = tokens[98], tokens[97]  # "a" and "b"
    swapped = write_gguf_file(tmp_path / "swapped.gguf", {**metadata, "tokenizer.ggml.tokens": tokens},
                              gguf_tensors(path))
    model, swapped = npllama.load(path), npllama.load(swapped)
    assert swapped.args.vocab_size == model.args.vocab_size
    with pytest.raises(ArgumentError, match="vocabulary"):
        list(model.generate([1, 2, 3], 4, draft=swapped))


def test_the_command_line_refuses_a_draft_of_another_vocabulary(default_model_path, llama3, capsys):
    """-m SmolLM2 -md a Llama 3 vocabulary model: exit status 2, one error line naming the vocabulary."""
    _, draft = llama3
    code, out, err = run_cli(capsys, "-m", default_model_path, "-p", "hi", "-n", 4, "-md", draft.source)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert lines[-1].startswith("error:") and "vocabulary" in lines[-1]
    assert [line for line in lines if line.startswith("error")] == lines[-1:]


# ---- 6. batches ----------------------------------------------------------------------

@pytest.mark.slow
def test_batch_rows_with_lookup_equal_each_prompt_alone(smollm2):
    """Prompts of different lengths and limits, one stopping on a token of its text: each row
    with prompt lookup equals that prompt generated alone without speculation."""
    tok = smollm2.tokenizer
    prompts = [tok.encode(t, bos=None) for t in (COPY, OPEN, "Hi", COPY[:60])]
    limits = [24, 10, 5, 16]
    alone = [greedy(smollm2, p, n) for p, n in zip(prompts, limits)]
    k = distinct_stop(alone[0], 4, 24)
    stops = [{alone[0][k]}, set(), set(), set()]
    expected = [alone[0][:k + 1]] + alone[1:]
    stats = GenerationStats()
    out = smollm2.generate_batch(prompts, limits, Sampler(0), stop_ids=stops, lookup=True, stats=stats)
    assert [o.tokens for o in out] == expected
    assert stats.accepted > 0


def test_batch_rows_with_a_draft_equal_each_prompt_alone(byte_level, eager):
    """A batch with a draft of another shape (most guesses rejected; rows of different guess
    lengths in one pass, those done guessing riding along) and with the model sharpened as its
    draft (all kept): each row is its prompt alone without speculation, the rows leaving at their
    limits; each slot of the first draft's cache holds a prefix of a row's text (the draft's
    padded passes leave their pads' keys and values after a slot's tokens, never read)."""
    model, other = byte_level(), byte_level(**SHAPES[2])
    tok = model.tokenizer
    prompts = [tok.encode(t, bos=None) for t in ("in the ", "a", "hello there, hello there", "the the the ")]
    limits = [30, 12, 5, 20]
    alone = [greedy(model, p, n) for p, n in zip(prompts, limits)]
    rejecting = DraftModel(model, sharpened(other, 1000), len(prompts), 64)
    for draft, all_kept in ((rejecting, False), (sharpened(model, 1000), True)):
        stats = GenerationStats()
        out = model.generate_batch(prompts, limits, Sampler(0), stop_ids=(), draft=draft, stats=stats)
        assert [o.tokens for o in out] == alone
        assert stats.drafted > 0 and (stats.accepted == stats.drafted) == all_kept
    texts = [p + a for p, a in zip(prompts, alone)]
    for slot, held in enumerate(rejecting.held):
        assert any(held == text[:len(held)] for text in texts), slot
        assert_draft_holds(rejecting, slot, zeroed=False)


# ---- 7. the command line -------------------------------------------------------------

@pytest.fixture
def load_once(monkeypatch):
    """The CLI runs main() several times on the default model: loaded once per set of options."""
    real_load, loaded = npllama.formats.load, {}

    def load(path, **kwargs):
        key = (str(path), tuple(sorted((k, v) for k, v in kwargs.items() if k != "verbose")))
        if key not in loaded:
            loaded[key] = real_load(path, **kwargs)
        return loaded[key]

    monkeypatch.setattr(npllama.formats, "load", load)


SUMMARY = re.compile(r", (\d+) drafted, (\d+) accepted \((\d+)%\) \(stopped: ")


@pytest.mark.slow
def test_the_command_line_prints_the_same_text_with_lookup_and_a_draft(default_model_path, load_once, capsys):
    """-n 24 on the copying prompt: the text without speculation, with --lookup and with -md the
    model itself; the summary line reports what was drafted and accepted."""
    command = ["-m", default_model_path, "-p", COPY, "-n", 24]
    code, plain, err = run_cli(capsys, *command)
    assert code == 0 and plain.startswith(COPY) and len(plain) > len(COPY) + 10
    assert "drafted" not in err
    code, looked, err = run_cli(capsys, *command, "--lookup")
    assert code == 0 and looked == plain
    drafted, accepted, percent = map(int, SUMMARY.search(err).groups())
    assert 0 < accepted <= drafted and percent == round(100 * accepted / drafted)
    code, out, err = run_cli(capsys, *command, "-md", default_model_path, "--draft-max", 4)
    assert code == 0 and out == plain


@pytest.mark.parametrize("argv, message", [
    (["--lookup", "-md", "DRAFT"], "not both"), (["serve", "--lookup", "-md", "DRAFT"], "not both"),
    (["--lookup", "--draft-max", "0"], "--draft-max"), (["serve", "--lookup", "--draft-max", "65"], "--draft-max"),
])
def test_the_command_line_refuses_speculation_flags_before_loading(tmp_path, capsys, argv, message):
    """One line, exit status 2, and the model (which does not exist) never looked for."""
    argv = [str(tmp_path / "draft") if a == "DRAFT" else a for a in argv]
    code, _, err = run_cli(capsys, *argv, "-m", tmp_path / "no-model")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, err
    assert "no-model" not in err


def test_bad_speculation_arguments_are_named(byte_level):
    model = byte_level()
    with pytest.raises(ArgumentError, match="not both"):
        list(model.generate([1, 2], 4, lookup=True, draft=model))
    for bad in (0, 65, 2.5, True):
        with pytest.raises(ArgumentError, match="draft_max"):
            list(model.generate([1, 2], 4, lookup=True, draft_max=bad))
    with pytest.raises(ArgumentError, match="rows"):
        drafter_for(model, model.new_cache(16, rows=2), draft=DraftModel(model, model, 1, 16))


# ---- 8. mpiexec -----------------------------------------------------------------------

def mpiexec(n: int, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, *command], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)


def single(*command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO)


@pytest.mark.slow  # mpiexec
@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"{MPIEXEC} is missing (the test extra installs mpi4py and mpich)")
def test_two_ranks_print_the_unspeculated_text(tmp_path):
    """mpiexec -n 2 with --lookup, and with -md a sharpened copy of the model (its guesses
    broadcast from rank 0), prints the text of one process without speculation."""
    args = tiny_args(vocab_size=BYTE_VOCAB, n_heads=8, n_kv_heads=4)  # 4 heads and 2 kv heads a rank
    model = tiny_gguf(tmp_path / "model.gguf", args)
    draft = write_gguf_file(tmp_path / "draft.gguf", tiny_gguf_metadata(args), gguf_tensors(model, 1000))
    command = ["-m", "npllama", "-m", str(model), "-p", "in the ", "-n", "32"]
    one = single(*command)
    assert one.returncode == 0 and one.stdout.strip(), one.stderr[-2000:]
    for flags in (["--lookup"], ["-md", str(draft)]):
        two = mpiexec(2, *command, *flags)
        assert two.returncode == 0, two.stderr[-2000:]
        assert two.stdout == one.stdout, flags
        assert int(SUMMARY.search(two.stderr).group(1)) > 0


# ---- 9. prompt lookup's index ----------------------------------------------------------

def continuation(tokens, k):
    index = NgramIndex()
    index.extend(tokens)
    return index.continuation(k)


def test_lookup_reads_on_after_the_latest_earlier_occurrence():
    # (1, 2, 3) occurs at 0 (then 9) and at 4 (then 7, 5): the latest is taken.
    assert continuation([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]


def test_lookup_prefers_the_longest_ngram():
    # The 3-gram (4, 5, 6) was followed by 10; the 1-gram (6,) more recently by 11.
    assert continuation([4, 5, 6, 10, 9, 6, 11, 4, 5, 6], 2) == [10, 9]
    # The 2-gram (8, 6) by 12; (6,) more recently by 13.
    assert continuation([8, 6, 12, 9, 6, 13, 8, 6], 1) == [12]


def test_lookup_continues_cyclically_past_the_end():
    """A match d tokens back goes on with the last d tokens, repeated."""
    assert continuation([1, 2, 3, 1], 7) == [2, 3, 1, 2, 3, 1, 2]
    assert continuation([7, 5, 5], 4) == [5, 5, 5, 5]


def test_lookup_without_a_match_guesses_nothing():
    assert continuation([1, 2, 3], 4) == []
    assert continuation([1], 4) == []


def test_lookup_index_grows_with_the_row():
    """Extended token by token (a row's new tokens), the index answers as built at once; Lookup
    guesses for each row from its prompt and new tokens, and forgets a row that leaves."""
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5]
    index = NgramIndex()
    for i in range(1, len(tokens) + 1):
        index.extend(tokens[:i])
        assert index.continuation(4) == continuation(tokens[:i], 4)
    lookup = Lookup(draft_max=8)
    row = Row([1, 2, 3, 4, 1, 2], 10, Sampler(0), set())
    row.done.tokens, row.done.new_tokens = [3, 4, 1], 3
    other = Row([5, 6, 5], 10, Sampler(0), set())
    guesses = lookup.guess([row, other], [3, 0])
    assert [g.tokens for g in guesses] == [[2, 3, 4], []] and guesses[0].q is None
    lookup.leave(0, row)
    assert id(row) not in lookup.index and id(other) in lookup.index


# ---- 10. how many tokens a row guesses -------------------------------------------------

@pytest.mark.parametrize("draft_max", [8, 3])
def test_a_row_guesses_more_while_all_are_kept_and_pauses_when_none_are(draft_max):
    drafting = Drafting(draft_max=draft_max, cost=PASS_COST)
    lengths = [drafting.wanted()]
    assert 1 <= lengths[0] <= draft_max  # a fresh row probes at once
    for _ in range(5):  # every guess kept: more each step, up to draft_max, and staying there
        drafting.update(Guesses([0] * lengths[-1]), lengths[-1])
        lengths.append(drafting.wanted())
    assert all(b > a or b == draft_max for a, b in zip(lengths, lengths[1:])) and lengths[-1] == draft_max
    assert drafting.drafted == drafting.accepted == sum(lengths[:-1])
    drafting.update(Guesses([0] * draft_max), 0)  # every guess rejected: a pause
    steps = 0
    while drafting.wanted() == 0:
        steps += 1
        assert steps < 1000, "never guesses again"
    assert steps > 0 and drafting.accepted == drafting.drafted - draft_max


def test_a_row_with_nothing_to_guess_keeps_its_length():
    """No n-gram found (no guess made, none paid for): the next step asks as many again."""
    drafting = Drafting(draft_max=8, cost=PASS_COST)
    k = drafting.wanted()
    drafting.update(Guesses([]), 0)
    assert drafting.wanted() == k and drafting.drafted == drafting.accepted == 0


def test_speculation_in_the_bf16_flow_is_refused(default_model_path, byte_level, capsys):
    """The bf16 flow rounds a pass over several positions otherwise than one at a time: on SmolLM2
    that turned a near tie and the greedy text, so the combination is refused, before loading on
    the command line."""
    model = byte_level()
    bf16 = Llama(model.args, model.weights, tokenizer=model.tokenizer, dtype="bfloat16")
    with pytest.raises(ArgumentError, match="bfloat16"):
        list(bf16.generate([1, 2, 3], 4, lookup=True))
    with pytest.raises(ArgumentError, match="bfloat16"):
        list(bf16.generate([1, 2, 3], 4, draft=model))
    code = cli.main(["-m", "/nonexistent", "-p", "hi", "-n", "2", "--lookup", "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    assert code == 2 and "bfloat16" in err and "does not exist" not in err

"""Perplexity and KL divergence over a whole text, by llama-perplexity's method."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

import npllama
from npllama import cli
from npllama.cli import perplexity as command
from npllama.perplexity import Running, evaluate, windows
from oracle.checkpoints import tiny_args

PASSAGE = Path(__file__).parent / "data" / "passage.txt"


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint(tiny_args(), seed=9)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["perplexity", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def final(out: str) -> float:
    return float(out.split("Final estimate: PPL = ")[1].split()[0])


def by_hand(model, n_ctx: int) -> float:
    """exp(mean NLL) from each window's full logits, one single-sequence forward pass per window:
    BOS first, scored from the middle, each position predicting the next token."""
    tokens = model.tokenizer.encode(PASSAGE.read_text())
    nll = []
    for start in range(0, len(tokens) // n_ctx * n_ctx, n_ctx):
        window = [model.tokenizer.bos_id] + tokens[start + 1:start + n_ctx]
        logits = model.forward(window).astype(np.float64)  # [n_ctx, V]
        for j in range(n_ctx // 2, n_ctx - 1):
            z = logits[j] - logits[j].max()
            nll.append(math.log(np.exp(z).sum()) - z[window[j + 1]])
    return math.exp(np.mean(nll))


@pytest.mark.slow
@pytest.mark.parametrize("options, per_pass", [(["-np", 1], 1), (["-np", 3], 3), (["--parallel", 2, "-b", 8], 2),
                                               (["-b", 64], 2), (["-b", 8], 1), (["-b", 2048], 64)])
def test_perplexity_is_exp_mean_nll_of_the_second_halves(checkpoint, capsys, options, per_pass):
    """Whatever the windows a pass (-np, or llama-perplexity's -b / -c) and the positions of a
    window a pass (-b below -c: a window in passes through its cache)."""
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "--ctx-size", 32, *options)
    model = npllama.load(checkpoint)
    n_windows = len(model.tokenizer.encode(PASSAGE.read_text())) // 32
    assert code == 0 and f"{n_windows} windows of 32 tokens, 15 scored in each" in out
    assert f"({n_windows * 15} tokens)" in out
    assert out.split("\n")[1].startswith(f"[{min(per_pass, n_windows)}]")  # the running estimates, a pass each
    assert final(out) == pytest.approx(by_hand(model, 32), rel=1e-5)


def test_windows_follow_llama_perplexity():
    tokens = list(range(100, 171))  # 71 tokens, BOS already first in real use
    w = windows(tokens, 16, bos_id=7)
    assert w.shape == (4, 16)  # the 7-token tail is left out
    assert list(w[:, 0]) == [7] * 4 and list(w[1, 1:]) == tokens[17:32]
    assert list(windows(tokens, 16, bos_id=None)[1]) == tokens[16:32]  # no BOS: the text itself


@pytest.mark.slow
def test_a_model_against_itself_has_zero_divergence(checkpoint, capsys):
    # -t: bit-equal only at one thread count; by default each load follows the machine's load.
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "-t", 2, "-c", 32, "--kl-divergence",
                       "--reference", checkpoint, "--max-mean-kl", 0, "--max-kl", 0, "--min-top1", 100,
                       "--max-logit-error", 0)
    assert code == 0 and "mean 0, max 0" in out and "same top token 100.00%" in out and "OK" in out


@pytest.mark.slow
def test_the_oracle_agrees_within_float32_rounding(checkpoint, capsys):
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "-c", 32, "--kl-divergence",
                       "--max-mean-kl", 1e-9, "--min-top1", 99)
    assert code == 0, out


@pytest.mark.slow
def test_a_wrong_eps_shows_and_a_bound_fails(checkpoint, capsys, monkeypatch):
    """The model under test computes with eps 1e-2 where params.json says 1e-5; the reference is right."""
    load = command.load_model
    models = []

    def load_model(*args, **kwargs):
        model = load(*args, **kwargs)
        if not models:
            model.args = dataclasses.replace(model.args, norm_eps=1e-2)
        models.append(model)
        return model

    monkeypatch.setattr(command, "load_model", load_model)
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "-c", 32, "--kl-divergence",
                       "--reference", checkpoint, "--max-mean-kl", 1e-6)
    mean = float(out.split("KL divergence (nats) over")[1].split("mean ")[1].split(",")[0])
    assert code == 1 and mean > 1e-6 and "FAIL: mean_kl" in out and "--max-mean-kl" in out  # the oracle: ~1e-11


@pytest.mark.slow
def test_bad_input_is_a_clear_error(checkpoint, capsys, tmp_path, random_checkpoint):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    other_vocab = random_checkpoint(tiny_args(vocab_size=128256 + 64))
    for argv, message in ((["-f", empty], "is empty"), (["-f", short, "-c", 32], "needs at least 64"),
                          (["-f", PASSAGE, "-c", 10**5], "beyond the model's context of 8192"),
                          (["-f", PASSAGE, "-c", 32, "--kl-divergence", "--reference", other_vocab],
                           "vocabulary of 128320 tokens and the model 128256"),
                          (["-f", PASSAGE, "--max-kl", 1], "add --kl-divergence")):
        code, _, err = run(capsys, "-m", checkpoint, *argv)
        assert code == 2 and message in err.splitlines()[-1], err


@pytest.mark.slow
def test_kl_divergence_base_saves_then_compares(checkpoint, capsys, tmp_path):
    """llama-perplexity's two steps: --kl-divergence-base FILE alone saves the logits (and prints
    the perplexity); with --kl-divergence they are the reference. The same model against its own
    saved logits: KL 0, every top token the same. A base from another text, a missing one, and
    one of another shape are refused naming the file."""
    base = tmp_path / "base.npy"
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "-t", 2, "-c", 32, "--kl-divergence-base", base)
    assert code == 0 and f"saved the logits to {base}" in out and base.is_file()
    assert not list(tmp_path.glob("*.part"))
    saved = np.load(base)
    n_windows = int(out.split("perplexity: ")[1].split()[0])
    assert saved.shape == (n_windows, 15, 128256 + 1)
    code, out2, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "-t", 2, "-c", 32, "--kl-divergence",
                        "--kl-divergence-base", base, "--max-kl", 0, "--min-top1", 100)
    assert code == 0 and "mean 0, max 0" in out2 and final(out2) == final(out)
    other = tmp_path / "other.txt"
    other.write_text(PASSAGE.read_text()[::-1])
    for argv, message in (([other], "was made from another text"), ([PASSAGE, "-c", 16], "made from another text, context")):
        code, _, err = run(capsys, "-m", checkpoint, "-f", *argv[:1], *argv[1:] or ["-c", 32], "--kl-divergence",
                           "--kl-divergence-base", base)
        assert code == 2 and str(base) in err and message in err, err
    code, _, err = run(capsys, "-m", tmp_path / "no-model-needed", "-f", PASSAGE, "--kl-divergence",
                       "--kl-divergence-base", tmp_path / "none.npy")
    assert code == 2 and "none.npy does not exist" in err and err.count("\n") == 1


def test_one_window_is_not_enough():
    """llama-perplexity asks for two windows: one token short of them is an error naming the
    text's length, and exactly two windows' worth is accepted."""
    with pytest.raises(npllama.errors.ArgumentError, match="the text is 31 tokens long"):
        windows(list(range(31)), 16, bos_id=None)
    assert windows(list(range(32)), 16, bos_id=None).shape == (2, 16)


def test_the_error_of_the_perplexity_is_llama_perplexitys():
    """ppl * sqrt(var / (N - 1)), var = mean(nll^2) - mean(nll)^2. With N = 4 dividing by N
    instead of N - 1 makes the error 13% smaller, far beyond the 1e-12 compared here."""
    nll = np.array([1.0, 2.0, 3.0, 4.0])
    totals = Running(nll=[nll[:3], nll[3:]])  # over two passes: the count is of every token
    ppl, err = totals.perplexity()
    mean, var = 2.5, 7.5 - 2.5 ** 2  # mean(nll), mean(nll^2) - mean(nll)^2
    assert ppl == pytest.approx(math.exp(mean), rel=1e-12)
    assert err == pytest.approx(math.exp(mean) * math.sqrt(var / 3), rel=1e-12)
    assert abs(err - math.exp(mean) * math.sqrt(var / 4)) > 0.1 * err


def fixed_logits(probs: np.ndarray, batch: int = 1):
    """A logits_of for evaluate(): every window's scored positions get log(probs) [n, V]."""
    def run(chunk: np.ndarray) -> np.ndarray:
        return np.broadcast_to(np.log(probs), (len(chunk), *probs.shape)).astype(np.float32)
    run.batch = batch
    return run


def kl_by_hand(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) of each row: sum_i p_i log(p_i / q_i)."""
    return (p * np.log(p / q)).sum(-1)


# Two windows of 8 tokens: positions 4, 5, 6 are scored in each, over a vocabulary of 3.
CHUNKS = np.array([[0, 1, 2, 0, 1, 2, 0, 1], [2, 2, 1, 1, 0, 0, 2, 2]])
MODEL = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])  # one distribution a position
REFERENCE = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.6, 0.3, 0.1]])


def test_kl_divergence_is_of_the_model_from_the_reference():
    """Mean and max of KL(P_reference || P_model) = sum p_ref log(p_ref / p_model), worked out
    from the probabilities themselves; KL(P_model || P_reference) would give other numbers."""
    *_, totals = evaluate(CHUNKS, fixed_logits(MODEL, batch=2), fixed_logits(REFERENCE))
    kl = totals.kl_summary()
    expected = kl_by_hand(REFERENCE, MODEL)  # [3]: 0 where the two agree
    assert kl["tokens"] == 6
    assert kl["mean_kl"] == pytest.approx(expected.mean(), rel=1e-5)
    assert kl["max_kl"] == pytest.approx(expected.max(), rel=1e-5)
    swapped = kl_by_hand(MODEL, REFERENCE)
    assert abs(swapped.mean() - expected.mean()) > 0.1 * expected.mean()
    assert abs(swapped.max() - expected.max()) > 0.1 * expected.max()


def test_top1_agreement_counts_the_positions_where_the_top_tokens_agree():
    """The model's and the reference's most likely tokens agree at 1 of 3 scored positions
    (the first), so at 2 of 6 over two windows: 33.33%."""
    *_, totals = evaluate(CHUNKS, fixed_logits(MODEL), fixed_logits(REFERENCE, batch=2))
    assert list(MODEL.argmax(-1) == REFERENCE.argmax(-1)) == [True, False, False]
    assert totals.kl_summary()["top1_agreement"] == pytest.approx(100 * 2 / 6)

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
from npllama.perplexity import windows
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


@pytest.mark.parametrize("batch", [1, 3])
def test_perplexity_is_exp_mean_nll_of_the_second_halves(checkpoint, capsys, batch):
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "--ctx-size", 32, "--batch", batch)
    model = npllama.load(checkpoint)
    n_tokens = len(model.tokenizer.encode(PASSAGE.read_text()))
    assert code == 0 and f"{n_tokens // 32} windows of 32 tokens, 15 scored in each" in out
    assert f"({n_tokens // 32 * 15} tokens)" in out
    assert final(out) == pytest.approx(by_hand(model, 32), rel=1e-5)


def test_windows_follow_llama_perplexity():
    tokens = list(range(100, 171))  # 71 tokens, BOS already first in real use
    w = windows(tokens, 16, bos_id=7)
    assert w.shape == (4, 16)  # the 7-token tail is left out
    assert list(w[:, 0]) == [7] * 4 and list(w[1, 1:]) == tokens[17:32]
    assert list(windows(tokens, 16, bos_id=None)[1]) == tokens[16:32]  # no BOS: the text itself


def test_a_model_against_itself_has_zero_divergence(checkpoint, capsys):
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "-c", 32, "--kl-divergence",
                       "--reference", checkpoint, "--max-mean-kl", 0, "--max-kl", 0, "--min-top1", 100,
                       "--max-logit-error", 0)
    assert code == 0 and "mean 0, max 0" in out and "same top token 100.00%" in out and "OK" in out


def test_the_oracle_agrees_within_float32_rounding(checkpoint, capsys):
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "-c", 32, "--kl-divergence",
                       "--max-mean-kl", 1e-9, "--min-top1", 99)
    assert code == 0, out


def test_a_wrong_eps_shows_and_a_bound_fails(checkpoint, capsys, monkeypatch):
    """The model under test computes with eps 1e-2 where params.json says 1e-5; the reference is right."""
    load = command.load_model
    models = []

    def load_model(path, **kwargs):
        model = load(path, **kwargs)
        if not models:
            model.args = dataclasses.replace(model.args, norm_eps=1e-2)
        models.append(model)
        return model

    monkeypatch.setattr(command, "load_model", load_model)
    code, out, _ = run(capsys, "-m", checkpoint, "-f", PASSAGE, "-c", 32, "--kl-divergence",
                       "--reference", checkpoint, "--max-mean-kl", 1e-6)
    mean = float(out.split("KL divergence over")[1].split("mean ")[1].split(",")[0])
    assert code == 1 and mean > 1e-6 and "FAIL: mean_kl" in out and "--max-mean-kl" in out  # the oracle: ~1e-11


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

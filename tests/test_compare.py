"""`python -m npllama compare`: npllama against the torch oracle, and a failure it must catch."""

import sys

import pytest

import npllama
import npllama.model
from npllama import cli, layers
from npllama.model import LAYER_TRACE_NAMES
from oracle.checkpoints import tiny_args

ARGS = tiny_args(dim=96, n_heads=12, n_kv_heads=4, n_layers=2, ffn_dim_multiplier=1.5, multiple_of=64)


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint(ARGS, seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compare_passes_on_a_correct_model(checkpoint, capsys, dtype):
    assert cli.main(["compare", "-m", str(checkpoint), "--dtype", dtype]) == 0
    out = capsys.readouterr().out
    expected = (["embedding"] + [f"layers.{i}.{n}" for i in range(ARGS.n_layers) for n in LAYER_TRACE_NAMES]
                + ["norm", "logits"])
    rows = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in expected]
    assert rows == expected  # one row per named intermediate, layer by layer, in the forward pass's order
    assert f"OK: all {len(expected)} steps within their bound" in out
    assert " NO" not in out


def test_compare_fails_on_a_wrong_norm_eps_and_names_the_step(checkpoint, capsys, monkeypatch):
    """rms_norm with eps 1e-2 instead of the model's 1e-5: off by ~0.5%, far above the 1e-5 bound."""
    def rms_norm_wrong_eps(x, weight, eps):
        return layers.rms_norm(x, weight, 1e-2)

    monkeypatch.setattr(npllama.model, "rms_norm", rms_norm_wrong_eps)
    assert cli.main(["compare", "-m", str(checkpoint)]) == 1
    out = capsys.readouterr().out
    fail_line = next(line for line in out.splitlines() if line.startswith("FAIL"))
    assert "layers.0.attention_norm" in fail_line
    row = next(line for line in out.splitlines() if line.startswith("layers.0.attention_norm "))
    assert row.endswith("NO")
    # The embedding comes before the first norm, so it still matches.
    assert next(line for line in out.splitlines() if line.startswith("embedding ")).endswith("yes")


@pytest.mark.slow
def test_compare_per_layer_passes_and_still_catches_a_wrong_eps(checkpoint, capsys, monkeypatch):
    """--per-layer feeds each oracle layer npllama's own input: same verdicts on a sound model and on a
    broken one, with nothing carried over from the layers before."""
    dtype = "bfloat16"  # the flow --per-layer is for
    assert cli.main(["compare", "-m", str(checkpoint), "--dtype", dtype, "--per-layer"]) == 0
    assert "OK: all" in capsys.readouterr().out
    monkeypatch.setattr(npllama.model, "rms_norm", lambda x, weight, eps: layers.rms_norm(x, weight, 1e-1))
    assert cli.main(["compare", "-m", str(checkpoint), "--dtype", dtype, "--per-layer"]) == 1
    out = capsys.readouterr().out
    for i in range(ARGS.n_layers):  # every layer's own norm is wrong, whatever its input
        assert next(line for line in out.splitlines()
                    if line.startswith(f"layers.{i}.attention_norm ")).endswith("NO")
    assert "layers.0.attention_norm" in next(line for line in out.splitlines() if line.startswith("FAIL"))


def test_compare_without_torch_says_how_to_install_it(checkpoint, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert cli.main(["compare", "-m", str(checkpoint)]) == 2
    err = capsys.readouterr().err
    assert "pip install torch" in err and 'pip install "npllama[oracle]"' in err


@pytest.mark.slow
def test_compare_on_the_default_model(capsys, default_model_path):
    assert cli.main(["compare", "-m", str(default_model_path)]) == 0
    assert "OK: all" in capsys.readouterr().out

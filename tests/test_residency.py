"""Where weights live: float32 in RAM while the budget allows, layer by layer, the rest streamed
from the file; a quantized GGUF too big for RAM dequantized once into a cached bf16 copy."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

import npllama
from npllama.formats import dequantized
from npllama.formats.dequantized import quantized
from npllama.model import Llama
from oracle.checkpoints import tiny_args


def test_layers_are_resident_in_order_while_the_budget_allows(random_checkpoint, seed_prompt):
    path = random_checkpoint(tiny_args(n_layers=4))
    whole = npllama.load(path)
    per_layer = sum(4 * w.size for name, w in whole.weights.items() if name.startswith("layers.0."))
    output = 4 * whole.weights["output.weight"].size
    tiered = npllama.load(path, weights_budget=output + 2 * per_layer + per_layer // 2)
    assert tiered.resident_layers == 2 and not tiered.resident
    assert [layer.wqkv is not None for layer in tiered.layers] == [True, True, False, False]
    assert isinstance(tiered.output, np.ndarray)  # the output matrix came first
    tokens = whole.tokenizer.encode(seed_prompt)
    expected = whole.forward(tokens)
    np.testing.assert_allclose(tiered.forward(tokens), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert npllama.load(path, weights_budget=0).resident_layers == 0
    assert whole.resident and whole.resident_layers == 4


@pytest.fixture
def q8_gguf(tmp_path, monkeypatch):
    """A small model (dim 64: rows of whole Q8_0 blocks) stored as Q8_0, and a cache of its own."""
    from gguf import GGMLQuantizationType
    from npllama.config import ModelArgs
    from oracle.checkpoints import tiny_gguf
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=265, norm_eps=1e-5,
                     rope_theta=500000.0, multiple_of=32)
    return tiny_gguf(tmp_path / "q8.gguf", args, GGMLQuantizationType.Q8_0)


def test_a_quantized_model_too_big_for_ram_runs_from_a_bf16_copy(q8_gguf, tmp_path):
    in_ram = npllama.load(q8_gguf)
    assert in_ram.resident and quantized(in_ram.weights)  # it fits: dequantized to float32 at load
    streamed = npllama.load(q8_gguf, weights_budget=0)
    copies = list((tmp_path / "cache" / "dequantized").glob("q8-*.bf16.safetensors"))
    assert len(copies) == 1 and not quantized(streamed.weights)
    # The model runs the bf16 copy: the same as the dequantized weights rounded to bf16.
    rounded = {name: np.asarray(w, dtype=np.float32).astype(ml_dtypes.bfloat16) if name in quantized(in_ram.weights)
               else w for name, w in in_ram.weights.items()}
    reference = Llama(in_ram.args, rounded, weights_budget=0).forward([5, 6, 7])
    np.testing.assert_array_equal(streamed.forward([5, 6, 7]), reference)


def test_the_copy_is_made_once(q8_gguf, tmp_path, monkeypatch):
    npllama.load(q8_gguf, weights_budget=0)
    copy = next((tmp_path / "cache" / "dequantized").glob("*.safetensors"))
    made = copy.stat().st_mtime_ns

    def refuse(*args):
        raise AssertionError("the copy was made again")

    monkeypatch.setattr(dequantized, "write_bf16_copy", refuse)
    npllama.load(q8_gguf, weights_budget=0)
    assert copy.stat().st_mtime_ns == made


def test_a_damaged_copy_is_named(q8_gguf, tmp_path):
    npllama.load(q8_gguf, weights_budget=0)
    copy = next((tmp_path / "cache" / "dequantized").glob("*.safetensors"))
    copy.write_bytes(copy.read_bytes()[:100])
    with pytest.raises(npllama.CheckpointError, match=str(copy.name)):
        npllama.load(q8_gguf, weights_budget=0)


def test_not_enough_disk_for_the_copy(q8_gguf, monkeypatch):
    class Usage:
        free = 1 << 20
    monkeypatch.setattr(dequantized.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(npllama.CheckpointError, match="NPLLAMA_CACHE"):
        npllama.load(q8_gguf, weights_budget=0)

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


def test_the_default_budget_leaves_room_for_the_stored_weights(random_checkpoint, q8_gguf, monkeypatch):
    """By default the float32 copies take at most half the RAM, and with every stored weight (in
    the page cache, or paged in to be upcast) at most three quarters: on a machine this model's
    weights just overfill, it keeps some layers float32 and streams the rest, never all of them."""
    from npllama import resident_or_streamed
    from npllama.formats import shared
    from npllama.resident_or_streamed import default_weights_budget, stored_bytes
    real_sysconf = resident_or_streamed.os.sysconf

    def machine(page: int, pages: int) -> None:
        values = {"SC_PAGE_SIZE": page, "SC_PHYS_PAGES": pages}
        monkeypatch.setattr(resident_or_streamed.os, "sysconf", lambda name: values.get(name) or real_sysconf(name))

    page, pages = 4096, 1 << 20  # a 4 GiB machine
    machine(page, pages)
    ram = page * pages
    assert default_weights_budget(0) == ram // 2
    assert default_weights_budget(ram // 2) == ram // 4
    assert default_weights_budget(ram) == 0
    assert default_weights_budget(ram // 8, processes=2) == (3 * ram // 4 - ram // 4) // 2

    path = random_checkpoint(tiny_args(n_layers=4))
    whole = npllama.load(path)
    stored = stored_bytes(whole.weights)
    per_layer = sum(4 * w.size for name, w in whole.weights.items() if name.startswith("layers.0."))
    output = 4 * whole.weights["output.weight"].size
    # RAM whose three quarters hold the stored weights, the output's and 2.5 layers' float32 copies.
    small_ram = 4 * (stored + output + 2 * per_layer + per_layer // 2) // 3
    machine(1, small_ram)
    assert npllama.load(path).resident_layers == 2

    # A quantized tensor counts its blocks as stored, not the float32 it becomes.
    gguf = npllama.load(q8_gguf)
    blocks = [w for w in gguf.weights.values() if isinstance(w, shared.LazyRows)]
    assert blocks and all(w.nbytes == w.blocks.nbytes < 4 * w.size for w in blocks)

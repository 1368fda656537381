"""Where weights live: float32 in RAM while the budget allows, layer by layer, the rest streamed
from the file; a quantized GGUF too big for RAM dequantized once into a cached bf16 copy."""

from __future__ import annotations

import math
import os

import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

import npllama
from npllama.config import ModelArgs
from npllama.formats import dequantized, shares
from npllama.formats.dequantized import quantized
from npllama.model import Llama
from npllama.resident_or_streamed import stored_bytes
from npllama.tensor_parallel import Group
from oracle.checkpoints import _stored_name, _tiny_weights, tiny_args, tiny_gguf, tiny_gguf_metadata, write_gguf_file


def test_layers_are_resident_in_order_while_the_budget_allows(random_checkpoint, seed_prompt):
    path = random_checkpoint(tiny_args(n_layers=4))
    whole = npllama.load(path)
    per_layer = sum(4 * w.size for name, w in whole.weights.items() if name.startswith("layers.0."))
    output = 4 * whole.weights["output.weight"].size
    tiered = npllama.load(path, weights_budget=output + 2 * per_layer + per_layer // 2)
    assert tiered.resident_layers == 2 and not tiered.resident
    assert [isinstance(layer.wqkv, np.ndarray) for layer in tiered.layers] == [True, True, False, False]
    assert isinstance(tiered.output, np.ndarray)  # the output matrix came first
    tokens = whole.tokenizer.encode(seed_prompt)
    expected = whole.forward(tokens)
    np.testing.assert_allclose(tiered.forward(tokens), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert npllama.load(path, weights_budget=0).resident_layers == 0
    assert whole.resident and whole.resident_layers == 4


# A small model whose every matrix is rows of whole Q8_0 blocks (dim 64, hidden 192).
Q8_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=265, norm_eps=1e-5,
                    rope_theta=500000.0, multiple_of=32)


@pytest.fixture
def q8_gguf(tmp_path, monkeypatch):
    """Q8_ARGS's model stored as Q8_0, and a cache of its own."""
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    return tiny_gguf(tmp_path / "q8.gguf", Q8_ARGS, GGMLQuantizationType.Q8_0)


def test_a_quantized_model_too_big_for_ram_runs_from_a_bf16_copy(q8_gguf, tmp_path):
    in_ram = npllama.load(q8_gguf)
    assert in_ram.resident and quantized(in_ram.weights)  # it fits: dequantized to float32 at load
    # Bit-equal only at one thread count: by default each model follows the machine's load.
    streamed = npllama.load(q8_gguf, weights_budget=0, threads=2)
    copies = list((tmp_path / "cache" / "dequantized").glob("q8-*.bf16.safetensors"))
    assert len(copies) == 1 and not quantized(streamed.weights)
    # The model runs the bf16 copy: the same as the dequantized weights rounded to bf16.
    rounded = {name: np.asarray(w, dtype=np.float32).astype(ml_dtypes.bfloat16) if name in quantized(in_ram.weights)
               else w for name, w in in_ram.weights.items()}
    reference = Llama(in_ram.args, rounded, weights_budget=0, threads=2).forward([5, 6, 7])
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
    # Each process's stored weights count: below half the RAM, so the half-RAM cap does not hide it.
    assert default_weights_budget(ram // 4, processes=2) == (3 * ram // 4 - 2 * ram // 4) // 2

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


def copies(tmp_path) -> list:
    """The finished bf16 copies in the q8_gguf fixture's cache."""
    return sorted((tmp_path / "cache" / "dequantized").glob("q8-*.bf16.safetensors"))


def float32_bytes(args: ModelArgs) -> int:
    return sum(4 * math.prod(shape) for shape in args.weight_shapes().values())


def test_the_copy_is_made_when_the_float32_weights_do_not_fit(q8_gguf, tmp_path):
    """The budget is for float32 copies: a Q8_0 model whose blocks fit it but whose float32
    weights do not (4 bytes a weight against 34 bytes per 32) runs from the bf16 copy."""
    stored = stored_bytes(npllama.load(q8_gguf).weights)
    assert stored < float32_bytes(Q8_ARGS) // 3
    model = npllama.load(q8_gguf, weights_budget=(stored + float32_bytes(Q8_ARGS)) // 2)
    assert len(copies(tmp_path)) == 1 and not quantized(model.weights)


class RankOfTwo(Group):
    """Rank 0 of 2, alone on its machine, as read_share sees it (no MPI needed)."""

    rank, size, node_rank, node_size = 0, 2, 0, 1


def test_a_rank_copies_when_its_share_does_not_fit(q8_gguf, tmp_path):
    """Under tensor parallelism the budget is one rank's: with room for its half of the float32
    weights but not the whole model's, it needs no bf16 copy; with less, it makes one."""
    _, weights, _ = shares.read_share(q8_gguf, "gguf", RankOfTwo(), 1 << 40, False)
    share = sum(4 * weights[name].size for name in weights)  # what this rank holds, as float32
    whole = float32_bytes(Q8_ARGS)
    assert share < 0.6 * whole and not copies(tmp_path)
    shares.read_share(q8_gguf, "gguf", RankOfTwo(), (share + whole) // 2, False)
    assert not copies(tmp_path)
    _, weights, _ = shares.read_share(q8_gguf, "gguf", RankOfTwo(), share - 1, False)
    assert len(copies(tmp_path)) == 1 and not quantized(weights)


def test_a_rewritten_gguf_gets_a_copy_of_its_own(q8_gguf, tmp_path, monkeypatch):
    """The file written again with other weights (every matrix halved) and the same size: the
    next load runs the new weights, bit for bit those of a fresh copy, not the stale copy's."""
    size = q8_gguf.stat().st_size
    old = npllama.load(q8_gguf, weights_budget=0, threads=1).forward([5, 6, 7])
    # (Not every weight negated: norms and matrices all negated give the same logits.)
    tensors = {_stored_name(name, "gguf"): w / 2 if w.ndim == 2 else w for name, w in _tiny_weights(Q8_ARGS).items()}
    write_gguf_file(q8_gguf, tiny_gguf_metadata(Q8_ARGS), tensors, GGMLQuantizationType.Q8_0)
    stat = q8_gguf.stat()
    os.utime(q8_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))  # 10 s later, as a real rewrite
    assert q8_gguf.stat().st_size == size
    new = npllama.load(q8_gguf, weights_budget=0, threads=1).forward([5, 6, 7])
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "fresh"))
    fresh = npllama.load(q8_gguf, weights_budget=0, threads=1).forward([5, 6, 7])
    assert np.abs(fresh - old).max() > 0.5 * np.abs(fresh).max()  # the two files' models differ
    np.testing.assert_array_equal(new, fresh)  # threads pinned: the same tiles, the same bits


class Killed(Exception):
    """The writer stopped halfway."""


def test_a_half_written_copy_is_never_used(q8_gguf, tmp_path, monkeypatch):
    """While the copy is written, and after its writer stops halfway, no file stands under the
    copy's name (a concurrent or later load would map half a model); the next load writes it whole."""
    from npllama.formats.gguf import QuantizedTensor
    decode, seen = QuantizedTensor.rows, []

    def dying(self, index):
        seen.append(copies(tmp_path))  # what another load would find now
        if len(seen) == 5:
            raise Killed
        return decode(self, index)

    monkeypatch.setattr(QuantizedTensor, "rows", dying)
    with pytest.raises(Killed):
        npllama.load(q8_gguf, weights_budget=0)
    assert seen == [[]] * 5 and not copies(tmp_path)
    monkeypatch.setattr(QuantizedTensor, "rows", decode)
    streamed = npllama.load(q8_gguf, weights_budget=0)
    assert len(copies(tmp_path)) == 1
    expected = npllama.load(q8_gguf).forward([5, 6, 7])  # float32; the copy rounds to bf16 (~1% here)
    np.testing.assert_allclose(streamed.forward([5, 6, 7]), expected, rtol=0, atol=0.03 * np.abs(expected).max())


def test_stored_bytes_are_the_files_own(random_checkpoint, q8_gguf):
    """What the weights take as stored, counted from shapes and the file's tensor types: bf16 is
    2 bytes a weight; Q8_0 is 34 bytes (a float16 scale, 32 int8) per 32 weights, norms float32."""
    args = tiny_args()
    meta = npllama.load(random_checkpoint(args), weights_budget=0)
    assert stored_bytes(meta.weights) == 2 * sum(math.prod(s) for s in args.weight_shapes().values())
    per_weight = {GGMLQuantizationType.Q8_0: 34 / 32, GGMLQuantizationType.F32: 4}
    expected = sum(int(per_weight[t.tensor_type] * t.n_elements) for t in GGUFReader(q8_gguf).tensors)
    assert stored_bytes(npllama.load(q8_gguf).weights) == expected

"""Where weights live: float32 in RAM while the budget allows, layer by layer, the rest streamed;
streamed as int16 from a copy made once in the cache (formats/int16.py) when the stored weights
take fewer bytes than float32 and their float32 copy does not fit the budget."""

from __future__ import annotations

import json
import math
import os
import re
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader

import npllama
import npllama.formats
from npllama.config import ModelArgs
from npllama.formats import int16, matrix_names
from npllama.formats.int16 import Int16Matrix, with_int16_copy
from npllama.model import Llama
from npllama.resident_or_streamed import stored_bytes
from npllama.tensor_parallel import Group, rank_args
from oracle.checkpoints import _stored_name, _tiny_weights, tiny_args, tiny_gguf, tiny_gguf_metadata, write_gguf_file


@pytest.mark.slow
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
TOKENS = [5, 6, 7]
# Of max|logit|: how far this model streamed as int16 may be from its blocks streamed as stored.
# A Q8_0 weight (a float16 scale times an int8) has up to 19 significant bits, and int16 rounds 71%
# of this model's at up to 2^-15 of their row's largest: the logits move by 1.1e-4 of their largest
# here (a bf16 checkpoint's, mostly held exactly, by less than 1e-4: tests/test_engine.py). One bit
# fewer in the copy doubles that.
INT16_BOUND = 2e-4


@pytest.fixture
def q8_gguf(tmp_path, monkeypatch):
    """Q8_ARGS's model stored as Q8_0, and a cache of its own."""
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    return tiny_gguf(tmp_path / "q8.gguf", Q8_ARGS, GGMLQuantizationType.Q8_0)


def copies(tmp_path) -> list:
    """The finished int16 copies in the q8_gguf fixture's cache."""
    return sorted((tmp_path / "cache" / "int16").glob("q8.gguf-*.int16.safetensors"))


def cached_files(tmp_path) -> list:
    """Every file in the fixture's int16 cache, finished or not."""
    folder = tmp_path / "cache" / "int16"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_quantized_model_too_big_for_ram_runs_from_the_int16_copy(q8_gguf, tmp_path):
    """Streamed with the default weights ("auto"), a Q8_0 model runs from its int16 copy: bit for
    bit the model of the copy's values (q * scale as float32, streamed the same way), and within
    1e-4 x max|logit| of the blocks streamed as stored (weights="exact"). Guards the scale being
    applied to every tile, and the copy being what is streamed rather than the blocks."""
    in_ram = npllama.load(q8_gguf)
    assert in_ram.resident and not copies(tmp_path)  # it fits: decoded to float32 at load, no copy
    # Bit-equal only at one thread count: by default each model follows the machine's load.
    streamed = npllama.load(q8_gguf, weights_budget=0, threads=2)
    assert len(copies(tmp_path)) == 1 and "int16" in streamed.streamed_as
    exact = npllama.load(q8_gguf, weights_budget=0, threads=2, weights="exact")
    assert "int16" not in exact.streamed_as and len(copies(tmp_path)) == 1
    logits, expected = streamed.forward(TOKENS), exact.forward(TOKENS)
    assert np.abs(logits - expected).max() <= INT16_BOUND * np.abs(expected).max()
    matrices = with_int16_copy(q8_gguf, in_ram.weights, matrix_names(in_ram.args))  # the copy, mapped again
    assert len(copies(tmp_path)) == 1 and all(isinstance(w, Int16Matrix) for w in matrices.values())
    values = {name: np.asarray(matrices[name], dtype=np.float32) if name in matrices else w
              for name, w in in_ram.weights.items()}
    reference = Llama(in_ram.args, values, weights_budget=0, threads=2).forward(TOKENS)
    np.testing.assert_array_equal(logits, reference)


def test_the_copy_is_made_once(q8_gguf, tmp_path, monkeypatch):
    """A second load maps the cached copy: it neither writes it again nor touches it."""
    npllama.load(q8_gguf, weights_budget=0)
    (copy,) = copies(tmp_path)
    made = copy.stat().st_mtime_ns

    def refuse(*args):
        raise AssertionError("the copy was made again")

    monkeypatch.setattr(int16, "write_int16_copy", refuse)
    assert "int16" in npllama.load(q8_gguf, weights_budget=0).streamed_as
    assert copy.stat().st_mtime_ns == made and copies(tmp_path) == [copy]


def test_a_damaged_copy_is_named(q8_gguf, tmp_path):
    """A truncated copy, and a whole file that lacks a matrix's row scales, are refused with a
    CheckpointError naming the copy, not mapped as weights."""
    npllama.load(q8_gguf, weights_budget=0)
    (copy,) = copies(tmp_path)
    whole = copy.read_bytes()
    copy.write_bytes(whole[:100])
    with pytest.raises(npllama.CheckpointError, match=copy.name):
        npllama.load(q8_gguf, weights_budget=0)
    # Well-formed, but one matrix's scales renamed away: the shape checks must find it.
    name = matrix_names(Q8_ARGS)[-1]
    n = struct.unpack("<Q", whole[:8])[0]
    scales = f'"{name}{int16.SCALE}"'.encode()
    header = whole[8:8 + n].replace(scales, scales.upper())  # the same length: the data stays in place
    assert header != whole[8:8 + n]
    copy.write_bytes(whole[:8] + header + whole[8 + n:])
    with pytest.raises(npllama.CheckpointError, match=re.escape(f"{copy.name} does not hold {name} as int16")):
        npllama.load(q8_gguf, weights_budget=0)


def test_not_enough_disk_for_the_copy(q8_gguf, tmp_path, monkeypatch):
    """With too little free space for the copy, the load says so and how to fix it (the cache
    directory is NPLLAMA_CACHE), and leaves no file behind."""
    class Usage:
        free = 1 << 20
    monkeypatch.setattr(int16.shutil, "disk_usage", lambda path: Usage)
    with pytest.raises(npllama.CheckpointError, match="NPLLAMA_CACHE"):
        npllama.load(q8_gguf, weights_budget=0)
    assert cached_files(tmp_path) == []


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
    # Streamed as stored: by default ("auto") the int16 copy would count instead of the bf16
    # matrices, and its row scales (4 bytes a row of this model's 128256-row output) take more
    # than the half layer of slack.
    assert npllama.load(path, weights="exact").resident_layers == 2

    # A quantized tensor counts its blocks as stored, not the float32 it becomes.
    gguf = npllama.load(q8_gguf)
    blocks = [w for w in gguf.weights.values() if isinstance(w, shared.LazyRows)]
    assert blocks and all(w.nbytes == w.blocks.nbytes < 4 * w.size for w in blocks)


def float32_bytes(args: ModelArgs) -> int:
    return sum(4 * math.prod(shape) for shape in args.weight_shapes().values())


def test_the_copy_is_made_when_the_float32_weights_do_not_fit(q8_gguf, tmp_path):
    """The budget is for float32 copies: a Q8_0 model whose blocks fit it but whose float32
    weights do not (4 bytes a weight against 34 bytes per 32) runs from the int16 copy; with
    room for every float32 copy it makes none."""
    stored = stored_bytes(npllama.load(q8_gguf).weights)
    assert stored < float32_bytes(Q8_ARGS) // 3 and not copies(tmp_path)
    fits = npllama.load(q8_gguf, weights_budget=float32_bytes(Q8_ARGS))
    assert fits.resident and "int16" not in fits.streamed_as and not copies(tmp_path)
    model = npllama.load(q8_gguf, weights_budget=(stored + float32_bytes(Q8_ARGS)) // 2)
    assert len(copies(tmp_path)) == 1 and "int16" in model.streamed_as


class RankOfTwo(Group):
    """Rank 0 of 2, alone on its machine, as load sees it (no MPI needed)."""

    rank, size, node_rank, node_size = 0, 2, 0, 1


class Stopped(Exception):
    """The load stopped once it had decided."""


def test_a_rank_copies_when_its_share_does_not_fit(q8_gguf, tmp_path, monkeypatch):
    """Under tensor parallelism the budget is one rank's: with room for its half of the float32
    weights but not the whole model's, it needs no int16 copy; with less, it makes one of its own
    rows only (the copy's key names the rank). The load is stopped at whichever comes first, the
    copy or the model (a fake group cannot run one)."""
    made = []

    def record_copy(path, weights, names, part="", verbose=False):
        made.append((part, {name: weights[name].shape for name in names}))
        raise Stopped

    def record_model(*args, **kwargs):
        made.append("model")
        raise Stopped

    monkeypatch.setattr(npllama.formats, "world", lambda comm=None: RankOfTwo())
    monkeypatch.setattr(npllama.formats, "with_int16_copy", record_copy)
    monkeypatch.setattr(npllama.formats, "Llama", record_model)
    share_shapes = rank_args(Q8_ARGS, 0, 2, "").weight_shapes()
    share = sum(4 * math.prod(shape) for shape in share_shapes.values())  # this rank's float32 bytes
    whole = float32_bytes(Q8_ARGS)
    assert share < 0.6 * whole
    with pytest.raises(Stopped):
        npllama.load(q8_gguf, weights_budget=(share + whole) // 2)
    assert made == ["model"]  # the share fits: no copy
    with pytest.raises(Stopped):
        npllama.load(q8_gguf, weights_budget=share - 1)
    part, shapes = made[1]
    assert part == "rank 0 of 2"
    assert shapes == {name: share_shapes[name] for name in matrix_names(Q8_ARGS)}  # its rows, not the whole


def test_a_rewritten_gguf_gets_a_copy_of_its_own(q8_gguf, tmp_path, monkeypatch):
    """The file written again with other weights (every matrix halved) and the same size: the
    next load runs the new weights, bit for bit those of a fresh copy, not the stale copy's."""
    size = q8_gguf.stat().st_size
    old = npllama.load(q8_gguf, weights_budget=0, threads=1).forward(TOKENS)
    # (Not every weight negated: norms and matrices all negated give the same logits.)
    tensors = {_stored_name(name, "gguf"): w / 2 if w.ndim == 2 else w for name, w in _tiny_weights(Q8_ARGS).items()}
    write_gguf_file(q8_gguf, tiny_gguf_metadata(Q8_ARGS), tensors, GGMLQuantizationType.Q8_0)
    stat = q8_gguf.stat()
    os.utime(q8_gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))  # 10 s later, as a real rewrite
    assert q8_gguf.stat().st_size == size
    new = npllama.load(q8_gguf, weights_budget=0, threads=1)
    assert "int16" in new.streamed_as and len(copies(tmp_path)) == 2
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "fresh"))
    fresh = npllama.load(q8_gguf, weights_budget=0, threads=1).forward(TOKENS)
    assert np.abs(fresh - old).max() > 0.5 * np.abs(fresh).max()  # the two files' models differ
    np.testing.assert_array_equal(new.forward(TOKENS), fresh)  # threads pinned: the same tiles, the same bits


class Killed(Exception):
    """The writer stopped halfway."""


def test_a_half_written_copy_is_never_used(q8_gguf, tmp_path, monkeypatch):
    """While the copy is written, and after its writer stops halfway, no file stands under the
    copy's name (a concurrent or later load would map half a model) and nothing is left behind;
    the next load writes it whole."""
    convert, seen = int16.to_int16, []

    def dying(rows):
        seen.append(copies(tmp_path))  # what another load would find now
        if len(seen) == 5:  # of 15 matrices
            raise Killed
        return convert(rows)

    monkeypatch.setattr(int16, "to_int16", dying)
    with pytest.raises(Killed):
        npllama.load(q8_gguf, weights_budget=0)
    assert seen == [[]] * 5 and cached_files(tmp_path) == []
    monkeypatch.setattr(int16, "to_int16", convert)
    streamed = npllama.load(q8_gguf, weights_budget=0)
    (copy,) = copies(tmp_path)
    n = struct.unpack("<Q", copy.read_bytes()[:8])[0]
    metadata = json.loads(copy.read_bytes()[8:8 + n])["__metadata__"]
    assert int(metadata["weights"]) == sum(math.prod(Q8_ARGS.weight_shapes()[name]) for name in matrix_names(Q8_ARGS))
    expected = npllama.load(q8_gguf, weights_budget=0, weights="exact").forward(TOKENS)
    np.testing.assert_allclose(streamed.forward(TOKENS), expected, rtol=0, atol=INT16_BOUND * np.abs(expected).max())


def test_stored_bytes_are_the_files_own(random_checkpoint, q8_gguf):
    """What the weights take as stored, counted from shapes and the file's tensor types: bf16 is
    2 bytes a weight; Q8_0 is 34 bytes (a float16 scale, 32 int8) per 32 weights, norms float32."""
    args = tiny_args()
    meta = npllama.load(random_checkpoint(args), weights_budget=0)
    assert stored_bytes(meta.weights) == 2 * sum(math.prod(s) for s in args.weight_shapes().values())
    per_weight = {GGMLQuantizationType.Q8_0: 34 / 32, GGMLQuantizationType.F32: 4}
    expected = sum(int(per_weight[t.tensor_type] * t.n_elements) for t in GGUFReader(q8_gguf).tensors)
    assert stored_bytes(npllama.load(q8_gguf).weights) == expected

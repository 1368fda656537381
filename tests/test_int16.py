"""The int16 store (npllama/formats/int16.py): each matrix row as int16 q times a power-of-two
scale, made once in the cache and streamed by default when the stored weights take fewer bytes
than float32. What it must hold: every weight within 2^-15 of its row's largest, a bf16 weight at
least 2^-7 of its row's largest exactly, a K-quant weight closer than bf16 held it; a header that
counts what it does not hold exactly; a model within 1e-7 mean KL of the weights as stored; and
the load's choices among weights="auto", "exact", "int16" and "float32"."""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import time
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from gguf import GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import npllama
import npllama.formats
import npllama.perplexity as P
from npllama.config import ModelArgs
from npllama.errors import ArgumentError
from npllama.formats import matrix_names
from npllama.formats.gguf import read_gguf
from npllama.formats.int16 import Int16Matrix, identity, to_int16, with_int16_copy
from npllama.formats.meta import read_meta
# random_k_blocks: random blocks with about a real layer's spread (as the 8B Q4_K_M's)
from oracle.checkpoints import _stored_name, _tiny_weights, random_k_blocks, tiny_args, tiny_gguf, tiny_gguf_metadata

BF16 = ml_dtypes.bfloat16
PASSAGE = Path(__file__).parent / "data" / "passage.txt"
# A small model whose matrices are rows of whole Q8_0 blocks, as in tests/test_residency.py.
Q8_ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=265, norm_eps=1e-5,
                    rope_theta=500000.0, multiple_of=32)
TOKENS = [5, 6, 7]


def header_of(copy: Path) -> dict:
    """A safetensors file's JSON header, metadata included."""
    with open(copy, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def int16_copies(cache: Path) -> list[Path]:
    return sorted((cache / "int16").glob("*.int16.safetensors")) if (cache / "int16").exists() else []


# --- to_int16: what it holds -------------------------------------------------------------------

@st.composite
def weight_rows(draw) -> np.ndarray:
    """float32 [rows, cols]: mixed signs, each row scaled to 10^-30 .. 10^30 (its largest at
    least 0.5e-30) or all zeros; the smaller elements of a row may underflow to subnormals or zero.
    (A row whose largest is under 2^-111 would need a scale below float32's smallest normal,
    2^-126, where to_int16 stops: no checkpoint's row is that small.)"""
    n_rows, n_cols = draw(st.integers(1, 6)), draw(st.integers(1, 48))
    unit = draw(arrays(np.float32, (n_rows, n_cols), elements=st.floats(-1, 1, width=32)))
    peak = draw(arrays(np.int64, n_rows, elements=st.integers(0, n_cols - 1)))
    unit[np.arange(n_rows), peak] = draw(arrays(np.float32, n_rows, elements=st.floats(0.5, 1, width=32) |
                                                st.floats(-1, -0.5, width=32)))
    decades = draw(arrays(np.int64, n_rows, elements=st.integers(-30, 30)))
    zero = draw(arrays(np.bool_, n_rows))
    rows = (unit.astype(np.float64) * 10.0 ** decades[:, None]).astype(np.float32)  # [rows, cols]
    rows[zero] = 0
    return rows


# Edge rows: a largest just below a power of two, (1 - 2^-24) 2^e, that rounds to 32768 steps (one
# too many for int16); zeros; 1e-30 with a subnormal; 1e30; a subnormal-free mix of signs.
BELOW_ONE = np.nextafter(np.float32(1), np.float32(0))
EDGES = np.array([[BELOW_ONE, -BELOW_ONE, 0.5], [0, 0, 0], [1e-30, -3e-31, 1e-45], [1e30, -1e30, 7e29],
                  [-0.5, 0.25, 1e-38]], np.float32)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(weight_rows())
@example(EDGES)
def test_to_int16_holds_every_weight_within_2_to_the_minus_15_of_its_rows_largest(rows):
    """q * scale is each weight within 2^-15 of its row's largest (with a power-of-two scale that
    uses 15 bits: a largest |q| of 16384 or more); q never leaves [-32767, 32767] (no wrap-around
    of a largest rounded up to 32768). Guards the scale's exponent: one bit too many overflows,
    one too few doubles the error."""
    q, scale = to_int16(rows)
    assert q.dtype == np.int16 and q.shape == rows.shape and scale.dtype == np.float32 and scale.shape == rows.shape[:1]
    mantissa, _ = np.frexp(scale)
    assert (mantissa == 0.5).all()  # powers of two: scaling the output columns is exact
    assert np.abs(q.astype(np.int32)).max() <= 32767
    largest = np.abs(rows.astype(np.float64)).max(axis=1)  # [rows]
    error = np.abs(q * scale.astype(np.float64)[:, None] - rows)  # [rows, cols], exact in float64
    assert (error <= largest[:, None] * 2.0**-15).all()
    top_q = np.abs(q.astype(np.int32)).max(axis=1)  # [rows]
    assert ((top_q >= 16384) | (largest == 0)).all()
    assert (q[largest == 0] == 0).all()


@st.composite
def bf16_rows(draw) -> np.ndarray:
    """float32 [rows, cols] of bf16 values (8 significant bits), each row's within 2^-9 .. 1 of
    2^E (E from -100 to 100): many near the 2^-7 of the row's largest where exactness ends."""
    n_rows, n_cols = draw(st.integers(1, 6)), draw(st.integers(1, 48))
    mantissa = draw(arrays(np.int64, (n_rows, n_cols), elements=st.integers(128, 255)))
    octave = draw(arrays(np.int64, (n_rows, n_cols), elements=st.integers(-9, 0)))
    sign = draw(arrays(np.int64, (n_rows, n_cols), elements=st.sampled_from([-1, 1])))
    top = draw(arrays(np.int64, (n_rows, 1), elements=st.integers(-100, 100)))
    return np.ldexp((sign * mantissa).astype(np.float32), (octave - 8 + top).astype(np.int32))


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(weight_rows().map(lambda rows: rows.astype(BF16).astype(np.float32)) | bf16_rows())
@example(EDGES.astype(BF16).astype(np.float32))
def test_to_int16_holds_bf16_weights_at_least_2_to_the_minus_7_of_the_largest_exactly(values):
    """A bf16 weight has 8 significant bits, so with 15 bits for the row's largest it is held
    exactly down to 2^-7 of the largest: the rows of a bf16 checkpoint lose nothing there."""
    assert (values.astype(BF16).astype(np.float32) == values).all()  # [rows, cols] bf16 values
    q, scale = to_int16(values)
    largest = np.abs(values).max(axis=1, keepdims=True)  # [rows, 1]
    large = np.abs(values) >= largest * 2.0**-7
    np.testing.assert_array_equal((q * scale[:, None])[large], values[large])


@pytest.mark.slow
def test_an_8b_shaped_bf16_matrix(capsys):
    """Llama 3 8B's w1 shape, [14336, 4096], of N(0, 0.02^2) bf16 weights (a real layer's spread):
    more than 97% held exactly, none off by more than 2^-15 of its row's largest, and the product
    with a vector within 1e-4 (of its largest) of the bf16 weights' exact product (float64).
    Exactly 2^-15 is reached: a row whose largest is a power of two (one bf16 row in 128) has it at
    16384 steps, and a small weight half a step off."""
    start = time.perf_counter()
    rng = np.random.default_rng(8)
    w = (rng.standard_normal((14336, 4096), dtype=np.float32) * np.float32(0.02)).astype(BF16)  # [out, in]
    x = rng.standard_normal(4096, dtype=np.float32)  # [in]
    exact = worst = 0
    product, reference = np.empty(len(w), np.float32), np.empty(len(w), np.float64)  # [out]
    for r in range(0, len(w), 2048):
        values = w[r:r + 2048].astype(np.float32)  # [2048, in]
        q, scale = to_int16(values)
        held = q * scale[:, None]  # [2048, in], exact in float32
        exact += int(np.count_nonzero(held == values))
        largest = np.abs(values).max(axis=1, keepdims=True)  # [2048, 1]
        worst = max(worst, float((np.abs(held.astype(np.float64) - values) / largest).max()))
        product[r:r + 2048] = (q.astype(np.float32) @ x) * scale  # as the streamed matmul computes it
        reference[r:r + 2048] = values.astype(np.float64) @ x.astype(np.float64)
    fraction = exact / w.size
    error = np.abs(product - reference).max() / np.abs(reference).max()
    with capsys.disabled():
        print(f"\n8B-shaped bf16 matrix: {100 * fraction:.2f}% held exactly, largest error {worst:.3g} of "
              f"its row's largest, product within {error:.3g} of the exact one "
              f"({time.perf_counter() - start:.1f}s)")
    assert fraction > 0.97 and worst <= 2.0**-15 and error < 1e-4


# --- the copy's file --------------------------------------------------------------------------

def test_the_copys_header_counts_what_it_does_not_hold_exactly(random_checkpoint, tmp_path, monkeypatch):
    """The header's "inexact" and "weights" are the counts of a bf16 checkpoint's matrices worked
    out here from the rule (a weight is held when it is a whole number of 2^(e - 15), e its row's
    largest's binary exponent), "largest_error_of_row_max" their largest error; the stored q and
    scales are that rule's too. The user is told these numbers: they must be the file's."""
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path))
    args, weights, _ = read_meta(random_checkpoint(tiny_args()))
    names = matrix_names(args)
    matrices = with_int16_copy(random_checkpoint(tiny_args()), weights, names)
    (copy,) = int16_copies(tmp_path)
    inexact = total = 0
    worst = 0.0
    for name in names:
        v = np.asarray(weights[name]).astype(np.float64)  # [out, in] bf16 values
        largest = np.abs(v).max(axis=1)  # [out]
        assert (largest > 0).all()
        step = 2.0 ** (np.floor(np.log2(largest)) - 14)  # [out]: the largest in [2^14, 2^15) steps
        q = np.round(v / step[:, None])  # [out, in]
        inexact += int(np.count_nonzero(q != v / step[:, None]))
        total += v.size
        worst = max(worst, float((np.abs(q * step[:, None] - v) / largest[:, None]).max()))
        assert isinstance(matrices[name], Int16Matrix)
        np.testing.assert_array_equal(matrices[name].q, q)
        np.testing.assert_array_equal(matrices[name].scale, step)
    metadata = header_of(copy)["__metadata__"]
    print(f"bf16 checkpoint: {inexact} of {total} weights inexact, largest error {worst:.3g} of the row's largest")
    assert 0 < inexact < total and int(metadata["inexact"]) == inexact and int(metadata["weights"]) == total
    assert float(metadata["largest_error_of_row_max"]) == pytest.approx(worst, rel=1e-6)


def test_the_copys_name_follows_the_files_identity(tmp_path):
    """The copy's key changes when the file is rewritten (same size, other bytes where only the
    modification time shows it, a later time), when its size changes, and with the rows it holds
    (one rank's share); it stays when nothing changed, so the copy is found again."""
    path = tmp_path / "model.gguf"
    data = bytearray(np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    path.write_bytes(data)
    first = identity(path, "")
    assert identity(path, "") == first
    assert identity(path, "rank 0 of 2") not in (first, identity(path, "rank 1 of 2"))
    stat = path.stat()
    data[len(data) // 2] ^= 1  # in the middle: beyond the first and last MiB that are hashed
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))  # 10 s later, as a real rewrite
    assert path.stat().st_size == stat.st_size and identity(path, "") != first
    rewritten = identity(path, "")
    path.write_bytes(data + b"\0")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))
    assert identity(path, "") not in (first, rewritten)


# --- K-quants: closer than bf16 -----------------------------------------------------------------

# One layer whose every matrix row is whole 256-value K-quant blocks (dim 256, hidden 768).
K_ARGS = ModelArgs(dim=256, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=265, norm_eps=1e-5,
                   rope_theta=500000.0, multiple_of=256)
def write_gguf(path: Path, args: ModelArgs, tensors: dict, qtypes: dict) -> Path:
    """A GGUF of the tiny tokenizer and these Meta-named tensors: float32 arrays stored as F32,
    or quantized to qtypes[name] (uint8 rows of blocks already of that type, else quantized here)."""
    writer = GGUFWriter(str(path), "llama")
    for key, value in tiny_gguf_metadata(args).items():
        add = {bool: writer.add_bool, int: writer.add_uint32, float: writer.add_float32,
               str: writer.add_string}.get(type(value), writer.add_array)
        add(key, value)
    for name, w in tensors.items():
        if name in qtypes:
            writer.add_tensor(_stored_name(name, "gguf"), w if w.dtype == np.uint8 else quantize(w, qtypes[name]),
                              raw_dtype=qtypes[name])
        else:
            writer.add_tensor(_stored_name(name, "gguf"), w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    writer.close()
    return path


def q4_k_m_like_gguf(path: Path) -> tuple[Path, dict, dict]:
    """K_ARGS's model with Q4_K_M's types (Q6_K for the output, wv and w2 of this last layer,
    Q4_K for the other matrices, F32 norms); returns the path, the blocks and their types."""
    weights = _tiny_weights(K_ARGS)
    rng = np.random.default_rng(0)
    blocks, qtypes = {}, {}
    for name, w in weights.items():
        if w.ndim == 2:
            six = name == matrix_names(K_ARGS)[-1] or name.endswith(("wv.weight", "w2.weight"))
            qtypes[name] = Q.Q6_K if six else Q.Q4_K
            blocks[name] = random_k_blocks(qtypes[name].name, w.shape, w.shape[1] ** -0.5, rng)
    return write_gguf(path, K_ARGS, {**weights, **blocks}, qtypes), blocks, qtypes


def test_a_q4_k_m_model_is_held_closer_than_bf16_held_it(tmp_path, monkeypatch, capsys):
    """Every matrix of a Q4_K/Q6_K model, as the int16 store holds it, against gguf-py's float32
    decoding of its blocks: in each, the largest error is smaller than that of the same values
    rounded to bf16 (the copy the int16 store replaced). Guards the copy being made from the
    decoded float32 values, with all of int16's bits."""
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    path, blocks, qtypes = q4_k_m_like_gguf(tmp_path / "kq.gguf")
    assert set(qtypes.values()) == {Q.Q4_K, Q.Q6_K}
    model = npllama.load(path, weights_budget=0, threads=2)  # by default: streamed as int16
    assert "int16" in model.streamed_as and np.isfinite(model.forward(TOKENS)).all()
    names = matrix_names(K_ARGS)
    matrices = with_int16_copy(path, read_gguf(path)[1], names)  # the copy the load made, mapped again
    assert len(int16_copies(tmp_path / "cache")) == 1
    lines = []
    for name in names:
        decoded = dequantize(blocks[name], qtypes[name]).astype(np.float64)  # [out, in], gguf-py's
        held = np.asarray(matrices[name], dtype=np.float32)
        int16_error = np.abs(held - decoded).max()
        bf16_error = np.abs(decoded.astype(np.float32).astype(BF16).astype(np.float32) - decoded).max()
        lines.append(f"{name:32} {qtypes[name].name:5} int16 {int16_error:.3g}  bf16 {bf16_error:.3g}  "
                     f"(largest |w| {np.abs(decoded).max():.3g})")
        assert int16_error < bf16_error, lines[-1]
    with capsys.disabled():
        print("\nlargest absolute error of each matrix, int16 store vs bf16 rounding:\n" + "\n".join(lines))


# --- the model: KL against the weights as stored ------------------------------------------------

@pytest.mark.slow
def test_smollm2_as_int16_is_within_1e_7_mean_kl_of_its_blocks(default_model_path, capsys):
    """SmolLM2-135M-Instruct (Q4_1 and Q8_0 blocks) streamed as int16 against the same blocks
    streamed as stored, over the passage's perplexity windows: a mean KL of at most 1e-7 per token.
    The whole engine, the copy, its scales and the tiles, on a real model. Measured: 3.8e-8 (the
    copy rounds 17.9% of these blocks' values; the same values rounded to bf16, 6.0e-5); a copy
    with one bit fewer would quadruple it."""
    int16 = npllama.load(default_model_path, weights="int16", weights_budget=0, threads=2)
    exact = npllama.load(default_model_path, weights="exact", weights_budget=0, threads=2)
    assert "int16" in int16.streamed_as and "int16" not in exact.streamed_as
    chunks = P.windows(int16.tokenizer.encode(PASSAGE.read_text()), 64, None)
    totals = list(P.evaluate(chunks, P.model_logits(int16, 2), P.model_logits(exact, 2)))[-1]
    summary = totals.kl_summary()
    with capsys.disabled():
        print(f"\nSmolLM2 int16 vs exact, {summary['tokens']} tokens: mean KL {summary['mean_kl']:.3g}, "
              f"max {summary['max_kl']:.3g}, top token agreement {summary['top1_agreement']:.2f}%, "
              f"largest logit difference {summary['max_logit_error']:.3g}")
    assert summary["mean_kl"] <= 1e-7


# --- the load's choices -------------------------------------------------------------------------

def test_float32_weights_stream_exactly_under_auto_and_convert_under_int16(tmp_path, monkeypatch):
    """A float32 file gains nothing from int16 by default (it is no smaller than float32), so
    "auto" streams it as stored, bit for bit "exact"; "int16" converts it whatever it is stored
    as, within the bound test_residency.py holds a Q8_0 model to. (Each in a cache of its own:
    the next two tests are about one cache serving both.)"""
    path = tiny_gguf(tmp_path / "f32.gguf", Q8_ARGS)  # every tensor F32
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "auto"))
    auto = npllama.load(path, weights_budget=0, threads=2)
    exact = npllama.load(path, weights_budget=0, threads=2, weights="exact")
    assert "int16" not in auto.streamed_as and not auto.resident
    expected = exact.forward(TOKENS)
    np.testing.assert_array_equal(auto.forward(TOKENS), expected)
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "int16"))
    converted = npllama.load(path, weights_budget=0, threads=2, weights="int16")
    (copy,) = int16_copies(tmp_path / "int16")
    assert "int16" in converted.streamed_as
    assert int(header_of(copy)["__metadata__"]["weights"]) == sum(
        math.prod(Q8_ARGS.weight_shapes()[name]) for name in matrix_names(Q8_ARGS))
    logits = converted.forward(TOKENS)
    assert 0 < np.abs(logits - expected).max() <= 2e-4 * np.abs(expected).max()


def test_a_model_with_nothing_to_convert_needs_no_copy(tmp_path, monkeypatch):
    """Streamed by default, a float32 model has no matrix to convert: it writes no (empty) copy to
    the cache, and so loads on a machine whose cache disk is full."""
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "f32.gguf", Q8_ARGS)  # every tensor F32

    class Usage:
        free = 1 << 20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage)
    model = npllama.load(path, weights_budget=0)
    assert "int16" not in model.streamed_as and not int16_copies(tmp_path / "cache")


def test_auto_and_int16_copies_of_one_file_do_not_collide(tmp_path, monkeypatch):
    """A file of Q8_0 layers and a float32 output: "auto" copies the layers only (the output is
    no smaller than float32), "int16" every matrix. Loaded one way then the other, from one
    cache, each finds a copy that holds its matrices, not the other's taken for a damaged one."""
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    weights = _tiny_weights(Q8_ARGS)
    output = matrix_names(Q8_ARGS)[-1]
    qtypes = {name: Q.Q8_0 for name, w in weights.items() if w.ndim == 2 and name != output}
    path = write_gguf(tmp_path / "mixed.gguf", Q8_ARGS, weights, qtypes)
    expected = npllama.load(path, weights_budget=0, weights="exact").forward(TOKENS)
    for form in ("auto", "int16", "auto"):
        model = npllama.load(path, weights_budget=0, weights=form)
        assert "int16" in model.streamed_as
        np.testing.assert_allclose(model.forward(TOKENS), expected, rtol=0, atol=2e-4 * np.abs(expected).max())


def test_float32_is_refused_when_it_exceeds_the_machines_ram(tmp_path, monkeypatch):
    """weights="float32" makes every matrix a float32 copy whatever the budget: refused, naming
    the file and the way out, on a machine whose RAM it exceeds; on one it just fits, resident."""
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "q8.gguf", Q8_ARGS, Q.Q8_0)
    float32_bytes = sum(4 * math.prod(shape) for shape in Q8_ARGS.weight_shapes().values())
    monkeypatch.setattr(npllama.formats, "machine_ram", lambda: float32_bytes - 1)
    with pytest.raises(ArgumentError, match=rf"{path.name}: a float32 copy .* use weights 'auto'"):
        npllama.load(path, weights="float32")
    monkeypatch.setattr(npllama.formats, "machine_ram", lambda: float32_bytes)
    model = npllama.load(path, weights="float32", weights_budget=0)
    assert model.resident and not int16_copies(tmp_path / "cache")


def test_int16_with_the_bf16_flow_is_refused_before_any_file_is_read(tmp_path):
    """weights="int16" with dtype="bfloat16" is refused from the arguments alone: a file that is
    garbage (refused otherwise for what it is) or absent gives the same ArgumentError."""
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"not a model" * 100)
    with pytest.raises(npllama.CheckpointError):
        npllama.load(garbage, dtype="bfloat16")  # what reading it would say
    for path in (garbage, tmp_path / "absent.gguf"):
        with pytest.raises(ArgumentError, match="bf16 flow computes with the bf16 weights as stored"):
            npllama.load(path, dtype="bfloat16", weights="int16")


@pytest.mark.slow
def test_the_perplexity_command_measures_what_int16_costs(random_checkpoint, capsys):
    """`perplexity --kl-divergence --reference SAME --weights int16` compares the int16 copy with
    the same model read as stored (--reference-weights exact, the default): a small divergence,
    not zero; against an int16 reference, zero."""
    from npllama import cli
    path = str(random_checkpoint(tiny_args(), seed=9))
    passage = str(Path(__file__).parent / "data" / "passage.txt")
    argv = ["perplexity", "-m", path, "-f", passage, "-c", "32", "-t", "2", "--weights", "int16",
            "--weights-budget-gb", "0", "--kl-divergence", "--reference", path]
    means = []
    for reference in ("exact", "int16"):
        assert cli.main(argv + ["--reference-weights", reference]) == 0
        out = capsys.readouterr().out
        means.append(float(out.split("KL divergence")[1].split("mean ")[1].split(",")[0]))
    assert 0 < means[0] < 1e-6 and means[1] == 0

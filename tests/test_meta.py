"""npllama.formats.meta against torch itself: same bits, no copies, no code execution."""

from __future__ import annotations

import builtins
import collections
import contextlib
import os
import pickle
import tempfile
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from npllama.errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError
from npllama.formats.meta import MergedShards, merge_shards, read_meta_checkpoint, read_pth
from npllama.formats.shared import check_weights
from oracle.checkpoints import random_state_dict, tiny_args, write_shards, write_torch_zip


def torch_bytes(t: torch.Tensor) -> bytes:
    """A tensor's elements in logical (row-major) order, as raw bytes."""
    flat = torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1))  # contiguous even if empty
    return flat.view(torch.uint8).numpy().tobytes()


def assert_same_tensor(array: np.ndarray, t: torch.Tensor):
    assert array.shape == tuple(t.shape)
    assert array.dtype.name == str(t.dtype).removeprefix("torch.")
    assert np.ascontiguousarray(array).tobytes() == torch_bytes(t)


def assert_same_as_torch(path: Path):
    expected = torch.load(path, mmap=True, weights_only=True)
    actual = read_pth(path)
    assert list(actual) == list(expected)
    for name, t in expected.items():
        assert_same_tensor(actual[name], t)


def rewrite_zip(src: Path, dst: Path, change=lambda name, data: data, compression=zipfile.ZIP_STORED):
    """Copy a torch zip, passing each member through `change` (a torch-like file with one defect)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for name in zin.namelist():
            zout.writestr(name, change(name, zin.read(name)))


@pytest.fixture
def small_pth(tmp_path) -> Path:
    path = tmp_path / "small.pth"
    gen = torch.Generator().manual_seed(0)
    tensors = [("a", (4, 8), torch.bfloat16), ("b", (3,), torch.float16), ("c", (5, 2), torch.float32)]
    torch.save({name: torch.randn(shape, generator=gen).to(dtype) for name, shape, dtype in tensors}, path)
    return path


# --- Same bits as torch --------------------------------------------------------------------

def test_matches_torch_bit_for_bit_including_views(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = {dtype: torch.randn(6, 5, generator=gen).to(dtype)
            for dtype in (torch.bfloat16, torch.float16, torch.float32)}
    state = collections.OrderedDict()
    for dtype, t in base.items():
        name = str(dtype).removeprefix("torch.")
        state[name] = t
        state[name + ".tail"] = t[2:]  # storage offset, shares t's storage
        state[name + ".T"] = t.T  # transposed strides
        state[name + ".every_other"] = t[:, ::2]
    state["param"] = torch.nn.Parameter(torch.ones(3))
    path = tmp_path / "views.pth"
    torch.save(state, path)
    assert_same_as_torch(path)


def _random_tensor(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64,
                                  torch.int8, torch.int64, torch.uint16, torch.bool,
                                  torch.float8_e4m3fn, torch.complex64]))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    numel = int(np.prod(shape))
    high = 2 if dtype == torch.bool else 256  # any bits, but a bool byte must be 0 or 1
    raw = torch.randint(0, high, (numel * dtype.itemsize,), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))
    t = raw.view(dtype).reshape(shape)
    match draw(st.sampled_from(["whole", "offset", "permuted", "stepped", "expanded"])):
        case "offset" if numel:
            t = t.reshape(-1)[draw(st.integers(0, numel - 1)):]
        case "permuted":
            t = t.permute(tuple(reversed(range(t.ndim))))
        case "stepped" if t.ndim:
            t = t[..., ::2]
        case "expanded":
            t = t.unsqueeze(0).expand(3, *shape)  # stride 0
    return t


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_dtypes_shapes_and_views_round_trip(data):
    state = {f"t{i}": _random_tensor(data.draw) for i in range(data.draw(st.integers(1, 3)))}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random.pth"
        torch.save(state, path)
        assert_same_as_torch(path)


# --- No copies -----------------------------------------------------------------------------

def test_arrays_are_read_only_views_of_one_memory_map(small_pth):
    weights = read_pth(small_pth)
    maps = {id(a.base) for a in weights.values()}
    assert len(maps) == 1
    for array in weights.values():
        assert isinstance(array.base, np.memmap)
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[...] = 0


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_opening_reads_no_tensor_bytes(tmp_path):
    path = tmp_path / "big.pth"
    torch.save({f"w{i}": torch.ones(25_000_000, dtype=torch.bfloat16) for i in range(4)}, path)  # 200 MB
    before = _rss_bytes()
    weights = read_pth(path)
    assert _rss_bytes() - before < 50e6  # opening maps the 200 MB, it does not read them
    assert weights["w3"][-1] == 1  # the views are live: this pages in a little of the file
    assert _rss_bytes() - before < 50e6


# --- Unsafe pickles ------------------------------------------------------------------------

class Payload:
    """Runs `func(arg)` when unpickled, as a malicious checkpoint would."""

    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


class TrainingConfig:
    """A harmless object a training script might save next to its weights."""


def _touch(marker: Path) -> str:
    return f"touch {marker}"


@pytest.mark.parametrize("func, code, refused", [
    (os.system, _touch, "posix.system"),
    (builtins.eval, lambda m: f"__import__('os').system('touch {m}')", "builtins.eval"),
    (builtins.exec, lambda m: f"import os; os.system('touch {m}')", "builtins.exec"),
])
def test_code_in_the_pickle_is_refused_not_run(tmp_path, func, code, refused):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": Payload(func, code(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"'{refused}'") as e:
        read_pth(path)
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_os_system_global_is_refused_and_the_payload_is_live(tmp_path):
    marker = tmp_path / "pwned"
    data_pkl = b"cos\nsystem\n(V" + _touch(marker).encode() + b"\ntR."
    path = tmp_path / "evil.pth"
    write_torch_zip(path, data_pkl)
    with pytest.raises(UnsafeCheckpointError, match="'os.system'"):
        read_pth(path)
    assert not marker.exists()
    pickle.loads(data_pkl)  # control: plain pickle runs it, so the refusal above is what saved us
    assert marker.exists()


# Every global a torch.save'd state dict may name: nothing that calls, imports or looks up.
TORCH_DTYPE_NAMES = ("bfloat16", "float16", "float32", "float64", "complex64", "complex128", "bool",
                     "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
                     "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                     "float8_e8m0fnu", "complex32", "float4_e2m1fn_x2", "bits8", "bits16", "bits1x8",
                     "bits2x4", "bits4x2")
STORAGE_NAMES = ("BFloat16Storage", "HalfStorage", "FloatStorage", "DoubleStorage", "ComplexFloatStorage",
                 "ComplexDoubleStorage", "BoolStorage", "ByteStorage", "CharStorage", "ShortStorage",
                 "IntStorage", "LongStorage")
ALLOWED_GLOBALS = {("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
                   ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
                   ("torch.storage", "UntypedStorage"),
                   *(("torch", name) for name in STORAGE_NAMES + TORCH_DTYPE_NAMES)}


def test_the_allow_list_is_exactly_what_a_state_dict_needs():
    """Pinned: adding one entry (builtins.getattr opens a path to code through REDUCE) must be
    a deliberate, reviewed change to this test too."""
    from npllama.formats.meta import _ALLOWED_GLOBALS
    assert set(_ALLOWED_GLOBALS) == ALLOWED_GLOBALS


class Call:
    """Pickles as `f(*args)`, f itself possibly another Call: chains of calls made at load."""

    def __init__(self, f, *args):
        self.f, self.args = f, args

    def __call__(self, *args):  # pickle only checks that a REDUCE target is callable
        raise AssertionError("never called when pickling")

    def __reduce__(self):
        return self.f, self.args


def test_getattr_would_run_code_and_is_refused(tmp_path):
    """With getattr allowed, an allowed function leads to code: its __globals__, the zipfile
    module there, zipfile.os, os.system. Each step calls an allowed global; none names os."""
    marker = tmp_path / "pwned"
    module_globals = Call(getattr, torch._utils._rebuild_parameter, "__globals__")
    os_module = Call(getattr, Call(Call(getattr, module_globals, "get"), "zipfile"), "os")
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": Call(Call(getattr, os_module, "system"), _touch(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="'builtins.getattr'"):
        read_pth(path)
    assert not marker.exists()


def test_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "training.pth"
    torch.save({"w": torch.ones(2), "config": TrainingConfig()}, path)
    with pytest.raises(UnsafeCheckpointError, match="TrainingConfig'"):
        read_pth(path)


# --- Damaged and foreign files -------------------------------------------------------------

def _cut_points(path: Path) -> dict[str, int]:
    with zipfile.ZipFile(path) as z:
        info = {i.filename.split("/", 1)[1]: i for i in z.infolist()}
        central_directory = z.start_dir
    return {"data.pkl": info["data.pkl"].header_offset + 40,
            "storage": info["data/0"].header_offset + 100,
            "central directory": central_directory + 10,
            "last byte": path.stat().st_size - 1}


@pytest.mark.parametrize("where", ["data.pkl", "storage", "central directory", "last byte"])
def test_truncated_file(small_pth, where):
    cut = _cut_points(small_pth)[where]
    small_pth.write_bytes(small_pth.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_pth(small_pth)


def test_zip_version_beyond_zipfiles_is_a_checkpoint_error(small_pth):
    """The central directory's "version needed to extract" (2 bytes at offset 6) set to 6.4."""
    data = bytearray(small_pth.read_bytes())
    with zipfile.ZipFile(small_pth) as z:
        entry = z.start_dir  # the first central directory entry
    data[entry + 6:entry + 8] = (64).to_bytes(2, "little")
    small_pth.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt .*zip file version 6.4"):
        read_pth(small_pth)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_truncation_or_corrupt_byte_is_a_checkpoint_error(small_pth, data):
    """Whatever the damage, the user sees a CheckpointError or the (changed) tensors,
    never a zipfile, pickle or NumPy exception."""
    damaged = bytearray(small_pth.read_bytes())
    position = data.draw(st.integers(0, len(damaged) - 1))
    if data.draw(st.booleans()):
        del damaged[position:]
    else:
        damaged[position] ^= data.draw(st.integers(1, 255))
    path = small_pth.with_suffix(".damaged")
    path.write_bytes(damaged)
    with contextlib.suppress(CheckpointError):
        read_pth(path)


def test_storage_past_the_end_of_the_file_names_the_tensor(small_pth):
    # Make the central directory claim that storage data/0 (tensor "a") is 1 MB long.
    data = bytearray(small_pth.read_bytes())
    with zipfile.ZipFile(small_pth) as z:
        start = z.start_dir
    entry = data.rfind(b"PK\x01\x02", start, data.index(b"/data/0", start))
    data[entry + 20:entry + 28] = (2**20).to_bytes(4, "little") * 2  # compressed and file size
    small_pth.write_bytes(data)
    with pytest.raises(CheckpointError, match="tensor a.*past the end of the file"):
        read_pth(small_pth)


def test_storage_shorter_than_its_tensor_names_the_tensor(small_pth, tmp_path):
    short = tmp_path / "short.pth"
    rewrite_zip(small_pth, short, lambda name, data: data[:10] if name.endswith("data/2") else data)
    with pytest.raises(CheckpointError, match="tensor c needs 40 bytes"):
        read_pth(short)


def test_compressed_archive(small_pth, tmp_path):
    deflated = tmp_path / "deflated.pth"
    rewrite_zip(small_pth, deflated, compression=zipfile.ZIP_DEFLATED)  # e.g. re-zipped by a user
    with pytest.raises(CheckpointError, match="is compressed; re-save the file with torch.save"):
        read_pth(deflated)


def test_big_endian(small_pth, tmp_path):
    big = tmp_path / "big_endian.pth"
    rewrite_zip(small_pth, big, lambda name, data: b"big" if name.endswith("byteorder") else data)
    with pytest.raises(CheckpointError, match="big-endian"):
        read_pth(big)


def test_legacy_torch_format(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a torch zip checkpoint.*legacy.*torch.save"):
        read_pth(path)


def test_random_bytes_and_empty_and_missing_files(tmp_path):
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(10_000))
    with pytest.raises(CheckpointError, match=f"{noise} is not a torch zip checkpoint"):
        read_pth(noise)
    empty = tmp_path / "empty.pth"
    empty.touch()
    with pytest.raises(CheckpointError, match=f"{empty} is empty"):
        read_pth(empty)
    with pytest.raises(ModelNotFoundError, match="missing.pth not found"):
        read_pth(tmp_path / "missing.pth")


def test_unsupported_dtype_names_tensor_and_dtype(tmp_path):
    path = tmp_path / "complex32.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "ComplexHalf support is experimental"
        torch.save({"ok": torch.ones(2), "freqs": torch.ones(2, dtype=torch.complex32)}, path)
    with pytest.raises(CheckpointError, match="tensor freqs has dtype torch.complex32"):
        read_pth(path)


@pytest.mark.parametrize("obj, message", [
    ([torch.ones(2)], "holds a list, not a dict of tensors"),
    ({"model": {"w": torch.ones(2)}}, "entry 'model' is a dict, not a tensor"),
    ({"w": torch.ones(2), "step": 3}, "entry 'step' is a int, not a tensor"),
])
def test_not_a_state_dict(tmp_path, obj, message):
    path = tmp_path / "other.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=message):
        read_pth(path)


# --- Model-parallel shards -----------------------------------------------------------------

SHARD_ARGS = tiny_args(vocab_size=1024)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(SHARD_ARGS)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_shards_merge_to_the_original(tmp_path, state, n):
    weights = read_meta_checkpoint(write_shards(tmp_path, state, n))
    assert isinstance(weights, MergedShards)
    assert check_weights(weights, SHARD_ARGS, "test") == SHARD_ARGS
    assert list(weights) == list(state)
    for name, t in state.items():
        assert_same_tensor(weights[name], t)
        assert not weights[name].flags.writeable


def test_single_shard_is_not_copied(tmp_path, state):
    weights = read_meta_checkpoint(write_shards(tmp_path, state, 1))
    assert all(isinstance(weights[name].base, np.memmap) for name in weights)


def test_shards_are_merged_only_when_accessed(tmp_path, state, monkeypatch):
    directory = write_shards(tmp_path, state, 4)
    calls = []
    concatenate = np.concatenate
    monkeypatch.setattr(np, "concatenate", lambda *a, **k: calls.append(1) or concatenate(*a, **k))
    weights = read_meta_checkpoint(directory)
    assert len(weights) == len(state) and "output.weight" in weights
    check_weights(weights, SHARD_ARGS, "test")
    assert calls == []
    weights["layers.0.attention.wq.weight"]
    assert calls == [1]


def test_shards_from_different_checkpoints(tmp_path, state):
    directory = write_shards(tmp_path, state, 2)
    shard = torch.load(directory / "consolidated.01.pth", weights_only=True)
    del shard["layers.1.ffn_norm.weight"]
    torch.save(shard, directory / "consolidated.01.pth")
    with pytest.raises(CheckpointError, match="consolidated.01.pth and .*consolidated.00.pth hold "
                       "different tensors .*missing from it: layers.1.ffn_norm.weight"):
        read_meta_checkpoint(directory)


WQ = "layers.0.attention.wq.weight"


@pytest.mark.parametrize("change, message", [
    ({"norm.weight": np.ones(5)}, r"01.pth: norm.weight is float64 \(5,\) but 00.pth has float64 \(4,\); "
     "a replicated tensor"),
    ({WQ: np.ones((2, 5))}, rf"01.pth: {WQ} is float64 \(2, 5\) .* split on axis 0"),
    ({WQ: np.ones((2, 4), np.float32)}, rf"01.pth: {WQ} is float32"),
    ({WQ: np.ones(2)}, rf"01.pth: {WQ} is float64 \(2,\)"),
])
def test_shards_that_cannot_be_merged(change, message):
    shards = [{"norm.weight": np.ones(4), WQ: np.ones((2, 4))} for _ in range(2)]
    shards[1].update(change)
    with pytest.raises(CheckpointError, match=message):
        merge_shards(shards, names=["00.pth", "01.pth"])


def test_unknown_tensor_in_shards():
    shards = [{"rope.freqs": np.ones((4, 2))} for _ in range(2)]
    with pytest.raises(CheckpointError, match="rope.freqs is not a Llama 3 tensor"):
        merge_shards(shards)
    assert merge_shards(shards[:1])["rope.freqs"] is shards[0]["rope.freqs"]  # one shard: no rules


def test_missing_shard_files(tmp_path, state):
    with pytest.raises(ModelNotFoundError, match="consolidated.00.pth"):
        read_meta_checkpoint(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        read_meta_checkpoint(tmp_path / "nowhere")
    write_shards(tmp_path, state, 4)
    (tmp_path / "consolidated.02.pth").unlink()
    with pytest.raises(ModelNotFoundError, match="lacks consolidated.02.pth"):
        read_meta_checkpoint(tmp_path)


# --- check_weights -------------------------------------------------------------------------

def fake_weights(args, dtype=ml_dtypes.bfloat16) -> dict[str, np.ndarray]:
    """Right names and shapes, no memory: check_weights looks at nothing else."""
    zero = np.zeros((), dtype)
    return {name: np.broadcast_to(zero, shape) for name, shape in args.weight_shapes().items()}


def test_check_weights_accepts_a_matching_checkpoint():
    args = tiny_args()
    assert check_weights(fake_weights(args), args, "x.pth") == args


def test_check_weights_wrong_shape():
    weights = fake_weights(tiny_args())
    with pytest.raises(CheckpointError, match=r"consolidated.00.pth: layers.0.feed_forward.w1.weight has "
                       r"shape \(224, 64\) but params.json implies \(256, 64\) = \(hidden_dim, dim\); hidden_dim "
                       r"from dim, multiple_of and ffn_dim_multiplier: the checkpoint and params.json disagree"):
        check_weights(weights, tiny_args(ffn_dim_multiplier=1.5), "consolidated.00.pth")


def test_check_weights_missing_and_extra():
    args = tiny_args()
    weights = fake_weights(args)
    del weights["layers.1.attention.wk.weight"]
    with pytest.raises(CheckpointError, match="x.pth has no layers.1.attention.wk.weight"):
        check_weights(weights, args, "x.pth")
    weights = fake_weights(tiny_args(n_layers=3))
    with pytest.raises(CheckpointError, match="x.pth has tensors params.json does not imply: layers.2."):
        check_weights(weights, args, "x.pth")


def test_check_weights_detects_tied_embeddings():
    args = tiny_args()
    weights = fake_weights(args)
    del weights["output.weight"]
    assert check_weights(weights, args, "x.pth") == replace(args, tie_embeddings=True)
    del weights["norm.weight"]  # tying explains a missing output.weight, nothing else
    with pytest.raises(CheckpointError, match="x.pth has no norm.weight"):
        check_weights(weights, args, "x.pth")


def test_check_weights_dtype():
    with pytest.raises(CheckpointError, match="x.pth: tok_embeddings.weight has dtype float64"):
        check_weights(fake_weights(tiny_args(), np.float64), tiny_args(), "x.pth")

"""Hostile and broken files, each case found by an attacker's search, as a named regression test.

Every case ends in npllama's own exception, naming the file and the field, within 2 s and
200 MB (`bounded`: time from the clock, memory as the process's peak resident size, reset
before each case through /proc/self/clear_refs). Cases that once crashed the process run in a
subprocess, so a regression fails the test instead of killing the suite.
"""

from __future__ import annotations

import collections
import json
import os
import re
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import npllama
import npllama.formats.hf
import npllama.formats.shared
from npllama import cli
from npllama.errors import (ArgumentError, CheckpointError, ConfigError, ModelNotFoundError, NumericalError,
                            TokenizerError, UnsafeCheckpointError)
from npllama.formats import meta
from npllama.formats.meta import read_pth
from npllama.formats.shared import describe_exception
from npllama.generate import Sampler
from oracle.checkpoints import (tiny_gguf_metadata, tiny_model_args, tiny_model_files, write_gguf_file,
                                write_model_files, write_torch_zip)

REPO = Path(__file__).resolve().parent.parent
SECONDS, MEGABYTES = 2.0, 200


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/self/status")


@contextmanager
def bounded(seconds: float = SECONDS, megabytes: int = MEGABYTES):
    """The block must finish within `seconds` and grow the process's peak RSS by `megabytes`."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak RSS, to the current RSS
    rss, start = status_kb("VmRSS"), time.perf_counter()
    yield
    elapsed, grown = time.perf_counter() - start, (status_kb("VmHWM") - rss) / 1024
    assert elapsed < seconds, f"took {elapsed:.2f} s"
    assert grown < megabytes, f"peak RSS grew by {grown:.0f} MB"


def refused(error: type[Exception], *names, call, **kwargs) -> str:
    """The message of the `error` that call(**kwargs) raises in bounded time and memory, after
    checking it names each of `names` (the file, the field) and the first one only once."""
    with bounded(), pytest.raises(error) as e:
        call(**kwargs)
    message = str(e.value)
    for name in names:
        assert str(name) in message, f"{name!r} not in {message!r}"
    assert message.count(str(names[0])) == 1 if names else True, f"named twice: {message}"
    return message


def model_dir(tmp_path: Path, fmt: str, name: str = "model") -> Path:
    return write_model_files(tmp_path / name, tiny_model_files(fmt))


def edit_json(path: Path, change):
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))
    return path


def set_key(key: str, value):
    return lambda doc: doc.__setitem__(key, value)


# --- Hangs and multi-GB allocations -----------------------------------------------------------

@pytest.mark.parametrize("fmt, file, key, value, field", [
    ("meta", "params.json", "n_layers", 10**12, "n_layers"),
    ("hf", "config.json", "num_hidden_layers", 10**12, "num_hidden_layers"),
])
def test_huge_layer_count_in_json(tmp_path, fmt, file, key, value, field):
    path = model_dir(tmp_path, fmt)
    edit_json(path / file, set_key(key, value))
    refused(ConfigError, path / file, field, call=npllama.load, path=path)


def test_huge_block_count_in_gguf(tmp_path):
    path = gguf_of(tmp_path, **{"llama.block_count": 7})
    # gguf-py writes a Python int as uint32: make it a uint64 of 2^64-1 in place.
    data = bytearray(path.read_bytes())
    at = data.index(b"llama.block_count") + len(b"llama.block_count")
    assert struct.unpack_from("<II", data, at) == (4, 7)  # uint32, 7
    data[at:at + 8] = struct.pack("<IQ", 10, 2**64 - 1)  # uint64
    path.write_bytes(bytes(data))
    refused(ConfigError, path, "llama.block_count", call=npllama.load, path=path)


def test_shard_number_of_twenty_digits(tmp_path):
    path = model_dir(tmp_path, "meta")
    (path / "consolidated.00.pth").rename(path / "consolidated.99999999999999999999.pth")
    refused(ModelNotFoundError, path, "consolidated.00.pth", call=npllama.load, path=path)


@pytest.mark.parametrize("token_id", [2 * 10**8, 10**12, 2**63, -1])
def test_huge_or_negative_token_id_in_tokenizer_json(tmp_path, token_id):
    path = model_dir(tmp_path, "hf")
    edit_json(path / "tokenizer.json", lambda doc: doc["model"]["vocab"].__setitem__("zz", token_id))
    refused(TokenizerError, path / "tokenizer.json", call=npllama.load, path=path)


@pytest.mark.parametrize("index", [10**8, 2**31])
def test_memo_index_far_beyond_the_pickle(tmp_path, index):
    """LONG_BINPUT with a huge index: the C unpickler grows its memo table to the index."""
    path = write_torch_zip(tmp_path / "memo.pth", b"\x80\x02}r" + struct.pack("<I", index) + b".")
    with bounded():
        assert read_pth(path) == {}  # a valid pickle of an empty dict, read in a memo of one entry


@pytest.mark.parametrize("levels, message", [(30, "unknown storage record"), (40, "nests containers")])
def test_persistent_id_of_a_memo_dag_with_2_to_40_leaves(tmp_path, levels, message):
    """A tuple of two copies of a tuple of two copies of ... : 2^levels leaves when printed. 30
    levels reach the persistent id's message (which once repr()'d it); 40 exceed the nesting bound."""
    body = b"K\x01"  # the leaf, 1
    for _ in range(levels):
        body += b"q\x00h\x00h\x00\x86"  # BINPUT 0, BINGET 0 twice, TUPLE2
    path = write_torch_zip(tmp_path / "dag.pth", b"\x80\x02}(X\x01\x00\x00\x00w" + body + b"Qu.")
    refused(CheckpointError, path, message, call=read_pth, path=path)


def deep_pickle(depth: int, at: str) -> bytes:
    """A state dict whose key (or a tensor's size) is a tuple nested `depth` deep."""
    nested = b"(" * depth + b"K\x01" + b"t" * depth  # MARK ... TUPLE, depth times
    if at == "key":
        return b"\x80\x02}(" + nested + b"K\x01u."
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    return (b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00"
            + nested + b"K\x01\x85\x89ccollections\nOrderedDict\n)Rtu.")


@pytest.mark.slow
@pytest.mark.parametrize("depth, at", [(10**6, "key"), (10**5, "size")])
def test_deeply_nested_tuples_in_the_pickle(tmp_path, depth, at):
    """Once a SIGSEGV (key 10^6 deep) and a RecursionError (size 10^5 deep): run apart, so a
    crash fails this test rather than the suite."""
    path = write_torch_zip(tmp_path / "deep.pth", deep_pickle(depth, at))
    code = ("import sys, npllama.errors as e\nfrom npllama.formats.meta import read_pth\n"
            "try:\n    read_pth(sys.argv[1])\nexcept e.CheckpointError as x:\n    print('refused:', x)\n")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("refused:") and str(path) in result.stdout
    assert time.perf_counter() - start < 10  # a fresh interpreter's start included


def test_stride_zero_tensor_of_10_to_12_elements(tmp_path):
    """A 350 KB checkpoint claiming a [10^12] weight over one stored element."""
    path = model_dir(tmp_path, "meta")
    state = torch.load(path / "consolidated.00.pth", weights_only=True)
    state["norm.weight"] = torch.ones(1, dtype=torch.bfloat16).expand(10**12)
    torch.save(state, path / "consolidated.00.pth")
    refused(CheckpointError, path / "consolidated.00.pth", "norm.weight", "repeats elements",
            call=npllama.load, path=path)


@pytest.mark.parametrize("n", [10**8, -5, 0, 2.5])
def test_max_seq_len_out_of_range(tmp_path, n):
    path = model_dir(tmp_path, "gguf")
    refused(ConfigError, "max_seq_len", call=npllama.load, path=path, max_seq_len=n)


def test_max_seq_len_on_the_command_line(tmp_path, capsys):
    with bounded():
        code = cli.main(["-m", str(model_dir(tmp_path, "gguf")), "--max-seq-len", "100000000"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "--max-seq-len" in err


@pytest.mark.parametrize("fmt, file", [("meta", "tokenizer.model"), ("gguf", "model.gguf"),
                                       ("hf", "config.json"), ("hf", "model.safetensors")])
def test_fifo_where_a_file_belongs(tmp_path, fmt, file):
    entry = model_dir(tmp_path, fmt)
    directory = entry.parent if fmt == "gguf" else entry
    (directory / file).unlink()
    os.mkfifo(directory / file)
    refused(ModelNotFoundError, directory / file, "not a regular file", call=npllama.load, path=entry)


# --- Raw tracebacks instead of npllama's errors -------------------------------------------------

FIVE_THOUSAND_DIGITS = "5000 digits"  # str() of such an int raises, so it is spliced in as text


@pytest.mark.parametrize("key, value", [
    ("dim", "64"), ("multiple_of", 0), ("ffn_dim_multiplier", float("nan")), ("norm_eps", FIVE_THOUSAND_DIGITS),
    ("dim", FIVE_THOUSAND_DIGITS), ("norm_eps", float("inf")), ("use_scaled_rope", "yes"), ("n_heads", True),
    ("vocab_size", -1),
])
def test_params_json_values(tmp_path, key, value):
    """A string where a number belongs, a zero, NaN and Infinity (JSON's non-standard literals),
    a 5000-digit integer, a bool for an int: each refused naming the file and the key."""
    path = model_dir(tmp_path, "meta")
    edit_json(path / "params.json", set_key(key, value))
    text = (path / "params.json").read_text()
    (path / "params.json").write_text(text.replace(f'"{FIVE_THOUSAND_DIGITS}"', "7" * 5000))
    refused(ConfigError, path / "params.json", key, call=npllama.load, path=path)


def test_params_json_nested_too_deep(tmp_path):
    path = model_dir(tmp_path, "meta")
    (path / "params.json").write_text("[" * 100_000 + "]" * 100_000)
    refused(ConfigError, path / "params.json", "nests too deeply", call=npllama.load, path=path)


def test_params_json_multiple_of_float_is_named(tmp_path):
    """Once "implies (221.0, 64)": a float multiple_of now fails as itself."""
    path = model_dir(tmp_path, "meta")
    edit_json(path / "params.json", set_key("multiple_of", 7.0))
    message = refused(ConfigError, path / "params.json", "multiple_of is 7.0", call=npllama.load, path=path)
    assert "implies" not in message


@pytest.mark.parametrize("key, value, field", [
    ("architectures", 5, "architectures"), ("rope_parameters", [500000.0], "rope_parameters"),
    ("num_attention_heads", 0, "num_attention_heads"), ("rms_norm_eps", None, "rms_norm_eps"),
])
def test_config_json_values(tmp_path, key, value, field):
    path = model_dir(tmp_path, "hf")
    edit_json(path / "config.json", set_key(key, value))
    refused(ConfigError, path / "config.json", field, call=npllama.load, path=path)


@pytest.mark.parametrize("file, change, field", [
    ("tokenizer.json", lambda doc: doc.__setitem__("model", [1, 2]), "model"),
    ("tokenizer_config.json", lambda doc: doc.clear() or doc.update({"x": 1}) or None, "eos_token"),
    ("tokenizer.json", lambda doc: doc["model"]["vocab"].__setitem__("zz", "12"), "id '12'"),
    ("tokenizer.json", lambda doc: doc["added_tokens"].append({"content": "<x>"}), "added_tokens"),
    ("generation_config.json", set_key("eos_token_id", 2.5), "eos_token_id"),
])
def test_tokenizer_file_values(tmp_path, file, change, field):
    path = model_dir(tmp_path, "hf")
    edit_json(path / file, change)
    refused(TokenizerError, path, field, call=npllama.load, path=path)


def test_tokenizer_config_that_is_a_list(tmp_path):
    path = model_dir(tmp_path, "hf")
    (path / "tokenizer_config.json").write_text("[1, 2]")
    refused(TokenizerError, path / "tokenizer_config.json", "expected dict", call=npllama.load, path=path)


def safetensors_with(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("entry, field", [
    ({"dtype": "F32", "shape": [2**32, 2**32], "data_offsets": [0, 0]}, "norm.weight"),
    ({"dtype": "F32", "shape": [64.9], "data_offsets": [0, 256]}, "norm.weight"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, float("inf")]}, "norm.weight"),
    ({"dtype": "F32", "shape": [4], "data_offsets": [0, 10**30]}, "norm.weight"),
])
def test_safetensors_entries(tmp_path, entry, field):
    path = tmp_path / "x.safetensors"
    path.write_bytes(safetensors_with({"model.norm.weight": entry}, bytes(256)))
    refused(CheckpointError, path, field, call=npllama.formats.hf.read_safetensors, path=path)


@pytest.mark.parametrize("tensors", [
    ["a", "a"],  # the same name twice: json would keep the second silently
    ["a", "b"],  # two names over the same bytes
])
def test_safetensors_duplicate_or_overlapping_tensors(tmp_path, tensors):
    entries = ", ".join(f'"{name}": {{"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}' for name in tensors)
    raw = ("{" + entries + "}").encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(16))
    refused(CheckpointError, path, call=npllama.formats.hf.read_safetensors, path=path)


def test_safetensors_index_value_that_is_not_a_string(tmp_path):
    path = model_dir(tmp_path, "hf-sharded")
    edit_json(path / "model.safetensors.index.json",
              lambda doc: doc["weight_map"].__setitem__("model.norm.weight", 7))
    refused(CheckpointError, path / "model.safetensors.index.json", "model.norm.weight",
            call=npllama.load, path=path)


def gguf_of(tmp_path: Path, **metadata) -> Path:
    files = tiny_model_files("gguf")
    from npllama.formats.gguf import read_gguf_file  # to reuse the seed's tensors
    seed = write_model_files(tmp_path / "seed", files)
    parsed = read_gguf_file(seed)
    tensors = {name: parsed.array(info).copy() for name, info in parsed.tensors.items()}
    args = tiny_model_args(265)
    return write_gguf_file(tmp_path / "m.gguf", {**tiny_gguf_metadata(args), **metadata}, tensors)


def test_gguf_arrays_nested_5000_deep(tmp_path):
    """Built by hand (gguf-py would recurse as deeply writing it as npllama once did reading it):
    a first key-value pair whose value is an array of arrays, 5000 deep."""
    path = gguf_of(tmp_path)
    data = bytearray(path.read_bytes())
    name = b"x.deep"
    nested = struct.pack("<IIQ", 9, 9, 1) * 4999 + struct.pack("<IIQ", 9, 4, 0)  # array of ... of uint32
    n_kv = struct.unpack_from("<Q", data, 16)[0]  # after the magic, the version and the tensor count
    struct.pack_into("<Q", data, 16, n_kv + 1)
    data[24:24] = struct.pack("<Q", len(name)) + name + nested
    path.write_bytes(bytes(data))
    refused(CheckpointError, path, "x.deep", call=npllama.load, path=path)


def test_gguf_tokens_stored_as_integers(tmp_path):
    path = gguf_of(tmp_path, **{"tokenizer.ggml.tokens": list(range(265))})
    refused(TokenizerError, path, "tokenizer.ggml.tokens", call=npllama.load, path=path)


def test_gguf_nested_token_arrays(tmp_path):
    path = gguf_of(tmp_path, **{"tokenizer.ggml.tokens": [["a"], ["b"]]})
    refused(TokenizerError, path, "tokenizer.ggml.tokens", call=npllama.load, path=path)


def test_gguf_quantized_tensor_with_zero_rows(tmp_path):
    """A Q8_0 matrix of one row, its row count then set to 0 in the header."""
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    path = tmp_path / "zero.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", quantize(np.ones((1, 32), np.float32), GGMLQuantizationType.Q8_0),
                      raw_dtype=GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    dims = data.index(b"token_embd.weight") + len(b"token_embd.weight") + 4  # after n_dims
    assert struct.unpack_from("<QQ", data, dims) == (32, 1)
    struct.pack_into("<Q", data, dims + 8, 0)
    path.write_bytes(bytes(data))
    refused(CheckpointError, path, "token_embd.weight", call=npllama.load, path=path)


def test_gguf_unaligned_tensor_offset(tmp_path):
    from npllama.formats.gguf import read_gguf_file
    path = gguf_of(tmp_path)
    info = next(iter(read_gguf_file(path).tensors.values()))
    data = bytearray(path.read_bytes())
    name = info.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    offset_at = at + 4 + 8 * n_dims + 4
    struct.pack_into("<Q", data, offset_at, struct.unpack_from("<Q", data, offset_at)[0] + 4)
    path.write_bytes(bytes(data))
    refused(CheckpointError, path, info.name, call=npllama.load, path=path)


def test_pth_tensor_of_size_2_to_64(tmp_path):
    storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ"
    pkl = (b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"K\x00"
           + b"\x8a\x09" + (2**64).to_bytes(9, "little") + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)Rtu.")
    path = write_torch_zip(tmp_path / "big.pth", pkl)
    refused(CheckpointError, path, call=read_pth, path=path)


def test_pth_zip_version_needed_of_14_8(tmp_path):
    path = model_dir(tmp_path, "meta") / "consolidated.00.pth"
    data = bytearray(path.read_bytes())
    import zipfile
    with zipfile.ZipFile(path) as z:
        entry = z.start_dir
    struct.pack_into("<H", data, entry + 6, 148)
    path.write_bytes(bytes(data))
    refused(CheckpointError, path, "version 14.8", call=read_pth, path=path)


def test_empty_prompt_on_a_model_without_bos(tmp_path, capsys):
    code = cli.main(["-m", str(model_dir(tmp_path, "gguf")), "-p", "", "-n", "2"])
    last = capsys.readouterr().err.splitlines()[-1]
    assert code == 2 and last.startswith("error:") and "prompt is empty" in last


@pytest.mark.parametrize("call", [
    lambda m: m.forward([1, 2], start_pos=-1), lambda m: m.forward([1, 2], start_pos=1.5),
    lambda m: m.new_cache(-1), lambda m: list(m.generate([1, 2], 2.5)),
    lambda m: list(m.generate([1.5, 2])), lambda m: Sampler(temperature=float("nan")),
])
def test_api_arguments(tmp_path, call):
    model = npllama.load(model_dir(tmp_path, "gguf"))
    with bounded(), pytest.raises(ArgumentError):
        call(model)


# --- Silent wrong results -----------------------------------------------------------------------

@pytest.mark.parametrize("changes, field", [
    ({"rope_theta": 1e-300}, "rope_theta"), ({"use_scaled_rope": True, "rope_scaling_factor": 0}, "rope_scaling_factor"),
    ({"use_scaled_rope": True, "rope_scaling_factor": 1e300}, "rope_scaling_factor"),
    ({"norm_eps": 1e300}, "norm_eps"),
])
def test_values_that_would_give_nan_or_equal_logits(tmp_path, changes, field):
    path = model_dir(tmp_path, "meta")
    edit_json(path / "params.json", lambda doc: doc.update(changes))
    refused(ConfigError, path / "params.json", field, call=npllama.load, path=path)


def test_tiny_temperature_is_greedy_not_token_zero():
    logits = np.array([0.0, 1.0, 3.0, 2.0], np.float32)
    assert {Sampler(temperature=1e-40, seed=s)(logits) for s in range(5)} == {2}
    assert {Sampler(temperature=1e-320, seed=s)(logits) for s in range(5)} == {2}


def test_nan_logits_are_an_error_naming_the_position(tmp_path):
    model = npllama.load(model_dir(tmp_path, "gguf"))
    model.norm = model.norm * np.float32("nan")
    with pytest.raises(NumericalError, match="position 2"):
        list(model.generate([5, 6, 7], 3))
    with pytest.raises(NumericalError):
        Sampler(0.7, seed=1)(np.array([0.0, np.nan], np.float32))


def test_negative_token_id_is_reported_as_itself(tmp_path):
    path = model_dir(tmp_path, "hf")
    edit_json(path / "tokenizer.json", lambda doc: doc["model"]["vocab"].__setitem__("zz", -1))
    message = refused(TokenizerError, path / "tokenizer.json", "has id -1", call=npllama.load, path=path)
    assert "no token has id" not in message


# --- Security -------------------------------------------------------------------------------------

STATE = b"}X\x0c\x00\x00\x00__qualname__X\x04\x00\x00\x00evils"  # {"__qualname__": "evil"}
SLOT_STATE = b"N" + STATE + b"\x86"  # (None, {"__qualname__": "evil"}): set with setattr


@pytest.mark.parametrize("target", [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ccollections\nOrderedDict\n",
                                    b"ctorch\nFloatStorage\n"])
@pytest.mark.parametrize("state", [STATE, SLOT_STATE], ids=["dict", "slots"])
def test_refused_build_leaves_no_trace(tmp_path, target, state):
    """BUILD on an allowed global once set __qualname__ (and __defaults__) of npllama's own
    function before the file was refused: now the refusal comes first and nothing changes."""
    watched = (meta._rebuild_tensor_v2, collections.OrderedDict, meta._ALLOWED_GLOBALS["torch", "FloatStorage"])
    before = [(getattr(w, "__qualname__", None), getattr(w, "__defaults__", None), dict(getattr(w, "__dict__", {})))
              for w in watched]
    path = write_torch_zip(tmp_path / "build.pth", b"\x80\x02" + target + state + b"b.")
    refused(UnsafeCheckpointError, path, "sets the state", call=read_pth, path=path)
    after = [(getattr(w, "__qualname__", None), getattr(w, "__defaults__", None), dict(getattr(w, "__dict__", {})))
             for w in watched]
    assert after == before


@pytest.mark.parametrize("shard", ["/etc/passwd", "../outside.safetensors", "sub/../../x.safetensors"])
def test_index_may_not_lead_out_of_the_model_directory(tmp_path, shard, monkeypatch):
    path = model_dir(tmp_path, "hf-sharded")
    (tmp_path / "outside.safetensors").write_bytes(tiny_model_files("hf")["model.safetensors"])
    edit_json(path / "model.safetensors.index.json",
              lambda doc: doc["weight_map"].__setitem__("model.norm.weight", shard))
    opened = []
    open_regular = npllama.formats.shared.open_regular
    monkeypatch.setattr(npllama.formats.shared, "open_regular", lambda p, e: opened.append(p) or open_regular(p, e))
    monkeypatch.setattr(npllama.formats.hf, "open_regular", npllama.formats.shared.open_regular)
    refused(CheckpointError, path / "model.safetensors.index.json", "not a file name in the model directory",
            call=npllama.load, path=path)
    assert opened and all(Path(p).resolve().parent == path.resolve() for p in opened), opened


# --- Messages ---------------------------------------------------------------------------------

def test_wrong_model_type_is_named_as_such(tmp_path):
    path = model_dir(tmp_path, "hf")
    edit_json(path / "config.json", set_key("model_type", "mistral"))
    message = refused(ConfigError, path / "config.json", "model_type is 'mistral'", call=npllama.load, path=path)
    assert "describes a LlamaForCausalLM" not in message


def test_path_is_named_once(tmp_path):
    path = model_dir(tmp_path, "hf")
    edit_json(path / "config.json", lambda doc: doc.pop("rms_norm_eps"))
    message = refused(ConfigError, path / "config.json", "rms_norm_eps", call=npllama.load, path=path)
    assert message.count(str(path)) == 1


@pytest.mark.parametrize("fmt, file, change, key", [
    ("hf", "config.json", set_key("num_attention_heads", 5), "num_attention_heads"),
    ("gguf", None, {"llama.attention.head_count": 5}, "llama.attention.head_count"),
])
def test_messages_use_the_files_own_keys(tmp_path, fmt, file, change, key):
    if fmt == "hf":
        path = model_dir(tmp_path, "hf")
        edit_json(path / file, change)
    else:
        path = gguf_of(tmp_path, **change)
    message = refused(ConfigError, key, call=npllama.load, path=path)
    assert not re.search(r"\b(n_heads|dim)\b", message), message


def test_an_exception_without_a_message_still_says_something():
    assert describe_exception(MemoryError()) == "MemoryError: more memory than the file could need"
    assert describe_exception(KeyError()) == "KeyError"


def test_empty_byteorder_is_named(tmp_path):
    path = tmp_path / "order.pth"
    torch.save({"w": torch.ones(2)}, path)
    import zipfile
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp_path / "empty.pth", "w") as zout:
        for name in zin.namelist():
            zout.writestr(name, b"" if name.endswith("byteorder") else zin.read(name))
    message = refused(CheckpointError, tmp_path / "empty.pth", "''-endian", call=read_pth,
                      path=tmp_path / "empty.pth")
    assert "holds -endian" not in message

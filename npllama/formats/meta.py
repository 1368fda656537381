"""Meta's checkpoint directories: params.json, consolidated.NN.pth and tokenizer.model, read
without torch, safely and without copying.

A `torch.save` file is a zip archive: `data.pkl` pickles the dict's structure and
`data/<key>` holds each storage's raw bytes, uncompressed. Two things follow:

- Safety: unpickling calls whatever the pickle names, so `torch.load` without
  weights_only runs code from the file. `read_pth` unpickles with an allowlist of
  the few globals a tensor state dict needs, each mapped to an inert stand-in:
  nothing from torch is ever imported or called.
- Speed: storages are stored, not compressed, so each tensor is a NumPy view of
  one read-only memory map of the whole file. Opening an 8B model (16 GB) reads
  only the zip directory and data.pkl; the OS pages weights in as they are used.

A model too big for one GPU is saved as model-parallel shards, consolidated.00.pth, .01...,
each holding a slice of every split tensor (config.LAYER_TENSORS says which axis); they are
merged lazily, tensor by tensor, when used.
"""

from __future__ import annotations

import _compat_pickle
import collections
import json
import pickle
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, NamedTuple

import ml_dtypes
import numpy as np

from ..config import ModelArgs, RopeScaling, split_layer_name
from ..errors import CheckpointError, ConfigError, ModelNotFoundError, UnsafeCheckpointError
from ..tokenizer import Tokenizer
from .shared import check_weights, few

# --- params.json ----------------------------------------------------------------------------

# Keys with no safe default: guessing them is how other ports ended up with rope_theta 10000
# (Llama 2's) or norm_eps 1e-6 on Llama 3.
REQUIRED_PARAMS = ("dim", "n_layers", "n_heads", "vocab_size", "norm_eps", "rope_theta")
# Keys read when present, with Meta's defaults (llama_models/llama3/args.py). max_seq_len is not
# a Meta key (its generator takes it as an argument) but some exports state it: it is then the
# model's default context, which load(max_seq_len=...) overrides.
OPTIONAL_PARAMS = {"n_kv_heads": None, "multiple_of": 256, "ffn_dim_multiplier": None,
                   "use_scaled_rope": False, "rope_scaling_factor": RopeScaling.factor,
                   "max_seq_len": ModelArgs.max_seq_len}
# Keys of Meta's trainer and batch generator that do not change the model: accepted, unused.
IGNORED_PARAMS = ("max_batch_size", "vision_max_num_chunks")
# Keys that, set, describe a model npllama does not run, and what that model is.
REFUSED_PARAMS = {"vision_chunk_size": "a vision model (Llama 3.2 Vision)",
                  "vision_num_cross_attention_layers": "a vision model (Llama 3.2 Vision)",
                  "vision_model": "a vision model (Llama 3.2 Vision)",
                  "quantization_args": "a quantized checkpoint (int4/int8 weights with scales); use the "
                                       "bf16 release",
                  "lora_args": "a checkpoint with LoRA adapters, which npllama does not apply",
                  "moe_args": "a mixture-of-experts model (Llama 4)"}


def _is_set(value) -> bool:
    """Meta writes absent vision settings as -1 and absent sub-configs as null or {}."""
    return value not in (None, -1, 0, {}, [])


def load_params(path: str | Path) -> ModelArgs:
    """ModelArgs from a Meta params.json: every key is read, ignored on purpose, or refused."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path} not found: a Meta checkpoint directory holds params.json "
                                 "next to consolidated.00.pth and tokenizer.model")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(params).__name__}")
    missing = [k for k in REQUIRED_PARAMS if k not in params]
    if missing:
        raise ConfigError(f"{path} has no {', '.join(missing)}: npllama does not guess these "
                          "(Llama 3 uses norm_eps 1e-05 and rope_theta 500000.0); add them to the file")
    unknown = sorted(set(params) - {*REQUIRED_PARAMS, *OPTIONAL_PARAMS, *IGNORED_PARAMS, *REFUSED_PARAMS})
    if unknown:
        raise ConfigError(f"{path} has keys npllama does not know: {', '.join(unknown)}. It reads "
                          f"{', '.join(REQUIRED_PARAMS + tuple(OPTIONAL_PARAMS))}; a key it does not "
                          "know may change the model, so it is not ignored")
    refused = [k for k in REFUSED_PARAMS if _is_set(params.get(k))]
    if refused:
        raise ConfigError(f"{path} sets {refused[0]}: it describes {REFUSED_PARAMS[refused[0]]}; "
                          "npllama runs dense text-only Llama 3 models")
    p = {**OPTIONAL_PARAMS, **params}
    if "rope_scaling_factor" in params and not p["use_scaled_rope"]:
        raise ConfigError(f"{path} gives rope_scaling_factor {params['rope_scaling_factor']} but not "
                          "use_scaled_rope: true; the two contradict each other, fix one")
    try:
        return ModelArgs(
            dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
            n_kv_heads=p["n_kv_heads"] or p["n_heads"], vocab_size=p["vocab_size"],
            norm_eps=float(p["norm_eps"]), rope_theta=float(p["rope_theta"]), multiple_of=p["multiple_of"],
            ffn_dim_multiplier=p["ffn_dim_multiplier"], max_seq_len=p["max_seq_len"],
            rope_scaling=RopeScaling(factor=float(p["rope_scaling_factor"])) if p["use_scaled_rope"] else None)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def params_json(args: ModelArgs) -> dict:
    """The params.json Meta would write for this model (the inverse of load_params)."""
    s = args.rope_scaling
    if s is not None and replace(s, factor=RopeScaling.factor) != RopeScaling():
        raise ConfigError(f"params.json can state only Llama 3.1's scaled RoPE with another factor, not {s}")
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
              "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "multiple_of": args.multiple_of,
              "ffn_dim_multiplier": args.ffn_dim_multiplier, "norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "use_scaled_rope": s is not None}
    if s is not None and s.factor != RopeScaling.factor:
        params["rope_scaling_factor"] = s.factor
    return {k: v for k, v in params.items() if v is not None}


def read_meta(directory: str | Path) -> tuple[ModelArgs, MergedShards, Tokenizer]:
    """Configuration, weights and tokenizer of a Meta checkpoint directory."""
    directory = Path(directory)
    args = load_params(directory / "params.json")
    weights = read_meta_checkpoint(directory)
    args = check_weights(weights, args, str(directory))
    return args, weights, Tokenizer.from_llama3_model(directory / "tokenizer.model")


# --- What data.pkl may name --------------------------------------------------------------

# torch dtype name -> the NumPy dtype with the same bits; None: NumPy has no equivalent.
_TORCH_DTYPES = {
    "bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32,
    "float64": np.float64, "complex64": np.complex64, "complex128": np.complex128,
    "bool": np.bool_, "uint8": np.uint8, "int8": np.int8, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz, "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
    "complex32": None, "float4_e2m1fn_x2": None, "bits8": None, "bits16": None,
    "bits1x8": None, "bits2x4": None, "bits4x2": None,
}
# Typed storage classes, which torch.save names for the dtypes that have one.
_STORAGE_DTYPES = {
    "BFloat16Storage": "bfloat16", "HalfStorage": "float16", "FloatStorage": "float32",
    "DoubleStorage": "float64", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "BoolStorage": "bool", "ByteStorage": "uint8",
    "CharStorage": "int8", "ShortStorage": "int16", "IntStorage": "int32", "LongStorage": "int64",
}


class _TorchType(NamedTuple):
    """Stand-in for a torch dtype or storage class: plain data, so a pickle that
    tries to call it fails instead of running anything."""

    name: str  # e.g. "torch.BFloat16Storage", for error messages
    dtype: np.dtype | None


class _Storage(NamedTuple):
    key: str  # its bytes are the archive member data/<key>
    nbytes: int
    type: _TorchType


class _TensorRef(NamedTuple):
    """A tensor as data.pkl describes it; offset and strides count elements, as in torch."""

    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    dtype: _TorchType


# Arguments after the stride (requires_grad, backward_hooks, metadata) only matter to autograd.
def _rebuild_tensor_v2(storage, offset, size, stride, *_):
    return _TensorRef(storage, offset, tuple(size), tuple(stride), storage.type)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, *_):
    # Written for dtypes without a storage class: the storage is untyped bytes, the dtype separate.
    return _TensorRef(storage, offset, tuple(size), tuple(stride), dtype)


def _rebuild_parameter(tensor, *_):
    return tensor


def _torch_type(name: str, torch_dtype: str) -> _TorchType:
    dtype = _TORCH_DTYPES[torch_dtype]
    return _TorchType(name, None if dtype is None else np.dtype(dtype))


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch.storage", "UntypedStorage"): _torch_type("torch.storage.UntypedStorage", "uint8"),
    **{("torch", s): _torch_type(f"torch.{s}", d) for s, d in _STORAGE_DTYPES.items()},
    **{("torch", d): _torch_type(f"torch.{d}", d) for d in _TORCH_DTYPES},
}


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles data.pkl into _TensorRefs, refusing every global a state dict does not need."""

    def __init__(self, data: bytes, path: Path):
        super().__init__(BytesIO(data))
        self.path = path

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[module, name]
        except KeyError:
            # torch pickles with protocol 2, which spells Python 3 modules the Python 2 way
            # (builtins as __builtin__); name the module a reader would recognise.
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            raise UnsafeCheckpointError(
                f"{self.path}: refusing to load global '{module}.{name}': a Llama state dict only "
                "holds tensors, so this file may be malicious (do not torch.load it either); "
                "if you made it, save only model.state_dict()"
            ) from None

    def persistent_load(self, pid) -> _Storage:
        # torch.save writes ('storage', storage class, key, location, numel in that class's dtype).
        match pid:
            case ("storage", _TorchType(dtype=np.dtype() as dtype) as kind, str(key), _, int(n)) if n >= 0:
                return _Storage(key, n * dtype.itemsize, kind)
        raise CheckpointError(f"{self.path}: data.pkl holds an unknown storage record {pid!r}")


def _unpickle_state_dict(data: bytes, path: Path) -> dict[str, _TensorRef]:
    """data.pkl as name -> _TensorRef, or a CheckpointError saying why it is not a state dict."""
    try:
        state = _StateDictUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # a damaged pickle fails in many ways: EOFError, KeyError, TypeError...
        raise CheckpointError(f"{path}: data.pkl is corrupt ({type(e).__name__}: {e})") from None
    hint = "npllama reads state dicts saved with torch.save(model.state_dict())"
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: data.pkl holds a {type(state).__name__}, "
                              f"not a dict of tensors; {hint}")
    for name, value in state.items():
        if not (isinstance(name, str) and isinstance(value, _TensorRef)):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, "
                                  f"not a tensor; {hint}")
    return state


# --- Tensors as views of the file --------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, ..., file name length, extra field length


def _member_span(mm: np.memmap, zf: zipfile.ZipFile, member: str, path: Path,
                 what: str) -> tuple[int, int]:
    """File offset and size of a stored member's bytes, found without zipfile reading them.

    The offset comes from the member's own local header: torch pads every storage
    to a 64-byte boundary with an extra field that the central directory lacks."""
    damaged = f"{path}: {what} {member}"
    try:
        info = zf.getinfo(member)
    except KeyError:
        raise CheckpointError(f"{damaged} is missing from the archive; the file is corrupt, "
                              "download or save it again") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{damaged} is compressed; re-save the file with torch.save, "
                              "which stores everything uncompressed")
    header = mm[info.header_offset:][:_LOCAL_HEADER.size].tobytes() if info.header_offset >= 0 else b""
    if len(header) < _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{damaged} has a damaged zip header; the file is corrupt, "
                              "download or save it again")
    _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
    start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if start + info.file_size > len(mm):
        raise CheckpointError(f"{damaged} ends {start + info.file_size - len(mm)} bytes past the "
                              "end of the file: the file is truncated, download or save it again")
    return start, info.file_size


def _read_record(mm: np.memmap, zf: zipfile.ZipFile, member: str, path: Path) -> bytes:
    """A small member (data.pkl, byteorder), checked against its CRC."""
    start, size = _member_span(mm, zf, member, path, "record")
    data = mm[start:start + size].tobytes()
    if zlib.crc32(data) != zf.getinfo(member).CRC:
        raise CheckpointError(f"{path}: record {member} fails its CRC check; the file is corrupt, "
                              "download or save it again")
    return data


def _tensor_view(mm: np.memmap, zf: zipfile.ZipFile, prefix: str, ref: _TensorRef,
                 name: str, path: Path) -> np.ndarray:
    """The tensor as a read-only view of the file's memory map: offset, shape and
    strides applied in place, so no bytes are read or copied."""
    if ref.dtype.dtype is None:
        raise CheckpointError(f"{path}: tensor {name} has dtype {ref.dtype.name}, which NumPy "
                              "cannot represent; convert it (e.g. to bfloat16) and save again")
    dims = (ref.offset, *ref.size, *ref.stride)
    if len(ref.size) != len(ref.stride) or not all(type(d) is int and d >= 0 for d in dims):
        raise CheckpointError(f"{path}: tensor {name} has a malformed layout (offset {ref.offset!r}, "
                              f"size {ref.size!r}, stride {ref.stride!r}); the file is corrupt")
    member = f"{prefix}data/{ref.storage.key}"
    start, size = _member_span(mm, zf, member, path, f"tensor {name}'s storage")
    if ref.storage.nbytes > size:
        raise CheckpointError(f"{path}: tensor {name} needs {ref.storage.nbytes} bytes of storage "
                              f"{member} but it holds {size}; the file is corrupt")
    itemsize = ref.dtype.dtype.itemsize
    # Elements from the view's first to one past its last (none if any dimension is empty).
    span = 0 if 0 in ref.size else 1 + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if (ref.offset + span) * itemsize > ref.storage.nbytes:
        raise CheckpointError(f"{path}: tensor {name} (offset {ref.offset}, size {ref.size}, stride "
                              f"{ref.stride}) reaches past its {ref.storage.nbytes}-byte storage")
    return np.ndarray(ref.size, ref.dtype.dtype, buffer=mm, offset=start + ref.offset * itemsize,
                      strides=tuple(s * itemsize for s in ref.stride))


# --- read_pth ------------------------------------------------------------------------------

# zipfile reports a damaged central directory through many exception types (OSError when it
# seeks to a negative offset, NotImplementedError for a "version needed to extract" it lacks).
_ZIP_ERRORS = (zipfile.BadZipFile, OSError, EOFError, ValueError, struct.error, UnicodeDecodeError,
               NotImplementedError)


def _open_zip(file: BinaryIO, path: Path) -> zipfile.ZipFile:
    magic = file.read(4)
    if not magic:
        raise CheckpointError(f"{path} is empty: the download or save was interrupted")
    if magic != b"PK\x03\x04":
        legacy = " (it looks like torch's legacy format)" if magic[:1] == b"\x80" else ""
        raise CheckpointError(f"{path} is not a torch zip checkpoint{legacy}: re-save it with "
                              "torch.save, whose default format since torch 1.6 is the zip one")
    try:
        return zipfile.ZipFile(file)
    except _ZIP_ERRORS as e:
        raise CheckpointError(f"{path} is truncated or corrupt ({type(e).__name__}: {e}): "
                              "download or save it again") from None


def read_pth(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a torch.save'd state dict, as read-only NumPy views of the file.

    Nothing in data.pkl but tensors and the torch globals that describe them is
    accepted (else UnsafeCheckpointError), and no tensor bytes are read here."""
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path} not found: expected a .pth file written by torch.save")
    with open(path, "rb") as file, _open_zip(file, path) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (it holds "
                                  f"{len(pickles)} <archive>/data.pkl records, torch writes one)")
        prefix = pickles[0].removesuffix("data.pkl")
        mm = np.memmap(file, dtype=np.uint8, mode="r")
        # torch < 1.10 wrote no byteorder record, and only ever saved from little-endian machines.
        if f"{prefix}byteorder" in names:
            byteorder = _read_record(mm, zf, f"{prefix}byteorder", path)
            if byteorder != b"little":
                raise CheckpointError(f"{path} holds {byteorder.decode(errors='replace')}-endian "
                                      "tensors; npllama reads little-endian ones only")
        refs = _unpickle_state_dict(_read_record(mm, zf, pickles[0], path), path)
        return {name: _tensor_view(mm, zf, prefix, ref, name, path) for name, ref in refs.items()}


# --- Model-parallel shards -----------------------------------------------------------------

def _shard_axis(name: str) -> int | None:
    """The axis along which Meta split tensor `name` across shards; None if replicated."""
    found = split_layer_name(name)
    if found is None:
        raise CheckpointError(f"{name} is not a Llama 3 tensor: npllama does not know how Meta "
                              "splits it across model-parallel shards")
    return found[1].split_axis


def _merged_shape(name: str, parts: Sequence[np.ndarray], names: Sequence[str],
                  axis: int | None) -> tuple[int, ...]:
    """The shape of one tensor's shards joined on `axis` (None: replicated), checking they fit."""
    first = parts[0]
    if axis is not None and first.ndim <= axis:
        raise CheckpointError(f"{names[0]}: {name} has shape {first.shape}, "
                              f"but Meta splits it on axis {axis}")

    def agreed(shape):  # every dimension but the split one must match across shards
        return tuple(0 if i == axis else d for i, d in enumerate(shape))

    for part, shard in zip(parts, names):
        if part.dtype != first.dtype or agreed(part.shape) != agreed(first.shape):
            how = "replicated" if axis is None else f"split on axis {axis}"
            raise CheckpointError(f"{shard}: {name} is {part.dtype} {part.shape} but {names[0]} has "
                                  f"{first.dtype} {first.shape}; a {how} tensor cannot differ like that")
    if axis is None:
        return first.shape
    return first.shape[:axis] + (sum(part.shape[axis] for part in parts),) + first.shape[axis + 1:]


class MergedShards(Mapping):
    """Read-only name -> tensor mapping over model-parallel shards.

    Shapes and dtypes are checked when it is built, but a tensor is concatenated
    only when it is accessed, so merged weights are never all in memory at once
    unless the caller keeps them; accessing a tensor twice concatenates it twice."""

    def __init__(self, shards: Sequence[Mapping[str, np.ndarray]], names: Sequence[str] | None = None):
        if not shards:
            raise ValueError("merge_shards needs at least one shard")
        names = list(names) if names is not None else [f"shard {i}" for i in range(len(shards))]
        for shard, shard_name in zip(shards[1:], names[1:]):
            if shard.keys() != shards[0].keys():
                extra = sorted(shard.keys() - shards[0].keys())
                lacks = sorted(shards[0].keys() - shard.keys())
                raise CheckpointError(f"{shard_name} and {names[0]} hold different tensors "
                                      f"(only in {shard_name}: {few(extra)}; missing from it: "
                                      f"{few(lacks)}): the shards are not from one checkpoint")
        self._shards = list(shards)
        # A single shard is the whole tensor: nothing to split, so any name is fine.
        self._axes = {name: _shard_axis(name) if len(shards) > 1 else None for name in shards[0]}
        # Merged shapes and dtypes, known without merging (check_weights reads these).
        self.specs = {name: (_merged_shape(name, [s[name] for s in shards], names, axis),
                             shards[0][name].dtype) for name, axis in self._axes.items()}

    def __getitem__(self, name: str) -> np.ndarray:
        axis = self._axes[name]
        if axis is None:  # replicated, or a single shard: the shard's own (memory-mapped) array
            return self._shards[0][name]
        merged = np.concatenate([shard[name] for shard in self._shards], axis=axis)
        merged.flags.writeable = False  # like the memory-mapped arrays, so nobody relies on writing
        return merged

    def __contains__(self, name) -> bool:  # Mapping's default would concatenate to find out
        return name in self._axes

    def __iter__(self) -> Iterator[str]:
        return iter(self._axes)

    def __len__(self) -> int:
        return len(self._axes)


def merge_shards(shards: Sequence[Mapping[str, np.ndarray]],
                 names: Sequence[str] | None = None) -> MergedShards:
    """Meta's model-parallel shards as one lazy mapping; `names` label shards in errors."""
    return MergedShards(shards, names)


def read_meta_checkpoint(directory: str | Path) -> MergedShards:
    """The tensors of a Meta checkpoint directory: consolidated.00.pth, .01, ... merged."""
    directory = Path(directory)
    expected = "a Meta checkpoint directory holds consolidated.00.pth (and .01, .02... for a " \
        "model split across GPUs)"
    if not directory.is_dir():
        raise ModelNotFoundError(f"{directory} is not a directory: {expected}")
    found = {int(m[1]): p for p in directory.iterdir()
             if (m := re.fullmatch(r"consolidated\.(\d+)\.pth", p.name))}
    if not found:
        raise ModelNotFoundError(f"{directory} has no consolidated.*.pth: {expected}")
    missing = [f"consolidated.{i:02d}.pth" for i in range(max(found) + 1) if i not in found]
    if missing:
        raise ModelNotFoundError(f"{directory} lacks {few(missing)}: the shards must be numbered "
                                 f"from 00 without gaps; download the missing ones")
    paths = [found[i] for i in sorted(found)]
    return merge_shards([read_pth(p) for p in paths], [str(p) for p in paths])

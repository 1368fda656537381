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
import base64
import binascii
import collections
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
from ..errors import (CheckpointError, ConfigError, ConfigValueError, ModelNotFoundError, TokenizerError,
                      UnsafeCheckpointError, clipped, shown)
from ..tokenizer import Tokenizer
from .shared import check_weights, describe_exception, few, open_regular, read_json, read_regular

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
    params = read_json(path, "a Meta params.json (it lies next to consolidated.00.pth and "
                             "tokenizer.model)", max_bytes=1 << 20)
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
    if not isinstance(p["use_scaled_rope"], bool):
        raise ConfigError(f"{path}: use_scaled_rope is {shown(p['use_scaled_rope'])}; it must be true or false")
    if "rope_scaling_factor" in params and not p["use_scaled_rope"]:
        raise ConfigError(f"{path} gives rope_scaling_factor {shown(params['rope_scaling_factor'])} but "
                          "not use_scaled_rope: true; the two contradict each other, fix one")
    try:
        return ModelArgs(
            dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"],
            n_kv_heads=p["n_heads"] if p["n_kv_heads"] is None else p["n_kv_heads"],
            vocab_size=p["vocab_size"], norm_eps=p["norm_eps"], rope_theta=p["rope_theta"],
            multiple_of=p["multiple_of"], ffn_dim_multiplier=p["ffn_dim_multiplier"],
            max_seq_len=p["max_seq_len"],
            rope_scaling=RopeScaling(factor=p["rope_scaling_factor"]) if p["use_scaled_rope"] else None)
    except ConfigValueError as e:  # params.json's keys are ModelArgs' names, but for the factor
        raise ConfigError(f"{path}: {e.named({'rope_scaling.factor': 'rope_scaling_factor'})}") from None


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
    return args, weights, read_tokenizer_model(directory / "tokenizer.model")


# --- tokenizer.model ----------------------------------------------------------------------

def read_bpe_ranks(path: str | Path) -> dict[bytes, int]:
    """Token bytes -> rank, from a tiktoken BPE file such as Llama 3's tokenizer.model.

    Each line is "<base64 of the token's bytes> <rank>", ranks 0, 1, 2... in file
    order (as Meta and tiktoken write them); blank lines are skipped. The file is
    read on every call: tiktoken's own `load_tiktoken_bpe` caches by path and would
    return the old ranks after the file is rewritten.
    """
    path = Path(path)
    data = read_regular(path, "Meta's Llama 3 tokenizer.model (downloads ship it next to params.json; "
                              "Hugging Face repos keep it in original/tokenizer.model)", max_bytes=64 << 20)

    def bad_line(lineno: int, problem: str) -> TokenizerError:
        return TokenizerError(
            f"{path}, line {lineno}: {problem}. A Llama 3 tokenizer.model holds one "
            "'<base64 token> <rank>' pair per line, ranks 0, 1, 2... in order "
            "(Llama 2's SentencePiece tokenizer.model is a different, unsupported format)"
        )

    ranks: dict[bytes, int] = {}
    line_of_rank: list[int] = []
    for lineno, line in enumerate(data.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit() or len(fields[1]) > 9:
            raise bad_line(lineno, f"expected a token and a rank, got {line[:80]!r}")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error as e:
            raise bad_line(lineno, f"{fields[0][:80]!r} is not valid base64 ({e})") from None
        rank = int(fields[1])
        if token in ranks:
            raise bad_line(lineno, f"token {token!r} already has rank {ranks[token]} "
                                   f"(line {line_of_rank[ranks[token]]})")
        if rank < len(ranks):
            raise bad_line(lineno, f"rank {rank} was already given on line {line_of_rank[rank]}")
        if rank > len(ranks):
            raise bad_line(lineno, f"rank {rank} skips rank {len(ranks)}")
        ranks[token] = rank
        line_of_rank.append(lineno)
    if not ranks:
        raise TokenizerError(f"{path} holds no tokens: is it a Llama 3 tokenizer.model?")
    return ranks


def read_tokenizer_model(path: str | Path) -> Tokenizer:
    return Tokenizer.llama3(str(path), read_bpe_ranks(path))


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


class _StateDictUnpickler(pickle._Unpickler):
    """Unpickles data.pkl into _TensorRefs, refusing every global a state dict does not need.

    It is pickle's pure-Python unpickler, not the C one: its memo is a dict, so an index of 2^31
    in a 12-byte file costs one entry, not 16 GB of table; and it builds nested objects on its
    own stacks, not the C stack. What it builds is bounded by data.pkl's length: each opcode
    makes at most one object. data.pkl is at most MAX_PICKLE_BYTES (a Llama 3 405B's is a few
    hundred KB), which bounds the time too.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, path: Path):
        super().__init__(BytesIO(data))
        self.path = path
        # Nesting depth of each container built so far (by id, with the object, so that its id
        # is not reused): hashing a dict key nested 10^6 deep recurses in C until the process
        # dies, so nesting is bounded as containers are built.
        self.depths: dict[int, tuple[int, object]] = {}

    def nested(self, container, items) -> None:
        depth = 1 + max((self.depths.get(id(x), (0,))[0] for x in items), default=0)
        if depth > MAX_NESTING:
            raise CheckpointError(f"{self.path}: data.pkl nests containers more than {MAX_NESTING} deep; "
                                  "a state dict needs a few levels, the file is corrupt or hostile")
        if depth > self.depths.get(id(container), (0,))[0]:
            self.depths[id(container)] = (depth, container)

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[module, name]
        except (KeyError, TypeError):
            # torch pickles with protocol 2, which spells Python 3 modules the Python 2 way
            # (builtins as __builtin__); name the module a reader would recognise.
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            raise UnsafeCheckpointError(
                f"{self.path}: refusing to load global '{clipped(str(module))}.{clipped(str(name))}': "
                "a Llama state dict only holds tensors, so this file may be malicious (do not "
                "torch.load it either); if you made it, save only model.state_dict()") from None

    def load_build(self):
        """BUILD sets an object's state. torch.save uses it once, to attach `_metadata` to the
        state dict (an OrderedDict); on anything else (the allowed functions and classes, which
        are npllama's own objects) it would change them for the rest of the process, so it is
        refused before it touches anything. npllama never reads _metadata: the state is dropped."""
        state = self.stack.pop()
        if type(self.stack[-1]) is not collections.OrderedDict or type(state) is not dict:
            raise UnsafeCheckpointError(
                f"{self.path}: data.pkl sets the state of a {type(self.stack[-1]).__name__}, which a "
                "state dict never does; this file may be malicious (do not torch.load it either)")

    dispatch[pickle.BUILD[0]] = load_build

    def persistent_load(self, pid) -> _Storage:
        # torch.save writes ('storage', storage class, key, location, numel in that class's dtype).
        match pid:
            case ("storage", _TorchType(dtype=np.dtype() as dtype) as kind, str(key), _, int(n)) \
                    if 0 <= n <= MAX_ELEMENTS and len(key) <= 64:
                return _Storage(key, n * dtype.itemsize, kind)
        raise CheckpointError(f"{self.path}: data.pkl holds an unknown storage record "
                              f"({shown(pid)}); the file is corrupt")


# data.pkl's size, how deep its containers nest (a state dict: a dict of tensors whose sizes are
# tuples, a few levels), and how many elements a tensor or storage may have (2^48: 256 TB of bf16).
MAX_PICKLE_BYTES = 64 << 20
MAX_NESTING = 32
MAX_ELEMENTS = 1 << 48


def _bounded_nesting(opcode: bytes, new_items):
    """Pickle's handler for an opcode that builds a container (or adds items to one, or calls a
    function with them), with the result's nesting depth tracked. new_items(stack) are the items
    it takes from the stack."""
    original = pickle._Unpickler.dispatch[opcode[0]]

    def load(self):
        items = list(new_items(self.stack))
        original(self)
        self.nested(self.stack[-1], items)
    return load


# The items each container opcode takes: since the last MARK (the whole current stack, as the
# pure-Python unpickler keeps it), or the last n.
for _op, _take in ((pickle.TUPLE, lambda s: s), (pickle.LIST, lambda s: s), (pickle.DICT, lambda s: s),
                   (pickle.FROZENSET, lambda s: s), (pickle.APPENDS, lambda s: s), (pickle.SETITEMS, lambda s: s),
                   (pickle.ADDITEMS, lambda s: s), (pickle.TUPLE1, lambda s: s[-1:]),
                   (pickle.TUPLE2, lambda s: s[-2:]), (pickle.TUPLE3, lambda s: s[-3:]),
                   (pickle.APPEND, lambda s: s[-1:]), (pickle.SETITEM, lambda s: s[-2:]),
                   (pickle.REDUCE, lambda s: s[-1:])):
    _StateDictUnpickler.dispatch[_op[0]] = _bounded_nesting(_op, _take)


def _unpickle_state_dict(data: bytes, path: Path) -> dict[str, _TensorRef]:
    """data.pkl as name -> _TensorRef, or a CheckpointError saying why it is not a state dict."""
    try:
        state = _StateDictUnpickler(data, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # a damaged pickle fails in many ways: EOFError, KeyError, TypeError...
        raise CheckpointError(f"{path}: data.pkl is corrupt ({describe_exception(e)})") from None
    hint = "npllama reads state dicts saved with torch.save(model.state_dict())"
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: data.pkl holds a {type(state).__name__}, "
                              f"not a dict of tensors; {hint}")
    for name, value in state.items():
        if not (isinstance(name, str) and len(name) <= 256 and isinstance(value, _TensorRef)):
            raise CheckpointError(f"{path}: entry {shown(name)} is a {type(value).__name__}, "
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


def _read_record(mm: np.memmap, zf: zipfile.ZipFile, member: str, path: Path, max_bytes: int) -> bytes:
    """A small member (data.pkl, byteorder), checked against its CRC."""
    start, size = _member_span(mm, zf, member, path, "record")
    if size > max_bytes:
        raise CheckpointError(f"{path}: record {member} is {size} bytes, more than a state dict's "
                              f"{max_bytes}; the file is corrupt or not a Llama checkpoint")
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
    if not (len(ref.size) == len(ref.stride) <= 8 and all(type(d) is int and 0 <= d <= MAX_ELEMENTS
                                                          for d in dims)):
        raise CheckpointError(f"{path}: tensor {name} has a malformed layout (offset {shown(ref.offset)}, "
                              f"{len(ref.size)} sizes, {len(ref.stride)} strides); the file is corrupt")

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
    with open_regular(path, "a .pth file written by torch.save") as file, _open_zip(file, path) as zf:
        names = zf.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{path} is a zip file but not a torch checkpoint (it holds "
                                  f"{len(pickles)} <archive>/data.pkl records, torch writes one)")
        prefix = pickles[0].removesuffix("data.pkl")
        mm = np.memmap(file, dtype=np.uint8, mode="r")
        # torch < 1.10 wrote no byteorder record, and only ever saved from little-endian machines.
        if f"{prefix}byteorder" in names:
            byteorder = _read_record(mm, zf, f"{prefix}byteorder", path, max_bytes=16)
            if byteorder != b"little":
                order = byteorder.decode() if byteorder == b"big" else shown(byteorder.decode("latin-1"))
                raise CheckpointError(f"{path} holds {order}-endian tensors; npllama reads little-endian ones only")
        refs = _unpickle_state_dict(_read_record(mm, zf, pickles[0], path, MAX_PICKLE_BYTES), path)
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


# Meta's largest release (Llama 3.1 405B) has 8 or 16 shards.
MAX_SHARDS = 1024


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
    if len(found) > MAX_SHARDS:
        raise CheckpointError(f"{directory} has {len(found)} consolidated.*.pth files; a Llama checkpoint "
                              f"has at most {MAX_SHARDS}")
    if max(found) >= len(found):  # a gap: name the first few missing, never all of a huge range
        missing = [f"consolidated.{i:02d}.pth" for i in range(len(found) + 5) if i not in found][:5]
        raise ModelNotFoundError(f"{directory} lacks {', '.join(missing)}: the shards must be numbered "
                                 "from 00 without gaps; download the missing ones")
    paths = [found[i] for i in sorted(found)]
    shards = [read_pth(p) for p in paths]
    for shard, p in zip(shards, paths):
        for name, a in shard.items():
            check_holds_its_elements(a, name, p)
    return merge_shards(shards, [str(p) for p in paths])


def check_holds_its_elements(a: np.ndarray, name: str, path: Path) -> None:
    """A weight is never a view that repeats elements (an expanded, stride-0 tensor, which
    read_pth reads as torch.load does): 10^12 elements over one byte of storage would make the
    forward pass allocate and compute as if the file held them. So a weight's elements must fit
    in the bytes its view spans, and the work a file can cause is bounded by its size."""
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(a.shape, a.strides)) // a.itemsize if a.size else 0
    if a.size > span:
        raise CheckpointError(f"{path}: tensor {name} has {a.size} elements over {span} stored ones "
                              "(a view that repeats elements); a weight never does, the file is corrupt")


"""GGUF files (llama.cpp's format): configuration, tokenizer and weights in one memory-mapped file.

Layout, all little-endian:

    "GGUF", version (2 or 3), tensor count, metadata count
    metadata     key -> typed value: numbers, strings, arrays (the vocabulary is one array
                 of 49152 strings); llama.embedding_length, tokenizer.ggml.tokens, ...
    tensor infos name, dims innermost first (ne[0] is the length of a row), ggml type, offset
    padding to general.alignment (32 bytes), then every tensor's data

A GGUF shape lists dimensions innermost first, so the [out, in] matrix Meta stores as
(4096, 14336) is written ne = [14336, 4096]; reversed, it is NumPy's C-order shape.
Quantized types store each row as blocks (Q8_0: 32 int8 and one float16 scale, 34 bytes);
blocks never straddle rows, so one row can be decoded without the others.

llama.cpp's converter writes q and k in Meta's layout (it undoes the row permutation of
Hugging Face checkpoints), so they need no change here; tests/test_gguf.py checks it on
SmolLM2 by perplexity.

The header is parsed here rather than with gguf-py's GGUFReader, which builds one NumPy view
per metadata string: seconds for SmolLM2's 98k vocabulary and merge strings, where this parser
reads each string array in one tight loop. F32/F16/BF16, Q8_0, Q4_0, Q4_1 and the K-quants of
Q4_K_M and Q5_K_M files (Q4_K, Q5_K, Q6_K) are decoded here too, so the default model and the usual
Llama 3 downloads need nothing beyond NumPy; gguf-py (pip install gguf) is imported only to
dequantize other types (Q2_K, Q3_K, IQ*, Q5_0, Q5_1...).
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

from ..config import EMBEDDING, OUTPUT, ModelArgs, RopeScaling, meta_name
from ..errors import CheckpointError, ConfigError, ConfigValueError, TokenizerError, clipped, shown
from ..layers import rope_frequencies, scale_rope_frequencies
from ..tokenizer import SPECIAL_TOKEN_TYPES, Tokenizer
from .shared import LazyRows, check_weights, checked_size, open_regular

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_DEPTH = 4  # llama.cpp's files nest none; the parser recurses per level
MAX_ELEMENTS = 1 << 48

# --- The header --------------------------------------------------------------------------

# Metadata value types -> struct format; 8 is a string, 9 an array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_NUMPY_SCALARS = {k: np.dtype(v) for k, v in _SCALARS.items()}


class GGMLType(NamedTuple):
    id: int
    name: str
    block_size: int  # values per block (1 for plain floats)
    type_size: int  # bytes per block


# ggml's tensor types (ggml.h; gguf-py's GGML_QUANT_SIZES, which a test checks this against).
GGML_TYPES = {t.id: t for t in (GGMLType(*fields) for fields in [
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20), (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 40), (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110), (12, "Q4_K", 256, 144), (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292), (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110), (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136), (24, "I8", 1, 1), (25, "I16", 1, 2), (26, "I32", 1, 4), (27, "I64", 1, 8),
    (28, "F64", 1, 8), (29, "IQ1_M", 256, 56), (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66), (39, "MXFP4", 32, 17), (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18),
])}
# Stored as plain floats: read as views of the file, never decoded.
FLOAT_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64)}


def ggml_type(type_id: int) -> GGMLType:
    """The ggml type with this id; types newer than this table come from gguf-py if installed."""
    if type_id in GGML_TYPES:
        return GGML_TYPES[type_id]
    try:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        qtype = GGMLQuantizationType(type_id)
        return GGMLType(type_id, qtype.name, *GGML_QUANT_SIZES[qtype])
    except (ImportError, ValueError, KeyError):
        raise KeyError(type_id) from None


class _Truncated(Exception):
    """The header claims more bytes than the file holds."""


class _HeaderReader:
    """Reads GGUF header values one after another from a bytes-like buffer."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        """Advance by n bytes; returns where they start."""
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise _Truncated
        self.pos = start + n
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: a metadata string at byte {start} is not UTF-8; "
                                  "the file is corrupt") from None

    def strings(self, count: int) -> list[str]:
        """An array of strings, in one tight loop: a vocabulary has 10^5 of them."""
        buf, pos, size = self.buf, self.pos, len(self.buf)
        unpack = struct.Struct("<Q").unpack_from
        raw = []
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            n = unpack(buf, pos)[0]
            pos += 8
            raw.append(buf[pos:pos + n])
            pos += n
        if pos > size:
            raise _Truncated
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in raw]
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: a metadata string array holds text that is not UTF-8; "
                                  "the file is corrupt") from None

    def value(self, kind: int, key: str, depth: int = 0):
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _NUMPY_SCALARS:  # one read for the whole array (token types: 49152 ints)
                dtype = _NUMPY_SCALARS[item_kind]
                start = self.take(count * dtype.itemsize)
                return np.frombuffer(self.buf, dtype, count, start).tolist()
            if count > len(self.buf) - self.pos:  # every item takes at least one byte
                raise _Truncated
            if item_kind == _ARRAY and depth >= MAX_ARRAY_DEPTH:  # parsing recurses: bound it
                raise CheckpointError(f"{self.path}: metadata {clipped(key)} nests arrays more than "
                                      f"{MAX_ARRAY_DEPTH} deep; the file is corrupt")
            if item_kind == _STRING:
                return self.strings(count)
            return [self.value(item_kind, key, depth + 1) for _ in range(count)]
        raise CheckpointError(f"{self.path}: metadata {key} has unknown value type {kind}; "
                              "the file is corrupt or from a newer GGUF version")


class TensorInfo(NamedTuple):
    name: str  # llama.cpp's name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # NumPy (C-order) shape: GGUF's ne reversed, so [out, in]
    qtype: GGMLType
    start: int  # absolute file offset of the first byte
    nbytes: int


@dataclass
class GGUFFile:
    """A parsed GGUF header and the memory map its tensors live in."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    buffer: Any  # read-only mmap of the whole file

    def array(self, info: TensorInfo) -> np.ndarray:
        """The tensor's stored bytes as a read-only view: float arrays for F32/F16/BF16,
        uint8 rows of blocks [rows, bytes_per_row] for quantized types."""
        if info.qtype.name in FLOAT_DTYPES:
            dtype = FLOAT_DTYPES[info.qtype.name]
            return np.frombuffer(self.buffer, dtype, info.nbytes // dtype.itemsize,
                                 info.start).reshape(info.shape)
        rows = info.shape[:-1]
        row_bytes = info.shape[-1] // info.qtype.block_size * info.qtype.type_size
        return np.frombuffer(self.buffer, np.uint8, info.nbytes, info.start).reshape(*rows, row_bytes)


def read_gguf_file(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header and map the file; no tensor data is read."""
    path = Path(path)
    size = checked_size(path, ".gguf", "GGUF", 24)
    with open_regular(path, "a .gguf file") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it starts with {buf[:4]!r}, not b'GGUF')")
    r = _HeaderReader(buf, path)
    r.take(4)
    key = "the header"
    try:
        version = r.scalar("<I")
        if version not in (2, 3):
            hint = (" (it looks big-endian; npllama reads little-endian files)" if version > 0xFFFF
                    else "; re-convert the model with a current llama.cpp")
            raise CheckpointError(f"{path} is GGUF version {version}, npllama reads versions 2 and 3{hint}")
        n_tensors, n_kv = r.scalar("<Q"), r.scalar("<Q")
        # A tensor info takes at least 24 bytes and a key-value pair 12: counts beyond what the
        # file can hold are corrupt, whatever the loops below would have found.
        if n_tensors * 24 + n_kv * 12 > size:
            raise CheckpointError(f"{path}: its header claims {shown(n_tensors)} tensors and {shown(n_kv)} "
                                  f"metadata keys, more than its {size} bytes can hold; the file is corrupt")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = r.string()
            if key in metadata:
                raise CheckpointError(f"{path}: metadata key {clipped(key)} appears twice; the file is corrupt")
            metadata[key] = r.value(r.scalar("<I"), key)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment % 8:
            raise CheckpointError(f"{path}: general.alignment is {alignment!r}; it must be a "
                                  "positive multiple of 8")
        raw = []
        for i in range(n_tensors):
            key = f"tensor info {i}"
            name = r.string()
            key = f"tensor info of {name}"
            n_dims = r.scalar("<I")
            if not 1 <= n_dims <= 4:
                raise CheckpointError(f"{path}: tensor {name} has {n_dims} dimensions; GGUF allows 1 to 4")
            ne = [r.scalar("<Q") for _ in range(n_dims)]
            raw.append((name, ne, r.scalar("<I"), r.scalar("<Q")))
    except _Truncated:
        raise CheckpointError(f"{path} is truncated: it ends inside {clipped(key)}; download it again") from None
    data_start = -(-r.pos // alignment) * alignment

    tensors = {}
    for name, ne, type_id, offset in raw:
        name = clipped(name)
        if not all(1 <= n <= MAX_ELEMENTS for n in ne) or math.prod(ne) > MAX_ELEMENTS:
            raise CheckpointError(f"{path}: tensor {name} has dimensions {ne}; each must be from 1 to "
                                  f"{MAX_ELEMENTS}, and so must their product: the file is corrupt")
        if offset % alignment:
            raise CheckpointError(f"{path}: tensor {name} starts at offset {offset}, not a multiple of "
                                  f"general.alignment ({alignment}); the file is corrupt")
        try:
            qtype = ggml_type(type_id)
        except KeyError:
            raise CheckpointError(f"{path}: tensor {name} has ggml type {type_id}, which npllama does not "
                                  "know (nor gguf-py, if installed: pip install -U gguf)") from None
        if ne[0] % qtype.block_size:
            raise CheckpointError(f"{path}: tensor {name} has rows of {ne[0]} values, not a multiple of "
                                  f"{qtype.name}'s block of {qtype.block_size}; the file is corrupt")
        nbytes = math.prod(ne) // qtype.block_size * qtype.type_size
        start = data_start + offset
        if start + nbytes > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends {start + nbytes - size} bytes "
                                  "past the end of the file; download it again")
        if name in tensors:
            raise CheckpointError(f"{path} holds two tensors named {name}; the file is corrupt")
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(ne)), qtype, start, nbytes)
    _check_no_overlap(path, tensors.values())
    return GGUFFile(path, version, metadata, tensors, buf)


def _check_no_overlap(path: Path, tensors) -> None:
    """Two tensors sharing bytes would be a way to make a small file stand for a large model."""
    ends = sorted((t.start, t.start + t.nbytes, t.name) for t in tensors)
    for (_, end, first), (start, _, second) in zip(ends, ends[1:]):
        if start < end:
            raise CheckpointError(f"{path}: tensors {first} and {second} overlap; the file is corrupt")


# --- Dequantization ----------------------------------------------------------------------

# The block formats llama.cpp's files use most, written out because gguf-py's generic kernels
# take several times longer (most of a GGUF model's load time). Each kernel repeats gguf-py's
# float32 operations in gguf-py's order, so the results are bit-identical, NaN payloads and
# signed zeros included (tests/test_gguf.py).
#
# A kernel writes the values of N blocks into `out`, float32 [N, values per block], all blocks
# at once. NumPy pays a fixed cost for each run of contiguous elements an operation walks, so
# the kernels unpack bits where the runs are long (whole rows of bytes; 4 or 8 bytes at a time
# in uint32/uint64 words, whose masks keep each byte's bits within that byte), in whatever order
# that leaves the values, and put them in order in the one copy that turns them into floats.

def _scales(b: np.ndarray, start: int) -> np.ndarray:
    return b[:, start:start + 2].view(np.float16).astype(np.float32)  # [N, 1]


def _nibble_planes(qs: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte, unpacked: [N, w] -> [2, N, w], the low nibbles then the high."""
    planes = np.empty((2, *qs.shape), np.uint8)  # [2, N, w]
    np.bitwise_and(qs, 15, out=planes[0])
    np.right_shift(qs, 4, out=planes[1])
    return planes


# The legacy formats: blocks of 32 values, a float16 scale d (and for Q4_1 a float16 minimum m),
# then the quants; Q4 packs values 0..15 in the low nibbles, 16..31 in the high ones.

def _q8_0(b: np.ndarray, out: np.ndarray) -> None:  # [N, 34] -> [N, 32]: d * q
    np.copyto(out, b[:, 2:].view(np.int8))
    out *= _scales(b, 0)


def _q4(b: np.ndarray, out: np.ndarray) -> None:  # [N, 16] -> [N, 32]: the 4-bit q
    np.copyto(out.reshape(len(b), 2, 16), _nibble_planes(b).transpose(1, 0, 2))


def _q4_0(b: np.ndarray, out: np.ndarray) -> None:  # [N, 18] -> [N, 32]: d * (q - 8)
    _q4(b[:, 2:], out)
    out -= 8
    out *= _scales(b, 0)


def _q4_1(b: np.ndarray, out: np.ndarray) -> None:  # [N, 20] -> [N, 32]: d * q + m
    _q4(b[:, 4:], out)
    out *= _scales(b, 0)
    out += _scales(b, 2)


# The K-quants: super-blocks of 256 values whose sub-blocks each have an integer scale, itself
# scaled by the super-block's float16 d. Q4_K and Q5_K: 8 sub-blocks of 32, each with a 6-bit
# scale sc and a 6-bit minimum m (times the float16 dmin): value = d*sc * q - dmin*m, q of 4 or 5
# bits. Q6_K: 16 sub-blocks of 16 with int8 scales: value = d*sc * (q - 32), q of 6 bits.

_LOW_6_BITS, _LOW_4_BITS, _BITS_4_5 = 0x3F3F3F3F, 0x0F0F0F0F, 0x30303030  # the mask in each byte


def _k_scales_and_mins(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's and Q5_K's 8 sub-block scales d*sc and minimums dmin*m: [N, 8, 1] each.

    Bytes 4..15 pack the 6-bit sc and m, taken here as three words of four bytes (i = 0..3):
        word 0, byte i: low 6 bits sc[i],  top 2 bits the top 2 bits of sc[i+4]
        word 1, byte i: low 6 bits m[i],   top 2 bits the top 2 bits of m[i+4]
        word 2, byte i: low nibble the low 4 bits of sc[i+4], high nibble those of m[i+4]"""
    words = b[:, 4:16].view(np.uint32)  # [N, 3]
    low_sc, low_m, high = words[:, 0], words[:, 1], words[:, 2]  # [N]
    packed = np.empty((len(b), 4), np.uint32)  # [N, 4], as bytes sc[0..7] then m[0..7]
    np.bitwise_and(low_sc, _LOW_6_BITS, out=packed[:, 0])
    packed[:, 1] = (high & _LOW_4_BITS) | ((low_sc >> 2) & _BITS_4_5)
    np.bitwise_and(low_m, _LOW_6_BITS, out=packed[:, 2])
    packed[:, 3] = ((high >> 4) & _LOW_4_BITS) | ((low_m >> 2) & _BITS_4_5)
    d_dmin = b[:, 0:4].view(np.float16).astype(np.float32)  # [N, 2]
    products = d_dmin[:, :, None] * packed.view(np.uint8).reshape(-1, 2, 8).astype(np.float32)  # [N, 2, 8]
    return products[:, 0, :, None], products[:, 1, :, None]


def _q4_k(b: np.ndarray, out: np.ndarray) -> None:  # [N, 144] -> [N, 256]
    n = len(b)
    # Each run c of 32 bytes holds sub-block 2c in its low nibbles and 2c+1 in its high ones.
    q = _nibble_planes(b[:, 16:]).reshape(2, n, 4, 32)  # [low/high, N, run, 32]
    _k_quant_values(b, q, out)


def _q5_k(b: np.ndarray, out: np.ndarray) -> None:  # [N, 176] -> [N, 256]
    n = len(b)
    q = _nibble_planes(b[:, 48:]).reshape(2, n, 4, 32)  # [low/high, N, run, 32]: Q4_K's 4 bits
    # The fifth bits: sub-block s's are bit s of the 32 bytes qh.
    qh = np.ascontiguousarray(b[:, 16:48]).view(np.uint64)  # [N, 4 words]
    fifth = np.empty((2, n, 4, 4), np.uint64)  # [low/high, N, run, 4 words]: sub-block 2*run + low/high
    for s in range(8):
        np.right_shift(qh, s, out=fifth[s % 2, :, s // 2])
    fifth &= 0x0101010101010101
    fifth *= 16
    q.view(np.uint64).reshape(fifth.shape)[...] |= fifth
    _k_quant_values(b, q, out)


def _k_quant_values(b: np.ndarray, q: np.ndarray, out: np.ndarray) -> None:
    """d*sc * q - dmin*m: q [low/high, N, run, 32] -> out [N, 256]."""
    n = len(b)
    np.copyto(out.reshape(n, 4, 2, 32), q.transpose(1, 2, 0, 3))  # sub-block 2*run + low/high
    values = out.reshape(n, 8, 32)
    scale, minimum = _k_scales_and_mins(b)  # [N, 8, 1]
    values *= scale
    values -= minimum


def _q6_k(b: np.ndarray, out: np.ndarray) -> None:  # [N, 210] -> [N, 256]
    n = len(b)
    # Low 4 bits: each half h of ql (64 bytes) holds values 128h..128h+63 in its low nibbles,
    # the next 64 in its high ones; so value 128h + 64p + 32r + j with p low/high, r a run of 32.
    q = _nibble_planes(b[:, :128]).reshape(2, n, 2, 2, 32)  # [p, N, h, r, 32]
    # High 2 bits: bits 2k, 2k+1 of qh's half h (32 bytes) belong to value 128h + 32k + j, k = 2p + r.
    qh = np.ascontiguousarray(b[:, 128:192]).view(np.uint64).reshape(n, 2, 4)  # [N, h, 4 words]
    top = np.empty((2, n, 2, 2, 4), np.uint64)  # [p, N, h, r, 4 words]
    for k in range(4):
        np.right_shift(qh, 2 * k, out=top[k // 2, :, :, k % 2])
    top &= 0x0303030303030303
    top *= 16
    q.view(np.uint64).reshape(top.shape)[...] |= top
    q -= 32  # wraps around in uint8: read as int8 it is q - 32, from -32 to 31
    np.copyto(out.reshape(n, 2, 2, 2, 32), q.view(np.int8).transpose(1, 2, 0, 3, 4))  # [N, h, p, r, 32]
    values = out.reshape(n, 16, 16)
    values *= _scales(b, 208)[:, :, None] * b[:, 192:208, None].view(np.int8).astype(np.float32)  # [N, 16, 1]


# dequantize_rows hands the kernels this many values' blocks at a time (1 MB of float32): a
# kernel makes several passes over its intermediates and its output, which then stay in the CPU's
# cache instead of going to memory and back each time (a 4096 x 4096 K-quant matrix decodes 1.1
# to 1.4 times faster so than in one call).
PIECE_VALUES = 1 << 18

_KERNELS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize_rows(blocks: np.ndarray, qtype: GGMLType) -> np.ndarray:
    """float32 values of quantized rows: uint8 [..., bytes_per_row] -> float32 [..., row_length]."""
    kernel = _KERNELS.get(qtype.name)
    if kernel is None:  # Q2_K, Q3_K, IQ*, Q5_0...: gguf-py's kernels
        try:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize
        except ImportError:
            raise CheckpointError(f"decoding {qtype.name} tensors needs gguf-py: pip install gguf "
                                  "(npllama decodes F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and "
                                  "Q6_K itself)") from None
        return dequantize(blocks, GGMLQuantizationType(qtype.id))
    stored = blocks.reshape(-1, qtype.type_size)  # [N blocks, bytes]
    out = np.empty((len(stored), qtype.block_size), np.float32)  # [N blocks, values]
    step = max(1, PIECE_VALUES // qtype.block_size)
    for start in range(0, len(stored), step):
        kernel(stored[start:start + step], out[start:start + step])
    return out.reshape(*blocks.shape[:-1], blocks.shape[-1] // qtype.type_size * qtype.block_size)


# --- Weights -----------------------------------------------------------------------------

class QuantizedTensor(LazyRows):
    """A quantized GGUF matrix, dequantized to float32 row by row when used."""

    def __init__(self, blocks: np.ndarray, shape: tuple[int, int], qtype: GGMLType, name: str = ""):
        super().__init__(shape, np.float32, name)
        self.blocks = blocks  # uint8 [rows, bytes_per_row], a read-only view of the file
        self.qtype = qtype

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def rows(self, index) -> np.ndarray:
        return dequantize_rows(self.blocks[index], self.qtype)  # [..., cols] float32

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.name!r}, {self.qtype.name}, shape={self.shape})"


# Not a weight: Llama 3.1's RoPE scaling, written by llama.cpp as one factor per frequency.
ROPE_FREQS = "rope_freqs.weight"


class GGUFWeights(Mapping):
    """Meta name -> tensor of a GGUF file: F32/F16/BF16 tensors are read-only views of the
    memory map, quantized ones QuantizedTensors (decoded when used)."""

    def __init__(self, file: GGUFFile, names: dict[str, str]):
        self.file = file
        self._infos = {meta: file.tensors[name] for meta, name in names.items()}  # Meta name -> info

    def __getitem__(self, name: str):
        info = self._infos[name]
        stored = self.file.array(info)
        if info.qtype.name in FLOAT_DTYPES:
            return stored
        if len(info.shape) != 2:  # llama.cpp never quantizes vectors; decode such a one now
            return dequantize_rows(stored, info.qtype).reshape(info.shape)
        return QuantizedTensor(stored, info.shape, info.qtype, info.name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def qtypes(self) -> dict[str, int]:
        """How many tensors of each ggml type, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
        counts: dict[str, int] = {}
        for info in self._infos.values():
            counts[info.qtype.name] = counts.get(info.qtype.name, 0) + 1
        return counts


def _weights(file: GGUFFile) -> GGUFWeights:
    names = {}
    for name, info in file.tensors.items():
        if name == ROPE_FREQS:
            continue
        meta = meta_name(name, "gguf")
        if meta is None:
            raise CheckpointError(f"{file.path} holds tensor {name}, which a Llama model does not have "
                                  "(npllama runs plain Llama: no biases, no fused qkv, no experts)")
        if info.qtype.name not in FLOAT_DTYPES:
            try:  # decode one row now, so an unsupported type fails at load, naming the tensor
                dequantize_rows(file.array(info)[(0,) * (len(info.shape) - 1)], info.qtype)
            except NotImplementedError:
                raise CheckpointError(f"{file.path}: tensor {name} is {info.qtype.name}, which gguf-py "
                                      "cannot dequantize; use a file quantized as Q8_0, Q4_K_M, ...") from None
            except CheckpointError as e:
                raise CheckpointError(f"{file.path}: tensor {name}: {e}") from None
        names[meta] = name
    return GGUFWeights(file, names)


# --- Configuration -----------------------------------------------------------------------

def _is(value, kind: type | tuple[type, ...]) -> bool:
    """isinstance, but a bool is not an int (GGUF types them apart; Python does not)."""
    return isinstance(value, kind) and (not isinstance(value, bool) or kind is bool)


def _get(file: GGUFFile, key: str, kind: type | tuple[type, ...], default: Any = ...,
         items: type | None = None, error: type[Exception] = ConfigError) -> Any:
    """Metadata `key`, checked to be of type `kind` (a list of `items`, if given); `default` if
    absent (required if not given)."""
    if key not in file.metadata:
        if default is ...:
            raise error(f"{file.path} has no metadata key {key}: the file is incomplete or not a Llama model")
        return default
    value = file.metadata[key]
    expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    if not _is(value, kind):
        raise error(f"{file.path}: metadata {key} is {shown(value)}; expected a {expected}")
    if items is not None and not all(_is(item, items) for item in value):
        bad = next(item for item in value if not _is(item, items))
        raise error(f"{file.path}: metadata {key} holds {shown(bad)}; expected a list of {items.__name__}")
    return value


def _rope_scaling(file: GGUFFile, arch: str, head_dim: int, theta: float) -> RopeScaling | None:
    """Meta's RoPE scaling from GGUF: llama.cpp stores Llama 3.1's as a rope_freqs tensor of
    per-frequency divisors (factor for long wavelengths, 1 for short ones, blended between);
    the parameters that reproduce those divisors are recovered and checked."""
    kind = file.metadata.get(f"{arch}.rope.scaling.type", "none")
    linear = file.metadata.get(f"{arch}.rope.scale_linear", 1.0)
    if kind != "none" or linear != 1.0:
        raise ConfigError(f"{file.path}: RoPE scaling {kind if kind != 'none' else 'linear'} is not "
                          "supported; npllama implements Llama 3.1's scaling only")
    info = file.tensors.get(ROPE_FREQS)
    if info is None:
        return None
    if info.qtype.name != "F32" or info.shape != (head_dim // 2,):
        raise CheckpointError(f"{file.path}: {ROPE_FREQS} is {info.qtype.name} {info.shape}; expected "
                              f"float32 ({head_dim // 2},)")
    divisors = file.array(info).astype(np.float64)
    if np.all(divisors == 1.0):
        return None
    freqs = rope_frequencies(head_dim, theta)
    original = _get(file, f"{arch}.rope.scaling.original_context_length", int, 8192)
    scaling = RopeScaling(factor=float(divisors.max()), original_max_seq_len=original)
    expected = freqs.astype(np.float64) / scale_rope_frequencies(freqs, scaling)
    if not np.allclose(divisors, expected, rtol=1e-4):
        raise ConfigError(f"{file.path}: {ROPE_FREQS} holds RoPE divisors that are not Llama 3.1's "
                          f"scaling (factor {scaling.factor:g}, low/high frequency factors 1 and 4, "
                          f"original context {original}); npllama cannot run this RoPE variant")
    return scaling


def gguf_model_args(file: GGUFFile) -> ModelArgs:
    """ModelArgs from GGUF metadata (max_seq_len is left at its default: the caller's choice)."""
    arch = _get(file, "general.architecture", str)
    if arch != "llama":
        raise ConfigError(f"{file.path}: general.architecture is {shown(arch)}; npllama runs Llama models "
                          "(architecture 'llama') only")
    if _get(file, f"{arch}.expert_count", int, 0):
        raise ConfigError(f"{file.path} is a mixture-of-experts model ({arch}.expert_count = "
                          f"{file.metadata[f'{arch}.expert_count']}); npllama runs dense Llama models only")
    n_heads = _get(file, f"{arch}.attention.head_count", int)
    dim = _get(file, f"{arch}.embedding_length", int)
    embedding = file.tensors.get(EMBEDDING.gguf)
    if embedding is None:
        raise CheckpointError(f"{file.path} has no tensor {EMBEDDING.gguf}; the file is incomplete")
    vocab_size = embedding.shape[0]
    stated = _get(file, f"{arch}.vocab_size", int, vocab_size)
    if stated != vocab_size:
        raise ConfigError(f"{file.path}: {arch}.vocab_size is {stated} but {EMBEDDING.gguf} has "
                          f"{vocab_size} rows; the file is inconsistent")
    keys = _args_keys(arch)
    try:
        args = ModelArgs(
            dim=dim,
            n_layers=_get(file, keys["n_layers"], int),
            n_heads=n_heads,
            n_kv_heads=_get(file, keys["n_kv_heads"], int, n_heads),
            vocab_size=vocab_size,
            norm_eps=_get(file, keys["norm_eps"], (int, float)),
            # llama.cpp's default where the key is absent (old Llama 1/2 conversions).
            rope_theta=_get(file, keys["rope_theta"], (int, float), 10000.0),
            ffn_hidden_dim=_get(file, keys["ffn_hidden_dim"], int),
            tie_embeddings=OUTPUT.gguf not in file.tensors,
        )
        scaling = _rope_scaling(file, arch, args.head_dim, args.rope_theta)
    except ConfigValueError as e:
        raise ConfigError(f"{file.path}: {e.named(keys)}") from None
    for key in (f"{arch}.rope.dimension_count", f"{arch}.attention.key_length",
                f"{arch}.attention.value_length"):
        value = _get(file, key, int, args.head_dim)
        if value != args.head_dim:
            raise ConfigError(f"{file.path}: {key} is {value} but embedding_length / head_count is "
                              f"{args.head_dim}; npllama needs head_dim = dim / n_heads, fully rotated")
    return replace(args, rope_scaling=scaling) if scaling is not None else args


def _args_keys(arch: str) -> dict[str, str]:
    """ModelArgs' fields as GGUF names them, for messages in the file's own words."""
    return {"dim": f"{arch}.embedding_length", "n_layers": f"{arch}.block_count",
            "n_heads": f"{arch}.attention.head_count", "n_kv_heads": f"{arch}.attention.head_count_kv",
            "vocab_size": f"the rows of {EMBEDDING.gguf}", "norm_eps": f"{arch}.attention.layer_norm_rms_epsilon",
            "rope_theta": f"{arch}.rope.freq_base", "ffn_hidden_dim": f"{arch}.feed_forward_length",
            "rope_scaling.factor": f"the largest divisor in {ROPE_FREQS}",
            "rope_scaling.original_max_seq_len": f"{arch}.rope.scaling.original_context_length"}


# --- Tokenizer ---------------------------------------------------------------------------

# Tokens that end generation in llama.cpp (its end-of-generation list), when they are special.
_END_OF_GENERATION = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>",
                      "<|end|>", "<end_of_turn>")


def gguf_tokenizer(file: GGUFFile) -> Tokenizer:
    """The byte-level BPE tokenizer of tokenizer.ggml.* metadata (model "gpt2")."""
    model = _get(file, "tokenizer.ggml.model", str)
    if model != "gpt2":
        what = "SentencePiece (Llama 1/2)" if model == "llama" else shown(model)
        raise TokenizerError(f"{file.path}: the tokenizer is {what}; npllama reads byte-level BPE "
                             "tokenizers (tokenizer.ggml.model 'gpt2': Llama 3, SmolLM2)")
    tokens = _get(file, "tokenizer.ggml.tokens", list, items=str, error=TokenizerError)
    types = _get(file, "tokenizer.ggml.token_type", list, None, items=int, error=TokenizerError)
    ids = {}
    for key in ("bos", "eos", "eot", "eom"):
        value = _get(file, f"tokenizer.ggml.{key}_token_id", int, None, error=TokenizerError)
        if value is not None and not 0 <= value < len(tokens):
            raise TokenizerError(f"{file.path}: tokenizer.ggml.{key}_token_id is {value}, outside the "
                                 f"{len(tokens)}-token vocabulary")
        ids[key] = value
    if ids["eos"] is None:
        raise TokenizerError(f"{file.path} has no tokenizer.ggml.eos_token_id; npllama would not know "
                             "where generation ends")
    pre = _get(file, "tokenizer.ggml.pre", str, "default")
    # llama.cpp adds BOS by default for Llama 3's tokenizer, not for other BPE ones.
    add_bos = _get(file, "tokenizer.ggml.add_bos_token", bool, pre == "llama-bpe")
    specials = {t for t, kind in zip(tokens, types or ()) if kind in SPECIAL_TOKEN_TYPES}
    stop_ids = {i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None}
    stop_ids |= {i for i, t in enumerate(tokens) if t in _END_OF_GENERATION and t in specials}
    return Tokenizer.from_byte_level_bpe(
        str(file.path), tokens, types, pre, bos_id=ids["bos"], eos_id=ids["eos"], stop_ids=stop_ids,
        add_bos=add_bos, merges=_get(file, "tokenizer.ggml.merges", list, None, items=str, error=TokenizerError),
        chat_template=_get(file, "tokenizer.chat_template", str, None))


def read_gguf(path: str | Path) -> tuple[ModelArgs, GGUFWeights, Tokenizer]:
    """Configuration, weights (Meta's names, [out, in]) and tokenizer of a Llama GGUF file."""
    file = read_gguf_file(path)
    args = gguf_model_args(file)
    weights = _weights(file)
    # Shapes and dtypes only: QuantizedTensors state them without being decoded.
    args = check_weights(weights, args, str(file.path), config="its GGUF metadata")
    return args, weights, gguf_tokenizer(file)

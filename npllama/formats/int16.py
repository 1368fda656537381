"""The int16 copy of a checkpoint's matrices: what streamed weights are read from by default.

A streamed matrix is converted to float32 on every token, and for bf16 that conversion is the
slowest step of a decode (ml_dtypes' cast: benchmarks/engines.py's cast probes measure each
storage's rate on the machine at hand). So each matrix is stored once more, as int16 with one
power-of-two scale per output row, row = q * 2^k: the matmul casts a tile of q to float32 with
NumPy's own SIMD cast, multiplies, and scales its output columns by 2^k, which is exact.

Exactness: k is chosen from the row's largest magnitude so that it becomes an int16 of 15 bits
(16384 to 32767). A bf16 weight (8 significant bits) is then held exactly when it is at least
2^-7 of its row's largest; a smaller one loses low bits, an error of at most 2^-15 of the row's
largest (far below bf16's own step at the row's scale). A row whose largest is below 2^-111
(the scale stops at 2^-126) is held as zeros. A quantized GGUF's weight is a float32
value; int16 holds it to the same 2^-15 of its row's largest. The copy's header records how many
weights it does not hold exactly and their largest error relative to their row's largest.

The copy is a safetensors file in the cache directory ($NPLLAMA_CACHE/int16, by default
~/.cache/npllama/int16) named after a hash of the source's identity (its weight files' paths,
sizes, modification times, first and last MiB) and of the rows it holds (one rank's share under
mpiexec); written to a temporary name and renamed once complete, so an interrupted write is never
used; made once, with a progress line, and mapped again by later loads. Disk: 2 bytes a weight
and 4 a row (an 8B model: 15 GB).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..progress import Progress
from .default_model import cache_dir
from .hf import read_safetensors
from .shared import LazyRows

CHUNK_ROWS_BYTES = 64 << 20  # float32 bytes of rows converted at a time: bounds the temporaries
SCALE = ".int16_scale"  # suffix of each matrix's row scales in the file


def to_int16(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """rows [r, in] -> q int16 [r, in] and scale float32 [r] (powers of two), rows ~ q * scale."""
    x = np.asarray(rows, dtype=np.float32)  # [r, in]
    _, exponent = np.frexp(np.abs(x).max(axis=1))  # [r]: largest = m * 2^e, 0.5 <= m < 1
    k = np.clip(exponent - 15, -126, 127)  # largest / 2^k in [16384, 32768): 15 bits
    scale = np.ldexp(np.float32(1), k).astype(np.float32)  # [r]
    q = np.rint(x / scale[:, None])  # [r, in], exact division by a power of two
    return np.clip(q, -32767, 32767).astype(np.int16), scale  # 32767.5 and up round to 32768


class Int16Matrix(LazyRows):
    """A matrix stored as int16 rows q [out, in] and power-of-two row scales [out]: its values,
    q * scale, as float32 rows when indexed; the streamed matmul reads q and scale directly."""

    def __init__(self, q: np.ndarray, scale: np.ndarray, name: str = ""):
        super().__init__(q.shape, np.float32, name)
        self.q, self.scale = q, scale

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def rows(self, index) -> np.ndarray:
        return self.q[index].astype(np.float32) * self.scale[index][..., None]


def identity(path: Path, part: str, names: list[str] = ()) -> str:
    """A hash of what the copy is made from: the weight files (path, size, modification time,
    first and last MiB), which rows (`part`) and which matrices."""
    files = sorted(p for p in path.iterdir() if p.suffix in (".pth", ".safetensors")) if path.is_dir() else [path]
    digest = hashlib.sha256(f"{part}|{','.join(sorted(names))}".encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        with open(f, "rb") as data:
            digest.update(data.read(1 << 20))
            data.seek(max(0, stat.st_size - (1 << 20)))
            digest.update(data.read(1 << 20))
    return digest.hexdigest()[:20]


def with_int16_copy(path: Path, weights: Mapping, names: list[str], part: str = "",
                    verbose: bool = False) -> dict:
    """The matrices `names` of `weights` as Int16Matrix, from the cached copy, made now if absent."""
    copy = cache_dir() / "int16" / f"{path.name}-{identity(path, part, names)}.int16.safetensors"
    if not copy.exists():
        write_int16_copy(copy, {name: weights[name] for name in sorted(names)}, verbose)
    stored = read_safetensors(copy)
    out = {}
    for name in names:
        q, scale = stored.get(name), stored.get(name + SCALE)
        if q is None or scale is None or q.shape != weights[name].shape or q.dtype != np.int16 or \
                scale.shape != q.shape[:1] or scale.dtype != np.float32:
            raise CheckpointError(f"{copy} does not hold {name} as int16 {weights[name].shape} with its row "
                                  "scales: the cached copy is damaged; delete it and load again")
        out[name] = Int16Matrix(q, scale, name)
    return out


def write_int16_copy(copy: Path, matrices: dict, verbose: bool) -> None:
    """A safetensors file of each matrix's int16 rows and row scales, converted chunk by chunk of
    rows, and what int16 does not hold exactly in its metadata (and on stderr when verbose)."""
    header, offset = {}, 0
    for name, w in matrices.items():
        for key, dtype, shape in ((name, "I16", list(w.shape)), (name + SCALE, "F32", [w.shape[0]])):
            nbytes = 2 * w.size if dtype == "I16" else 4 * w.shape[0]
            header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    copy.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(copy.parent).free
    if free < offset + (1 << 30):
        raise CheckpointError(f"the int16 copy of this model's matrices needs {offset / 2**30:.1f} GB in "
                              f"{copy.parent}, which has {free / 2**30:.1f} GB free: free space there, set "
                              "NPLLAMA_CACHE to a larger disk, or load with weights='exact' (--weights exact)")
    partial = copy.with_name(f".{copy.name}.{os.getpid()}.partial")
    reserved = header_bytes(header)  # the header is written last, with what was measured
    inexact, worst, total = 0, 0.0, sum(w.size for w in matrices.values())
    with Progress(f"making the int16 copy of {len(matrices)} matrices, once", total / 2**30, "G weights",
                  enabled=verbose) as progress, open(partial, "wb") as f:
        try:
            f.seek(8 + reserved)
            done = 0
            for name, w in matrices.items():
                rows, scales = max(1, CHUNK_ROWS_BYTES // (4 * w.shape[1])), []
                for r in range(0, w.shape[0], rows):
                    values = np.asarray(w[r:r + rows], dtype=np.float32)  # [rows, in]: decoded, upcast
                    q, scale = to_int16(values)
                    error = np.abs(q * scale[:, None] - values)  # [rows, in]
                    top = np.abs(values).max(axis=1, keepdims=True)  # [rows, 1]
                    inexact += int(np.count_nonzero(error))
                    worst = max(worst, float((error / np.where(top > 0, top, 1)).max()))
                    f.write(q.tobytes())
                    scales.append(scale)
                    done += q.size
                    progress.update(done / 2**30)
                f.write(np.concatenate(scales).tobytes())
            header["__metadata__"] = {"inexact": str(inexact), "weights": str(total),
                                      "largest_error_of_row_max": repr(worst)}
            f.seek(0)
            f.write(struct.pack("<Q", reserved) + json.dumps(header).encode().ljust(reserved))
        except BaseException:
            f.close()
            partial.unlink(missing_ok=True)
            raise
    os.replace(partial, copy)
    if verbose:
        print(f"int16 copy {copy}: {inexact:,} of {total:,} weights ({100 * inexact / max(total, 1):.2f}%) not "
              f"held exactly, the largest error {worst:.2g} of its row's largest", flush=True)


def header_bytes(header: dict) -> int:
    """Room for the header and the metadata added at the end (three numbers), 8-aligned as
    safetensors' own writer aligns the data."""
    n = len(json.dumps(header).encode()) + 256
    return n + -n % 8

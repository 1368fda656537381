"""What the checkpoint formats share: opening files that may be hostile, the checks every
loaded model passes before any math, and matrices whose rows are produced only when used.

Every reader (Meta's .pth, GGUF, Hugging Face) hands back a mapping from Meta's tensor names to
arrays, or to `LazyRows` where the stored bytes are not the matrix itself (quantized blocks,
HF's reordered q/k rows); `check_weights` then holds names, shapes and dtypes against the
configuration, reading only shapes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from ..config import OUTPUT, ModelArgs, explain_shape, split_layer_name
from ..errors import CheckpointError, ConfigError, ModelNotFoundError


def few(names: Sequence[str], limit: int = 5) -> str:
    """A list short enough for an error message."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


# What the forward pass upcasts from; anything else (float64, int8...) is refused at load.
_WEIGHT_DTYPES = (np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float32))


# --- Files ---------------------------------------------------------------------------------

def open_regular(path: Path, expected: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file. A FIFO or a device would block the read
    or never end, so it is refused; the open itself does not block (O_NONBLOCK), and the type is
    checked on the opened descriptor, so a file swapped in after a check cannot slip through.
    `expected` says what the file should be, for the message."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} not found: expected {expected}") from None
    except IsADirectoryError:
        raise ModelNotFoundError(f"{path} is a directory: expected {expected}") from None
    except OSError as e:
        raise ModelNotFoundError(f"{path} cannot be opened ({e.strerror}): expected {expected}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
        raise ModelNotFoundError(f"{path} is {kind}: expected {expected}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, expected: str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes (a config or vocabulary, not weights)."""
    with open_regular(path, expected) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise CheckpointError(f"{path} is {size} bytes; {expected} is at most {max_bytes >> 20} MB")
        return f.read(max_bytes)


def describe_exception(e: BaseException) -> str:
    """Type and message, never empty and never long (a MemoryError's message is empty)."""
    text = str(e)[:200] if not isinstance(e, MemoryError) else "more memory than the file could need"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def parse_json_int(digits: str) -> int | float:
    """An integer of JSON: one too long for int() (4300 digits and up) becomes an infinite float,
    so the check of the field it belongs to refuses it, naming the field."""
    return int(digits) if len(digits) <= 300 else float(digits)


def read_json(path: Path, expected: str, error: type[Exception] = ConfigError,
              max_bytes: int = 64 << 20) -> Any:
    """A JSON file's value, or `error` if it is not JSON or nests too deep for the parser. NaN
    and Infinity, which Python's json accepts, pass as floats: the check of each value refuses
    them naming its field, which a parse error could not."""
    data = read_regular(path, expected, max_bytes)
    try:
        return json.loads(data, parse_int=parse_json_int)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError are ValueErrors
        reason = "it nests too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise error(f"{path} is not valid JSON: {reason}") from None


def checked_size(path: Path, suffix: str, header: str, header_bytes: int) -> int:
    """The size of a weights file that exists, is a regular file and can hold its header."""
    with open_regular(path, f"a {suffix} file") as f:
        size = os.fstat(f.fileno()).st_size
    if size < header_bytes:
        raise CheckpointError(f"{path} is {size} bytes, too short for a {header} header: the "
                              "download was interrupted; download it again")
    return size


# --- Weights -------------------------------------------------------------------------------

def check_weights(weights: Mapping[str, np.ndarray], args: ModelArgs, source: str,
                  config: str = "params.json") -> ModelArgs:
    """Check tensor names, shapes and dtypes against what `args` implies, before any math.

    Returns `args`, with tie_embeddings set if the checkpoint has no output.weight
    (Llama 3.2 reuses tok_embeddings as the output projection). A mapping with
    `specs` (name -> (shape, dtype): MergedShards) is checked from them, without producing any tensor."""
    specs = getattr(weights, "specs", None) or {name: (a.shape, a.dtype) for name, a in weights.items()}
    if OUTPUT.meta not in specs and not args.tie_embeddings:
        args = replace(args, tie_embeddings=True)
    expected = args.weight_shapes()
    missing = [name for name in expected if name not in specs]
    if missing:
        raise CheckpointError(f"{source} has no {few(missing)}, which {config} implies: "
                              "the checkpoint is incomplete or not a Llama 3 model")
    extra = [name for name in specs if name not in expected]
    if extra:
        raise CheckpointError(f"{source} has tensors {config} does not imply: {few(extra)}; "
                              f"the checkpoint and {config} disagree (e.g. on n_layers)")
    for name, shape in expected.items():
        actual, dtype = specs[name]
        if tuple(actual) != shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(actual)} but {config} implies "
                                  f"{shape} = {explain_shape(split_layer_name(name)[1])}: the checkpoint "
                                  f"and {config} disagree")
        if dtype not in _WEIGHT_DTYPES:
            raise CheckpointError(f"{source}: {name} has dtype {dtype}; npllama computes with "
                                  "bfloat16, float16 or float32 weights, convert it to one of them")
    return args


class LazyRows:
    """A stored [rows, cols] matrix that becomes a NumPy array only when it is used.

    `np.asarray(t)` produces all of it; `t[rows]` only those rows, so an embedding lookup
    decodes T rows of the table and the streamed matmul one tile at a time. `shape`, `dtype`
    and `size` describe the array it becomes, so code that checks or sizes weights never
    produces them. Nothing is cached: the model keeps its own float32 copy when it fits.
    Subclasses say how rows are made (`rows`): dequantized (GGUF), or reordered (HF's q/k).
    """

    ndim = 2

    def __init__(self, shape: tuple[int, int], dtype, name: str = ""):
        self.shape, self.dtype, self.name = tuple(shape), np.dtype(dtype), name

    def rows(self, index) -> np.ndarray:
        """The rows `index` (an int, slice or integer array) selects, as an array."""
        raise NotImplementedError

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes as stored (in the file's memory map), as an array's nbytes: subclasses that
        hold their stored form say what it takes."""
        return self.size * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.rows(slice(None))
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype) -> np.ndarray:
        return np.asarray(self, dtype=dtype)

    def __getitem__(self, index) -> np.ndarray:
        rows, rest = (index[0], index[1:]) if isinstance(index, tuple) else (index, ())
        if rows is Ellipsis or rows is None:
            return np.asarray(self)[index]
        out = self.rows(rows)
        if not rest:
            return out
        return out[rest] if out.ndim == 1 else out[(slice(None), *rest)]


class LazyPart(LazyRows):
    """Rows [lo, hi) (axis 0) or columns [lo, hi) (axis 1) of a LazyRows: one process's part of
    a quantized or reordered matrix under tensor parallelism, still produced only when used."""

    def __init__(self, whole: LazyRows, axis: int, lo: int, hi: int):
        shape = (hi - lo, whole.shape[1]) if axis == 0 else (whole.shape[0], hi - lo)
        super().__init__(shape, whole.dtype, whole.name)
        self.whole, self.axis, self.lo, self.hi = whole, axis, lo, hi

    @property
    def nbytes(self) -> int:
        return self.whole.nbytes * self.size // self.whole.size

    def rows(self, index) -> np.ndarray:
        if self.axis == 1:
            out = self.whole.rows(index)
            return out[..., self.lo:self.hi]
        if isinstance(index, slice):
            r = range(self.lo, self.hi)[index]
            return self.whole.rows(slice(r.start, r.stop, r.step))
        return self.whole.rows(np.arange(self.lo, self.hi)[index])


def part_of(w, axis: int, lo: int, hi: int):
    """Rows or columns [lo, hi) of a weight: a view of a (memory-mapped) array, which is
    contiguous, so zero-copy, for rows; a LazyPart of a LazyRows."""
    if isinstance(w, LazyRows):
        return LazyPart(w, axis, lo, hi)
    return w[lo:hi] if axis == 0 else w[:, lo:hi]

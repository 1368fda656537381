"""How weights reach the matmul: a float32 copy kept in RAM, or streamed from the memory map.

A decode step reads every weight once, so its speed is set by memory bandwidth. When the float32
copy of a model fits the RAM budget it is made once at load (`resident`). When it does not (an 8B
model is 32 GB in float32, 16 GB as stored bf16), each matrix stays a bf16 memory map and is
upcast in cache-sized tiles into a reused float32 buffer, each tile consumed by BLAS while it is
still in cache. Tiles start at fixed rows; each free core takes one contiguous run of them and
multiplies tile by tile with single-threaded BLAS, so the result is the same however many cores
were free (NumPy releases the GIL in both the upcast and the matmul).

Either way the forward passes are the same code: `linear(x, w)` computes `x @ w.T`, and a
`StreamedWeight` answers that expression by tiles. q|k|v and w1|w3 are stacked by rows in both
forms (`LayerWeights`), so the engine multiplies each group in one product.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from .config import LAYER_TENSORS, layer_name
from .threads import Threads

BF16 = np.dtype(ml_dtypes.bfloat16)
# float32 bytes of one tile: twice the 1 MB L2 of the machine this was tuned on (the shared L3
# still holds a tile between its upcast and its matmul); smaller tiles streamed measurably slower.
# benchmarks/bench.py's streamed_matvec probe measures this path (benchmarks/results/).
TILE_BYTES = 2 << 20


def to_float32(w: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy (bf16 -> f32 is exact: a bf16 is the top half of a float32)."""
    return np.ascontiguousarray(w, dtype=np.float32)


def round_to_bf16(w: np.ndarray) -> np.ndarray:
    """Round to the nearest bf16 value, kept in a float32 array (the notebook's bf16 precision)."""
    return w.astype(BF16).astype(np.float32)


def layer_float32_bytes(weights: Mapping[str, np.ndarray], i: int) -> int:
    """What a float32 copy of layer i's weights takes."""
    return sum(4 * weights[layer_name(t.meta, i)].size for t in LAYER_TENSORS)


def default_weights_budget(stored_bytes: int = 0, processes: int = 1) -> int:
    """Bytes one process's float32 copies of weights may take by default: half the machine's
    RAM, and no more than keeps them, with the weights as stored, within three quarters of it.

    The stored weights count because every one of them is in RAM too: those that stay mapped
    are read from the page cache on every token (read from disk instead, a token would take
    minutes), and those copied were paged in to be upcast. So an 8B model (16 GB of bf16) on a
    24 GB machine keeps about one layer in float32 (a peak RSS of about 17 GB), and on a 64 GB
    one all of them. `processes` ranks of one machine share it (tensor_parallel.py)."""
    ram = machine_ram()
    return max(0, min(ram // 2, 3 * ram // 4 - processes * stored_bytes)) // processes


def machine_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def stored_bytes(weights: Mapping[str, np.ndarray]) -> int:
    """What the weights take as stored: memory maps, quantized blocks."""
    return sum(w.nbytes for w in weights.values())


class TilePool:
    """Worker threads, as many as `threads` allows at most, each with its own float32 tile
    buffer, shared by all streamed weights; each product uses as many as are free right now."""

    def __init__(self, threads: Threads):
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads.max, thread_name_prefix="npllama-tiles")
        self.local = threading.local()

    def buffer(self, n_floats: int) -> np.ndarray:
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.size < n_floats:
            buf = self.local.buf = np.empty(n_floats, np.float32)
        return buf[:n_floats]

    def run(self, fn, tiles: list) -> None:
        """fn(tile) for every tile, the tiles split into as many contiguous runs as there are free
        cores. The pool's threads already fill the cores, so BLAS runs single-threaded meanwhile:
        with its own threads too, two tiles' matmuls fight for the cores and the stream slows
        several-fold."""
        n = min(self.threads.current, len(tiles))
        runs = [tiles[len(tiles) * i // n:len(tiles) * (i + 1) // n] for i in range(n)]
        with self.threads.blas_threads(1):
            for _ in self.executor.map(lambda run: [fn(tile) for tile in run], runs):
                pass


class Product:
    """A weight that computes `x @ w.T` itself (matmul_transposed), for the plain pass's
    layers.linear as for the engine: streamed by tiles, or split over processes."""

    __array_ufunc__ = None  # NumPy hands `x @ w.T` to __rmatmul__ instead of converting this object

    @property
    def T(self) -> Product:
        return self

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        return self.matmul_transposed(np.ascontiguousarray(x, dtype=np.float32))


class StreamedWeight(Product):
    """Stored [out, in] matrices, stacked by rows, used as `x @ w.T` without ever materialising
    them in float32. `parts` is one matrix, or several whose rows are read as one (q|k|v).

    Tiles are cut at fixed rows of each part, whatever the number of threads: each tile's
    product is one single-threaded BLAS call on the same rows, so the result does not depend on
    how many cores were free (threads only decide who computes which tiles)."""

    def __init__(self, parts, pool: TilePool, round_to_bf16: bool = False):
        self.parts = [parts] if hasattr(parts, "shape") else list(parts)
        self.pool, self.round_to_bf16 = pool, round_to_bf16
        n_in = self.parts[0].shape[1]
        self.shape, self.ndim = (sum(p.shape[0] for p in self.parts), n_in), 2
        self.tile_rows = max(1, TILE_BYTES // (4 * n_in))

    @property
    def nbytes(self) -> int:
        """What the matrix takes as stored."""
        return sum(p.nbytes for p in self.parts)

    def tiles(self) -> list[tuple[np.ndarray, int, int, int]]:
        """(part, first row, end row, first output column) of every tile."""
        out, offset = [], 0
        for part in self.parts:
            out += [(part, r, min(r + self.tile_rows, len(part)), offset + r)
                    for r in range(0, len(part), self.tile_rows)]
            offset += len(part)
        return out

    def matmul_transposed(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x @ w.T, into `out` if given."""
        n_in = self.shape[1]
        y = np.empty((x.shape[0], self.shape[0]), np.float32) if out is None else out  # [T, out]

        def product(tile) -> None:
            part, r0, r1, y0 = tile
            w = self.pool.buffer((r1 - r0) * n_in).reshape(r1 - r0, n_in)  # [r, in] float32
            scale = getattr(part, "scale", None)  # int16 rows, power-of-two row scales (formats/int16.py)
            # NumPy's own SIMD cast for int16; ml_dtypes' for bf16, exact, and faster than copying the
            # uint16s into the high halves of a zeroed float32 buffer (the upcast_into probe).
            np.copyto(w, part[r0:r1] if scale is None else part.q[r0:r1])
            if self.round_to_bf16:  # a float16 or float32 matrix in the bf16 flow
                np.copyto(w, w.astype(BF16))
            out = y[:, y0:y0 + r1 - r0]  # [T, r]
            np.matmul(x, w.T, out=out)  # [T, in] @ [in, r] -> [T, r]
            if scale is not None:
                out *= scale[r0:r1]  # times 2^k: exact

        self.pool.run(product, self.tiles())
        return y


@dataclass
class LayerWeights:
    """One layer's weights, ready for both forward passes. q|k|v and w1|w3 are stacked by rows,
    so that the runtime engine computes each group in one product; the plain pass reads wq, wk,
    wv, w1 and w3, which are the same weights (views of the stacked float32 copy, or streamed
    from the same stored parts), never a second copy."""

    attention_norm: np.ndarray  # [D]
    wq: np.ndarray  # [H*hd, D]
    wk: np.ndarray  # [KV*hd, D]
    wv: np.ndarray  # [KV*hd, D]
    wo: np.ndarray  # [D, H*hd]
    ffn_norm: np.ndarray  # [D]
    w1: np.ndarray  # [F, D]
    w2: np.ndarray  # [D, F]
    w3: np.ndarray  # [F, D]
    wqkv: np.ndarray  # [(H + 2 KV)*hd, D]
    w13: np.ndarray  # [2F, D]

    @classmethod
    def from_checkpoint(cls, weights: Mapping[str, np.ndarray], i: int, vector, stacked) -> LayerWeights:
        """Layer i's weights: `vector` makes each norm ready, `stacked` each matrix or group of
        matrices stacked by rows (q|k|v, w1|w3), as a float32 copy or streamed."""
        w = {t.key: weights[layer_name(t.meta, i)] for t in LAYER_TENSORS}
        qkv, ffn = [w["wq"], w["wk"], w["wv"]], [w["w1"], w["w3"]]
        wqkv, w13 = stacked(qkv), stacked(ffn)
        (wq, wk, wv), (w1, w3) = parts_of(wqkv, qkv), parts_of(w13, ffn)
        return cls(vector(w["attention_norm"]), wq, wk, wv, stacked([w["wo"]]), vector(w["ffn_norm"]),
                   w1, stacked([w["w2"]]), w3, wqkv, w13)


def stack_float32(parts: list, rounded: bool) -> np.ndarray:
    """The parts' rows, one below the other, in one float32 array (rounded to bf16 if asked)."""
    out = np.empty((sum(len(p) for p in parts), parts[0].shape[1]), np.float32)  # [rows, in]
    row = 0
    for part in parts:
        np.copyto(out[row:row + len(part)], part)  # an exact upcast of bf16 or float16
        row += len(part)
    if rounded:
        np.copyto(out, out.astype(BF16))
    return out


def parts_of(stacked, parts: list) -> list:
    """Each part of a stacked weight, as the same weights: views of the float32 copy, or streamed
    weights of the same stored matrices."""
    if isinstance(stacked, StreamedWeight):
        return [StreamedWeight(p, stacked.pool, stacked.round_to_bf16) for p in stacked.parts]
    cuts = np.cumsum([0] + [len(p) for p in parts])
    return [stacked[a:b] for a, b in zip(cuts, cuts[1:])]

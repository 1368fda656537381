"""How weights reach the matmul: a float32 copy kept in RAM, or streamed from the memory map.

A decode step reads every weight once, so its speed is set by memory bandwidth. When the float32
copy of a model fits the RAM budget it is made once at load (`resident`). When it does not (an 8B
model is 32 GB in float32, 16 GB as stored bf16), each matrix stays a bf16 memory map and is
upcast in cache-sized tiles into a reused float32 buffer, each tile consumed by BLAS while it is
still in cache. Each core takes one contiguous share of the rows and walks it tile by tile with
single-threaded BLAS: one task per core per matmul, so threads never hand work back and forth
(NumPy releases the GIL in both the upcast and the matmul).

Either way the forward pass is the same code: `linear(x, w)` computes `x @ w.T`, and a
`StreamedWeight` answers that expression by tiles.
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
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 8 << 30
    return max(0, min(ram // 2, 3 * ram // 4 - processes * stored_bytes)) // processes


def stored_bytes(weights: Mapping[str, np.ndarray]) -> int:
    """What the weights take as stored: memory maps, quantized blocks."""
    return sum(w.nbytes for w in weights.values())


class TilePool:
    """Worker threads, as many as `threads` allows at most, each with its own float32 tile
    buffer, shared by all weights; each product uses as many as are free right now."""

    def __init__(self, threads: Threads):
        self.threads = threads
        self.executor = ThreadPoolExecutor(threads.max, thread_name_prefix="npllama-tiles")
        self.local = threading.local()

    def buffer(self, n_floats: int) -> np.ndarray:
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.size < n_floats:
            buf = self.local.buf = np.empty(n_floats, np.float32)
        return buf[:n_floats]

    def run(self, fn, shares) -> None:
        """fn(share) for each share, in parallel. The pool's threads already fill the cores, so
        BLAS runs single-threaded meanwhile: with its own threads too, two tiles' matmuls fight
        for the cores and the stream slows several-fold."""
        with self.threads.blas_threads(1):
            for _ in self.executor.map(fn, shares):
                pass


class StreamedWeight:
    """A stored [out, in] matrix used as `x @ w.T` without ever materialising it in float32."""

    # Makes NumPy hand `x @ w.T` to __rmatmul__ instead of converting this object to an array.
    __array_ufunc__ = None

    def __init__(self, stored: np.ndarray, pool: TilePool):
        self.stored, self.pool = stored, pool
        self.shape, self.ndim = stored.shape, 2
        self.tile_rows = max(1, TILE_BYTES // (4 * stored.shape[1]))

    @property
    def T(self) -> _Transposed:
        return _Transposed(self)

    def matmul_transposed(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x @ w.T, into `out` if given."""
        n_out, n_in = self.shape
        y = np.empty((x.shape[0], n_out), np.float32) if out is None else out  # [T, out]

        def rows(share: range) -> None:
            for r0 in range(share.start, share.stop, self.tile_rows):
                r1 = min(r0 + self.tile_rows, share.stop)
                w = self.pool.buffer((r1 - r0) * n_in).reshape(r1 - r0, n_in)  # [r, in] float32
                # ml_dtypes' bf16 -> float32 cast: exact, and faster than copying the uint16s
                # into the high halves of a zeroed float32 buffer (the upcast_into probe).
                np.copyto(w, self.stored[r0:r1])
                np.matmul(x, w.T, out=y[:, r0:r1])  # [T, in] @ [in, r] -> [T, r]

        n = self.pool.threads.current
        cuts = [n_out * i // n for i in range(n + 1)]
        self.pool.run(rows, [range(a, b) for a, b in zip(cuts, cuts[1:]) if b > a])
        return y


class _Transposed:
    __array_ufunc__ = None

    def __init__(self, weight: StreamedWeight):
        self.weight = weight

    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        return self.weight.matmul_transposed(np.ascontiguousarray(x, dtype=np.float32))


@dataclass
class LayerWeights:
    attention_norm: np.ndarray  # [D]
    wq: np.ndarray  # [H*hd, D]
    wk: np.ndarray  # [KV*hd, D]
    wv: np.ndarray  # [KV*hd, D]
    wo: np.ndarray  # [D, H*hd]
    ffn_norm: np.ndarray  # [D]
    w1: np.ndarray  # [F, D]
    w2: np.ndarray  # [D, F]
    w3: np.ndarray  # [F, D]
    # Fast path (resident weights): q|k|v and w1|w3 stacked by rows, so one matmul computes all
    # of them; wq, wk, wv, w1, w3 are then views into these, costing no memory.
    wqkv: np.ndarray | None = None  # [(H + 2 KV)*hd, D]
    w13: np.ndarray | None = None  # [2F, D]

    def fuse(self) -> LayerWeights:
        wqkv = np.concatenate([self.wq, self.wk, self.wv])  # [(H + 2 KV)*hd, D]
        w13 = np.concatenate([self.w1, self.w3])  # [2F, D]
        q_end, k_end, f = len(self.wq), len(self.wq) + len(self.wk), len(self.w1)
        return LayerWeights(self.attention_norm, wqkv[:q_end], wqkv[q_end:k_end], wqkv[k_end:],
                            self.wo, self.ffn_norm, w13[:f], self.w2, w13[f:], wqkv, w13)

    @classmethod
    def from_checkpoint(cls, weights: Mapping[str, np.ndarray], i: int, matrix, vector) -> LayerWeights:
        """Layer i's weights, each made ready by `matrix` or `vector` (an upcast, a rounding, a stream)."""
        return cls(**{t.key: (matrix if len(t.shape) == 2 else vector)(weights[layer_name(t.meta, i)])
                      for t in LAYER_TENSORS})

"""Tensor parallelism: one model over N processes, each holding 1/N of every layer (Meta's split).

Meta runs its larger models this way (llama_models/llama3/model.py, with fairscale), and
npllama splits the weights the same way (config.LAYER_TENSORS' split axes):

- wq, wk, wv, w1, w3 are column-parallel: rank r holds its rows, i.e. its own query and
  key/value heads and its share of the SwiGLU width. Attention needs no communication: a rank's
  query heads attend over its own key/value heads, kept in its own KV cache.
- wo and w2 are row-parallel: rank r holds the columns that meet its heads (its share of the
  width), so `x @ wo.T` on a rank is a partial sum, and an all-reduce adds the N parts. These
  two all-reduces of a [T, D] vector are the only communication inside a layer.
- The embedding is vocabulary-parallel: each rank looks up the tokens in its rows of the table,
  zeros elsewhere, and an all-reduce puts every row together. The output is column-parallel over
  the vocabulary: each rank computes its logits and an all-gather joins them.

The forward pass does not change: the row-parallel matrices, the embedding and the output are
wrapped here in objects that answer `x @ w.T` (and the table lookup) with the collective
included, as resident_or_streamed.StreamedWeight answers it by tiles. A `Group` is the set of
processes: `Group()` is one process, whose wrappers are the weights themselves, and `MPIGroup`
runs over MPI (mpi4py), imported only when `mpiexec` started more than one process.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, fields, replace

import numpy as np

from .config import GLOBAL_TENSORS, LAYER_TENSORS, ModelArgs, layer_name
from .errors import ArgumentError, ConfigError
from .engine import linear
from .resident_or_streamed import Product

# The environment variables the MPI launchers set: MPICH's and Intel's hydra (PMI_SIZE), Open MPI,
# and Slurm's srun. One of them above 1 means mpiexec started this process as one of several.
LAUNCHER_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS")
INSTALL_HINT = ('install the MPI extra: pip install "npllama[mpi]" (mpi4py and an MPICH from PyPI, no '
                "system MPI needed)")


def launched_size() -> int:
    """How many processes the MPI launcher says it started (1 when not under mpiexec)."""
    for name in LAUNCHER_SIZE_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 1:
            return int(value)
    return 1


def share(n: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n things split N ways, sizes differing by at most 1."""
    return n * rank // size, n * (rank + 1) // size


class Group:
    """One process: every collective is the identity and every weight stays as it is. The
    forward pass and generation call these hooks, so that one code path serves both."""

    rank, size, node_rank, node_size = 0, 1, 0, 1

    def __init__(self):
        self.collective_seconds, self.collectives = 0.0, 0  # time spent waiting on the others

    def bcast(self, value):
        """Rank 0's `value`, on every rank (rank 0 reads input and samples; the others follow)."""
        return value

    def node_barrier(self) -> None:
        pass

    def row_parallel(self, w):
        return w

    def vocab_parallel(self, table, args: ModelArgs):
        return table

    def vocab_gathered(self, output):
        return output

    def abort(self, code: int) -> None:
        sys.exit(code)


class MPIGroup(Group):
    """The processes mpiexec started, over MPI. Rank 0 talks to the user."""

    def __init__(self, comm):
        super().__init__()
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.node_rank, self.node_size = self.node.Get_rank(), self.node.Get_size()
        _abort_on_uncaught_exception(self)

    def timed(self, collective, *args):
        t0 = time.perf_counter()
        result = collective(*args)
        self.collective_seconds += time.perf_counter() - t0
        self.collectives += 1
        return result

    def all_reduce(self, y: np.ndarray) -> np.ndarray:
        """y summed over the ranks, in place (float32, contiguous)."""
        self.timed(self.comm.Allreduce, self.MPI.IN_PLACE, y)
        return y

    def all_gather_columns(self, part: np.ndarray, out: np.ndarray, widths: list[int]) -> np.ndarray:
        """out [T, sum(widths)]: the ranks' [T, width] parts side by side, rank 0's first."""
        n_rows = part.shape[0]
        gathered = np.empty((out.shape[1], n_rows), np.float32)  # [V, T]: each rank's rows contiguous
        counts = [w * n_rows for w in widths]
        self.timed(self.comm.Allgatherv, np.ascontiguousarray(part.T), [gathered, counts])
        out[:] = gathered.T  # [T, V]
        return out

    def bcast(self, value):
        return self.timed(self.comm.bcast, value, 0)

    def node_barrier(self) -> None:
        self.node.Barrier()

    def row_parallel(self, w):
        return AllReduced(w, self)

    def vocab_parallel(self, table, args: RankArgs):
        return VocabParallelEmbedding(table, args.vocab_share, self)

    def vocab_gathered(self, output):
        return VocabGathered(output, self)

    def abort(self, code: int) -> None:
        """End every rank now: one that merely exited would leave the others waiting forever in
        their next collective."""
        sys.stdout.flush()
        sys.stderr.flush()
        # mpiexec forwards each rank's output through a pipe, and an abort kills its forwarders
        # too: on a busy machine the message just written could be lost. Give them a moment.
        time.sleep(0.5)
        self.comm.Abort(code)


def _abort_on_uncaught_exception(group: MPIGroup) -> None:
    """An exception nobody catches, on any rank, prints its traceback and ends every rank."""
    def hook(kind, value, traceback):
        sys.stderr = sys.__stderr__  # the command line quiets the other ranks' sys.stderr
        sys.__excepthook__(kind, value, traceback)
        print(f"npllama: rank {group.rank} of {group.size} failed; ending all ranks", file=sys.stderr)
        group.abort(1)
    sys.excepthook = hook


_WORLD: Group | None = None


def world(comm=None) -> Group:
    """The processes this one runs a model with: `comm` (an mpi4py communicator) if given; else
    every process mpiexec started, if it started more than one; else this process alone. mpi4py
    is imported only in the first two cases."""
    global _WORLD
    if comm is not None:
        return MPIGroup(comm) if comm.Get_size() > 1 else Group()
    if _WORLD is None:
        if launched_size() == 1:
            _WORLD = Group()
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise ArgumentError(f"this process was started by mpiexec as one of {launched_size()}, but "
                                    f"mpi4py is not installed: {INSTALL_HINT}") from None
            _WORLD = MPIGroup(MPI.COMM_WORLD) if MPI.COMM_WORLD.Get_size() > 1 else Group()
    return _WORLD


# --- One rank's share of the model ---------------------------------------------------------

@dataclass(frozen=True)
class RankArgs(ModelArgs):
    """ModelArgs of one rank's share (Meta's n_local_heads, n_local_kv_heads): its query and
    key/value heads and its SwiGLU width; everything else, head_dim and the vocabulary included,
    is the whole model's. The forward pass reads its sizes from here and so runs the share."""

    rank: int = 0
    size: int = 1
    whole: ModelArgs | None = None

    @property
    def head_dim(self) -> int:
        return self.whole.head_dim

    @property
    def vocab_share(self) -> tuple[int, int]:
        """[lo, hi) of the vocabulary this rank's rows of the embedding and output cover."""
        return share(self.vocab_size, self.rank, self.size)

    @property
    def hidden_share(self) -> tuple[int, int]:
        return share(self.whole.hidden_dim, self.rank, self.size)

    def slices(self) -> dict[str, tuple[int, int, int]]:
        """Meta's name of every weight -> (axis, lo, hi) of this rank's part; norms are whole."""
        heads = share(self.whole.n_heads, self.rank, self.size)
        kv_heads = kv_heads_of(self.whole.n_kv_heads, self.rank, self.size)
        hd = self.head_dim
        ranges = {"q_width": (heads[0] * hd, heads[1] * hd), "kv_width": (kv_heads[0] * hd, kv_heads[1] * hd),
                  "hidden_dim": self.hidden_share, "vocab_size": self.vocab_share}
        parts = {}
        for name, t in self._named_tensors():
            if t.split_axis is not None:
                parts[name] = (t.split_axis, *ranges[t.shape[t.split_axis]])
        return parts

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of this rank's part of every weight."""
        shapes = replace(self.whole, tie_embeddings=self.tie_embeddings).weight_shapes()
        for name, (axis, lo, hi) in self.slices().items():
            if name in shapes:
                shapes[name] = tuple(hi - lo if a == axis else d for a, d in enumerate(shapes[name]))
        return shapes

    def _named_tensors(self):
        for t in GLOBAL_TENSORS:
            yield t.meta, t
        for i in range(self.n_layers):
            for t in LAYER_TENSORS:
                yield layer_name(t.meta, i), t


def splits(n_heads: int, n_kv_heads: int, size: int) -> bool:
    """Whether `size` ranks can share the heads: each rank whole query heads, and whole key/value
    heads, its own (size divides n_kv_heads) or one it shares with size / n_kv_heads ranks."""
    return n_heads % size == 0 and (n_kv_heads % size == 0 or size % n_kv_heads == 0)


def kv_heads_of(n_kv_heads: int, rank: int, size: int) -> tuple[int, int]:
    """[lo, hi) of the key/value heads rank holds. With more ranks than key/value heads (Llama 3.1
    405B's 8 over 16 processes), Meta's split has none to give: each is then held, and its part of
    the KV cache kept, by the size / n_kv_heads ranks whose query heads use it (as vLLM does);
    Meta's own shard files never need this."""
    if size <= n_kv_heads:
        return share(n_kv_heads, rank, size)
    kv = rank * n_kv_heads // size
    return kv, kv + 1


def rank_args(args: ModelArgs, rank: int, size: int, source: str) -> RankArgs:
    """The share of rank `rank` of `size`, or a ConfigError if the model cannot be split that way
    (checked from the configuration alone, before any weight is read)."""
    if not splits(args.n_heads, args.n_kv_heads, size):
        ways = [n for n in range(1, args.n_heads + 1) if splits(args.n_heads, args.n_kv_heads, n)]
        raise ConfigError(f"{source}: {size} processes cannot share this model's {args.n_heads} query and "
                          f"{args.n_kv_heads} key/value heads; each rank must hold whole heads: run "
                          f"mpiexec -n with one of {', '.join(map(str, ways))}")
    if args.hidden_dim < size or args.vocab_size < size:
        raise ConfigError(f"{source}: a model this small cannot be split over {size} processes")
    values = {f.name: getattr(args, f.name) for f in fields(ModelArgs)}
    hidden_lo, hidden_hi = share(args.hidden_dim, rank, size)
    kv_lo, kv_hi = kv_heads_of(args.n_kv_heads, rank, size)
    values.update(n_heads=args.n_heads // size, n_kv_heads=kv_hi - kv_lo,
                  ffn_hidden_dim=hidden_hi - hidden_lo)
    return RankArgs(**values, rank=rank, size=size, whole=args)


# --- Weights that include their collective -------------------------------------------------

class AllReduced(Product):
    """A row-parallel matrix (Meta's RowParallelLinear): this rank's columns of wo or w2, [D, in/N].
    Its product with this rank's part of the input is a partial sum; the all-reduce adds them."""

    def __init__(self, w, group: MPIGroup):
        self.w, self.group, self.shape, self.ndim = w, group, w.shape, 2

    def matmul_transposed(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        return self.group.all_reduce(linear(x, self.w, out))  # [T, D]


class VocabParallelEmbedding:
    """This rank's rows [lo, hi) of the embedding table: a lookup fills the rows of the tokens in
    its range, zeros the others, and the all-reduce adds every rank's rows into the whole [T, D]."""

    def __init__(self, table, vocab: tuple[int, int], group: MPIGroup):
        (self.lo, self.hi), self.table, self.group = vocab, table, group

    def __getitem__(self, tokens: np.ndarray) -> np.ndarray:
        tokens = np.asarray(tokens)
        ours = (tokens >= self.lo) & (tokens < self.hi)  # [T]
        x = np.zeros((len(tokens), self.table.shape[1]), np.float32)  # [T, D]
        if ours.any():
            x[ours] = self.table[tokens[ours] - self.lo]
        return self.group.all_reduce(x)  # [T, D]


class VocabGathered(Product):
    """The output matrix as Meta's ColumnParallelLinear(gather_output=True): each rank computes
    the logits of its share of the vocabulary, and the all-gather joins them into [T, V]."""

    def __init__(self, w, group: MPIGroup):
        self.w, self.group = w, group
        self.widths = group.comm.allgather(w.shape[0])
        self.shape, self.ndim = (sum(self.widths), w.shape[1]), 2

    def matmul_transposed(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        part = linear(x, self.w)  # [T, V/N]
        out = np.empty((len(x), self.shape[0]), np.float32) if out is None else out  # [T, V]
        return self.group.all_gather_columns(part, out, self.widths)

"""One process's share of a checkpoint, for tensor parallelism (npllama/tensor_parallel.py).

Each rank opens only what its share needs, and checks that the model splits N ways from the
configuration alone, before it maps any weight:

- a Meta checkpoint saved in N model-parallel shards: rank r memory-maps consolidated.{r:02d}.pth,
  which already holds its part of every tensor, and nothing is merged. A machine needs only
  its own rank's file (and params.json, tokenizer.model);
- a Meta checkpoint in one file, a GGUF file or a Hugging Face directory: every rank maps the
  whole file and takes its rows or columns of each tensor (`Share`): views of the memory map,
  contiguous (so nothing is read until used) for the column-parallel matrices' rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

from ..config import LAYER_TENSORS, layer_name
from ..errors import CheckpointError, ModelNotFoundError
from ..tensor_parallel import Group, RankArgs, rank_args
from ..tokenizer import Tokenizer
from .gguf import read_gguf
from .hf import read_hf
from .meta import check_holds_its_elements, load_params, read_pth, read_tokenizer_model
from .shared import check_weights, part_of

WQ = layer_name(LAYER_TENSORS[0].meta, 0)  # the first layer's wq: how many shards a file is 1/N of


def read_share(path: Path, kind: str, group: Group) -> tuple[RankArgs, Mapping, Tokenizer]:
    """This rank's configuration, weights and tokenizer, from a checkpoint of format `kind`."""
    if kind == "meta":
        return read_meta_share(path, group)
    args, weights, tokenizer = (read_gguf if kind == "gguf" else read_hf)(path)  # maps, reads no weight
    local = rank_args(args, group.rank, group.size, str(path))
    return local, Share(weights, local), tokenizer


def read_meta_share(directory: Path, group: Group) -> tuple[RankArgs, Mapping, Tokenizer]:
    local = rank_args(load_params(directory / "params.json"), group.rank, group.size,
                      str(directory / "params.json"))
    own = directory / f"consolidated.{group.rank:02d}.pth"
    path = own if own.exists() else directory / "consolidated.00.pth"
    if not path.exists():
        raise ModelNotFoundError(f"{directory} has neither {own.name} (rank {group.rank}'s shard) nor "
                                 "consolidated.00.pth: copy the checkpoint's files here")
    tensors = read_pth(path)  # the zip directory and data.pkl only
    for name, a in tensors.items():
        check_holds_its_elements(a, name, path)
    n_shards = shards_in(tensors, local, path)
    if n_shards == group.size and path == own:
        local = check_weights(tensors, local, str(path))  # its own part of each tensor, as Meta split it
        weights = tensors
    elif n_shards == 1:
        whole = check_weights(tensors, local.whole, str(path))
        local = replace(local, tie_embeddings=whole.tie_embeddings)
        weights = Share(tensors, local)
    elif n_shards == group.size:
        raise ModelNotFoundError(f"{directory} lacks {own.name}: rank {group.rank} opens only its own shard of "
                                 f"the {n_shards}; copy that file to this machine")
    else:
        raise CheckpointError(f"{path} holds 1/{n_shards} of each split tensor: the checkpoint is saved in "
                              f"{n_shards} model-parallel shards, but mpiexec started {group.size} processes. "
                              f"Run mpiexec -n {n_shards} (rank r opens consolidated.r.pth alone), or one "
                              "process, which merges the shards")
    return local, weights, read_tokenizer_model(directory / "tokenizer.model")


def shards_in(tensors: Mapping, local: RankArgs, path: Path) -> int:
    """How many model-parallel shards the checkpoint `path` belongs to, from its first wq's rows."""
    if WQ not in tensors:
        raise CheckpointError(f"{path} has no {WQ}: it is not a Llama 3 checkpoint")
    rows, whole = tensors[WQ].shape[0], local.whole.q_width
    if rows == 0 or whole % rows:
        raise CheckpointError(f"{path}: {WQ} has {rows} rows, not n_heads * head_dim = {whole} or a "
                              "whole fraction of it; the file and params.json disagree")
    return whole // rows


class Share(Mapping):
    """Meta name -> this rank's part of the tensor (RankArgs.slices), taken when it is used."""

    def __init__(self, weights: Mapping, local: RankArgs):
        self.weights, self.parts = weights, local.slices()

    def __getitem__(self, name: str):
        w = self.weights[name]
        return part_of(w, *self.parts[name]) if name in self.parts else w

    def __contains__(self, name) -> bool:
        return name in self.weights

    def __iter__(self) -> Iterator[str]:
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

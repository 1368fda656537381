"""A quantized GGUF too big for RAM as float32: its weights dequantized once, to bf16, on disk.

Decoding Q4_K or Q6_K blocks costs several times more per weight than upcasting bf16, and a
streamed weight is decoded again on every token; so a quantized model whose float32 copy does
not fit the budget is dequantized once, at its first load, into a bf16 safetensors file in the
cache directory ($NPLLAMA_CACHE/dequantized, by default ~/.cache/npllama/dequantized), and then
runs the bf16 streamed path from that file's memory map. A later load maps the file again in
well under a second. The file is named after the GGUF's name, size and modification time, so
a changed model gets a new copy; it is written to a temporary name and renamed when complete,
so an interrupted write is never used. Rounding to bf16 keeps 8 significant bits of each
dequantized weight (the float32 value of a K-quant weight has more).

Costs: disk of 2 bytes per parameter (16 GB for an 8B model), and, at the first load, the time
to decode every block once (shown with a progress line).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import CheckpointError
from ..progress import Progress
from .default_model import cache_dir
from .gguf import QuantizedTensor
from .hf import read_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)
CHUNK_BYTES = 64 << 20  # bf16 bytes decoded at a time: bounds the float32 temporaries to 128 MB


def quantized(weights: Mapping) -> dict:
    """The weights that are quantized blocks, by Meta name."""
    return {name: w for name, w in weights.items() if isinstance(w, QuantizedTensor)}


def with_bf16_copy(path: Path, weights: Mapping, verbose: bool = False) -> dict:
    """`weights` with every quantized matrix replaced by its bf16 copy, made now if not cached."""
    blocks = quantized(weights)
    stat = path.stat()
    copy = cache_dir() / "dequantized" / f"{path.stem}-{stat.st_size}-{stat.st_mtime_ns}.bf16.safetensors"
    if not copy.exists():
        write_bf16_copy(copy, blocks, verbose)
    stored = read_safetensors(copy)
    for name, w in blocks.items():
        if name not in stored or stored[name].shape != w.shape or stored[name].dtype != BF16:
            raise CheckpointError(f"{copy} does not hold {name} as bf16 {w.shape}: the cached copy is "
                                  "damaged; delete it and load again")
    return {name: stored.get(name, w) if name in blocks else w for name, w in weights.items()}


def write_bf16_copy(copy: Path, blocks: dict, verbose: bool) -> None:
    """A safetensors file of the blocks' values as bf16, written chunk by chunk of rows so that
    no more than CHUNK_BYTES of a matrix is decoded at once."""
    names = sorted(blocks)
    header, offset = {}, 0
    for name in names:
        nbytes = 2 * blocks[name].size
        header[name] = {"dtype": "BF16", "shape": list(blocks[name].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors' own writer does
    copy.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(copy.parent).free
    if free < offset + len(raw) + (1 << 30):
        raise CheckpointError(f"the bf16 copy of this model needs {offset / 2**30:.1f} GB in {copy.parent}, "
                              f"which has {free / 2**30:.1f} GB free: free space there, set NPLLAMA_CACHE to "
                              "a larger disk, or raise --weights-budget-gb so the model fits in RAM")
    partial = copy.with_name(f".{copy.name}.{os.getpid()}.partial")
    with Progress(f"dequantizing {len(names)} quantized tensors to bf16, once", offset / 2**30, "GB",
                  enabled=verbose) as progress, open(partial, "wb") as f:
        try:
            f.write(struct.pack("<Q", len(raw)) + raw)
            done = 0
            for name in names:
                w = blocks[name]
                rows = max(1, CHUNK_BYTES // (2 * w.shape[1]))
                for r in range(0, w.shape[0], rows):
                    chunk = w[r:r + rows].astype(BF16)  # [rows, cols]: decode, then round
                    f.write(chunk.tobytes())
                    done += chunk.nbytes
                    progress.update(done / 2**30)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    os.replace(partial, copy)

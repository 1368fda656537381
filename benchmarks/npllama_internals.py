"""The parts of npllama the benchmark reaches into beyond its public API (npllama.load and a
model's forward and new_cache). They are imported here and nowhere else in benchmarks/, so that
when npllama moves one, this block is the one edit."""

import npllama.layers
import npllama.model
from npllama.config import ModelArgs, RopeScaling, load_params
from npllama.default_model import ensure_default_model
from npllama.weights import StreamedWeight, TilePool

# Each module calls its own name `linear`: the matmul breakdown wraps both with a timer.
LINEAR_CALLERS = (npllama.model, npllama.layers)

__all__ = ["LINEAR_CALLERS", "ModelArgs", "RopeScaling", "StreamedWeight", "TilePool",
           "ensure_default_model", "load_params"]

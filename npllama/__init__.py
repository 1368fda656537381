"""npllama: Llama 3 inference written with NumPy alone.

    import npllama
    model = npllama.load("Meta-Llama-3-8B/")          # or a Hugging Face dir, or a .gguf file
    ids = model.tokenizer.encode("the answer to ... is ")
    logits = model.forward(ids)                        # float32 [T, vocab_size]
    for t in model.generate(ids, 64, npllama.Sampler(temperature=0.7, top_p=0.9, seed=1)): ...
"""

from .config import ModelArgs, RopeScaling
from .errors import (CheckpointError, ConfigError, ModelNotFoundError, NpllamaError,
                     PromptTooLongError, TokenizerError, UnsafeCheckpointError)
from .generate import GenerationStats, Sampler
from .formats import load
from .model import TRACE_NAMES, KVCache, Llama

__version__ = "0.1.0"
__all__ = ["load", "Llama", "KVCache", "ModelArgs", "RopeScaling", "Sampler", "GenerationStats",
           "TRACE_NAMES", "NpllamaError", "ModelNotFoundError", "ConfigError", "CheckpointError",
           "UnsafeCheckpointError", "TokenizerError", "PromptTooLongError"]

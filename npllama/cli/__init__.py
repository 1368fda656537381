"""`python -m npllama`: run a Llama on the CPU, from the notebook's one-token story to a chat.

    python -m npllama                             the default model, the notebook's story
    python -m npllama -m DIR -p "..."             the prompt's tokens, the top-5 next tokens,
                                                  then a short continuation
    python -m npllama -m DIR -p "..." -n 64 --temperature 0.7 --top-p 0.9 -s 1
                                                  stream a continuation (llama-cli style)
    python -m npllama -m DIR --chat [--system S]  an interactive conversation
    python -m npllama explain [--plots DIR]       the forward pass step by step, as the notebook tells it
    python -m npllama compare                     every intermediate against the torch oracle
    python -m npllama perplexity -f FILE          perplexity over a text, KL divergence to a reference
    python -m npllama download                    fetch the default model, nothing else

Each subcommand is a module of this package with a `main(argv)`; what they share (the seed
prompt, the -m/-p/--dtype options, loading a model for a prompt) is in `common`.
"""

from __future__ import annotations

import importlib
import sys

from ..errors import NpllamaError

SUBCOMMANDS = ("explain", "compare", "perplexity", "download")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv[:1] and argv[0] in SUBCOMMANDS else "run"
    try:
        # Imported on demand: `compare` imports torch, `explain --plots` matplotlib.
        command = importlib.import_module(f".{name}", __name__)
        return command.main(argv[1:] if name != "run" else argv)
    except NpllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        return 0

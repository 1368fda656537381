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
    python -m npllama serve [--port 8080]         the OpenAI API over HTTP, continuous batching
    mpiexec -n N python -m npllama -m DIR ...     one model split over N processes (tensor_parallel.py)

Each subcommand is a module of this package with a `main(argv)`; what they share (the seed
prompt, the -m/-p/--dtype options, loading a model for a prompt) is in `common`.
"""

from __future__ import annotations

import importlib
import os
import sys
import time

from ..errors import ArgumentError, NpllamaError
from ..tensor_parallel import Group, world

SUBCOMMANDS = {  # each a module of this package with a `main(argv)`
    "explain": "the forward pass step by step, as the notebook tells it (--plots for its figures)",
    "compare": "every intermediate against the torch oracle",
    "perplexity": "perplexity over a text, and KL divergence to a reference (llama-perplexity's method)",
    "download": "fetch the default model, nothing else",
    "serve": "an OpenAI-compatible HTTP server, requests decoding together (needs npllama[serve])",
}
PARALLEL_SUBCOMMANDS = ("run", "perplexity")  # the rest run in one process


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    name = argv[0] if argv[:1] and argv[0] in SUBCOMMANDS else "run"
    group = Group()
    try:
        group = world()  # under mpiexec, the processes the model is split over
        if group.size > 1:
            talk_only_on_rank0(group, name)
        # Imported on demand: `compare` imports torch, `explain --plots` matplotlib.
        command = importlib.import_module(f".{name}", __name__)
        return command.main(argv[1:] if name != "run" else argv)
    except NpllamaError as e:
        if group.size == 1:
            print(f"error: {e}", file=sys.stderr)
            return 2
        # The same error often stops every rank: the others give rank 0 a second to say it alone.
        if group.rank > 0:
            time.sleep(1)
        print(f"error (rank {group.rank} of {group.size}): {e}", file=sys.__stderr__, flush=True)
        group.abort(2)  # never leave the other ranks waiting for this one
    except BrokenPipeError:  # output piped into `head`
        return 0


def talk_only_on_rank0(group: Group, name: str) -> None:
    if name not in PARALLEL_SUBCOMMANDS:
        raise ArgumentError(f"`{name}` runs in one process; run it without mpiexec (tensor parallelism "
                            f"serves {' and '.join(PARALLEL_SUBCOMMANDS)})")
    if group.rank > 0:  # rank 0 prints; errors still reach sys.__stderr__
        sys.stdout = sys.stderr = open(os.devnull, "w")

"""The command line: `npllama` (or `python -m npllama`), a subcommand or none.

    npllama                                       the default model, the notebook's story
    npllama -m DIR -p "..."                       the prompt's tokens, the top-5 next tokens,
                                                  then a short continuation
    npllama -m DIR -p "..." -n 64 --temp 0.7 --top-p 0.9 -s 1
                                                  stream a continuation (llama-cli style)
    npllama -m DIR -cnv [-sys S]                  an interactive conversation
    npllama explain [--plots DIR]                 the forward pass step by step, as the notebook tells it
    npllama compare                               every intermediate against the torch oracle
    npllama perplexity -f FILE                    perplexity over a text, KL divergence to a reference
    npllama serve [--port 8080]                   the OpenAI API over HTTP, continuous batching
    npllama download                              fetch the default model, nothing else
    mpiexec -n N npllama -m DIR ...               one model split over N processes (tensor_parallel.py)

Each subcommand is a module of this package with HELP (its line in `npllama --help`),
DESCRIPTION, `add_arguments(parser)` and `run(args)`; without a subcommand, `run.py`'s. What
they share (the seed prompt, the model options, loading a model for a prompt) is in `common`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from ..errors import ArgumentError, NpllamaError
from ..tensor_parallel import Group, world
from .common import HelpFormatter, new_parser

SUBCOMMANDS = ("explain", "compare", "perplexity", "serve", "download")  # modules of this package
PARALLEL_COMMANDS = ("run", "perplexity")  # the rest run in one process


def build_parser(prog: str = "npllama") -> argparse.ArgumentParser:
    """The main command's options at the top, one subparser per subcommand. The modules import
    nothing heavy at the top: torch (compare), matplotlib (explain --plots) and uvicorn (serve)
    are imported when their command runs."""
    from . import run
    parser = new_parser(prog, run.DESCRIPTION)
    parser.usage = "%(prog)s [options]\n   or: %(prog)s SUBCOMMAND [options]"
    run.add_arguments(parser)
    parser.set_defaults(command="run", run=run.run)
    subparsers = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND",
                                       help=f"each with its own options: {prog} SUBCOMMAND --help")
    for name in SUBCOMMANDS:
        module = importlib.import_module(f".{name}", __name__)
        sub = subparsers.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                                    formatter_class=HelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(command=name, run=module.run)
    return parser


def main(argv: list[str] | None = None, prog: str = "npllama") -> int:
    args = build_parser(prog).parse_args(sys.argv[1:] if argv is None else argv)
    group = Group()
    try:
        group = world()  # under mpiexec, the processes the model is split over
        if group.size > 1:
            talk_only_on_rank0(group, args.command)
        return args.run(args)
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
    if name not in PARALLEL_COMMANDS:
        raise ArgumentError(f"`{name}` runs in one process; run it without mpiexec (tensor parallelism "
                            f"serves the main command and perplexity)")
    if group.rank > 0:  # rank 0 prints; errors still reach sys.__stderr__
        sys.stdout = sys.stderr = open(os.devnull, "w")

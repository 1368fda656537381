"""`npllama perplexity -m MODEL -f FILE [-c N] [-b N] [-np N] [--kl-divergence]`: the model's
perplexity over a whole text, by llama-perplexity's method (npllama/perplexity.py), and with
--kl-divergence how far its next-token distributions are from a reference's: the torch oracle on
the same weights, another npllama configuration (--reference PATH, --reference-dtype,
--reference-weights), or the logits an earlier run saved (--kl-divergence-base FILE, as
llama-perplexity). Bounds given with --max-mean-kl, --max-kl, --min-top1 and --max-logit-error
make it exit 1 when crossed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import perplexity as P
from ..errors import ArgumentError
from ..formats import WEIGHT_FORMS
from ..model import DTYPES
from ..progress import Progress
from ..tensor_parallel import world
from .common import (add_batch_size_option, add_model_options, check_batch_size, check_model_options, load_model,
                     read_prompt_file)
from .compare import INSTALL_ORACLE

BOUNDS = {"max_mean_kl": ("mean_kl", "<="), "max_kl": ("max_kl", "<="), "min_top1": ("top1_agreement", ">="),
          "max_logit_error": ("max_logit_error", "<=")}


HELP = "perplexity over a text, and KL divergence to a reference (llama-perplexity's method)"
DESCRIPTION = " ".join(__doc__.split(": ", 1)[1].split())


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p, 512, "the window length n_ctx; the second half of each window is scored")
    add_batch_size_option(p, "positions a pass: -b 2048 -c 512 scores 4 windows a pass, -b 128 feeds each "
                          "window in 4 passes")
    p.add_argument("-f", "--file", type=Path, required=True, help="the text to score (UTF-8)")
    p.add_argument("-np", "--parallel", type=int, metavar="N", help="windows a pass, whatever -b says (default: "
                   "-b / -c, at least 1)")
    p.add_argument("--kl-divergence", action="store_true", help="also compare every scored token's "
                   "distribution with the reference's")
    p.add_argument("--kl-divergence-base", type=Path, metavar="FILE", help="as llama-perplexity: without "
                   "--kl-divergence, save this model's logits to FILE (an .npy of windows x scored positions x "
                   "vocabulary floats: 4 bytes each); with it, the reference is the logits saved in FILE")
    p.add_argument("--reference", help="the reference: 'oracle' (the torch oracle on this model's weights, "
                   "float32; needs torch), or a model path for another npllama configuration (default: oracle, "
                   "unless --kl-divergence-base)")
    p.add_argument("--reference-dtype", choices=DTYPES, default="float32",
                   help="compute precision of a --reference model")
    p.add_argument("--reference-weights", choices=WEIGHT_FORMS, default="exact",
                   help="how a --reference model's streamed matrices are read (--weights); with the same path, "
                   "--weights int16 against the default measures what the int16 copy costs")
    p.add_argument("--max-mean-kl", type=float, help="fail if the mean KL divergence is above this")
    p.add_argument("--max-kl", type=float, help="fail if any token's KL divergence is above this")
    p.add_argument("--min-top1", type=float, help="fail if the two agree on the most likely token less "
                   "often than this (percent)")
    p.add_argument("--max-logit-error", type=float, help="fail if any logit differs by more than this")


def run(args) -> int:
    bounds = {key: getattr(args, key) for key in BOUNDS if getattr(args, key) is not None}
    if bounds and not args.kl_divergence:
        raise ArgumentError(f"--{next(iter(bounds)).replace('_', '-')} bounds a KL divergence: add --kl-divergence")
    check_batch_size(args)
    if args.parallel is not None and args.parallel < 1:
        raise ArgumentError(f"-np (--parallel) must be at least 1, got {args.parallel}")
    if args.reference and args.kl_divergence_base:
        raise ArgumentError("give the reference with --reference or --kl-divergence-base, not both")
    if args.reference and not args.kl_divergence:
        raise ArgumentError("--reference is what --kl-divergence compares with: add --kl-divergence")
    args.reference = args.reference or (None if args.kl_divergence_base else "oracle")
    base = args.kl_divergence_base
    if base and args.kl_divergence and not base.is_file():
        raise ArgumentError(f"--kl-divergence-base {base} does not exist: make it first with the reference model, "
                            f"`perplexity -m REFERENCE -f {args.file} --kl-divergence-base {base}`")
    if base and not args.kl_divergence and not base.parent.is_dir():
        raise ArgumentError(f"--kl-divergence-base {base}: the directory {base.parent} does not exist")
    if args.kl_divergence and args.reference == "oracle" and world().size > 1:
        raise ArgumentError("--reference oracle runs the torch oracle on the whole model, in one process: "
                            "run it without mpiexec, or give --reference another npllama model")
    check_model_options(args)
    text = read_prompt_file(args.file)
    if not text.strip():
        raise ArgumentError(f"--file {args.file} is empty: there is nothing to score")
    model = load_model(args, max_seq_len=None)  # the model's own context, which a window must fit
    if args.max_seq_len > model.args.max_seq_len:
        raise ArgumentError(f"--ctx-size {args.max_seq_len} is beyond the model's context of "
                            f"{model.args.max_seq_len} positions")
    tok = model.tokenizer
    chunks = P.windows(tok.encode(text), args.max_seq_len, tok.bos_id if tok.add_bos else None)
    parallel = args.parallel or max(1, args.batch_size // args.max_seq_len)
    logits = P.model_logits(model, parallel, args.batch_size if args.batch_size < args.max_seq_len else None)
    reference = reference_logits(args, model, chunks, parallel) if args.kl_divergence else None
    if args.kl_divergence_base and not args.kl_divergence:
        logits = P.saving_logits(logits, args.kl_divergence_base, chunks, model.args.vocab_size)
    print(f"perplexity: {len(chunks)} windows of {args.max_seq_len} tokens, {args.max_seq_len // 2 - 1} scored in each")
    # llama-perplexity's running estimates, "[1]17.7379,[2]12.6068,...", as they come when the output
    # is a log; on a terminal the progress bar shows them live instead, and the line comes at the end.
    live, estimates, totals = not (sys.stdout.isatty() and sys.stderr.isatty()), [], None
    with Progress("perplexity", len(chunks), "windows") as progress:
        for done, totals in enumerate(P.evaluate(chunks, logits, reference)):
            ppl, err = totals.perplexity()
            windows_done = min((done + 1) * parallel, len(chunks))
            estimates.append(f"[{windows_done}]{ppl:.4f},")
            print(estimates[-1] if live else "", end="", flush=True)
            progress.update(windows_done, f"PPL {ppl:.4f} +/- {err:.4f}")
        print("" if live else "".join(estimates), flush=True)
    ppl, err = totals.perplexity()
    print(f"Final estimate: PPL = {ppl:.4f} +/- {err:.5f} ({totals.count} tokens)")
    if args.kl_divergence_base and not args.kl_divergence:
        print(f"saved the logits to {args.kl_divergence_base} ({args.kl_divergence_base.stat().st_size / 2**20:.0f} MB)")
    if reference is None:
        return 0
    return report_kl(totals.kl_summary(), bounds)


def reference_logits(args, model, chunks, parallel: int):
    if args.reference is None:
        return P.base_logits(args.kl_divergence_base, chunks, model.args.vocab_size)
    if args.reference != "oracle":
        other = load_model(args, args.reference, dtype=args.reference_dtype, max_seq_len=None,
                           weights=args.reference_weights)
        return P.model_logits(other, parallel, args.batch_size if args.batch_size < args.max_seq_len else None)
    try:
        import torch

        from oracle.reference import Oracle
    except ImportError as e:
        raise ArgumentError(f"{INSTALL_ORACLE}\n({e}); or give --reference another model") from None
    return P.oracle_logits(Oracle.of(model, dtype=torch.float32, max_seq_len=args.max_seq_len))


def report_kl(kl: dict, bounds: dict) -> int:
    print(f"KL divergence (nats) over {kl['tokens']} tokens: mean {kl['mean_kl']:.6g}, max {kl['max_kl']:.6g}, "
          f"99.9th percentile {kl['p99.9_kl']:.6g}; same top token {kl['top1_agreement']:.2f}%; "
          f"largest logit difference {kl['max_logit_error']:.6g}")
    failed = [f"{key} {kl[key]:.6g} is not {op} {bounds[name]:g} (--{name.replace('_', '-')})"
              for name, (key, op) in BOUNDS.items() if name in bounds
              and not (kl[key] <= bounds[name] if op == "<=" else kl[key] >= bounds[name])]
    if failed:
        print("FAIL: " + "; ".join(failed))
        return 1
    if bounds:
        print("OK: within every bound given")
    return 0

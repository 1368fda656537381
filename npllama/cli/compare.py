"""`python -m npllama compare`: npllama against the torch oracle, every intermediate, one table.

Both run the same prompt through the same weights (the oracle gets npllama's own weights,
converted to torch tensors, so any checkpoint npllama loads can be checked). Each row of the
table is one named intermediate of TRACE_NAMES, layer by layer: the largest absolute and
relative difference, the fraction of bit-identical elements, and the bound it must stay under.
Exit status: 0 if every row is within its bound, 1 if any is not (they are named), 2 if the
oracle cannot run (no torch). torch is imported here only, never by the rest of npllama.

End to end, each difference is carried into every later layer; `--per-layer` instead starts each
oracle layer from npllama's own input to it, which isolates each layer's math. float32 passes
either way; the bf16 flow of a deep model passes only per layer (see Oracle.forward).
"""

from __future__ import annotations

import argparse
import sys

from .common import add_one_prompt_options, load_for_prompt

MAX_NAMED = 12  # failing steps named in the summary line; the table marks every one
INSTALL_ORACLE = ('this runs the torch oracle, which needs torch. Install the CPU build, then the '
                  'oracle extra:\n'
                  '    pip install torch        # any torch >= 2.1; the CPU build is enough\n'
                  '    pip install "npllama[oracle]"')


HELP = "every intermediate against the torch oracle (needs torch)"
DESCRIPTION = ("Run npllama and the torch oracle on the same prompt and compare every named intermediate (in "
               "float32, or in the bfloat16 flow on both sides); exit 1 if any exceeds its bound.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_one_prompt_options(p)
    p.add_argument("--per-layer", action="store_true",
                   help="start each oracle layer from npllama's own input to that layer, so rounding "
                        "differences do not compound over the layers (bf16 on deep models needs this)")


def run(args) -> int:
    try:
        import torch

        from oracle.compare import BFLOAT16_BOUND, FLOAT32_BOUND, compare_traces, format_table
        from oracle.reference import Oracle
    except ImportError as e:
        print(f"error: {INSTALL_ORACLE}\n({e})", file=sys.stderr)
        return 2
    model, tokens = load_for_prompt(args)
    bf16 = args.dtype == "bfloat16"
    ours, theirs = {}, {}
    model.forward(tokens, trace=ours)
    oracle = Oracle.of(model, dtype=torch.bfloat16 if bf16 else torch.float32, max_seq_len=len(tokens))
    oracle.forward(tokens, trace=theirs, inputs=ours if args.per_layer else None)
    rows = compare_traces(ours, theirs, BFLOAT16_BOUND if bf16 else FLOAT32_BOUND)

    mode = "each layer from npllama's input to it" if args.per_layer else "end to end"
    print(f"compare: {model.source}, {args.dtype}, {len(tokens)} tokens, {mode}: npllama vs the torch "
          "oracle (max rel diff = max|npllama - oracle| / max|oracle| per step)\n")
    print(format_table(rows))
    bad = [r.name for r in rows if not r.ok]
    if bad:
        shown = ", ".join(bad[:MAX_NAMED]) + (f" and {len(bad) - MAX_NAMED} more (NO above)"
                                             if len(bad) > MAX_NAMED else "")
        print(f"\nFAIL: {len(bad)} of {len(rows)} steps exceed their bound: {shown}")
        if bf16 and not args.per_layer:
            print("(in the bf16 flow one-ulp rounding differences compound from layer to layer; "
                  "--per-layer checks each layer from the same input)")
        return 1
    print(f"\nOK: all {len(rows)} steps within their bound")
    return 0

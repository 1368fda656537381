"""The main command, `python -m npllama [-m MODEL] [-p PROMPT] ...`: the notebook's story (the
prompt's tokens, the top-5 next tokens, a short continuation), plain streaming with -n, or a chat."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..chat import chat_format_for
from ..config import check_fits, fits
from ..errors import ArgumentError
from ..generate import GenerationStats, Sampler, next_token_probs, top_tokens
from ..speculative import DraftModel
from ..tokenizer import StreamDecoder
from .common import (THE_PROMPT, add_batch_size_option, add_model_options, add_sampling_options,
                     add_speculation_options, check_batch_size, check_model_options, check_speculation_options,
                     from_rank0, load_draft, load_model, read_prompt_file, sampler_of)

STORY_TOKENS = 32  # continuation length of the story mode

DESCRIPTION = (
    "Llama 3 inference in NumPy. Without -n, shows the notebook's story: the prompt's tokens, the model's "
    "top-5 next tokens, then a short continuation. With -n, streams a continuation; with -cnv, chats. "
    "Sampling is greedy unless --temp is given (llama.cpp samples at --temp 0.8 by default).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_options(p, 2048, "positions a prompt and its continuation may use")
    add_batch_size_option(p, "prompt tokens fed a pass")
    p.add_argument("-p", "--prompt", help=f"prompt text (default: {THE_PROMPT!r}); with --chat, the one "
                   "message to answer (default: chat interactively)")
    p.add_argument("-f", "--file", type=Path, help="read the prompt from this file")
    p.add_argument("-n", "--n-predict", "--max-new-tokens", dest="max_new_tokens", type=int, metavar="N",
                   help="tokens to generate, -1: until a stop token or the context's end; giving it switches from "
                   f"the story to plain streaming (story: {STORY_TOKENS}, chat: 512)")
    add_sampling_options(p)
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt that does not fit "
                   "in the context (-c) instead of stopping with an error")
    p.add_argument("-cnv", "--conversation", "--chat", dest="chat", action="store_true",
                   help="chat in the model's own format (Llama 3 headers or ChatML); with -p, answer that one "
                   "message and exit")
    p.add_argument("-sys", "--system-prompt", "--system", dest="system", help="system message for --chat")
    p.add_argument("--batch", action="store_true", help="each line of -f (or of -p) is a prompt of its own: "
                   "all are continued together, and each completion is printed under its number")
    add_speculation_options(p)


def run(args) -> int:
    # Everything the flags can get wrong is checked before the model loads, which may take a while.
    check_args(args)
    sampler = sampler_of(args)
    prompt = read_prompt_file(args.file) if args.file else args.prompt
    model = load_model(args)
    draft = load_draft(args, model)
    speculation = {"lookup": args.lookup, "draft": draft, "draft_max": args.draft_max, "batch_size": args.batch_size}
    if args.chat:
        return chat(model, sampler, args, prompt, speculation)
    prompt = THE_PROMPT if prompt is None else prompt
    if args.batch:
        return run_batch(model, sampler, args, prompt, speculation)
    tokens = model.tokenizer.encode(prompt, bos=None)
    if not tokens:
        raise ArgumentError("the prompt is empty and this model's tokenizer adds no begin-of-text "
                            "token, so there is nothing to continue: give a prompt with -p or -f")
    if args.truncate:
        tokens = fit_prompt(tokens, model.context_length(), model.tokenizer.bos_id)
    check_fits(0, len(tokens), model.context_length(), generating=True)  # before the story, not after
    if args.max_new_tokens is None:
        show_story(model, tokens)
        n_new = STORY_TOKENS
        print("\ncontinuation:", flush=True)
    else:
        n_new = until_full(args.max_new_tokens, model)
    print(prompt, end="", flush=True)
    stats = GenerationStats()
    stream(model, model.generate(tokens, n_new, sampler, stats=stats, **speculation), stats)
    return 0


def run_batch(model, sampler: Sampler, args, text: str, speculation: dict) -> int:
    """Every non-empty line a prompt; the completions, labelled, once all are done."""
    prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ArgumentError("--batch found no prompt: give one per line with -f, or with -p")
    rows = [model.tokenizer.encode(p, bos=None) for p in prompts]
    if not all(rows):
        raise ArgumentError("a prompt is empty and this model's tokenizer adds no begin-of-text token")
    start = time.perf_counter()
    stats = GenerationStats()
    done = model.generate_batch(rows, STORY_TOKENS if args.max_new_tokens is None else until_full(args.max_new_tokens, model),
                                sampler, stats=stats, **speculation)
    seconds = time.perf_counter() - start
    stops = model.tokenizer.stop_ids
    for i, (prompt, completion) in enumerate(zip(prompts, done), 1):
        text = model.tokenizer.decode([t for t in completion.tokens if t not in stops])
        print(f"[{i}] {prompt}{text}\n    ({completion.new_tokens} tokens, stopped: {completion.stop_reason})")
    total = stats.new_tokens
    print(f"[{len(prompts)} prompts, {total} new tokens in {seconds:.1f}s: {total / seconds:.1f} tok/s in all"
          f"{stats.speculation()}]", file=sys.stderr)
    return 0


def check_args(args) -> None:
    if args.prompt is not None and args.file is not None:
        raise ArgumentError("give the prompt with -p or -f, not both")
    if args.chat and args.batch:
        raise ArgumentError("--chat and --batch do not go together: a chat is one conversation; give "
                            "--batch prompts to continue each, or --chat to talk")
    if args.max_new_tokens is not None and args.max_new_tokens < -2:
        raise ArgumentError(f"-n (--n-predict) must be >= 0, or -1 / -2 (until the context's end), got "
                            f"{args.max_new_tokens}")
    check_model_options(args)
    check_batch_size(args)
    check_speculation_options(args)


def until_full(n: int, model) -> int:
    """-n as llama.cpp reads it: -1 (and -2) is every position the context has left; a row stops
    there anyway."""
    return model.context_length() if n < 0 else n


def fit_prompt(tokens: list[int], context: int, bos_id: int | None) -> list[int]:
    """--truncate: a prompt that does not fit keeps its end, in half the context (the other half
    is left to generate), and its first token if that is the tokenizer's BOS (a tokenizer without
    one, SmolLM2's, has no token to keep: its first token is text like any other)."""
    if fits(0, len(tokens), context, generating=True):
        return tokens
    keep = (context - 1) // 2 or 1
    print(f"(prompt truncated from {len(tokens)} to {keep} tokens to fit --ctx-size {context})",
          file=sys.stderr)
    head = tokens[:1] if bos_id is not None and tokens[0] == bos_id and keep > 1 else []
    return head + tokens[len(tokens) - (keep - len(head)):]


def show_story(model, tokens: list[int]) -> None:
    """The notebook's steps: the tokens, then what the model predicts right after them."""
    tok = model.tokenizer
    print(f"prompt: {len(tokens)} tokens")
    for t in tokens:
        print(f"  {t:>7}  {tok.piece(t)!r}")
    probs = next_token_probs(model.forward(tokens, last_only=True)[-1])  # [V]
    print("next token, top 5:")
    for t in top_tokens(probs, 5):
        print(f"  {t:>7}  {tok.piece(int(t))!r:<16} p = {probs[t]:.4f}")


def stream(model, tokens, stats) -> list[int]:
    """Print tokens as they come, each character once its UTF-8 bytes are complete; Ctrl-C stops
    generation and keeps what was printed."""
    decoder = StreamDecoder(model.tokenizer, skip_special=True)
    out = []
    try:
        for t in tokens:
            out.append(t)
            print(decoder.push(t), end="", flush=True)
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
    print(decoder.flush(), flush=True)
    print(f"[{stats.summary()}]", file=sys.stderr)
    return out


def chat(model, sampler, args, one_shot: str | None, speculation: dict) -> int:
    fmt = chat_format_for(model.tokenizer)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    cache, cached = model.new_cache(), []  # `cached`: the tokens whose keys/values are in the cache
    if speculation["draft"] is not None:  # one for the whole conversation: it holds the earlier turns too
        speculation = {**speculation, "draft": DraftModel(model, speculation["draft"], 1, model.context_length(cache),
                                                           speculation["draft_max"])}
    n_new = 512 if args.max_new_tokens is None else until_full(args.max_new_tokens, model)
    interactive = one_shot is None
    if interactive:
        print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        if interactive:
            text = from_rank0(read_message)
            if text is None or not text.strip():
                return 0
        else:
            text = one_shot
        messages.append({"role": "user", "content": text})
        tokens = fmt.encode_dialog(messages)
        # Reuse the cache for the shared prefix of this dialog and the last one; feed only the rest.
        start = common_prefix(cached, tokens)
        stats = GenerationStats()
        reply = stream(model, model.generate(tokens[start:], n_new, sampler, stop_ids=fmt.stop_ids, stats=stats,
                                             cache=cache, start_pos=start, **speculation), stats)
        cached = tokens + reply[:max(stats.cached_positions - len(tokens), 0)]
        text = model.tokenizer.decode([t for t in reply if t not in fmt.stop_ids])
        messages.append({"role": "assistant", "content": text})
        if not interactive:
            return 0


def read_message() -> str | None:
    """A line from the user, or None at end of input (Ctrl-D) or on Ctrl-C."""
    try:
        return input("> ")
    except (EOFError, KeyboardInterrupt):
        print(file=sys.stderr)
        return None


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, len(b) - 1)  # always feed at least one token, so there are logits to sample from

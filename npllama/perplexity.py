"""Perplexity and KL divergence over a whole text, by llama.cpp's llama-perplexity method.

The text is tokenized once (with the tokenizer's BOS, if it has one) and cut into non-overlapping
windows of n_ctx tokens; the tail too short for a window is left out, and llama-perplexity asks
for at least two windows. Each window runs from position 0 in a context of its own, its first
token replaced by BOS when the tokenizer adds one, and only its second half is scored: the logits
at positions n_ctx/2 .. n_ctx-2 predict tokens n_ctx/2+1 .. n_ctx-1, so every scored token has at
least half a window before it. Perplexity is exp(mean NLL) over every scored token; its error is
ppl * the standard error of the mean NLL, as llama-perplexity prints it.

KL divergence compares the model with a reference (the torch oracle, or another npllama
configuration) on the same windows and positions: KL(P_reference || P_model) per token, with its
mean, maximum and 99.9th percentile, how often the two agree on the most likely token, and the
largest difference between the two's logits at any token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ArgumentError
from .generate import log_softmax


def windows(tokens: list[int], n_ctx: int, bos_id: int | None) -> np.ndarray:
    """The text's tokens as non-overlapping windows [n, n_ctx], each starting with BOS if given."""
    if n_ctx < 4:
        raise ArgumentError(f"--ctx-size is {n_ctx}; a window needs at least 4 tokens (half of it is scored)")
    if len(tokens) < 2 * n_ctx:
        raise ArgumentError(f"the text is {len(tokens)} tokens long; perplexity with --ctx-size {n_ctx} needs "
                            f"at least {2 * n_ctx} (two windows, as llama-perplexity asks): give a longer text "
                            "or a smaller --ctx-size")
    n = len(tokens) // n_ctx
    out = np.array(tokens[:n * n_ctx], np.int64).reshape(n, n_ctx)  # [n, n_ctx]
    if bos_id is not None:
        out[:, 0] = bos_id
    return out


def scored(n_ctx: int) -> slice:
    """Positions whose logits are scored: each predicts the token after it."""
    return slice(n_ctx // 2, n_ctx - 1)


def model_logits(model, parallel: int, batch_size: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """windows [B, n_ctx] -> logits at the scored positions [B, n_ctx/2 - 1, V], `parallel` windows
    a pass (the rows of one batched forward share every weight read), each window's positions
    fed batch_size at a time (llama.cpp's -b; default: the whole window in one pass)."""
    def run(chunk: np.ndarray) -> np.ndarray:
        n_rows, n_ctx = chunk.shape
        cache = model.new_cache(n_ctx, rows=n_rows)
        return model.forward_rows(chunk, np.full(n_rows, n_ctx), np.zeros(n_rows, np.int64), cache, scored(n_ctx),
                                  batch_size=batch_size)
    run.batch = parallel
    return run


def saving_logits(logits_of, path: Path, chunks: np.ndarray, vocab_size: int):
    """logits_of, whose every pass is also written to `path` (llama-perplexity's
    --kl-divergence-base): an .npy [windows, scored, V + 1] of float32, the last column the token
    each scored position predicts, so that a base made from another text is refused when read.
    Written under a temporary name, renamed when whole: an interrupted run leaves no half file."""
    n, first = len(chunks), scored(chunks.shape[1]).start
    part = path.with_name(path.name + ".part")
    try:
        out = np.lib.format.open_memmap(part, "w+", np.float32, (n, chunks.shape[1] - 1 - first, vocab_size + 1))
    except OSError as e:
        raise ArgumentError(f"cannot write --kl-divergence-base {path}: {e.strerror}") from None
    done = 0

    def run(chunk: np.ndarray) -> np.ndarray:
        nonlocal done
        logits = logits_of(chunk)  # [B, n, V]
        out[done:done + len(chunk), :, :vocab_size] = logits
        out[done:done + len(chunk), :, vocab_size] = chunk[:, first + 1:]
        done += len(chunk)
        if done == n:
            out.flush()
            part.replace(path)
        return logits
    run.batch = logits_of.batch
    return run


def base_logits(path: Path, chunks: np.ndarray, vocab_size: int):
    """The logits a run with --kl-divergence-base saved in `path`, memory-mapped, as a reference
    of the same windows in the same order."""
    first = scored(chunks.shape[1]).start
    shape = (len(chunks), chunks.shape[1] - 1 - first, vocab_size + 1)
    try:
        base = np.load(path, mmap_mode="r", allow_pickle=False)  # never a pickle: the file is data
    except (OSError, ValueError) as e:
        raise ArgumentError(f"--kl-divergence-base {path} cannot be read as an .npy array ({e}): make it with "
                            "`perplexity --kl-divergence-base FILE` on the reference model") from None
    if base.dtype != np.float32 or base.shape != shape:
        raise ArgumentError(f"--kl-divergence-base {path} holds {base.dtype} {base.shape}, where this text, "
                            f"--ctx-size and vocabulary need float32 {shape}: it was made from another text, "
                            "context or model; make it again with the same -f and -c")
    done = 0

    def run(chunk: np.ndarray) -> np.ndarray:
        nonlocal done
        saved = base[done:done + len(chunk)]  # [B, n, V + 1]
        if not np.array_equal(saved[:, :, vocab_size], chunk[:, first + 1:]):
            raise ArgumentError(f"--kl-divergence-base {path} was made from another text (window {done + 1} "
                                "differs): make it again with the same -f and -c")
        done += len(chunk)
        return np.asarray(saved[:, :, :vocab_size])  # [B, n, V]
    run.batch = 1
    return run


def oracle_logits(oracle) -> Callable[[np.ndarray], np.ndarray]:
    """The torch oracle as a reference: one window at a time, from position 0."""
    def run(chunk: np.ndarray) -> np.ndarray:
        out = []
        for window in chunk:
            oracle.reset()
            out.append(oracle.forward(window)[scored(len(window))])
        return np.stack(out)
    run.batch = 1
    return run


@dataclass
class Running:
    """Scored tokens so far: NLL for perplexity, and against a reference the KL statistics."""

    nll: list[np.ndarray] = field(default_factory=list)
    kl: list[np.ndarray] = field(default_factory=list)
    same_top1: int = 0
    max_logit_error: float = 0.0

    @property
    def count(self) -> int:
        return sum(len(x) for x in self.nll)

    def perplexity(self) -> tuple[float, float]:
        """exp(mean NLL) and its standard error (llama-perplexity's formula)."""
        nll = np.concatenate(self.nll)
        mean = float(nll.mean())
        var = float((nll * nll).mean()) - mean * mean
        err = math.sqrt(var / (len(nll) - 1)) if len(nll) > 1 and var > 0 else 0.0
        return math.exp(mean), math.exp(mean) * err

    def kl_summary(self) -> dict:
        kl = np.concatenate(self.kl)
        return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()), "p99.9_kl": float(np.percentile(kl, 99.9)),
                "top1_agreement": 100.0 * self.same_top1 / len(kl), "max_logit_error": self.max_logit_error,
                "tokens": len(kl)}


def evaluate(chunks: np.ndarray, logits_of, reference_of=None) -> Iterator[Running]:
    """Score every window, `logits_of.batch` at a time; yields the running totals after each pass."""
    totals, first = Running(), scored(chunks.shape[1]).start
    for b in range(0, len(chunks), logits_of.batch):
        chunk = chunks[b:b + logits_of.batch]
        targets = chunk[:, first + 1:]  # [B, n]: the token each scored position predicts
        logits = logits_of(chunk)  # [B, n, V]
        logp = log_softmax(logits)  # [B, n, V]
        totals.nll.append(-np.take_along_axis(logp, targets[..., None], -1).reshape(-1))
        if reference_of is not None:
            ref = np.concatenate([reference_of(chunk[i:i + reference_of.batch])
                                  for i in range(0, len(chunk), reference_of.batch)])  # [B, n, V]
            if ref.shape[-1] != logits.shape[-1]:
                raise ArgumentError(f"the reference has a vocabulary of {ref.shape[-1]} tokens and the model "
                                    f"{logits.shape[-1]}: KL divergence compares two versions of one model")
            ref_logp = log_softmax(ref)  # [B, n, V]
            totals.kl.append((np.exp(ref_logp) * (ref_logp - logp)).sum(-1).reshape(-1))
            totals.same_top1 += int((ref.argmax(-1) == logits.argmax(-1)).sum())
            totals.max_logit_error = max(totals.max_logit_error, float(np.abs(ref - logits).max()))
        yield totals

"""Turning logits into text: samplers and the token-by-token generation loop.

The sampler knows nothing of the model and the model nothing of sampling (as in llama2.c):
`generate` prefills the prompt in one forward pass, then feeds back one token per step
through the KV cache, and yields each token as soon as it is chosen.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .config import check_fits, fits
from .errors import ArgumentError, NumericalError, shown


def check_finite(logits: np.ndarray, position: int | None = None) -> None:
    """NaN or infinite logits come from broken weights or configuration; sampling from them would
    silently pick token 0."""
    if not np.isfinite(logits).all():
        where = f" at position {position}" if position is not None else ""
        bad = int(np.flatnonzero(~np.isfinite(logits))[0])
        raise NumericalError(f"the logits{where} hold {logits.flat[bad]} (token id {bad} first): the "
                             "model's weights or configuration produce non-finite values")


def next_token_probs(logits: np.ndarray) -> np.ndarray:
    """The next-token distribution of one position's logits, as every part of npllama computes
    it: in float64, where the tail of a 128k-way distribution does not underflow, and after
    subtracting the largest logit, so that exp() never overflows however large they are."""
    z = logits.astype(np.float64)  # [V]
    e = np.exp(z - z.max())  # [V]
    return e / e.sum()  # [V]


def top_tokens(probs: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k most probable tokens, most probable first, ties broken by the lower id."""
    return np.argsort(-probs, kind="stable")[:k]  # [k]


def top_k_filter(probs: np.ndarray, k: int) -> np.ndarray:
    """Zero all but the k most probable tokens."""
    if k <= 0 or k >= len(probs):
        return probs
    keep = top_tokens(probs, k)  # [k]
    out = np.zeros_like(probs)  # [V]
    out[keep] = probs[keep]
    return out


def top_p_filter(probs: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filtering: keep the smallest set of most probable tokens whose mass reaches p."""
    if p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")  # [V] most probable first
    mass_before = np.cumsum(probs[order]) - probs[order]  # [V] mass of the tokens ranked above
    keep = order[mass_before < p]  # the first token always stays (its mass_before is 0)
    out = np.zeros_like(probs)  # [V]
    out[keep] = probs[keep]
    return out


@dataclass
class Sampler:
    """temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), then top-k,
    then top-p, then one draw from the seeded generator (never NumPy's global state)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def integer(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 0

        # The messages name the command line's flag too: they reach its users unchanged.
        if not (number(self.temperature) and self.temperature >= 0):
            raise ArgumentError(f"temperature (--temperature) is {shown(self.temperature)}; it must be a "
                                "finite number >= 0 (0: greedy)")
        if not (number(self.top_p) and 0 < self.top_p <= 1):
            raise ArgumentError(f"top_p (--top-p) is {shown(self.top_p)}; it must be in (0, 1]")
        if not integer(self.top_k):
            raise ArgumentError(f"top_k (--top-k) is {shown(self.top_k)}; it must be an integer >= 0 "
                                "(0 disables it)")
        if self.seed is not None and not integer(self.seed):
            raise ArgumentError(f"seed (--seed) is {shown(self.seed)}; it must be an integer >= 0")
        self.rng = np.random.default_rng(self.seed)

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a token is drawn from, after temperature, top-k and top-p."""
        probs = top_k_filter(next_token_probs(self.scaled(logits)), self.top_k)  # [V]
        # Renormalise between the filters, as Hugging Face and llama.cpp do: top-p's p is a
        # fraction of what top-k kept, not of the whole vocabulary.
        probs = top_p_filter(probs / probs.sum(), self.top_p)  # [V]
        return probs / probs.sum()  # [V]

    def scaled(self, logits: np.ndarray) -> np.ndarray:
        """logits / temperature, in float64: a float32 quotient overflows already at 1e-37."""
        check_finite(logits)
        with np.errstate(over="ignore"):
            return logits.astype(np.float64) / self.temperature  # [V]

    def __call__(self, logits: np.ndarray) -> int:
        check_finite(logits)
        # A temperature so small that logits / temperature overflows even float64 (1e-320) is
        # the limit of ever sharper distributions: greedy.
        if self.temperature == 0 or not np.isfinite(self.scaled(logits)).all():
            return int(np.argmax(logits))
        probs = self.probabilities(logits)  # [V]
        # Inverse-CDF draw: one uniform number per token, so a seed fixes the whole run.
        return int(min(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right"),
                       len(probs) - 1))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "stop_token", "max_new_tokens", "max_seq_len" or "interrupted"
    cached_positions: int = 0  # positions now in the KV cache: where a follow-up call starts

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes from the prefill's logits; each later one costs a decode step.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens at {self.prefill_tok_s:.1f} tok/s, "
                f"{self.new_tokens} new tokens at {self.decode_tok_s:.1f} tok/s "
                f"(stopped: {self.stop_reason})")


def generate(model, prompt: Iterable[int], max_new_tokens: int = 256, sampler: Sampler | None = None,
             stop_ids: Iterable[int] | None = None, stats: GenerationStats | None = None,
             cache=None, start_pos: int = 0) -> Iterator[int]:
    """Yield up to max_new_tokens tokens continuing `prompt`, stopping after a stop token
    (which is yielded, so a caller can tell why it stopped) or when the context is full.

    To continue a conversation, pass the previous call's `cache` and, as `start_pos`, its
    `stats.cached_positions`; `prompt` is then only the tokens not yet in the cache.
    """
    try:
        prompt = [operator.index(t) for t in prompt]
    except TypeError:
        raise ArgumentError("the prompt must be a sequence of integer token ids") from None
    if not prompt:
        raise ArgumentError("the prompt is empty: give at least one token (e.g. the BOS token)")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ArgumentError(f"max_new_tokens is {shown(max_new_tokens)}; it must be an integer >= 0")
    sampler = sampler or Sampler()
    stats = stats if stats is not None else GenerationStats()
    stop_ids = set(model.tokenizer.stop_ids if stop_ids is None else stop_ids)
    if cache is None:  # sized by what this call can use, not by the model's whole context
        cache = model.new_cache(min(model.args.max_seq_len, len(prompt) + max(max_new_tokens, 1)))
    context = model.context_length(cache)
    check_fits(start_pos, len(prompt), context, generating=True)
    stats.prompt_tokens = len(prompt)

    t0 = time.perf_counter()
    logits = model.forward(prompt, start_pos, cache, last_only=True)[-1]  # [V]
    stats.prefill_seconds = time.perf_counter() - t0
    pos = stats.cached_positions = start_pos + len(prompt)  # where the next token goes
    check_finite(logits, pos - 1)
    stats.stop_reason = "max_new_tokens"
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        # Rank 0's choice (over several processes the others take it: tensor_parallel.py).
        token = model.group.bcast(sampler(logits))
        stats.new_tokens += 1
        yield token
        if token in stop_ids:
            stats.stop_reason = "stop_token"
            break
        if i + 1 == max_new_tokens:
            break
        if not fits(pos, 1, context, generating=True):  # no position left for another token
            stats.stop_reason = "max_seq_len"
            break
        logits = model.forward([token], pos, cache, last_only=True)[-1]  # [V]
        check_finite(logits, pos)
        pos = stats.cached_positions = pos + 1
        stats.decode_seconds = time.perf_counter() - t0

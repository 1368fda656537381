"""Turning logits into text: samplers and the one generation loop.

The sampler knows nothing of the model and the model nothing of sampling (as in llama2.c).
`Batch` is the loop, for one sequence or many at once (Meta's `generate(prompt_tokens:
List[List[int]])`), rows joining and leaving between steps (the server's continuous batching):
it prefills the prompts that joined in one forward pass, then feeds back one token per row and
step through the KV cache. `generate` streams one sequence's tokens as they are chosen;
`generate_batch` returns every prompt's completion.
"""

from __future__ import annotations

import math
import operator
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from .config import check_fits
from .errors import ArgumentError, NumericalError, shown
from .speculative import Drafting, Guesses, drafter_for, verify


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


def min_p_filter(probs: np.ndarray, min_p: float) -> np.ndarray:
    """Zero the tokens less than min_p times as probable as the likeliest (llama.cpp's min-p)."""
    return np.where(probs >= min_p * probs.max(), probs, 0.0) if min_p > 0 else probs  # [V]


def repeat_penalty(logits: np.ndarray, recent: Iterable[int], penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty: each token among the recent ones, counted once, has its logit
    divided by the penalty if positive and multiplied by it if not (less likely either way)."""
    if penalty == 1 or not recent:
        return logits  # [V]
    seen = np.fromiter(set(recent), np.int64)  # [n] distinct
    out = logits.copy()  # [V]
    z = out[seen]  # [n]
    out[seen] = np.where(z > 0, z / penalty, z * penalty)
    return out  # [V]


@dataclass
class Sampler:
    """temperature 0 is greedy (argmax); otherwise softmax(logits / temperature), then top-k,
    then top-p, then min-p, then one draw from the seeded generator (never NumPy's global state).
    Before either, the repeat penalty over the row's last repeat_last_n tokens (prompt included,
    as llama.cpp: each token is `accept`ed; -1: all of them, 0: none)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    rng: np.random.Generator = field(init=False, repr=False)
    recent: deque = field(init=False, repr=False)  # the last repeat_last_n tokens accepted

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
        if not (number(self.min_p) and 0 <= self.min_p <= 1):
            raise ArgumentError(f"min_p (--min-p) is {shown(self.min_p)}; it must be in [0, 1] (0 disables it)")
        if self.seed is not None and not integer(self.seed):
            raise ArgumentError(f"seed (--seed) is {shown(self.seed)}; it must be an integer >= 0")
        if not (number(self.repeat_penalty) and self.repeat_penalty > 0):
            raise ArgumentError(f"repeat_penalty (--repeat-penalty) is {shown(self.repeat_penalty)}; it must be a "
                                "finite number > 0 (1 disables it)")
        if not (integer(self.repeat_last_n) or self.repeat_last_n == -1):
            raise ArgumentError(f"repeat_last_n (--repeat-last-n) is {shown(self.repeat_last_n)}; it must be an "
                                "integer >= -1 (-1: every token, 0: none)")
        self.rng = np.random.default_rng(self.seed)
        self.recent = deque(maxlen=None if self.repeat_last_n == -1 else self.repeat_last_n)

    def accept(self, tokens: Iterable[int]) -> None:
        """Tokens of the row, in order: what the repeat penalty looks back on."""
        if self.repeat_penalty != 1:
            self.recent.extend(tokens)

    def penalized(self, logits: np.ndarray) -> np.ndarray:
        return repeat_penalty(logits, self.recent, self.repeat_penalty)  # [V]

    def argmax(self, logits: np.ndarray) -> int:
        return int(np.argmax(self.penalized(logits)))

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """The distribution a token is drawn from, after temperature, top-k, top-p and min-p."""
        probs = top_k_filter(next_token_probs(self.scaled(self.penalized(logits))), self.top_k)  # [V]
        # Renormalise between the filters, as Hugging Face and llama.cpp do: top-p's p is a
        # fraction of what top-k kept, not of the whole vocabulary.
        probs = top_p_filter(probs / probs.sum(), self.top_p)  # [V]
        probs = min_p_filter(probs / probs.sum(), self.min_p)  # [V]
        return probs / probs.sum()  # [V]

    def scaled(self, logits: np.ndarray) -> np.ndarray:
        """logits / temperature, in float64: a float32 quotient overflows already at 1e-37."""
        check_finite(logits)
        with np.errstate(over="ignore"):
            return logits.astype(np.float64) / self.temperature  # [V]

    def greedy(self, logits: np.ndarray) -> bool:
        """Whether the token is the argmax: at temperature 0, and at one so small that logits /
        temperature overflows even float64 (1e-320), the limit of ever sharper distributions."""
        return self.temperature == 0 or not np.isfinite(self.scaled(logits)).all()

    def draw(self, probs: np.ndarray) -> int:
        """Inverse-CDF draw: one uniform number per token, so a seed fixes the whole run."""
        return int(min(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right"), len(probs) - 1))

    def __call__(self, logits: np.ndarray) -> int:
        check_finite(logits)
        if self.greedy(logits):
            return self.argmax(logits)
        return self.draw(self.probabilities(logits))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    stop_reason: str = ""  # "stop_token", "max_new_tokens", "max_seq_len" or "interrupted"
    cached_positions: int = 0  # positions now in the KV cache: where a follow-up call starts
    drafted: int = 0  # speculative decoding: tokens guessed, and those the model kept
    accepted: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first new token comes from the prefill's logits; each later one costs a decode step.
        steps = max(self.new_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0

    def speculation(self) -> str:
        """", D drafted, A accepted (R%)" with speculative decoding, else ""."""
        if not self.drafted:
            return ""
        return f", {self.drafted} drafted, {self.accepted} accepted ({100 * self.accepted / self.drafted:.0f}%)"

    def summary(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens at {self.prefill_tok_s:.1f} tok/s, "
                f"{self.new_tokens} new tokens at {self.decode_tok_s:.1f} tok/s{self.speculation()} "
                f"(stopped: {self.stop_reason})")


@dataclass
class Completion:
    """One prompt's continuation, as Meta's CompletionPrediction: the new tokens (after the
    prompt's, with echo), and with logprobs each token's log-probability under the model."""

    tokens: list[int]
    logprobs: list[float] | None = None  # None for a prompt's first token, which nothing predicts
    stop_reason: str = ""  # "stop_token", "max_new_tokens", "max_seq_len" or "cancelled"
    prompt_tokens: int = 0
    new_tokens: int = 0
    top_logprobs: list[dict[int, float]] | None = None  # with Row.top_logprobs: the likeliest at each step


@dataclass
class Row:
    """One sequence of a generation: what it asks for, and what it has got so far."""

    prompt: list[int]  # the tokens to feed, at positions start..
    limit: int  # max_new_tokens
    sampler: Sampler
    stops: set[int]
    start: int = 0  # positions 0..start-1 are already in the cache (a conversation's earlier turns)
    done: Completion = field(default_factory=lambda: Completion([]))
    prompt_logprobs: bool = False  # each prompt token's log-probability too (done.logprobs first)
    top_logprobs: int = 0  # and the k likeliest tokens' at each new token (done.top_logprobs)
    cancelled: bool = False  # set from anywhere (a client gone): the row leaves at the next step
    error: Exception | None = None  # why choosing its token failed, in a Batch that isolates rows
    fresh: int = 0  # tokens the last step gave it (more than one with speculative decoding)
    drafting: Drafting | None = None  # its speculation, in a Batch with a drafter

    @property
    def pos(self) -> int:
        """Where the newest token goes (before the first, where the prompt's last one is)."""
        return self.start + len(self.prompt) + self.done.new_tokens - 1

    @property
    def newest(self) -> int:
        """The token at `pos`: the next one fed."""
        return self.done.tokens[-1] if self.done.new_tokens else self.prompt[-1]

    def new_tokens(self) -> list[int]:
        return self.done.tokens[len(self.done.tokens) - self.done.new_tokens:]

    def stop_reason(self, token: int, context: int) -> str:
        """Why the row stops after choosing `token`, or "" if it goes on."""
        if token in self.stops:
            return "stop_token"
        if self.done.new_tokens >= self.limit:
            return "max_new_tokens"
        if self.pos + 1 >= context:  # no position left for another token
            return "max_seq_len"
        return ""

    def record(self, token: int, logits: np.ndarray) -> None:
        """`token`, chosen from `logits` [V], becomes the row's newest."""
        self.done.tokens.append(token)
        self.done.new_tokens += 1
        if self.done.logprobs is not None:
            lp = log_softmax(logits)  # [V]
            self.done.logprobs.append(float(lp[token]))
            if self.done.top_logprobs is not None:
                self.done.top_logprobs.append({int(t): float(lp[t]) for t in top_tokens(lp, self.top_logprobs)})


class Batch:
    """The one generation loop, for one sequence or many, rows joining and leaving as they go
    (continuous batching: the server's requests, generate_batch's prompts, generate's one row).

    `add(row)` gives a row a free cache slot; its prompt is prefilled at the next `step`, in one
    forward pass with the other rows that joined since (each at its own start position). Each
    step also feeds every row already going its newest token (one pass over all of them), then
    chooses each row's next token. A row that stops, or is cancelled, leaves at once: its slot is
    swapped behind the going rows', so later steps neither compute nor read it, and a new row
    can take it. The rows going hold slots 0..len(going)-1, in that order.

    With a drafter (speculative.py), a going row is fed its newest token and the drafter's
    guesses after it in the same pass, and gets the guesses the model keeps and one token more;
    the positions of the rejected ones are zeroed, as if never written."""

    def __init__(self, model, cache, isolate: bool = False, drafter=None, batch_size: int | None = None):
        # isolate: a row whose token cannot be chosen leaves alone (a server's request), instead
        # of the error stopping the whole batch. batch_size: prompt positions a prefill pass.
        self.model, self.cache, self.isolate, self.drafter = model, cache, isolate, drafter
        self.batch_size = batch_size
        self.context = model.context_length(cache)
        self.going: list[Row] = []  # going[i] holds slot i
        self.joining: list[Row] = []  # the next slots, prefilled at the next step

    @property
    def free(self) -> int:
        return len(self.cache.order) - len(self.going) - len(self.joining)

    def __bool__(self) -> bool:
        return bool(self.going or self.joining)

    def add(self, row: Row) -> None:
        if not self.free:
            raise ArgumentError(f"all {len(self.cache.order)} rows of the KV cache are taken")
        check_fits(row.start, len(row.prompt), self.context, generating=True)
        if self.drafter:
            row.drafting = Drafting(self.drafter.draft_max, self.drafter.cost)
        row.sampler.accept(row.prompt)  # the repeat penalty looks back on the prompt too, as llama.cpp's
        self.joining.append(row)

    def step(self) -> list[Row]:
        """Prefill the rows that joined, feed the going ones their newest token (and guesses),
        choose every row's next tokens; returns the rows that got some (row.fresh of them, the
        last of row.done.tokens)."""
        for slot in reversed(range(len(self.going))):
            if self.going[slot].cancelled:
                self.leave(slot, "cancelled")
        for row in self.joining:
            if row.cancelled:
                row.done.stop_reason = "cancelled"
        self.joining = [row for row in self.joining if not row.cancelled]
        logits, guesses, written = [], [], []  # per row in slot order: [T, V], its guesses, end of its positions written
        if self.going:
            guesses = self.guesses()
            logits, width = self.feed(guesses)
            written = [row.pos + width for row in self.going]
        if self.joining:
            first = len(self.going)
            last_logits, width = self.prefill(self.joining, first)  # [k, V]
            if self.drafter:
                self.drafter.join(self.joining, first)
            logits += list(last_logits[:, None])  # [1, V] each
            guesses += [Guesses([]) for _ in self.joining]
            written += [row.start + width for row in self.joining]
            self.going, self.joining = self.going + self.joining, []
        for slot in reversed(range(len(self.going))):  # rows asked for no tokens are done before the first
            if self.going[slot].limit == 0:
                for per_row in logits, guesses, written:
                    per_row[slot], per_row[-1] = per_row[-1], per_row[slot]
                    per_row.pop()
                self.leave(slot, "max_new_tokens")
        rows = list(self.going)
        # Rank 0's choices (over several processes the others take them: tensor_parallel.py).
        chosen = self.model.group.bcast([self.choose(row, logits[s], guesses[s]) for s, row in enumerate(rows)])
        reasons = ["error" if tokens is None else self.record(row, tokens, logits[s])
                   for s, (row, tokens) in enumerate(zip(rows, chosen))]
        for slot, row in enumerate(rows):
            if row.drafting and chosen[slot] is not None:
                row.drafting.update(guesses[slot], len(chosen[slot]) - 1)
            if self.drafter:
                self.drafter.kept(slot, row)
        # Positions past each row's newest token that this step wrote (rejected guesses, pads).
        self.cache.clear(*zip(*[(s, row.pos, written[s]) for s, row in enumerate(rows) if row.pos < written[s]]))
        for slot in reversed(range(len(rows))):
            if reasons[slot]:
                self.leave(slot, reasons[slot])
        return [row for slot, row in enumerate(rows) if chosen[slot] is not None]

    def guesses(self) -> list[Guesses]:
        """The drafter's guesses for each going row: as many as its Drafting wants, no more than
        leave a token to choose after them, and no further than every row's pass fits the cache."""
        if not self.drafter:
            return [Guesses([]) for _ in self.going]
        room = self.context - 1 - max(row.pos for row in self.going)
        wanted = [max(0, min(row.drafting.wanted(), row.limit - row.done.new_tokens - 1, room)) for row in self.going]
        return self.drafter.guess(self.going, wanted)

    def feed(self, guesses: list[Guesses]) -> tuple[list[np.ndarray], int]:
        """One pass over the going rows, each fed its newest token and its guesses: each row's
        logits [1 + guesses, V], after its newest token and after each guess, and the pass's width."""
        n, width = len(self.going), 1 + max(len(g.tokens) for g in guesses)
        tokens = np.zeros((n, width), np.int64)  # [n, T] right-padded
        for i, (row, g) in enumerate(zip(self.going, guesses)):
            tokens[i, :1 + len(g.tokens)] = [row.newest] + g.tokens
        lengths = np.array([1 + len(g.tokens) for g in guesses])  # [n]
        positions = np.array([row.pos for row in self.going])  # [n]
        logits = self.model.forward_rows(tokens, lengths, positions, self.cache, "all" if width > 1 else "last")
        return [logits[i, :lengths[i]] if width > 1 else logits[i:i + 1] for i in range(n)], width

    def choose(self, row: Row, logits: np.ndarray, guesses: Guesses) -> list[int] | None:
        """The row's next tokens from its logits [1 + guesses, V] (speculative.verify), or None if
        that fails in a batch that isolates rows (row.error)."""
        try:
            for j, position_logits in enumerate(logits):
                check_finite(position_logits, row.pos + j)
            return verify(row.sampler, logits, guesses)
        except Exception as e:
            if not self.isolate:
                raise
            row.error = e
            return None

    def record(self, row: Row, tokens: list[int], logits: np.ndarray) -> str:
        """Each chosen token becomes the row's newest until one stops it; returns why it stops
        ("" if it goes on)."""
        row.fresh = 0
        for token, position_logits in zip(tokens, logits):
            row.record(token, position_logits)
            row.fresh += 1
            reason = row.stop_reason(token, self.context)
            if reason:
                return reason
        return ""

    def prefill(self, rows: list[Row], first_slot: int) -> tuple[np.ndarray, int]:
        """Logits [k, V] of each joining row's prompt's last position, its keys and values now in
        slots first_slot.., and the pass's width; with prompt_logprobs, each prompt token's
        log-probability too."""
        n = len(rows)
        lengths = np.array([len(r.prompt) for r in rows])  # [k]
        tokens = np.zeros((n, lengths.max()), np.int64)  # [k, T] right-padded
        for i, row in enumerate(rows):
            tokens[i, :len(row.prompt)] = row.prompt
        every = any(row.prompt_logprobs for row in rows)
        starts = np.array([r.start for r in rows])  # [k]
        logits = self.model.forward_rows(tokens, lengths, starts, self.cache, "all" if every else "last", first_slot,
                                         self.batch_size)
        if not every:
            return logits, tokens.shape[1]  # [k, V]
        for i, row in enumerate(rows):  # [k, T, V]: each prompt token given the ones before it
            if row.prompt_logprobs:
                lp = log_softmax(logits[i, :len(row.prompt) - 1])  # [L-1, V]
                row.done.logprobs += [None] + [float(lp[j, t]) for j, t in enumerate(row.prompt[1:])]
                if row.done.top_logprobs is not None:
                    row.done.top_logprobs += [None] + [{int(t): float(lp[j, t]) for t in top_tokens(lp[j], row.top_logprobs)}
                                                       for j in range(len(row.prompt) - 1)]
        return logits[np.arange(n), lengths - 1], tokens.shape[1]  # [k, V]

    def leave(self, slot: int, reason: str) -> None:
        """The row in `slot` stops: the last going row takes its slot, whose own slot is free."""
        last, row = len(self.going) - 1, self.going[slot]
        row.done.stop_reason = reason
        if self.drafter:
            self.drafter.leave(slot, row)
        if slot != last:
            used = max(row.pos, self.going[last].pos) + 1
            self.cache.swap(slot, last, used)
            if self.drafter:
                self.drafter.swap(slot, last, used)
        self.going[slot] = self.going[last]
        self.going.pop()


def decode(model, rows: list[Row], cache, drafter=None, batch_size: int | None = None) -> Iterator[list[Row]]:
    """Every row through one Batch until each has stopped: yields, after each step, the rows
    that got tokens."""
    batch = Batch(model, cache, drafter=drafter, batch_size=batch_size)
    for row in rows:
        batch.add(row)
    while batch:
        got = batch.step()
        if got:
            yield got


def generate(model, prompt: Iterable[int], max_new_tokens: int = 256, sampler: Sampler | None = None,
             stop_ids: Iterable[int] | None = None, stats: GenerationStats | None = None,
             cache=None, start_pos: int = 0, lookup: bool = False, draft=None,
             draft_max: int = 8, batch_size: int | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens tokens continuing `prompt`, stopping after a stop token
    (which is yielded, so a caller can tell why it stopped) or when the context is full: the
    one generation loop (`decode`) with one row, each token yielded as soon as it is chosen.

    To continue a conversation, pass the previous call's `cache` and, as `start_pos`, its
    `stats.cached_positions`; `prompt` is then only the tokens not yet in the cache.

    Speculative decoding (speculative.py): `lookup=True` guesses by prompt lookup, `draft` by a
    smaller model of the same vocabulary (a loaded model, or the DraftModel of an earlier call
    of the same conversation, which holds its earlier turns); up to draft_max tokens a pass.
    batch_size (llama.cpp's -b): the prompt is fed that many tokens a pass (default: all at once).
    """
    prompt = checked_prompts([prompt])[0]
    check_limit(max_new_tokens)
    model.check_tokens(prompt, start_pos, cache, generating=True)
    if cache is None:  # sized by what this call can use, not by the model's whole context
        cache = model.new_cache(min(model.args.max_seq_len, len(prompt) + max(max_new_tokens, 1)))
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    stops = set(model.tokenizer.stop_ids if stop_ids is None else stop_ids)  # by default the tokenizer's
    row = Row(prompt, max_new_tokens, sampler or Sampler(), stops, start_pos)
    drafter = drafter_for(model, cache, lookup, draft, draft_max)

    t0 = time.perf_counter()
    for _ in decode(model, [row], cache, drafter, batch_size):
        if row.done.new_tokens == 1:  # the first token comes from the prefill's logits
            stats.prefill_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        else:
            stats.decode_seconds = time.perf_counter() - t0
        stats.new_tokens, stats.cached_positions = row.done.new_tokens, row.pos
        if row.drafting:
            stats.drafted, stats.accepted = row.drafting.drafted, row.drafting.accepted
        yield from row.done.tokens[len(row.done.tokens) - row.fresh:]
    stats.stop_reason = row.done.stop_reason
    stats.cached_positions = row.pos + (row.done.new_tokens == 0)  # the last token chosen is not fed


def generate_batch(model, prompts: Sequence[Sequence[int]], max_new_tokens=256, samplers=None,
                   stop_ids=None, echo: bool = False, logprobs: bool = False, lookup: bool = False,
                   draft=None, draft_max: int = 8, stats: GenerationStats | None = None,
                   batch_size: int | None = None) -> list[Completion]:
    """Continue every prompt at once, each row with its own sampler, stop tokens and limit (one
    value for all, or a list of one per prompt), as generate continues one; a row that stops
    leaves the batch. Returns the completions in the prompts' order, as Meta's generate:
    with echo, the prompt's tokens first; with logprobs, each token's log-probability.
    lookup, draft and draft_max as in generate, each row guessing for itself; `stats` gets
    the tokens and the guesses of all rows; batch_size as in generate."""
    prompts = checked_prompts(prompts)
    n = len(prompts)
    limits = per_row(max_new_tokens, n, "max_new_tokens")
    for limit in limits:
        check_limit(limit)
    per_row_stops = isinstance(stop_ids, list) and all(s is None or isinstance(s, Iterable) for s in stop_ids)
    stops = per_row(stop_ids, n, "stop_ids") if per_row_stops and stop_ids else [stop_ids] * n
    stops = [set(model.tokenizer.stop_ids if s is None else s) for s in stops]  # by default the tokenizer's
    for p in prompts:
        check_fits(0, len(p), model.args.max_seq_len, generating=True)
    rows = [Row(p, m, s, stop, done=Completion(list(p) if echo else [], [] if logprobs else None, prompt_tokens=len(p)),
                prompt_logprobs=echo and logprobs) for p, m, s, stop in zip(prompts, limits, row_samplers(samplers, n), stops)]
    size = max(len(p) + max(m, 1) for p, m in zip(prompts, limits))
    cache = model.new_cache(min(model.args.max_seq_len, size), rows=n)
    for _ in decode(model, rows, cache, drafter_for(model, cache, lookup, draft, draft_max), batch_size):
        pass
    if stats is not None:
        stats.prompt_tokens, stats.new_tokens = sum(map(len, prompts)), sum(row.done.new_tokens for row in rows)
        stats.drafted = sum(row.drafting.drafted for row in rows if row.drafting)
        stats.accepted = sum(row.drafting.accepted for row in rows if row.drafting)
    return [row.done for row in rows]


def checked_prompts(prompts) -> list[list[int]]:
    try:
        prompts = [[operator.index(t) for t in p] for p in prompts]
    except TypeError:
        raise ArgumentError("a prompt must be a sequence of integer token ids") from None
    if not prompts or any(not p for p in prompts):
        raise ArgumentError("every prompt needs at least one token (e.g. the BOS token)")
    return prompts


def check_limit(max_new_tokens) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ArgumentError(f"max_new_tokens is {shown(max_new_tokens)}; it must be an integer >= 0")


def per_row(value, n: int, name: str) -> list:
    """A value given once for every row, or a list of one per row."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ArgumentError(f"{name} has {len(value)} entries for {n} prompts; give one, or one per prompt")
        return list(value)
    return [value] * n


def row_samplers(samplers, n: int) -> list[Sampler]:
    """One sampler per row, each with its own state: a single Sampler is cloned with seeds
    seed, seed+1, ... (rows with the same seed would draw the same numbers)."""
    if isinstance(samplers, (list, tuple)):
        return per_row(samplers, n, "samplers")
    base = samplers or Sampler()
    return [replace(base, seed=None if base.seed is None else base.seed + i) for i in range(n)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p of every token, in float64 as next_token_probs computes p."""
    z = logits.astype(np.float64)  # [..., V]
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # [..., V]

"""Speculative decoding: several tokens a pass, each one distributed as without speculation.

A decode step is a pass over all the weights for one new token, and a pass over a few positions
costs little more than a pass over one (on the 8B shape streamed, 9 positions cost about 1.6x
one; benchmarks/speculative.py measures it). So a drafter guesses the next k tokens cheaply, one
pass of the model computes the logits after the newest token and after each guess, and `verify`
keeps the guesses the model itself would have produced, then adds one token of its own: 1 to
k+1 tokens a pass.

- Greedy: a guess stays while it is the model's argmax; the first that is not is replaced by
  the argmax, so the text is the text without speculation (the logits of a pass over several
  positions equal those of one position at a time to float32 rounding, as a batch's rows do).
- Sampling (Leviathan et al. 2023; Chen et al. 2023): a guess x drawn from the drafter's
  distribution q stays with probability min(1, p(x)/q(x)), p being the sampler's distribution
  (temperature, top-k, top-p, min-p); the first rejected is replaced by a draw from
  max(0, p - q), normalised; after k kept guesses one more token comes from p. Each token is
  then distributed exactly as p. A prompt lookup's guess is certain: q = 1 on it.

Drafters: `Lookup` (the tokens that followed the latest earlier occurrence of the context's last
1-3 tokens) and `DraftModel` (a smaller model with the same vocabulary and a KV cache of its own,
whose rejected positions are dropped with the rows'). How much a row drafts adapts to what it
got (`Drafting`): text that speculation does not help costs a few percent at most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError
from .layers import softmax

NGRAM_MAX = 3  # prompt lookup matches the context's last 3 tokens, else 2, else 1
PROBE = 4  # guesses of a probe
PROBE_SHARE = 0.02  # where guesses fail, probes add at most this share to the passes
P_MIN = 0.75  # a draft model stops guessing below this probability (llama.cpp's --draft-p-min)
# Measured on SmolLM2: the bf16 flow's roundings turned a near tie the other way, and the greedy text with it.
BF16_SPECULATION = ("speculative decoding (--lookup, -md) with --dtype bfloat16: a pass over several positions "
                    "rounds to bf16 otherwise than one position at a time, enough to change greedy text; use "
                    "--dtype float32")


@dataclass(frozen=True)
class PassCost:
    """What a step with k guesses costs, in passes over one position: 1 + first + step * (k - 1)
    for the model's pass, plus `guess` for each guess a draft model makes (its share of the
    model's weights; prompt lookup's guesses are free)."""

    first: float
    step: float
    guess: float = 0.0

    def __call__(self, k: int) -> float:
        return 1.0 if k == 0 else 1 + self.first + self.step * (k - 1) + self.guess * k

    def fewest(self, draft_max: int) -> int:
        """The fewest guesses that, all kept, give 1.2 times the tokens per cost of no guess."""
        return next((k for k in range(1, draft_max + 1) if (k + 1) / self(k) >= 1.2), draft_max)


# What passes over several positions cost where they cost the most measured (benchmarks/
# speculative.py, AMD EPYC, OpenBLAS's Haswell kernels, whose matrix-matrix product of a few
# columns runs at a third of its matrix-vector speed): SmolLM2 in RAM 2.4x one position for 2,
# 3.0x for 8, 4.3x for 16; the 8B shape streamed 3.2x, 3.7x, 5.1x. Where a few positions cost
# less (CPUs with faster small products), rows guess as they would here, only more cheaply.
# Fixed, not timed, so that a seeded row guesses, and so draws, the same run to run.
PASS_COST = PassCost(1.5, 0.15)


@dataclass
class Guesses:
    """A row's guessed tokens, and the distributions they were drawn from: q [k, V], or None
    when each guess is certain (prompt lookup, or a greedy row)."""

    tokens: list[int]
    q: np.ndarray | None = None
    spent: bool = False  # a draft model ran for them (which, with no guess sure enough, is a failed probe)


@dataclass
class Drafting:
    """One row's speculation: how many tokens to guess at its next step, and its tally.

    Guesses come right in runs (a passage being copied) and wrong in runs (text the drafter
    cannot foresee), so the row follows its last step. If the tokens it got paid for the cost of
    its guesses, it goes on guessing: twice as many if all were kept, else as many as were (never
    fewer than `cost.fewest`, the fewest that can pay for what they add to the pass). If not, it
    stops guessing and probes again after a pause: 2, 4, 8.. steps after guesses that paid, up to
    the pause at which probes add PROBE_SHARE to the passes, which is also the pause before a row
    has had guesses pay at all: where guessing fails, it costs little."""

    draft_max: int
    cost: PassCost
    length: int = 0  # tokens to guess at the next step; 0: probing
    pause: int = 0  # steps left before the next probe
    backoff: int = 0  # the pause after a failed probe (set to the longest)
    drafted: int = 0
    accepted: int = 0

    def __post_init__(self):
        self.probe = max(self.cost.fewest(self.draft_max), min(PROBE, self.draft_max))  # guesses of a probe
        self.longest = math.ceil((self.cost(self.probe) - 1) / PROBE_SHARE)  # steps
        self.backoff = self.backoff or self.longest

    def wanted(self) -> int:
        """Tokens to guess at this step."""
        if self.length:
            return self.length
        if self.pause:
            self.pause -= 1
            return 0
        return self.probe

    def update(self, guesses: Guesses, accepted: int) -> None:
        drafted = len(guesses.tokens)
        self.drafted, self.accepted = self.drafted + drafted, self.accepted + accepted
        if not drafted and not guesses.spent:  # no guess to make, none paid for (no n-gram found)
            return
        if drafted and accepted + 1 >= self.cost(drafted):
            grown = 2 * drafted if accepted == drafted else accepted
            self.length, self.backoff = min(self.draft_max, max(grown, self.cost.fewest(self.draft_max))), 2
        else:
            self.length, self.pause, self.backoff = 0, self.backoff, min(self.longest, 2 * self.backoff)


def verify(sampler, logits: np.ndarray, guesses: Guesses) -> list[int]:
    """The tokens one pass gives a row (its generate.Sampler, which generate.py imports this module
    to call): the guesses kept, then one token of the model's own. logits [k+1, V]: after the
    row's newest token, and after each of its k guesses."""
    out = []
    for j, guess in enumerate(guesses.tokens):
        token = guess
        if sampler.greedy(logits[j]):
            token = sampler.argmax(logits[j])
        else:
            p = sampler.probabilities(logits[j])  # [V]
            q = one_hot(guess, len(p)) if guesses.q is None else guesses.q[j]  # [V]
            if sampler.rng.random() * q[guess] >= p[guess]:  # rejected: probability 1 - min(1, p/q)
                residual = np.maximum(p - q, 0.0)  # [V]
                total = residual.sum()
                # total is 0 only if p = q to rounding, where nothing is rejected: then p itself.
                token = sampler.draw(residual / total if total > 0 else p)
        out.append(token)
        sampler.accept([token])  # the next position's repeat penalty sees it
        if token != guess:
            return out
    out.append(sampler(logits[len(guesses.tokens)]))
    sampler.accept(out[-1:])
    return out


def one_hot(token: int, n: int) -> np.ndarray:
    q = np.zeros(n)  # [V]
    q[token] = 1.0
    return q


class Drafter:
    """What a Batch asks of a drafter: `guess` for the going rows (slots 0..), and the hooks by
    which a drafter that keeps state per slot follows the batch's (a draft model's KV cache)."""

    draft_max: int
    cost: PassCost

    def guess(self, rows: list, wanted: list[int]) -> list[Guesses]:
        """Up to wanted[i] guesses for rows[i], the row in slot i."""
        raise NotImplementedError

    def join(self, rows: list, first_slot: int) -> None:
        """Rows joined the batch in slots first_slot.., their prompts prefilled by the model."""

    def kept(self, slot: int, row) -> None:
        """The model's pass is done: the row's newest token is at row.pos."""

    def swap(self, a: int, b: int, used: int) -> None:
        """The batch exchanged two slots (their first `used` positions)."""

    def leave(self, slot: int, row) -> None:
        """The row in `slot` stopped."""


class Lookup(Drafter):
    """Prompt lookup: a row's guesses are what followed the latest earlier occurrence of its
    context's last NGRAM_MAX tokens (else fewer) in its context (prompt and new tokens). Free
    to compute, and right where the model copies: quoting, summarising, editing text or code."""

    def __init__(self, draft_max: int = 8, cost: PassCost = PASS_COST):
        self.draft_max, self.cost = check_draft_max(draft_max), cost
        self.index: dict[int, NgramIndex] = {}  # id(row) -> its context's n-grams

    def guess(self, rows: list, wanted: list[int]) -> list[Guesses]:
        out = []
        for row, k in zip(rows, wanted):
            index = self.index.setdefault(id(row), NgramIndex())
            index.extend(row.prompt + row.new_tokens())
            out.append(Guesses(index.continuation(k) if k else []))
        return out

    def leave(self, slot: int, row) -> None:
        self.index.pop(id(row), None)


class NgramIndex:
    """Where each 1- to NGRAM_MAX-gram of a token sequence last occurred with a token after it."""

    def __init__(self):
        self.tokens: list[int] = []
        self.follower: dict[tuple[int, ...], int] = {}  # n-gram -> index of the token after its latest occurrence

    def extend(self, tokens: list[int]) -> None:
        """Index the tokens beyond those seen (`tokens` starts with them)."""
        for i in range(len(self.tokens), len(tokens)):
            self.tokens.append(tokens[i])
            for n in range(1, min(NGRAM_MAX, i) + 1):  # the n-grams that end just before token i
                self.follower[tuple(self.tokens[i - n:i])] = i

    def continuation(self, k: int) -> list[int]:
        """k tokens that followed the latest earlier occurrence of the longest suffix found, read
        on past the end as a repeat (a match d tokens back continues with the last d tokens)."""
        for n in range(min(NGRAM_MAX, len(self.tokens)), 0, -1):
            i = self.follower.get(tuple(self.tokens[-n:]))
            if i is not None:
                out, period = [], len(self.tokens) - i
                for m in range(k):
                    out.append(self.tokens[i + m] if i + m < len(self.tokens) else out[m - period])
                return out
        return []


class DraftModel(Drafter):
    """A smaller model with the same vocabulary guesses: for a greedy row its argmax, while it is
    at least p_min sure of it; for a sampling row a draw with the row's sampler from the draft's
    own distribution q (which verify weighs the guess by). It keeps a KV cache of its own, a slot
    per row of the batch's: `held[slot]`, the tokens that slot holds (positions a rejected guess
    wrote are dropped and zeroed, as the model's own are), and `seen[slot]`, the tokens of the
    last row that left it, so that a conversation's next turn finds its earlier ones."""

    def __init__(self, model, draft, rows: int, context: int, draft_max: int = 8, p_min: float = P_MIN):
        check_same_vocabulary(model, draft)
        self.model, self.draft_max, self.p_min = draft, check_draft_max(draft_max), p_min
        self.cost = pass_cost(model, draft)
        self.cache = draft.new_cache(min(context, draft.args.max_seq_len), rows)
        self.context = draft.context_length(self.cache)
        self.held: list[list[int] | None] = [[] for _ in range(rows)]  # None: the slot's earlier turns are unknown
        self.seen: list[list[int]] = [[] for _ in range(rows)]

    def join(self, rows: list, first_slot: int) -> None:
        """Prefill the joining rows' prompts into their slots (in one pass, as the model's), after
        the earlier turns the slot's last row saw; a row whose earlier turns it did not see (or
        that do not fit its context) gets no guesses."""
        slots = range(first_slot, first_slot + len(rows))
        tokens, starts = [], []
        for slot, row in zip(slots, rows):
            history, held = self.seen[slot][:row.start], self.held[slot]
            if held is None or len(history) < row.start or row.start + len(row.prompt) > self.context:
                self.held[slot], history = None, []
            else:
                self.forget(slot, min(len(held), row.start))
            tokens.append(history[len(self.held[slot] or []):] + row.prompt)
            starts.append(len(self.held[slot] or []))
        self.feed(rows, first_slot, tokens, starts)

    def guess(self, rows: list, wanted: list[int]) -> list[Guesses]:
        """Up to wanted[i] guesses for rows[i] (the rows in slots 0..): one pass feeding each row
        the tokens its slot lacks, then one pass a guess, while any row still guesses."""
        # A row's guesses are fed at positions up to row.pos + k - 1, which the draft's cache must hold.
        wanted = [min(k, self.context - row.pos) if self.held[slot] is not None else 0
                  for slot, (row, k) in enumerate(zip(rows, wanted))]
        out = [Guesses([]) for _ in rows]
        if not any(wanted):
            return out
        lacking = [self.lacking(slot, row) for slot, row in enumerate(rows)]
        starts = [row.pos + 1 - len(t) for row, t in zip(rows, lacking)]
        if max(starts) + max(map(len, lacking)) > self.context:
            return out  # the padded pass would run past the cache: no guesses near the context's end
        logits = self.feed(rows, 0, lacking, starts)  # [n, V]
        qs, asked = [[] for _ in rows], list(wanted)
        for _ in range(max(wanted)):
            drawn = [self.draw(row.sampler, logits[i]) if wanted[i] else (-1, None) for i, row in enumerate(rows)]
            tokens = self.model.group.bcast([token for token, _ in drawn])  # rank 0's guesses, on every rank
            for i, token in enumerate(tokens):
                if token < 0:
                    wanted[i] = 0
                    continue
                out[i].tokens.append(token)
                qs[i].append(drawn[i][1])
                wanted[i] -= 1
            if not any(wanted):
                break
            # Rows done guessing ride along (a pass takes contiguous slots), fed a token at their
            # next position that `kept` drops again.
            feed = [[out[i].tokens[-1] if out[i].tokens else row.newest] for i, row in enumerate(rows)]
            logits = self.feed(rows, 0, feed, [row.pos + len(out[i].tokens) for i, row in enumerate(rows)])
        for i, row in enumerate(rows):
            out[i].spent = asked[i] > 0
            if any(q is not None for q in qs[i]):  # a greedy guess is certain: q = 1 on it
                out[i].q = np.stack([one_hot(t, len(logits[i])) if q is None else q
                                     for t, q in zip(out[i].tokens, qs[i])])  # [k, V]
        return out

    def draw(self, sampler, logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        """A guess and the distribution q it was drawn from; for a greedy row the argmax (q is not
        needed), or -1 where the draft is less than p_min sure of it. A sampling row's guess is
        never held back by p_min: that would make the guesses made follow another q than the one
        verify is given."""
        if sampler.greedy(logits):
            token = int(np.argmax(logits))
            return (token if softmax(logits.astype(np.float64))[token] >= self.p_min else -1), None
        q = sampler.probabilities(logits)  # [V]
        return sampler.draw(q), q

    def lacking(self, slot: int, row) -> list[int]:
        """The row's tokens up to its newest that the slot does not hold yet."""
        held = self.held[slot]
        if held is None:
            return [row.newest]
        return (row.prompt + row.new_tokens())[len(held) - row.start:]  # from position len(held)

    def feed(self, rows: list, first_slot: int, tokens: list[list[int]], starts: list[int]) -> np.ndarray:
        """Each row's tokens at positions starts[i].. of its slot: logits [n, V] after each row's last."""
        n, width = len(rows), max(map(len, tokens))
        batch = np.zeros((n, width), np.int64)  # [n, T] right-padded
        for i, t in enumerate(tokens):
            batch[i, :len(t)] = t
        logits = self.model.forward_rows(batch, np.array([len(t) for t in tokens]), np.array(starts), self.cache,
                                         "last", first_slot)
        slots = range(first_slot, first_slot + n)
        self.cache.clear(*zip(*[(s, a + len(t), a + width) for s, t, a in zip(slots, tokens, starts) if len(t) < width]))
        for slot, t, start in zip(slots, tokens, starts):
            if self.held[slot] is not None:
                del self.held[slot][start:]
                self.held[slot] += t
        return logits

    def kept(self, slot: int, row) -> None:
        """After the model's pass: the slot keeps the positions before the row's newest token."""
        if self.held[slot] is not None:
            self.forget(slot, row.pos)

    def forget(self, slot: int, keep: int) -> None:
        held = self.held[slot]
        if len(held) > keep:
            self.cache.clear([slot], [keep], [len(held)])
            del held[keep:]

    def swap(self, a: int, b: int, used: int) -> None:
        self.cache.swap(a, b, used)
        self.held[a], self.held[b] = self.held[b], self.held[a]
        self.seen[a], self.seen[b] = self.seen[b], self.seen[a]

    def leave(self, slot: int, row) -> None:
        """The row in `slot` stops: the slot remembers its tokens (positions 0..row.pos)."""
        self.seen[slot] = self.seen[slot][:row.start] + row.prompt + row.new_tokens()


def drafter_for(model, cache, lookup: bool = False, draft=None, draft_max: int = 8):
    """The drafter of a Batch over `cache`: prompt lookup, a draft model (a loaded model, or a
    DraftModel kept from an earlier call, as a conversation's is), or None (no speculation)."""
    if lookup and draft is not None:
        raise ArgumentError("give prompt lookup (--lookup) or a draft model (-md), not both")
    if (lookup or draft is not None) and model.dtype == "bfloat16":
        raise ArgumentError(BF16_SPECULATION)
    if isinstance(draft, DraftModel):
        if len(draft.cache.order) != len(cache.order):
            raise ArgumentError(f"the DraftModel has {len(draft.cache.order)} rows for a batch of {len(cache.order)}")
        return draft
    if draft is not None:
        return DraftModel(model, draft, len(cache.order), model.context_length(cache), draft_max)
    return Lookup(draft_max, pass_cost(model)) if lookup else None


def pass_cost(model, draft=None) -> PassCost:
    """The cost model of a step of `model`, with a draft model's guesses."""
    if draft is None:
        return PASS_COST
    return PassCost(PASS_COST.first, PASS_COST.step, parameters(draft) / parameters(model))


def parameters(model) -> int:
    return sum(math.prod(shape) for shape in getattr(model.args, "whole", model.args).weight_shapes().values())


def check_same_vocabulary(model, draft) -> None:
    """A draft must speak the model's token ids: the same vocabulary, token for token."""
    a, b = model.tokenizer, draft.tokenizer
    same = model.args.vocab_size == draft.args.vocab_size and a.vocabulary_digest() == b.vocabulary_digest()
    if not same:
        raise ArgumentError(f"the draft model ({draft.source or 'given'}) has another vocabulary than the model "
                            f"({model.source or 'given'}): {draft.args.vocab_size} tokens against "
                            f"{model.args.vocab_size}, or the same ids for other text; a draft must share the "
                            "model's tokenizer (e.g. Llama-3.2-1B for Llama-3-8B)")


def check_draft_max(draft_max) -> int:
    if not isinstance(draft_max, int) or isinstance(draft_max, bool) or not 1 <= draft_max <= 64:
        raise ArgumentError(f"draft_max (--draft-max) is {draft_max!r}; it must be an integer from 1 to 64")
    return draft_max

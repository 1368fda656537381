"""Step-by-step comparison of an npllama trace with the oracle's: the numbers behind the tests,
the README's error table and `python -m npllama compare`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# float32: every intermediate within 1e-5 of the oracle's largest magnitude at that step.
# The two sides sum in different orders (BLAS blocking, complex vs real RoPE), which moves
# results by a few float32 ulps per step; 1e-5 leaves room for that over 30+ layers but is
# far below any real bug (a wrong eps or theta shows up at 1e-3 or more).
FLOAT32_BOUND = 1e-5
# bf16 flow: both sides round to bf16 at the same points, so most elements are bit-identical;
# an element whose float32 value sits on a rounding boundary may round the other way (1 bf16
# ulp, 2^-8 relative) and that difference then propagates. Bound: 2 bf16 ulps of the step's max.
BFLOAT16_BOUND = 2 * 2.0 ** -8


@dataclass
class StepError:
    name: str
    max_abs: float
    max_rel: float  # max|npllama - oracle| / max|oracle| over the step's finite elements
    identical: float  # fraction of bit-identical elements
    bound: float

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.bound


def step_error(name: str, ours: np.ndarray, theirs: np.ndarray, bound: float) -> StepError:
    if ours.shape != theirs.shape:
        raise AssertionError(f"{name}: npllama shape {ours.shape} != oracle shape {theirs.shape}")
    finite = np.isfinite(theirs)
    if not np.array_equal(finite, np.isfinite(ours)) or not np.array_equal(ours[~finite], theirs[~finite]):
        return StepError(name, np.inf, np.inf, 0.0, bound)  # e.g. the mask in the wrong place
    diff = np.abs(ours[finite].astype(np.float64) - theirs[finite])
    scale = float(np.max(np.abs(theirs[finite]), initial=0.0)) or 1.0
    max_abs = float(diff.max(initial=0.0))
    return StepError(name, max_abs, max_abs / scale, float(np.mean(ours == theirs)), bound)


def compare_traces(ours: dict, theirs: dict, bound: float) -> list[StepError]:
    """One row per intermediate, in the order npllama computed them."""
    missing = set(ours) ^ set(theirs)
    if missing:
        raise AssertionError(f"traces name different steps: {sorted(missing)[:5]}")
    return [step_error(name, ours[name], theirs[name], bound) for name in ours]


def format_table(rows: list[StepError]) -> str:
    lines = [f"{'step':<28} {'max abs diff':>13} {'max rel diff':>13} {'identical':>10} {'bound':>9}  ok",
             "-" * 82]
    for r in rows:
        lines.append(f"{r.name:<28} {r.max_abs:>13.3e} {r.max_rel:>13.3e} {r.identical:>10.2%} "
                     f"{r.bound:>9.1e}  {'yes' if r.ok else 'NO'}")
    return "\n".join(lines)

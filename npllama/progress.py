"""A progress line on stderr for a step a person waits for: loading, dequantizing, a long prefill.

Silent for the step's first two seconds (most steps end before anyone wonders), then redrawn at
most ten times a second with the fraction done and the time left, and closed with one line
saying how long the step took. On a terminal the line is redrawn in place; piped into a file,
only the closing line is written, so logs stay readable.
"""

from __future__ import annotations

import sys
import time

QUIET_SECONDS = 2.0
REDRAW_SECONDS = 0.1


class Progress:
    open_steps = 0  # only the outermost open step reports: perplexity's line covers its windows

    def __init__(self, what: str, total: float, unit: str = "", enabled: bool = True, stream=None):
        self.what, self.total, self.unit = what, max(total, 1e-9), unit
        self.enabled = enabled and Progress.open_steps == 0
        self.stream = stream or sys.stderr
        self.start = self.drawn = time.monotonic()
        self.shown = False
        self.width = 0  # the longest line drawn, which the next must cover

    def update(self, done: float, note: str = "") -> None:
        if not self.enabled:  # a decode step's layers come here too: nothing else to pay
            return
        now = time.monotonic()
        if now - self.start < QUIET_SECONDS or now - self.drawn < REDRAW_SECONDS:
            return
        self.drawn, self.shown = now, True
        if not self._is_terminal():
            return
        fraction = min(done / self.total, 1.0)
        left = (now - self.start) * (1 - fraction) / fraction if fraction > 0 else float("inf")
        bar = "#" * int(30 * fraction)
        line = f"{self.what}: [{bar:<30}] {100 * fraction:5.1f}% {self._amount(done)} {_seconds(left)} left {note}"
        self.width = max(self.width, len(line))
        self.stream.write(f"\r{line:<{self.width}}")
        self.stream.flush()

    def __enter__(self) -> Progress:
        Progress.open_steps += 1
        return self

    def __exit__(self, *exc) -> None:
        """The closing line, if the step took long enough to have shown progress: in a log one
        clean line; on a terminal it overwrites the bar, padded over the bar's longer text."""
        Progress.open_steps -= 1
        if self.enabled and self.shown:
            amount = f", {_number(self.total)} {self.unit}" if self.unit else ""
            line = f"{self.what}: done{amount} in {_seconds(time.monotonic() - self.start)}"
            if self._is_terminal():
                line = f"\r{line:<{self.width}}"
            self.stream.write(line + "\n")
            self.stream.flush()

    def _amount(self, done: float) -> str:
        return f"({_number(done)}/{_number(self.total)} {self.unit})" if self.unit else ""

    def _is_terminal(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False


def _number(x: float) -> str:
    """A count as an integer (20 windows, 30 layers), an amount with one decimal (1.5 G weights)."""
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def _seconds(s: float) -> str:
    if s == float("inf"):
        return "?"
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.1f} min"

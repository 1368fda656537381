"""The progress line: silent for a quick step, drawn for a slow one, one closing line in logs."""

from __future__ import annotations

import io

from npllama import progress as P
from npllama.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self, monkeypatch):
        self.now = 100.0
        monkeypatch.setattr(P.time, "monotonic", lambda: self.now)


def test_a_quick_step_prints_nothing(monkeypatch):
    clock, out = Clock(monkeypatch), Terminal()
    with Progress("loading", 10, "GB", stream=out) as p:
        clock.now += 1.5
        p.update(10)
    assert out.getvalue() == ""


def test_a_slow_step_draws_and_closes(monkeypatch):
    clock, out = Clock(monkeypatch), Terminal()
    with Progress("dequantizing", 8, "GB", stream=out) as p:
        clock.now += 3
        p.update(2)
        clock.now += 0.05  # too soon to redraw
        p.update(3)
        clock.now += 3
        p.update(4)
    lines = out.getvalue().split("\r")
    assert "25.0% (2/8 GB) 9s left" in lines[1]  # 3 s for a quarter: 9 s to go
    assert "50.0% (4/8 GB) 6s left" in lines[2] and len(lines) == 4
    assert lines[3].startswith("dequantizing: done, 8 GB in 6s") and lines[3].endswith("\n")
    assert len(lines[3]) - 1 >= len(lines[2])  # it covers the longer bar it replaces


def test_in_a_log_only_the_closing_line(monkeypatch):
    clock, out = Clock(monkeypatch), io.StringIO()
    with Progress("prefill of 4000 tokens", 30, "layers", stream=out) as p:
        clock.now += 5
        p.update(15)
        clock.now += 5
    assert out.getvalue() == "prefill of 4000 tokens: done, 30 layers in 10s\n"  # one clean line


def test_counts_are_integers_and_amounts_keep_a_decimal(monkeypatch):
    clock, out = Clock(monkeypatch), Terminal()
    with Progress("copying", 2.5, "G weights", stream=out) as p:
        clock.now += 3
        p.update(1.25)
    assert "(1.2/2.5 G weights)" in out.getvalue() or "(1.3/2.5 G weights)" in out.getvalue()
    assert "done, 2.5 G weights in 3s" in out.getvalue()


def test_disabled_prints_nothing(monkeypatch):
    clock, out = Clock(monkeypatch), Terminal()
    with Progress("loading", 1, enabled=False, stream=out) as p:
        clock.now += 10
        p.update(1)
    assert out.getvalue() == ""


def test_only_the_outermost_step_reports(monkeypatch):
    """perplexity's line covers its windows: each window's prefill, inside it, stays silent."""
    clock, out = Clock(monkeypatch), Terminal()
    with Progress("perplexity", 2, "windows", stream=out) as outer:
        for window in range(2):
            with Progress("prefill of 512 tokens", 30, "layers", stream=out) as inner:
                clock.now += 5
                inner.update(30)
            outer.update(window + 1)
    assert "prefill" not in out.getvalue() and "perplexity: done" in out.getvalue()
    with Progress("prefill of 512 tokens", 30, "layers", stream=out) as alone:  # none open: it reports
        clock.now += 5
        alone.update(30)
    assert "prefill of 512 tokens: done" in out.getvalue()

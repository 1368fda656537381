"""Threads that fit the machine as it is: a fixed count when asked for, else the free cores."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_info

import npllama
import npllama.engine
from npllama import threads as T
from npllama.errors import ArgumentError
from npllama.threads import Threads


class FakeMachine:
    """/proc/stat's busy seconds, this process's CPU seconds and the clock, set by the test."""

    def __init__(self, monkeypatch, cores: int = 2):
        self.busy, self.own, self.now = 100.0, 10.0, 1000.0
        monkeypatch.setattr(T, "machine_busy_seconds", lambda: self.busy)
        monkeypatch.setattr(T.time, "process_time", lambda: self.own)
        monkeypatch.setattr(T.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(T, "available_cores", lambda: cores)

    def run(self, seconds: float, own_cores: float, foreign_cores: float):
        """`seconds` pass with npllama using own_cores and other processes foreign_cores."""
        self.now += seconds
        self.own += own_cores * seconds
        self.busy += (own_cores + foreign_cores) * seconds


def blas_threads() -> list[int]:
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


def test_a_busy_core_is_left_to_its_process(monkeypatch):
    monkeypatch.delenv(T.ENV, raising=False)
    machine = FakeMachine(monkeypatch)
    threads = Threads()
    assert threads.adaptive and threads.max == 2
    machine.run(0.5, own_cores=1.9, foreign_cores=0.05)  # idle machine: both cores are ours
    assert threads.update() == 2
    machine.run(0.5, own_cores=1.0, foreign_cores=1.0)  # a build spinning on one core
    assert threads.update() == 1
    machine.run(0.1, own_cores=1.0, foreign_cores=0.0)  # too soon to measure again
    assert threads.update() == 1
    machine.run(0.4, own_cores=1.0, foreign_cores=0.1)  # the build is done
    assert threads.update() == 2
    machine.run(0.5, own_cores=0.5, foreign_cores=2.0)  # every core taken: still one thread
    assert threads.update() == 1


def test_an_explicit_count_is_kept_whatever_the_load(monkeypatch):
    machine = FakeMachine(monkeypatch)
    monkeypatch.setenv(T.ENV, "2")
    threads = Threads()
    machine.run(0.5, own_cores=1.0, foreign_cores=1.0)
    assert not threads.adaptive and threads.update() == 2
    assert Threads(1).update() == 1  # the argument wins over the environment


@pytest.mark.parametrize("value", ["0", "two", "-1", "1.5"])
def test_a_bad_environment_value_is_named(monkeypatch, value):
    monkeypatch.setenv(T.ENV, value)
    with pytest.raises(ArgumentError, match=T.ENV):
        Threads()


@pytest.mark.parametrize("value", [0, -2, 1.5, True])
def test_a_bad_argument_is_named(value):
    with pytest.raises(ArgumentError, match="threads"):
        Threads(value)


def test_blas_threads_are_set_for_a_forward_pass_and_restored_after(monkeypatch, random_checkpoint):
    from oracle.checkpoints import tiny_args
    model = npllama.load(random_checkpoint(tiny_args()), threads=1)
    before = blas_threads()
    seen = []
    original = npllama.engine.linear

    def spy(*args):
        seen.append(blas_threads())
        return original(*args)

    monkeypatch.setattr(npllama.engine, "linear", spy)
    model.forward([1, 2, 3])
    assert seen and all(counts == [1] * len(before) for counts in seen)
    assert blas_threads() == before


def test_cli_threads_flag(capsys, tmp_path):
    from npllama import cli
    assert cli.main(["-m", str(tmp_path / "none"), "-t", "0"]) == 2
    assert "threads (-t) is 0" in capsys.readouterr().err

"""The fuzz suite in CI: a minute of tests/fuzz.py with a fixed seed must find no bug, the seeds
must load unmutated, and the harness must recognise each kind of bug when a deliberately broken
loader commits it.

The fuzzer is run as a person runs it, `python -m tests.fuzz`: test modules do not import one
another (test_layout.py), and its workers are processes anyway. The broken loaders are the
functions below, which the workers import from this module by name (--target)."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

import npllama

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow  # the fuzzer


def fuzz(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.fuzz", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def saved_outcomes(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/outcome.json"))]


@pytest.mark.parametrize("fmt", ["meta", "gguf", "hf"])
def test_fifteen_seconds_of_fuzzing_each_format_finds_no_bug(fmt, tmp_path):
    run = fuzz("--minutes", "0.25", "--seed", "0", "--formats", fmt, "--out", str(tmp_path))
    print(run.stdout)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr[-3000:]}\nfailing inputs saved in {tmp_path}"


def test_every_seed_loads_and_runs_unmutated():
    run = fuzz("--inputs", "0")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "seeds load and run unmutated: meta, gguf, hf, hf-sharded" in run.stdout


# ---- Deliberately broken loaders, one per kind of bug ---------------------------------------

def raises_key_error(path):
    raise KeyError(path)


def sleeps_forever(path):
    time.sleep(3600)


def allocates_2_gb(path):
    bytearray(2 << 30)


def aborts(path):
    os.abort()


def runs_out_of_memory_in_rust(path):
    """What a Rust extension (tiktoken) does when an allocation fails: say so, then abort."""
    os.write(2, b"memory allocation of 2147483648 bytes failed\n")
    os.abort()


def refuses_with_an_npllama_error(path):
    raise npllama.CheckpointError(f"{path}: refused, as a reader should refuse a bad file")


class UnsafeUnpickler(pickle.Unpickler):
    """What torch.load(weights_only=False) amounts to: whatever the pickle names is called. Torch's
    own globals become no-ops, so that torch need not be imported."""

    def find_class(self, module, name):
        if module.startswith("torch"):
            return lambda *args: None
        return super().find_class(module, name)

    def persistent_load(self, pid):
        return None


def unpickles_unsafely(path):
    with zipfile.ZipFile(Path(path) / "consolidated.00.pth") as z:
        pkl = next(name for name in z.namelist() if name.endswith("/data.pkl"))
        UnsafeUnpickler(io.BytesIO(z.read(pkl))).load()


@pytest.mark.parametrize("target, outcome, error", [
    ("raises_key_error", "other_exception", "KeyError"),
    ("sleeps_forever", "hang", ""),
    ("allocates_2_gb", "memory", "MemoryError"),
    ("aborts", "crash", ""),
    ("runs_out_of_memory_in_rust", "memory", ""),
])
def test_the_harness_recognises_each_kind_of_bug(target, outcome, error, tmp_path):
    run = fuzz("--inputs", "2", "--formats", "gguf", "--target", f"tests.test_fuzz:{target}", "--out", str(tmp_path))
    assert run.returncode == 1, run.stdout + run.stderr
    found = saved_outcomes(tmp_path)
    assert [(o["outcome"], o["type"]) for o in found] == [(outcome, error)] * 2, run.stdout
    assert f"2 x {outcome}" in run.stdout


def test_the_harness_finds_where_a_hang_is_stuck(tmp_path):
    fuzz("--inputs", "1", "--formats", "gguf", "--target", "tests.test_fuzz:sleeps_forever", "--out", str(tmp_path))
    assert saved_outcomes(tmp_path)[0]["where"] == "test_fuzz.py sleeps_forever"


def test_npllama_errors_are_not_bugs(tmp_path):
    run = fuzz("--inputs", "4", "--formats", "gguf", "--target", "tests.test_fuzz:refuses_with_an_npllama_error",
               "--out", str(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert not saved_outcomes(tmp_path)


def test_the_harness_sees_code_run_from_a_pickle(tmp_path):
    """Some mutations inject pickle opcodes that create a marker file if what they name is called:
    an unsafe unpickler calls it; npllama's must not."""
    run = fuzz("--inputs", "200", "--formats", "meta", "--target", "tests.test_fuzz:unpickles_unsafely",
               "--out", str(tmp_path))
    executed = [o for o in saved_outcomes(tmp_path) if o["outcome"] == "code_executed"]
    assert executed, run.stdout
    assert all(any("inject" in m for m in o["mutations"]) for o in executed)

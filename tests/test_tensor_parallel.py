"""Tensor parallelism over MPI (npllama/tensor_parallel.py, formats/shares.py): N processes under
`mpiexec` give the single process's logits (within 1e-5 of their largest) and its tokens, each
holding 1/N of the weights; a failure on any rank ends them all; a model that cannot be split N
ways is refused before a weight is read. mpiexec -n 4 oversubscribes a 2-core machine: fine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import npllama
from npllama.config import EMBEDDING

from npllama.formats.meta import params_json
from npllama.errors import ConfigError
from npllama.tensor_parallel import RankArgs, rank_args, share, splits
from oracle.checkpoints import (TINY_RANKS, TINY_SPECIALS, llama3_tokenizer_path, random_state_dict, tiny_args,
                                tiny_gguf, tiny_model_files, write_model_files, write_shards)

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mpi_worker.py"
MPIEXEC = Path(sys.executable).with_name("mpiexec")
# 8 query and 4 key/value heads: splits 1, 2 or 4 ways.
ARGS = tiny_args(n_heads=8, n_kv_heads=4)


def mpiexec(n: int, *command: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    assert MPIEXEC.exists(), f"{MPIEXEC} is missing: the test extra installs mpi4py and mpich"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(MPIEXEC), "-n", str(n), sys.executable, *command], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO, **kwargs)


def single(*command: str, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    return subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO, **kwargs)


def run_worker(model: Path, n: int, out: Path) -> tuple[dict, list[dict]]:
    """The worker's results over n ranks (n = 1: plain python, no mpiexec), and each rank's report."""
    done = mpiexec(n, str(WORKER), str(model), str(out)) if n > 1 else single(str(WORKER), str(model), str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(n)]
    with np.load(f"{out}.npz") as results:
        return dict(results), reports


def meta_checkpoint(directory: Path, n_shards: int, args=ARGS) -> Path:
    """A random bf16 Meta checkpoint saved as Meta saves an n-way model-parallel one."""
    write_shards(directory, random_state_dict(args, seed=3), n_shards)
    (directory / "params.json").write_text(json.dumps(params_json(args)))
    shutil.copy(llama3_tokenizer_path(), directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process results of every model the tests split, computed once."""
    root = tmp_path_factory.mktemp("tp")
    models = {"meta": meta_checkpoint(root / "meta1", 1), "meta2": meta_checkpoint(root / "meta2", 2),
              "meta4": meta_checkpoint(root / "meta4", 4)}
    gguf_args = replace(ARGS, vocab_size=len(TINY_RANKS) + len(TINY_SPECIALS), multiple_of=32)
    from gguf import GGMLQuantizationType
    models["gguf"] = tiny_gguf(root / "q8.gguf", gguf_args, GGMLQuantizationType.Q8_0)
    models["hf"] = write_model_files(root / "hf", tiny_model_files("hf"))
    results = {}
    for name in ("meta", "gguf", "hf"):
        results[name] = run_worker(models[name], 1, root / f"{name}-single")
    results["meta2"] = results["meta4"] = results["meta"]  # the same weights, saved in shards
    return models, results, root


def assert_same_run(split: dict, whole: dict) -> None:
    bound = 1e-5 * np.abs(whole["logits"]).max()
    assert np.abs(split["logits"] - whole["logits"]).max() <= bound
    for key in ("greedy", "sampled", "batch"):
        np.testing.assert_array_equal(split[key], whole[key], err_msg=key)


@pytest.mark.slow  # mpiexec
@pytest.mark.parametrize("model,n", [("meta2", 2), ("meta4", 4), ("meta", 2), ("gguf", 2), ("gguf", 4), ("hf", 2),
                                     ("hf", 4)])
def test_n_ranks_compute_what_one_process_does(reference, model, n):
    """Logits within 1e-5 x max, and identical greedy, seeded-sampled and batched tokens: from
    Meta checkpoints saved in n shards (each rank maps its own), from one Meta file, a Q8_0 GGUF
    (quantized rows produced lazily, a vocabulary of 265 that 4 ranks split unevenly) and a
    Hugging Face directory (q/k rows reordered lazily; on 4 ranks, 2 kv heads each shared by two
    ranks), each rank taking its part."""
    models, results, root = reference
    whole, single_reports = results[model]
    split, reports = run_worker(models[model], n, root / f"{model}-{n}")
    assert [r["size"] for r in reports] == [n] * n
    assert_same_run(split, whole)
    one, args = single_reports[0], npllama.load(models[model]).args
    assert one["resident_bytes"] == resident_bytes(args, 0, 1)
    kv_heads = max(args.n_kv_heads // n, 1)  # more ranks than kv heads: each holds one, shared
    for r in reports:  # each rank its heads, its KV cache and its part of the weights
        assert (r["n_heads"], r["n_kv_heads"]) == (args.n_heads // n, kv_heads)
        assert r["cache_bytes"] == one["cache_bytes"] * kv_heads // args.n_kv_heads
        assert r["resident_bytes"] == resident_bytes(args, r["rank"], n)
    if n <= args.n_kv_heads:  # nothing replicated: the parts add up to the whole
        assert sum(r["resident_bytes"] for r in reports) == one["resident_bytes"]


def resident_bytes(args, rank: int, n: int) -> int:
    """What rank's float32 copy of the weight matrices should take, by Meta's split: its rows of
    wq, wk, wv, w1, w3 and of the output (by vocabulary), its columns of wo and w2; one head's
    rows of wk and wv when n exceeds the kv heads. The embedding stays memory-mapped."""
    def part(n_items: int) -> int:
        lo, hi = share(n_items, rank, n)
        return hi - lo

    total = 0
    for name, shape in args.weight_shapes().items():
        key = name.split(".")[-2]
        if name == EMBEDDING.meta and not args.tie_embeddings:
            continue
        if len(shape) == 1:  # the norms: every rank holds them whole (a float32 file's, mapped)
            continue
        if key in ("wk", "wv") and n > args.n_kv_heads:
            size = args.head_dim * shape[1]
        elif key in ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings"):
            size = part(shape[0]) * shape[1]
        else:  # wo, w2
            size = shape[0] * part(shape[1])
        total += 4 * size
    return total


@pytest.mark.slow  # mpiexec
def test_a_shard_file_is_the_only_weights_file_a_rank_opens(reference, tmp_path):
    """Rank r of a 2-shard checkpoint opens consolidated.0r.pth and no other weights file: with
    one shard replaced by garbage, the error comes from the rank that owns it, naming it."""
    models, _, _ = reference
    for broken in (0, 1):
        directory = tmp_path / f"broken{broken}"
        shutil.copytree(models["meta2"], directory)
        (directory / f"consolidated.{broken:02d}.pth").write_bytes(b"not a checkpoint")
        done = mpiexec(2, "-m", "npllama", "-m", str(directory), "-p", "hi", "-n", "2", timeout=60)
        assert done.returncode != 0
        assert f"consolidated.{broken:02d}.pth" in done.stderr
        assert f"rank {broken} of 2" in done.stderr  # the rank that owns the file, and only it, read it


@pytest.mark.slow  # mpiexec
def test_the_command_line_prints_the_same_text(reference):
    """Rank 0 reads, samples and prints; the others stay silent: stdout is the single process's,
    for a seeded stream and for a chat whose messages come on stdin (which mpiexec gives rank 0)."""
    models, _, _ = reference
    stream = ["-m", "npllama", "-m", str(models["meta2"]), "-p", "Once upon a time", "-n", "24",
              "--temperature", "0.9", "-s", "5"]
    chat = ["-m", "npllama", "-m", str(models["meta2"]), "--chat", "-n", "12"]
    for command, stdin in ((stream, None), (chat, "hello there\nand again\n")):
        one = single(*command, input=stdin)
        two = mpiexec(2, *command, input=stdin)
        assert one.returncode == two.returncode == 0, two.stderr[-2000:]
        assert two.stdout == one.stdout and one.stdout.strip()


@pytest.mark.slow  # mpiexec
def test_a_rank_that_raises_ends_every_rank(reference, tmp_path):
    """Rank 1 fails while rank 0 waits for it inside a forward pass's all-reduce: mpiexec exits
    non-zero within 30 s, and the failing rank's message is shown."""
    models, _, _ = reference
    script = tmp_path / "fail.py"
    script.write_text(
        "import sys, npllama\n"
        f"model = npllama.load({str(models['meta2'])!r})\n"
        "if model.group.rank == 1:\n"
        "    raise RuntimeError('planted failure on rank 1')\n"
        "model.forward([1, 2, 3])\n")
    start = time.monotonic()
    done = mpiexec(2, str(script), timeout=60)
    assert time.monotonic() - start < 30
    assert done.returncode != 0
    assert "planted failure on rank 1" in done.stderr


@pytest.mark.slow  # mpiexec
def test_the_command_line_ends_every_rank_on_an_error(reference, tmp_path):
    """An error on one rank only (rank 0 cannot read the prompt file, the others never try) ends all."""
    models, _, _ = reference
    start = time.monotonic()
    done = mpiexec(2, "-m", "npllama", "-m", str(models["meta2"]), "-f", str(tmp_path / "missing.txt"), timeout=60)
    assert time.monotonic() - start < 30
    assert done.returncode != 0
    assert "missing.txt" in done.stderr and "rank 0 of 2" in done.stderr


@pytest.mark.slow  # mpiexec
def test_a_model_that_cannot_be_split_n_ways_is_refused_before_any_weight_is_read(reference, tmp_path):
    """3 ranks for 4 key/value heads: refused from params.json (consolidated.00.pth here is garbage,
    and the error is still this one); a 2-shard checkpoint on 4 ranks: refused, naming the shards."""
    models, _, _ = reference
    directory = tmp_path / "garbage"
    shutil.copytree(models["meta"], directory)
    (directory / "consolidated.00.pth").write_bytes(b"garbage")
    done = mpiexec(3, "-m", "npllama", "-m", str(directory), "-n", "1", timeout=60)
    assert done.returncode != 0
    assert "params.json: 3 processes cannot share this model's 8 query and 4 key/value heads" in done.stderr
    assert "one of 1, 2, 4, 8" in done.stderr

    done = mpiexec(4, "-m", "npllama", "-m", str(models["meta2"]), "-n", "1", timeout=60)
    assert done.returncode != 0
    assert "saved in 2 model-parallel shards, but mpiexec started 4 processes" in done.stderr


@pytest.mark.slow
def test_without_mpi4py_the_error_says_how_to_install_it(reference):
    code = ("import sys; sys.modules['mpi4py'] = None; from npllama.cli import main; "
            f"sys.exit(main(['-m', {str(reference[0]['meta'])!r}, '-n', '1']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PMI_SIZE": "2"})  # as mpiexec sets it
    assert done.returncode == 2
    assert 'pip install "npllama[mpi]"' in done.stderr


@pytest.mark.slow
def test_one_process_never_imports_mpi4py(reference):
    code = ("import sys, npllama; m = npllama.load(sys.argv[1]); list(m.generate([1, 2], 3)); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'")
    done = single("-c", code, str(reference[0]["meta"]))
    assert done.returncode == 0, done.stderr[-2000:]


@settings(max_examples=60, deadline=None)
@given(n_kv_heads=st.integers(1, 8), n_rep=st.integers(1, 4), data=st.data())
def test_the_ranks_parts_tile_every_weight(n_kv_heads, n_rep, data):
    """For any split that `splits` allows: the parts cover every weight, each element once (wk and
    wv: each head size / n_kv_heads times when there are more ranks than kv heads), on Meta's
    split axes, in whole heads; every query head of a rank finds its kv head (h // n_rep) among
    the rank's own; the part shapes are what RankArgs.weight_shapes says a shard holds."""
    n_heads = n_kv_heads * n_rep
    size = data.draw(st.sampled_from([n for n in range(1, 2 * n_heads + 1) if splits(n_heads, n_kv_heads, n)]))
    args = replace(tiny_args(dim=8 * n_heads, n_heads=n_heads, n_kv_heads=n_kv_heads), vocab_size=1001)
    ranks = [rank_args(args, r, size, "test") for r in range(size)]
    hd = args.head_dim
    for name, shape in args.weight_shapes().items():
        parts = [r.slices().get(name) for r in ranks]
        if parts[0] is None:  # a norm: every rank holds it whole
            assert all(p is None for p in parts) and len(shape) == 1
            continue
        axis = parts[0][0]
        assert [p[0] for p in parts] == [axis] * size
        assert [r.weight_shapes()[name][axis] for r in ranks] == [hi - lo for _, lo, hi in parts]
        covered = np.zeros(shape[axis], int)
        for _, lo, hi in parts:
            covered[lo:hi] += 1
        replicated = name.endswith(("wk.weight", "wv.weight")) and size > n_kv_heads
        assert (covered == (size // n_kv_heads if replicated else 1)).all(), name
        if name.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight")):
            assert all(lo % hd == 0 and hi % hd == 0 for _, lo, hi in parts)  # whole heads
    for r in ranks:  # grouped-query attention stays within the rank
        q_lo, q_hi = r.slices()["layers.0.attention.wq.weight"][1:]
        kv_lo, kv_hi = r.slices()["layers.0.attention.wk.weight"][1:]
        assert all(kv_lo // hd <= h // n_rep < kv_hi // hd for h in range(q_lo // hd, q_hi // hd))
        assert r.n_heads // r.n_kv_heads == (n_rep if size <= n_kv_heads else n_heads // size)
        assert isinstance(r, RankArgs) and r.head_dim == hd


def test_a_split_into_parts_that_are_not_whole_heads_is_refused():
    args = tiny_args(n_heads=8, n_kv_heads=2)
    for size in (3, 5, 6, 16):
        with pytest.raises(ConfigError, match="run mpiexec -n with one of 1, 2, 4, 8"):
            rank_args(args, 0, size, "params.json")

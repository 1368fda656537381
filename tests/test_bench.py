"""benchmarks/bench.py runs end to end (--quick) and reports every figure for both engines;
benchmarks/torch_llama.py, the baseline, computes what the oracle computes. No time is asserted:
timings on a shared machine prove nothing in a test."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from torch_llama import TorchLlama  # noqa: E402

from npllama.config import RopeScaling  # noqa: E402
from oracle.checkpoints import random_state_dict, tiny_args  # noqa: E402
from oracle.reference import Oracle  # noqa: E402

ENGINE_FIGURES = ("load_s", "prefill_tok_s", "decode_tok_s", "decode_ms_at_context",
                  "decode_bandwidth_pct", "decode_bandwidth_pct_of_run_best", "peak_memory_mb",
                  "context_slowdown", "greedy_tokens", "foreign_cores")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    md = tmp / "table.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--json", str(out),
         "--markdown", str(md), "--cache-dir", str(tmp / "cache"), "--profile"],
        cwd=tmp, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout, proc.stderr, md.read_text()


def stat_ok(s):
    return set(s) >= {"median", "min", "max"} and s["min"] <= s["median"] <= s["max"] and s["median"] > 0


def test_json_has_every_figure_for_both_engines(quick_run):
    results, *_ = quick_run
    model = results["models"]["tiny"]
    assert model["status"] == "ok"
    settings = results["settings"]
    for name in ("npllama", "torch"):
        e = model["engines"][name]
        assert e["status"] == "ok", e.get("error")
        missing = [k for k in ENGINE_FIGURES if k not in e]
        assert not missing, f"{name} lacks {missing}"
        assert stat_ok(e["load_s"]) and stat_ok(e["decode_tok_s"]) and stat_ok(e["decode_bandwidth_pct"])
        assert sorted(map(int, e["prefill_tok_s"])) == sorted(settings["prefill"])
        assert sorted(map(int, e["decode_ms_at_context"])) == sorted(settings["contexts"])
        assert all(stat_ok(s) for s in [*e["prefill_tok_s"].values(), *e["decode_ms_at_context"].values()])
        assert all(e["peak_memory_mb"][k] > 0 for k in ("RssAnon", "RssFile", "VmHWM"))
        assert e["info"]["weight_bytes_per_token"]["bytes"] > 0
        assert len(e["greedy_tokens"]) == settings["decode_tokens"] + 1
    assert model["greedy_agreement"]["of"] == settings["decode_tokens"] + 1


def test_json_has_machine_info_and_bandwidth(quick_run):
    results, *_ = quick_run
    m = results["machine"]
    assert m["cpu_count"] >= 1 and m["ram_gb"] > 0 and m["numpy"] and m["torch"]
    bw = results["bandwidth"]
    assert bw["limit_gb_s"] > 0
    for when in ("start", "end"):  # probed before and after the models
        assert {"matvec_numpy_gemv", "matvec_numpy_linear", "matvec_torch_linear",
                "upcast_astype", "upcast_into", "streamed_matvec"} <= set(bw["probes"][when]["probes"])


def test_profile_names_the_weight_matmuls(quick_run):
    results, *_ = quick_run
    prof = results["profiles"]["tiny"]
    assert prof["status"] == "ok", prof.get("error")
    assert prof["top_tottime"] and prof["matmuls"]["matmul_ms_per_token"] > 0
    # Resident weights take the fused fast path: q|k|v and w1|w3 are one matmul each.
    assert {"wqkv", "wo", "w13", "w2", "output"} <= set(prof["matmuls"]["by_weight"])


def test_markdown_table_prints(quick_run):
    results, stdout, stderr, markdown = quick_run
    assert "| figure | npllama | torch | npllama speedup |" in stdout
    for label in ("load (s)", "prefill 8 tokens (tok/s)", "decode 4 tokens (tok/s)",
                  "decode at context 64 (ms/token)", "% of bandwidth limit", "peak RssAnon"):
        assert label in stdout
    assert markdown.strip() == stdout.strip()
    assert "[tiny/npllama]" in stderr and "[tiny/torch]" in stderr  # progress on stderr


def test_a_failed_request_is_kept_as_data():
    """A worker that fails is asked nothing more, and its error and cost are reported, not raised:
    one failed engine must leave the other's figures standing."""
    from interleave import Worker
    worker = Worker("test", threads=None)
    spec = {"path": str(ROOT / "no-such-checkpoint"), "weights_budget": None}
    assert worker.ask("engine", engine="npllama", spec=spec, cfg={"max_seq_len": 8}) == {}
    assert worker.ask("load") is None
    assert worker.ask("setup") is None
    out = worker.close()
    assert out["status"] == "error" and out["error"].startswith("load: ")
    assert "no-such-checkpoint" in out["error"]
    assert out["peak_memory_sampled_mb"]["VmRSS"] > 0 and out["wall_s"] > 0


@pytest.mark.parametrize("gqa", ["sdpa", "repeat_kv"])
@pytest.mark.parametrize("overrides", [{}, dict(rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True),
                                       dict(n_kv_heads=8)])
def test_torch_baseline_matches_oracle(gqa, overrides):
    """Prefill, a second chunk through the cache, then a decode step: the baseline does the
    same math as the oracle."""
    args = tiny_args(**overrides)
    state = random_state_dict(args, seed=3)
    oracle = Oracle(args, state, max_seq_len=32)
    model = TorchLlama(args, state, max_seq_len=32, gqa=gqa)
    model.new_cache()
    tokens = list(range(100, 117))
    for chunk, start in ((tokens[:10], 0), (tokens[10:], 10), ([5], 17)):
        want = oracle.forward(chunk, start)
        got = model.forward(torch.tensor(chunk), start, last_only=False).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())

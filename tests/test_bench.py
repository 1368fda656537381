"""benchmarks/bench.py runs end to end (--quick) and reports every figure for both engines, idle
and under load; an engine a model cannot run is reported as not run; benchmarks/torch_llama.py,
the baseline, computes what the oracle computes; the F32 GGUF for llama.cpp holds npllama's
weights. No time is asserted: timings on a shared machine prove nothing in a test."""

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

import npllama  # noqa: E402
from npllama.config import RopeScaling  # noqa: E402
from oracle.checkpoints import random_state_dict, tiny_args, tiny_gguf  # noqa: E402
from oracle.reference import Oracle  # noqa: E402

ENGINE_FIGURES = ("load_s", "prefill_tok_s", "decode_tok_s", "decode_ms_at_context",
                  "decode_bandwidth_pct", "decode_bandwidth_pct_of_run_best", "peak_memory_mb",
                  "context_slowdown", "greedy_tokens", "foreign_cores", "decode_under_load_tok_s",
                  "decode_under_load_vs_idle")


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
        under = e["decode_under_load_tok_s"]
        assert stat_ok(under) and e["decode_under_load_vs_idle"] > 0
        assert len(under["spinner_cores"]) == under["n"] and max(under["spinner_cores"]) > 0  # it ran
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
    # The engine multiplies q|k|v and w1|w3 as one matmul each.
    assert {"wqkv", "wo", "w13", "w2", "output"} <= set(prof["matmuls"]["by_weight"])


def test_markdown_table_prints(quick_run):
    results, stdout, stderr, markdown = quick_run
    assert "| figure | npllama | torch | npllama speedup |" in stdout
    for label in ("load (s)", "prefill 8 tokens (tok/s)", "decode 4 tokens (tok/s)",
                  "decode at context 64 (ms/token)", "% of bandwidth limit", "peak RssAnon",
                  "decode under load / idle"):
        assert label in stdout
    assert markdown.strip() == stdout.strip()
    assert "[tiny/npllama]" in stderr and "[tiny/torch]" in stderr  # progress on stderr


def test_an_engine_the_model_cannot_run_is_not_run(tmp_path):
    """spec["unavailable"] starts no worker for that engine: it is reported as not run, with the
    reason, and the other engine's figures stand."""
    import bench
    import prepare
    from interleave import engine_cfg, measure_engines
    from machine import QuietMachine
    from report import derive, model_notes, model_table
    a = bench.parse_args(["--quick", "--max-wait", "0"])
    spec = dict(prepare.prepare("tiny", tmp_path), unavailable={"torch": "a reason of the spec's"})
    model = {"status": "ok", "spec": spec, "settings": engine_cfg(a, 1),
             **measure_engines(a, "tiny", spec, 1, QuietMachine(0, 0))}
    derive(model, 10.0)
    np_, th = model["engines"]["npllama"], model["engines"]["torch"]
    assert th == {"engine": "torch", "status": "skipped", "reason": "a reason of the spec's"}
    assert np_["status"] == "ok" and np_["decode_under_load_tok_s"]
    notes = "\n".join(model_notes(model))
    assert "torch not run: a reason of the spec's" in notes and "failed" not in notes
    assert any(line.startswith("| decode under load / idle |") for line in model_table(model))


def test_models_that_write_multi_gb_files_need_with_8b():
    import bench
    import prepare
    for name in prepare.BIG_MODELS:
        with pytest.raises(SystemExit):
            bench.parse_args(["--models", name])
        assert bench.parse_args(["--with-8b", "--models", name]).models == [name]
    assert bench.parse_args(["--with-8b", "--models", "tiny"]).models == ["tiny", "8b"]


def test_f32_gguf_for_llama_cpp_holds_npllamas_weights(tmp_path):
    """The GGUF llama.cpp runs: the original's metadata and tensor names, npllama's float32
    weights (here decoded from Q8_0), so npllama computes the same logits from it."""
    import gguf
    import prepare
    original = tiny_gguf(tmp_path / "q8.gguf", qtype=gguf.GGMLQuantizationType.Q8_0)
    copy = prepare.f32_gguf(original, tmp_path / "cache")
    assert prepare.f32_gguf(original, tmp_path / "cache") == copy  # written once
    a, b = gguf.GGUFReader(original), gguf.GGUFReader(copy)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert {t.tensor_type for t in b.tensors} == {gguf.GGMLQuantizationType.F32}
    assert b.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32
    def metadata(reader):
        return {k: f.contents() for k, f in reader.fields.items()
                if not k.startswith(("GGUF.", "general.file_type"))}
    assert metadata(a) == metadata(b)
    tokens = np.array([1, 2, 3])
    # Bit-equal only at one thread count: by default each load follows the machine's load.
    models = [npllama.load(path, threads=2) for path in (original, copy)]
    want, got = (m.forward(tokens, 0, m.new_cache(8)) for m in models)
    np.testing.assert_array_equal(got, want)


def test_a_failed_llama_bench_is_kept_as_data():
    from llama_cpp import LlamaBench
    run = LlamaBench("test", "/bin/false", "no.gguf", threads=1)
    assert run.ask("decode", prompt=1, n=4) is None
    out = run.close()
    assert out["status"] == "error" and "/bin/false" in out["error"]


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

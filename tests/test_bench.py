"""The benchmark harness measures what it says (rounds interleaved and reversed, a busy core that
spins, the load of other processes less the benchmark's own, failures kept as data), and
benchmarks/bench.py runs end to end (--quick) with every figure for both engines, idle and beside a
busy core; suites merged into others keep their commands and results files; benchmarks/torch_llama.py,
the baseline, computes what the oracle computes; the F32 GGUF for llama.cpp holds npllama's weights.
No time is asserted: timings on a shared machine prove nothing in a test."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402
from torch_llama import TorchLlama  # noqa: E402

import npllama  # noqa: E402
from npllama.config import RopeScaling  # noqa: E402
from oracle.checkpoints import random_state_dict, tiny_args, tiny_gguf  # noqa: E402
from oracle.reference import Oracle  # noqa: E402

ENGINE_FIGURES = ("load_s", "prefill_tok_s", "decode_tok_s", "decode_ms_at_context", "decode_bandwidth_pct",
                  "peak_memory_mb", "greedy_tokens", "foreign_cores", "decode_under_load_tok_s", "memory_after_load",
                  "fill_s")


def stat_ok(s):
    return set(s) >= {"median", "min", "max"} and s["min"] <= s["median"] <= s["max"] and s["median"] > 0


# --- The harness ------------------------------------------------------------------------------

def test_summary_and_cell():
    s = harness.summary([3, 1, 2, 10], "s")
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.5, 1, 10, 4)
    assert harness.cell(s) == "2.50 (1.00-10.0)" and harness.cell(None) == "-"
    assert harness.cell(harness.summary([5], "s")) == "5.00"


def test_rounds_reverse_the_order_every_other_round_and_run_busy_cases_beside_a_spinner():
    seen = []

    def run(case):
        seen.append((case["name"], case["load"]))
        if case["load"] == "busy":
            time.sleep(0.3)  # long enough for the busy loop to show
        return {"value": len(seen)}
    cases = [{"name": "a", "load": "idle"}, {"name": "b", "load": "busy"}]
    harness.rounds(cases, run, 3, tag="test")
    assert seen == [("a", "idle"), ("b", "busy"), ("b", "busy"), ("a", "idle"), ("a", "idle"), ("b", "busy")]
    idle, busy = cases
    assert [x["value"] for x in idle["runs"]] == [1, 4, 5] and len(busy["runs"]) == 3
    assert all("spinner_cores" not in x and x["foreign_cores"] >= 0 for x in idle["runs"])
    assert all(x["spinner_cores"] > 0.3 for x in busy["runs"])  # it spun, beside the measurement
    assert harness.stat(busy, "n", "value")["samples"] == [2, 3, 6]


def test_the_benchmarks_own_processes_are_not_foreign_load():
    """A busy loop counted as the benchmark's own is left out of the foreign load: the same interval
    measured with and without it differs by what it ran."""
    with harness.spinner() as (pid, spinner_cores):
        theirs, ours = harness.foreign_load(), harness.foreign_load([pid])
        time.sleep(1.0)
        spun, without, with_it = spinner_cores(), theirs(), ours()
    assert spun > 0.3
    assert abs((without - with_it) - spun) < 0.25, (without, with_it, spun)


def test_run_once_returns_the_reply_of_a_fresh_process_and_raises_on_its_error():
    reply = harness.run_once("harness", "memory_mb", pid=None)
    assert reply["VmRSS"] > 0 and reply["RssAnon"] > 0 and reply["peak_rss_mb"] >= reply["VmRSS"] * 0.5
    with pytest.raises(SystemExit, match="no_such_function"):
        harness.run_once("harness", "no_such_function")


def test_a_failed_request_is_kept_as_data():
    """A worker that fails is asked nothing more, and its error and cost are reported, not raised:
    one failed engine must leave the other's figures standing."""
    worker = harness.Worker("test", "engines")
    spec = {"path": str(ROOT / "no-such-checkpoint"), "weights_budget": None}
    assert worker.ask("Npllama", spec=spec, cfg={"max_seq_len": 8}) is not None
    assert worker.ask("load") is None
    assert worker.ask("setup") is None
    out = worker.close()
    assert out["status"] == "error" and out["error"].startswith("load: ")
    assert "no-such-checkpoint" in out["error"]
    assert out["peak_memory_mb"]["VmRSS"] > 0 and out["wall_s"] > 0


def test_the_machine_is_named():
    m = harness.machine_info()
    assert m["cpu"] and m["cpu_count"] >= 1 and m["ram_gb"] > 0 and m["numpy"] and m["blas"]["num_threads"] >= 1
    line = harness.machine_line(m)
    assert m["cpu"] in line and f"{m['cores_available']} cores" in line and m["numpy"] in line


# --- bench.py -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--quick", "--out",
                           str(tmp / "latest"), "--cache-dir", str(tmp / "cache")],
                          cwd=tmp, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp / "latest.json").read_text()), proc.stdout, proc.stderr, (tmp / "latest.md").read_text()


@pytest.mark.slow
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
        assert all(e["memory_after_load"][k] > 0 for k in ("RssAnon", "RssFile"))
        assert e["info"]["weight_bytes"] > 0
        assert len(e["greedy_tokens"]) == settings["decode_tokens"] + 1
        under = e["decode_under_load_tok_s"]
        assert stat_ok(under)
        assert len(under["spinner_cores"]) == under["n"] and max(under["spinner_cores"]) > 0  # it ran
        assert len(e["foreign_cores"]) >= e["decode_tok_s"]["n"] + under["n"]
    assert model["greedy_agreement"]["of"] == settings["decode_tokens"] + 1
    assert stat_ok(model["bandwidth_during_decode"]) and stat_ok(model["bandwidth_during_busy_decode"])


@pytest.mark.slow
def test_json_has_machine_info_and_bandwidth(quick_run):
    results, *_ = quick_run
    m = results["machine"]
    assert m["cpu_count"] >= 1 and m["ram_gb"] > 0 and m["numpy"] and m["torch"] and results["code"]["commit"]
    limit = results["models"]["tiny"]["bandwidth_during_decode"]
    assert stat_ok(limit) and limit["n"] == results["settings"]["rounds"]


@pytest.mark.slow
def test_markdown_table_prints(quick_run):
    results, stdout, stderr, markdown = quick_run
    assert harness.machine_line(results["machine"]) in stdout
    header = next(line for line in stdout.splitlines() if line.startswith("| figure"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["figure", "npllama", "torch", "npllama speedup"]
    for label in ("load (s)", "prefill 8 tokens (tok/s)", "decode 4 tokens (tok/s)", "decode at context 64 (ms/token)",
                  "% of the bandwidth limit", "peak RssAnon", "the same decode beside a busy core", "bandwidth limit probed"):
        assert label in stdout
    assert markdown.strip() == stdout.strip()
    assert "[tiny decode 4] round 2/2, npllama busy" in stderr  # progress on stderr


@pytest.mark.slow
def test_an_engine_the_model_cannot_run_is_not_run(tmp_path):
    """spec["unavailable"] starts no worker for that engine: it is reported as not run, with the
    reason, and the other engine's figures stand."""
    import bench
    import prepare
    a = bench.parse_args(["--quick"])
    spec = dict(prepare.prepare("tiny", tmp_path), unavailable={"torch": "a reason of the spec's"})
    model = {"status": "ok", "spec": spec, "settings": bench.engine_cfg(a, 1),
             **bench.measure_model(a, "tiny", spec, 1)}
    bench.derive(model)
    np_, th = model["engines"]["npllama"], model["engines"]["torch"]
    assert th == {"engine": "torch", "status": "skipped", "reason": "a reason of the spec's"}
    assert np_["status"] == "ok" and np_["decode_under_load_tok_s"]
    notes = "\n".join(bench.model_notes(model))
    assert "torch: not run: a reason of the spec's" in notes and "failed" not in notes
    assert any(line.startswith("| the same decode beside a busy core") for line in bench.model_table(model).splitlines())


@pytest.mark.slow
def test_batch_suite_runs_end_to_end(tmp_path):
    """One other suite through the same harness: fresh processes, idle and busy, a table a load."""
    env = dict(os.environ, NPLLAMA_BENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "batch.py"), "--models", "tiny", "--batches", "1,2",
                           "--tokens", "3", "--rounds", "1", "--under-load", "--out",
                           str(tmp_path / "batch")], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "batch.json").read_text())["runs"]
    assert {(r["rows"], r["load"]) for r in runs} == {(b, load) for b in (0, 1, 2) for load in ("idle", "busy")}
    assert all(stat_ok(r["tok_s"]) for r in runs)
    assert all(r["runs"][0]["spinner_cores"] > 0 for r in runs if r["load"] == "busy")


def test_models_that_write_multi_gb_files_need_with_8b():
    import bench
    import prepare
    for name in prepare.BIG_MODELS:
        with pytest.raises(SystemExit):
            bench.parse_args(["--models", name])
        assert bench.parse_args(["--with-8b", "--models", name]).models == [name]
    assert bench.parse_args(["--with-8b", "--models", "tiny"]).models == ["tiny", "8b"]
    quick = bench.parse_args(["--quick", "--rounds", "5"])
    assert quick.models == ["tiny"] and quick.rounds == 5 and quick.contexts == [32, 64]


@pytest.mark.slow
@pytest.mark.parametrize("command, results", [("batch.py", "batch"), ("batch.py --base HEAD", "commits"),
                                               ("serve.py", "serve"), ("serve.py --soak", "serve_load")])
def test_merged_suites_keep_their_results_files(command, results):
    """commits.py in batch.py (--base), serve_load.py in serve.py (--soak): each writes the results file it
    wrote."""
    script, *args = command.split()
    shown = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args, "--help"], capture_output=True,
                           text=True, check=True).stdout
    assert f"OUT.md [{ROOT / 'benchmarks' / 'results' / results}]" in " ".join(shown.split())


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
        return {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "general.file_type"))}
    assert metadata(a) == metadata(b)
    tokens = np.array([1, 2, 3])
    # Bit-equal only at one thread count: by default each load follows the machine's load.
    models = [npllama.load(path, threads=2) for path in (original, copy)]
    want, got = (m.forward(tokens, 0, m.new_cache(8)) for m in models)
    np.testing.assert_array_equal(got, want)


def test_a_failed_llama_bench_is_kept_as_data():
    from bench import LlamaBench
    run = LlamaBench("/bin/false", "no.gguf", threads=1)
    assert run.decode(4) is None
    out = run.close()
    assert out["status"] == "error" and "/bin/false" in out["error"]


@pytest.mark.parametrize("overrides", [{}, dict(rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True),
                                       dict(n_kv_heads=8)])
def test_torch_baseline_matches_oracle(overrides):
    """Prefill, a second chunk through the cache, then a decode step: the baseline does the
    same math as the oracle."""
    args = tiny_args(**overrides)
    state = random_state_dict(args, seed=3)
    oracle = Oracle(args, state, max_seq_len=32)
    model = TorchLlama(args, state, max_seq_len=32)
    model.new_cache()
    tokens = list(range(100, 117))
    for chunk, start in ((tokens[:10], 0), (tokens[10:], 10), ([5], 17)):
        want = oracle.forward(chunk, start)
        got = model.forward(torch.tensor(chunk), start, last_only=False).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())

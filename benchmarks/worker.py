"""One measurement in its own process, so that engines' memory never mixes: bench.py runs
`python benchmarks/worker.py TASK JOB.json RESULT.json` and reads RESULT.json.

Tasks:
  prepare    write or find a model's files (prepare.py), report its spec;
  bandwidth  the machine's limits: large float32 matrix-vector products, bf16 -> float32 upcasts;
  serve      one engine (npllama or torch) on one model, measuring what bench.py asks for
             (load, prefill, decode, decode at context lengths, memory) one request at a time;
  profile    cProfile of npllama's decode steps.

Progress goes to stderr; stdout carries only `serve`'s replies.
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import os
import pstats
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

import numpy as np  # noqa: E402

import prepare  # noqa: E402
from npllama_internals import LINEAR_CALLERS, StreamedWeight, TilePool, load_params  # noqa: E402
from stats import read_memory, summary  # noqa: E402

TAG = ""


def progress(msg: str) -> None:
    print(f"[{TAG}] {msg}", file=sys.stderr, flush=True)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


# --- Engines: the same four calls on both sides --------------------------------------------

class NpllamaEngine:
    name = "npllama"

    def __init__(self, spec: dict, max_seq_len: int):
        self.spec, self.max_seq_len = spec, max_seq_len
        self.model = self.cache = None

    def load(self):
        import npllama
        self.model = None
        gc.collect()
        budget = self.spec["weights_budget"]
        kwargs = {} if budget is None else {"weights_budget": budget}
        self.model = npllama.load(self.spec["path"], max_seq_len=self.max_seq_len, **kwargs)

    def new_cache(self):
        self.cache = self.model.new_cache(self.max_seq_len)

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self.model.forward(tokens, start_pos, self.cache, last_only=True)[-1]  # [V]

    def describe(self) -> dict:
        m = self.model
        return {"resident": m.resident, "dtype": m.dtype,
                "weight_bytes_per_token": {"bytes": npllama_weight_bytes(m),
                                           "method": "measured from model.layers and model.output"}}


def matrix_bytes(w) -> int:
    """Bytes a matmul streams for one weight: the float32 array, or a streamed one's stored
    (memory-mapped) matrix."""
    return w.stored.nbytes if isinstance(w, StreamedWeight) else w.nbytes


def _read_weights(layer) -> list:
    """The arrays a decode step multiplies by: with the fused fast path (wqkv, w13) the separate
    wq/wk/wv/w1/w3 are views into the fused arrays and must not be counted twice."""
    fields = vars(layer)
    skip = set()
    if fields.get("wqkv") is not None:
        skip |= {"wq", "wk", "wv"}
    if fields.get("w13") is not None:
        skip |= {"w1", "w3"}
    return [w for name, w in fields.items() if w is not None and name not in skip]


def npllama_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every layer's arrays and the output matrix in the
    form the matmul reads them (the embedding table is not counted: one row is read)."""
    return sum(matrix_bytes(w) for layer in model.layers for w in _read_weights(layer)) + \
        matrix_bytes(model.output)


class TorchEngine:
    name = "torch"

    def __init__(self, spec: dict, max_seq_len: int, gqa: str):
        import torch
        self.torch, self.spec, self.max_seq_len, self.gqa = torch, spec, max_seq_len, gqa
        self.dtype = getattr(torch, spec["torch_dtype"])
        self.model = None

    def load(self):
        """State dict load + model build. A Meta .pth is memory-mapped (bf16 stays mapped,
        float32 compute copies it into RAM, as npllama's float32 copy); npllama's decoded
        float32 weights (GGUF models) are read into RAM like npllama's."""
        from torch_llama import TorchLlama
        torch = self.torch
        self.model = None
        gc.collect()
        if self.spec["kind"] == "meta":
            path = Path(self.spec["path"])
            args = load_params(path / "params.json", self.max_seq_len)
            state = torch.load(path / "consolidated.00.pth", mmap=True, weights_only=True)
        else:
            saved = torch.load(self.spec["torch_weights"], mmap=False, weights_only=True)
            args, state = prepare.args_from_json(saved["args"]), saved["state_dict"]
        self.model = TorchLlama(args, state, self.dtype, self.max_seq_len, gqa=self.gqa)

    def new_cache(self):
        self.model.new_cache()

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        t = self.torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        return self.model.forward(t, start_pos, last_only=True)[-1].numpy()  # [V]

    def describe(self) -> dict:
        m = self.model
        n = sum(w.numel() * w.element_size() for layer in m.layers for w in layer)
        n += m.output.numel() * m.output.element_size()
        return {"dtype": str(self.dtype).replace("torch.", ""), "gqa": self.gqa,
                "num_threads": self.torch.get_num_threads(),
                "weight_bytes_per_token": {"bytes": n, "method": "layer matrices and output matrix"}}


# --- Measurements ---------------------------------------------------------------------------

def tokens_for(n: int, vocab_size: int, seed: int) -> np.ndarray:
    """Fixed pseudo-random prompt ids: compute does not depend on which ids they are."""
    return np.random.default_rng(seed).integers(0, vocab_size, n).astype(np.int64)


def decode_steps(engine, token: int, start_pos: int, n: int) -> tuple[float, list[int]]:
    """n greedy decode steps from start_pos, feeding each argmax back; (seconds, token ids)."""
    out = []
    t0 = time.perf_counter()
    for i in range(n):
        token = int(np.argmax(engine.forward(np.array([token]), start_pos + i)))
        out.append(token)
    return time.perf_counter() - t0, out


def fill(engine, tokens: np.ndarray, start: int, end: int, chunk: int) -> float:
    """Prefill positions [start, end) in chunks (bounds the [H, T, S] attention temporaries)."""
    t0 = time.perf_counter()
    for s in range(start, end, chunk):
        engine.forward(tokens[s:min(s + chunk, end)], s)
    return time.perf_counter() - t0


class Server:
    """One engine, driven by bench.py one measurement at a time (JSON lines on stdin/stdout), so
    that the two engines' measurements can be interleaved: on a machine shared with other work,
    load that comes and goes then falls on both engines alike instead of on whichever ran last."""

    def __init__(self, spec: dict, cfg: dict):
        if cfg["engine"] == "npllama":
            self.engine = NpllamaEngine(spec, cfg["max_seq_len"])
        else:
            import torch
            torch.set_num_threads(cfg["threads"])
            self.engine = TorchEngine(spec, cfg["max_seq_len"], cfg["torch_gqa"])
        self.cfg = cfg
        self.prompt = self.context_prompt = None

    def load(self) -> dict:
        return {"seconds": timed(self.engine.load)[0]}

    def setup(self) -> dict:
        """KV cache, fixed prompts, and an untimed warm-up: first calls pay for lazy
        initialisation (thread pools, page faults in the cache and in new buffers)."""
        cfg, engine = self.cfg, self.engine
        engine.new_cache()
        args = engine.model.args
        self.prompt = tokens_for(max(cfg["prefill"] + [cfg["decode_prompt"]]), args.vocab_size, seed=1)
        self.context_prompt = tokens_for(max(cfg["contexts"] + [cfg["profile_context"]]),
                                         args.vocab_size, seed=2)
        engine.forward(self.prompt[:cfg["decode_prompt"]], 0)
        decode_steps(engine, 0, cfg["decode_prompt"], 2)
        return {"info": engine.describe(), "model_args": prepare.args_to_json(args)}

    def prefill(self, n: int) -> dict:
        return {"seconds": timed(self.engine.forward, self.prompt[:n], 0)[0]}

    def decode(self, prompt: int, n: int) -> dict:
        logits = self.engine.forward(self.prompt[:prompt], 0)  # untimed
        first = int(np.argmax(logits))
        t, ids = decode_steps(self.engine, first, prompt, n)
        return {"seconds": t, "tokens": [first] + ids}

    def fill(self, start: int, end: int, chunk: int) -> dict:
        return {"seconds": fill(self.engine, self.context_prompt, start, end, chunk)}

    def decode_at(self, ctx: int, steps: int) -> dict:
        """`steps` decode steps at positions ctx..; they are overwritten by the next fill."""
        return {"seconds": decode_steps(self.engine, int(self.context_prompt[ctx - 1]), ctx, steps)[0]}

    def memory(self) -> dict:
        return read_memory()


def serve(spec: dict, cfg: dict) -> None:
    # Replies go to the original stdout; anything else printed (by a library) goes to stderr.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    server = ProbeServer(cfg) if cfg["engine"] == "probe" else Server(spec, cfg)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "quit":
            break
        try:
            cpu0 = time.process_time()
            reply = getattr(server, op)(**cmd)
            if isinstance(reply, dict) and "seconds" in reply:
                reply["cpu_seconds"] = time.process_time() - cpu0
        except Exception as e:
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# --- The machine's limits -------------------------------------------------------------------

class Probes:
    """GB/s of a float32 matrix-vector product over a matrix far larger than the caches (the
    weight bytes a decode step must stream), three ways; and of bf16 -> float32 upcasts."""

    def __init__(self, cfg: dict):
        import ml_dtypes
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(cfg["threads"])
        rows, cols = self.matrix = cfg["bw_rows"], cfg["bw_cols"]
        rng = np.random.default_rng(0)
        w = rng.standard_normal((rows, cols), dtype=np.float32)  # [out, in]
        x = rng.standard_normal(cols, dtype=np.float32)  # [in]
        wt, xt = torch.from_numpy(w), torch.from_numpy(x)[None]
        b = w.astype(ml_dtypes.bfloat16)  # [out, in] bf16
        streamed = StreamedWeight(b, TilePool(cfg["threads"]))
        out = np.empty_like(w)
        out.fill(0)  # touch the pages once so the preallocated case measures the copy alone
        self.probes = {
            "matvec_numpy_gemv": ("float32 W @ x (NumPy, sgemv)", w.nbytes, lambda: w @ x),
            "matvec_numpy_linear": ("float32 x[None] @ W.T (NumPy, npllama's linear)", w.nbytes,
                                    lambda: x[None] @ w.T),
            "matvec_torch_linear": ("float32 F.linear(x[None], W) (torch)", w.nbytes,
                                    lambda: F.linear(xt, wt)),
            "upcast_astype": ("bf16 -> float32, .astype (new array)", b.nbytes,
                              lambda: b.astype(np.float32)),
            "upcast_into": ("bf16 -> float32 into a preallocated array", b.nbytes,
                            lambda: np.copyto(out, b)),
            # The streamed path's ceiling: what an 8B decode step does with every matrix.
            "streamed_matvec": ("bf16 x[None] @ W.T streamed by npllama's tiles (GB/s of bf16)",
                                b.nbytes, lambda: x[None] @ streamed.T),
        }

    def run(self, keys, repeats: int, verbose: bool = True) -> dict:
        res = {}
        for key in keys:
            label, nbytes, fn = self.probes[key]
            fn()
            rates = [nbytes / timed(fn)[0] / 1e9 for _ in range(repeats)]
            res[key] = dict(summary(rates, "GB/s"), label=label)
            if verbose:
                progress(f"{label}: {np.median(rates):.2f} GB/s")
        return res


def run_bandwidth(cfg: dict) -> dict:
    probes = Probes(cfg)
    res = {"matrix": list(probes.matrix), "probes": probes.run(probes.probes, max(cfg["repeats"], 5))}
    best = max((k for k in res["probes"] if k.startswith("matvec")), key=lambda k: res["probes"][k]["median"])
    res["limit_gb_s"], res["limit_probe"] = res["probes"][best]["median"], best
    return res


class ProbeServer:
    """The matrix-vector probe on request, so bench.py can measure the bandwidth limit between
    decode measurements, under the same conditions (other processes, memory traffic) as they."""

    def __init__(self, cfg: dict):
        self.probes = Probes(cfg)

    def matvec(self) -> dict:
        res = self.probes.run([k for k in self.probes.probes if k.startswith("matvec")], 5, verbose=False)
        return {"gb_s": max(r["median"] for r in res.values()),
                "probes": {k: r["median"] for k, r in res.items()}}

    def memory(self) -> dict:
        return read_memory()


# --- Where a decode step spends its time ----------------------------------------------------

def run_profile(spec: dict, cfg: dict) -> dict:
    engine = NpllamaEngine(spec, cfg["max_seq_len"])
    engine.load()
    engine.new_cache()
    vocab = engine.model.args.vocab_size
    ctx = cfg["profile_context"]
    fill(engine, tokens_for(ctx, vocab, seed=3), 0, ctx, cfg["prefill_chunk"])
    decode_steps(engine, 1, ctx, 2)  # warm-up
    steps = cfg["profile_steps"]
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    decode_steps(engine, 1, ctx, steps)
    prof.disable()
    wall = time.perf_counter() - t0
    out = Path(cfg["profile_out"])
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(out)
    text = {}
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(25)
        text[key] = s.getvalue()
    rows = []
    for (file, line, func), (cc, nc, tt, ct, _) in pstats.Stats(prof).stats.items():
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": nc,
                     "tottime_ms_per_token": 1e3 * tt / steps, "cumtime_ms_per_token": 1e3 * ct / steps})
    rows.sort(key=lambda r: -r["tottime_ms_per_token"])
    progress(f"profiled {steps} decode steps at context {ctx}: {1e3 * wall / steps:.1f} ms/token "
             f"(with profiler); stats in {out}")
    return {"context": ctx, "steps": steps, "ms_per_token_profiled": 1e3 * wall / steps,
            "top_tottime": rows[:30], "text": text, "prof_file": str(out),
            "matmuls": matmul_breakdown(engine, ctx, steps)}


def matmul_breakdown(engine, ctx: int, steps: int) -> dict:
    """Time and GB/s of each weight matmul of a decode step, without cProfile's overhead: the
    `linear` that npllama's model and layers modules call is wrapped (in this process only) by
    one that times each call and names it from the weight it was given."""
    model = engine.model
    names = {id(model.output): "output"}
    for layer in model.layers:
        names.update({id(w): f for f, w in vars(layer).items() if w is not None})
    times: dict[str, list] = {}
    originals = {m: m.linear for m in LINEAR_CALLERS}

    def make(original):
        def timed_linear(x, w):
            t0 = time.perf_counter()
            y = original(x, w)
            rec = times.setdefault(names.get(id(w), f"other {w.shape}"), [0.0, 0, 0])
            rec[0] += time.perf_counter() - t0
            rec[1] += 1
            rec[2] += matrix_bytes(w)
            return y
        return timed_linear

    for m in LINEAR_CALLERS:
        m.linear = make(originals[m])
    try:
        t0 = time.perf_counter()
        decode_steps(engine, 1, ctx, steps)
        wall = time.perf_counter() - t0
    finally:
        for m, f in originals.items():
            m.linear = f
    rows = {name: {"ms_per_token": 1e3 * t / steps, "calls_per_token": n / steps,
                   "gb_s": b / t / 1e9 if t else None} for name, (t, n, b) in times.items()}
    total = sum(r["ms_per_token"] for r in rows.values())
    progress(f"matmuls: {total:.1f} of {1e3 * wall / steps:.1f} ms/token")
    return {"ms_per_token": 1e3 * wall / steps, "matmul_ms_per_token": total, "by_weight": rows}


def main() -> int:
    global TAG
    task, spec_path, result_path = sys.argv[1:4]
    job = json.loads(Path(spec_path).read_text())
    TAG = job.get("tag", task)
    try:
        if task == "prepare":
            try:
                result = {"status": "ok", "spec": prepare.prepare(job["model"], Path(job["cache_dir"]))}
            except prepare.Skip as e:
                result = {"status": "skipped", "reason": str(e)}
        elif task == "bandwidth":
            result = run_bandwidth(job["cfg"])
        elif task == "serve":
            serve(job["spec"], job["cfg"])
            return 0
        elif task == "profile":
            result = run_profile(job["spec"], job["cfg"])
        else:
            raise ValueError(f"unknown task {task!r}")
        result["memory_final"] = read_memory()
    except Exception as e:  # reported, not raised: the other engines' figures still count
        traceback.print_exc()
        result = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The process every measurement runs in, so that each engine's memory is its own and a failure
stays in its process. bench.py (interleave.Worker) starts `python benchmarks/worker.py`, writes
one JSON request per line to its stdin and reads one JSON reply per line from its stdout:

  {"op": "prepare", "name": ..., "cache_dir": ..., "llama_cpp": ...}   write or find a model's
      files (prepare.py);
  {"op": "engine", "engine": "npllama" | "torch", "spec": ..., "cfg": ...}   then, for that engine
      on that model: load, then setup, prefill, decode, fill, decode_at, or (npllama) profile;
  {"op": "probes", "threads": ..., "mb": ...}   then: bandwidth (every probe), matvec (the limit).

A reply is a dict of figures, with the CPU seconds the process spent when it is a timing
("seconds"), or {"error": "..."} with the traceback on stderr. Memory is not asked for: bench.py
reads it from /proc/<pid>/status. Anything a library prints goes to stderr.
"""

from __future__ import annotations

import cProfile
import dataclasses
import gc
import io
import json
import os
import pstats
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import numpy as np  # noqa: E402

import npllama.engine  # noqa: E402
import npllama.layers  # noqa: E402
import npllama.model  # noqa: E402
import prepare  # noqa: E402
from machine import Probes  # noqa: E402
from npllama.formats.meta import load_params  # noqa: E402
from stats import timed  # noqa: E402

# Each module calls its own name `linear` (the engine's takes an `out`): the matmul breakdown
# wraps each with a timer.
LINEAR_CALLERS = (npllama.model, npllama.layers, npllama.engine)


# --- Engines: the same four calls on both sides --------------------------------------------

class NpllamaEngine:
    def __init__(self, spec: dict, cfg: dict):
        self.spec, self.max_seq_len = spec, cfg["max_seq_len"]
        self.model = self.cache = None

    def load(self):
        import npllama
        budget = self.spec["weights_budget"]
        kwargs = {} if budget is None else {"weights_budget": budget}
        self.model = npllama.load(self.spec["path"], max_seq_len=self.max_seq_len,
                                  weights=self.spec.get("weights", "auto"), **kwargs)

    def int16_copies(self) -> list[Path]:
        return prepare.int16_copies(self.spec)

    def new_cache(self):
        self.cache = self.model.new_cache(self.max_seq_len)

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        return self.model.forward(tokens, start_pos, self.cache, last_only=True)[-1]  # [V]

    def describe(self) -> dict:
        m = self.model
        return {"resident": m.resident, "resident_layers": m.resident_layers, "n_layers": m.args.n_layers,
                "dtype": m.dtype,
                "weight_bytes_per_token": {"bytes": npllama_weight_bytes(m),
                                           "method": "measured from model.layers and model.output"}}


def matrix_bytes(w) -> int:
    """Bytes a matmul streams for one weight: the float32 array, or a streamed one's stored
    (memory-mapped) matrices."""
    return w.nbytes


def _read_weights(layer) -> list:
    """The arrays a decode step multiplies by: the engine's stacked wqkv and w13 (wq..w3, which
    the plain pass reads, are the same weights and must not be counted twice), wo, w2, norms."""
    return [w for name, w in vars(layer).items() if name not in ("wq", "wk", "wv", "w1", "w3")]


def npllama_weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every layer's arrays and the output matrix in the
    form the matmul reads them (the embedding table is not counted: one row is read)."""
    return sum(matrix_bytes(w) for layer in model.layers for w in _read_weights(layer)) + \
        matrix_bytes(model.output)


class TorchEngine:
    def __init__(self, spec: dict, cfg: dict):
        import torch
        torch.set_num_threads(cfg["threads"])
        self.torch, self.spec, self.max_seq_len, self.gqa = torch, spec, cfg["max_seq_len"], cfg["torch_gqa"]
        self.dtype = getattr(torch, spec["torch_dtype"])
        self.model = None

    def load(self):
        """State dict load + model build. A Meta .pth is memory-mapped (bf16 stays mapped,
        float32 compute copies it into RAM, as npllama's float32 copy); npllama's decoded
        float32 weights (GGUF models) are read into RAM like npllama's."""
        from torch_llama import TorchLlama
        torch = self.torch
        if self.spec["kind"] == "meta":
            path = Path(self.spec["path"])
            args = dataclasses.replace(load_params(path / "params.json"), max_seq_len=self.max_seq_len)
            state = torch.load(path / "consolidated.00.pth", mmap=True, weights_only=True)
        else:
            saved = torch.load(self.spec["torch_weights"], mmap=False, weights_only=True)
            args, state = prepare.args_from_json(saved["args"]), saved["state_dict"]
        self.model = TorchLlama(args, state, self.dtype, self.max_seq_len, gqa=self.gqa)

    def int16_copies(self) -> list[Path]:
        return []

    def new_cache(self):
        self.model.new_cache()

    def forward(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        t = self.torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        return self.model.forward(t, start_pos, last_only=True)[-1].numpy()  # [V]

    def describe(self) -> dict:
        m = self.model
        n = sum(w.numel() * w.element_size() for layer in m.layers for w in layer.values())
        n += m.output.numel() * m.output.element_size()
        return {"dtype": str(self.dtype).replace("torch.", ""), "gqa": self.gqa,
                "num_threads": self.torch.get_num_threads(),
                "weight_bytes_per_token": {"bytes": n, "method": "layer matrices and output matrix"}}


ENGINE_CLASSES = {"npllama": NpllamaEngine, "torch": TorchEngine}


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


class Session:
    """One engine on one model, measured one request at a time, so that bench.py can interleave
    the engines' measurements (interleave.Interleaved)."""

    def __init__(self, engine: str, spec: dict, cfg: dict):
        self.engine, self.cfg = ENGINE_CLASSES[engine](spec, cfg), cfg
        self.prompt = self.context_prompt = None

    def load(self) -> dict:
        """The load's time, and whether it made or mapped npllama's int16 copy of the matrices
        it streams (formats/int16.py): the first load makes it, later ones map it."""
        self.engine.model = None  # the previous repeat's model, freed before the next is timed
        gc.collect()
        before = self.engine.int16_copies()
        reply = {"seconds": timed(self.engine.load)[0]}
        after = self.engine.int16_copies()
        if after and "int16" in getattr(self.engine.model, "streamed_as", ""):
            reply["int16_copy"] = "made" if len(after) > len(before) else "mapped"
        return reply

    def setup(self) -> dict:
        """KV cache, fixed prompts, and an untimed warm-up: first calls pay for lazy
        initialisation (thread pools, page faults in the cache and in new buffers)."""
        cfg, engine = self.cfg, self.engine
        engine.new_cache()
        args = engine.model.args
        self.prompt = tokens_for(max(cfg["prefill"] + [cfg["decode_prompt"]]), args.vocab_size, seed=1)
        self.context_prompt = tokens_for(max(cfg["contexts"]), args.vocab_size, seed=2)
        engine.forward(self.prompt[:cfg["decode_prompt"]], 0)
        decode_steps(engine, 0, cfg["decode_prompt"], 2)
        return {"info": engine.describe(), "model_args": dataclasses.asdict(args)}

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

    def profile(self, out: str) -> dict:
        """cProfile of npllama's decode steps once the cache holds `profile_context` positions,
        then the same steps again without the profiler, each weight matmul timed."""
        engine, cfg = self.engine, self.cfg
        ctx, steps = cfg["profile_context"], cfg["profile_steps"]
        engine.new_cache()
        fill(engine, tokens_for(ctx, engine.model.args.vocab_size, seed=3), 0, ctx, cfg["prefill_chunk"])
        decode_steps(engine, 1, ctx, 2)  # warm-up
        return dict(cprofile_decode(engine, ctx, steps, Path(out)), context=ctx, steps=steps,
                    matmuls=matmul_breakdown(engine, ctx, steps))


# --- Where a decode step spends its time ----------------------------------------------------

def cprofile_decode(engine, ctx: int, steps: int, out: Path) -> dict:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    decode_steps(engine, 1, ctx, steps)
    prof.disable()
    wall = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.dump_stats(out)
    text = {}
    for key in ("tottime", "cumulative"):
        s = io.StringIO()
        pstats.Stats(prof, stream=s).strip_dirs().sort_stats(key).print_stats(25)
        text[key] = s.getvalue()
    rows = [{"function": f"{Path(file).name}:{line}({func})", "calls": nc,
             "tottime_ms_per_token": 1e3 * tt / steps, "cumtime_ms_per_token": 1e3 * ct / steps}
            for (file, line, func), (cc, nc, tt, ct, _) in pstats.Stats(prof).stats.items()]
    rows.sort(key=lambda r: -r["tottime_ms_per_token"])
    return {"ms_per_token_profiled": 1e3 * wall / steps, "top_tottime": rows[:30], "text": text,
            "prof_file": str(out)}


def matmul_breakdown(engine, ctx: int, steps: int) -> dict:
    """Time and GB/s of each weight matmul of a decode step, without cProfile's overhead: the
    `linear` that npllama's modules call is wrapped (in this process only) by one that times each
    call and names it from the weight it was given."""
    model = engine.model
    names = {id(model.output): "output"}
    for layer in model.layers:
        names.update({id(w): f for f, w in vars(layer).items() if w is not None})
    times: dict[str, list] = {}
    originals = {m: m.linear for m in LINEAR_CALLERS}

    def make(original):
        def timed_linear(x, w, *out):
            t0 = time.perf_counter()
            y = original(x, w, *out)
            rec = times.setdefault(names.get(id(w), f"other {w.shape}"), [0.0, 0, 0])
            rec[0] += time.perf_counter() - t0
            rec[1] += 1
            rec[2] += matrix_bytes(w)
            return y
        return timed_linear

    for m in LINEAR_CALLERS:
        m.linear = make(originals[m])
    try:
        wall = decode_steps(engine, 1, ctx, steps)[0]
    finally:
        for m, f in originals.items():
            m.linear = f
    rows = {name: {"ms_per_token": 1e3 * t / steps, "calls_per_token": n / steps,
                   "gb_s": b / t / 1e9 if t else None} for name, (t, n, b) in times.items()}
    return {"ms_per_token": 1e3 * wall / steps, "by_weight": rows,
            "matmul_ms_per_token": sum(r["ms_per_token"] for r in rows.values())}


# --- Requests -------------------------------------------------------------------------------

def answer(op: str, request: dict, subject):
    """(reply, subject): `engine` and `probes` make the subject later requests are methods of."""
    if op == "prepare":
        try:
            return {"spec": prepare.prepare(request["name"], Path(request["cache_dir"]),
                                            request.get("llama_cpp", False))}, subject
        except prepare.Skip as e:
            return {"status": "skipped", "reason": str(e)}, subject
    if op == "engine":
        return {}, Session(**request)
    if op == "probes":
        return {}, Probes(**request)
    return getattr(subject, op)(**request), subject


def serve() -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stdout now carries replies alone
    subject = None
    for line in sys.stdin:
        request = json.loads(line)
        op = request.pop("op")
        cpu0 = time.process_time()
        try:
            reply, subject = answer(op, request, subject)
            if "seconds" in reply:
                reply["cpu_seconds"] = time.process_time() - cpu0
        except Exception as e:  # reported, not raised: bench.py records it and carries on
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    serve()

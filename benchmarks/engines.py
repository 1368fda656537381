"""Inside bench.py's worker processes: an engine on a model (`Session`) and the bandwidth limit
(`Probe`). npllama and torch get the same weights, dtype and threads, compute the last position's
logits only and feed back the argmax; prompts are fixed pseudo-random ids."""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
import timeit
from pathlib import Path

import numpy as np

import npllama
from npllama.formats.default_model import cache_dir
from npllama.formats.meta import load_params


def int16_copies(spec: dict) -> list[Path]:
    """npllama's int16 copies of a streamed model (formats/int16.py), which its first load makes."""
    return sorted((cache_dir() / "int16").glob(f"{Path(spec['path']).name}-*.int16.safetensors"))


def read_weights(layer) -> list:
    """The arrays a decode step multiplies by (the engine's stacked wqkv and w13 hold wq..w3's weights)."""
    return [w for name, w in vars(layer).items() if name not in ("wq", "wk", "wv", "w1", "w3")]


def weight_bytes(model, unwrap=lambda w: w) -> int:
    """Bytes of weights a decode step reads as the matmuls read them (float32, or a streamed matrix's
    stored bytes); not the embedding table, of which one row is read."""
    return sum(unwrap(w).nbytes for layer in model.layers for w in read_weights(layer)) + unwrap(model.output).nbytes


class Npllama:
    def __init__(self, spec: dict, cfg: dict):
        self.spec, self.cfg = spec, cfg

    def load(self):
        self.model = npllama.load(self.spec["path"], max_seq_len=self.cfg["max_seq_len"],
                                  weights=self.spec.get("weights", "auto"), weights_budget=self.spec["weights_budget"])

    def new_cache(self):
        self.cache = self.model.new_cache(self.cfg["max_seq_len"])

    def forward(self, tokens, start_pos: int) -> np.ndarray:
        return self.model.forward(tokens, start_pos, self.cache, last_only=True)[-1]  # [V]

    def describe(self) -> dict:
        m = self.model
        return {"resident": m.resident, "resident_layers": m.resident_layers, "n_layers": m.args.n_layers,
                "dtype": m.dtype, "streamed_as": getattr(m, "streamed_as", ""), "weight_bytes": weight_bytes(m)}


class Torch:
    def __init__(self, spec: dict, cfg: dict):
        import torch
        torch.set_num_threads(cfg["threads"])
        self.torch, self.spec, self.cfg, self.dtype = torch, spec, cfg, getattr(torch, spec["torch_dtype"])

    def load(self):
        """A Meta .pth memory-mapped (bf16 stays mapped; float32 compute copies it, as npllama does), or
        npllama's decoded float32 weights of a GGUF, read into RAM."""
        from prepare import args_from_json
        from torch_llama import TorchLlama
        path, n = Path(self.spec["path"]), self.cfg["max_seq_len"]
        if self.spec["kind"] == "meta":
            args = dataclasses.replace(load_params(path / "params.json"), max_seq_len=n)
            state = self.torch.load(path / "consolidated.00.pth", mmap=True, weights_only=True)
        else:
            saved = self.torch.load(self.spec["torch_weights"], weights_only=True)
            args, state = args_from_json(saved["args"]), saved["state_dict"]
        self.model = TorchLlama(args, state, self.dtype, n)

    def new_cache(self):
        self.model.new_cache()

    def forward(self, tokens, start_pos: int) -> np.ndarray:
        return self.model.forward(self.torch.from_numpy(np.asarray(tokens, np.int64)), start_pos)[-1].numpy()  # [V]

    def describe(self) -> dict:
        m = self.model
        return {"dtype": str(self.dtype)[6:], "num_threads": self.torch.get_num_threads(),
                "weight_bytes": sum(w.nbytes for layer in m.layers for w in layer.values()) + m.output.nbytes}


def decode_steps(engine, token: int, start_pos: int, n: int) -> tuple[float, list[int]]:
    """n greedy steps from start_pos, each argmax fed back: (seconds, token ids)."""
    out, t0 = [], time.perf_counter()
    for i in range(n):
        out.append(token := int(np.argmax(engine.forward(np.array([token]), start_pos + i))))
    return time.perf_counter() - t0, out


def timed(fn, *args) -> dict:
    t0 = time.perf_counter()
    fn(*args)
    return {"seconds": time.perf_counter() - t0}


class Session:
    """One engine on one model, measured a call at a time so that bench.py can interleave the engines."""

    def __init__(self, engine: str, spec: dict, cfg: dict):
        self.engine, self.cfg = {"npllama": Npllama, "torch": Torch}[engine](spec, cfg), cfg

    def load(self) -> dict:
        """Seconds, and whether the load made or mapped npllama's int16 copy of the streamed matrices."""
        self.engine.model = None  # the last round's model, freed before this one is timed
        gc.collect()
        before = int16_copies(self.engine.spec)
        reply = timed(self.engine.load)
        if "int16" in getattr(self.engine.model, "streamed_as", ""):
            reply["int16_copy"] = "made" if len(int16_copies(self.engine.spec)) > len(before) else "mapped"
        return reply

    def setup(self) -> dict:
        """The KV cache, the prompts, and an untimed warm-up (thread pools, page faults in new buffers)."""
        cfg, engine, vocab = self.cfg, self.engine, self.engine.model.args.vocab_size
        engine.new_cache()
        rng = np.random.default_rng(1)
        self.prompt = rng.integers(0, vocab, max(cfg["prefill"] + [cfg["decode_prompt"]]))
        self.context_prompt = rng.integers(0, vocab, max(cfg["contexts"]))
        decode_steps(engine, int(np.argmax(engine.forward(self.prompt[:cfg["decode_prompt"]], 0))), cfg["decode_prompt"], 2)
        return {"info": engine.describe(), "model_args": dataclasses.asdict(engine.model.args)}

    def prefill(self, n: int) -> dict:
        return timed(self.engine.forward, self.prompt[:n], 0)

    def decode(self, prompt: int, n: int) -> dict:
        first = int(np.argmax(self.engine.forward(self.prompt[:prompt], 0)))  # untimed
        seconds, ids = decode_steps(self.engine, first, prompt, n)
        return {"seconds": seconds, "tokens": [first] + ids}

    def fill(self, start: int, end: int) -> dict:
        """Positions [start, end) in chunks of 512 (bounding the [H, T, S] attention temporaries)."""
        chunk, tokens = 512, self.context_prompt
        return timed(lambda: [self.engine.forward(tokens[s:min(s + chunk, end)], s) for s in range(start, end, chunk)])

    def decode_at(self, ctx: int, steps: int) -> dict:
        """Steps at positions ctx.. (the next fill overwrites them)."""
        return {"seconds": decode_steps(self.engine, int(self.context_prompt[ctx - 1]), ctx, steps)[0]}


class Probe:
    """The bandwidth limit: GB/s of float32 matrix-vector products over an `mb`-megabyte matrix, far
    larger than the caches, three ways; the fastest is the limit."""

    def __init__(self, threads: int, mb: int):
        import torch
        torch.set_num_threads(threads)
        cols = 4096 if mb >= 64 else 1024
        rng = np.random.default_rng(0)
        w = rng.standard_normal((mb * 2**20 // (4 * cols), cols), dtype=np.float32)  # [out, in]
        x = rng.standard_normal(cols, dtype=np.float32)  # [in]
        wt, xt = torch.from_numpy(w), torch.from_numpy(x)[None]  # [out, in], [1, in]
        self.n_bytes, self.ways = w.nbytes, [lambda: w @ x, lambda: x[None] @ w.T,  # sgemv, npllama's linear
                                             lambda: torch.nn.functional.linear(xt, wt)]

    def matvec(self) -> dict:
        for way in self.ways:
            way()  # warm-up
        return {"gb_s": max(self.n_bytes / statistics.median(timeit.repeat(way, number=1, repeat=5)) / 1e9
                            for way in self.ways)}

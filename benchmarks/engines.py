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


def weight_bytes(model, unwrap=lambda w: w) -> int:
    """Bytes of weights a decode step reads as the matmuls read them (float32, or a streamed matrix's stored
    bytes): the engine's stacked wqkv and w13 (not wq..w3, which are views of them) and the output matrix; not
    the embedding table, of which one row is read."""
    return unwrap(model.output).nbytes + sum(unwrap(w).nbytes for layer in model.layers for name, w in vars(layer).items()
                                             if name not in ("wq", "wk", "wv", "w1", "w3"))


def timed(fn, *args) -> dict:
    t0 = time.perf_counter()
    fn(*args)
    return {"seconds": time.perf_counter() - t0}


class Session:
    """One engine on one model, measured a call at a time so that bench.py can interleave the engines.
    A subclass an engine: it loads, makes a KV cache and runs a forward pass."""

    def __init__(self, spec: dict, cfg: dict):
        self.spec, self.cfg, self.model = spec, cfg, None

    def load(self) -> dict:
        """Seconds, and whether the load made or mapped npllama's int16 copy of the streamed matrices."""
        self.model = None  # the last round's model, freed before this one is timed
        gc.collect()
        before = int16_copies(self.spec)
        reply = timed(self.load_model)
        if "int16" in getattr(self.model, "streamed_as", ""):
            reply["int16_copy"] = "made" if len(int16_copies(self.spec)) > len(before) else "mapped"
        return reply

    def setup(self) -> dict:
        """The KV cache, the prompts, and an untimed warm-up (thread pools, page faults in new buffers)."""
        cfg, vocab = self.cfg, self.model.args.vocab_size
        self.new_cache()
        rng = np.random.default_rng(1)
        self.prompt = rng.integers(0, vocab, max(cfg["prefill"] + [cfg["decode_prompt"]]))
        self.context_prompt = rng.integers(0, vocab, max(cfg["contexts"]))
        self.decode(cfg["decode_prompt"], 2)
        return {"info": self.describe(), "model_args": dataclasses.asdict(self.model.args)}

    def steps(self, token: int, start_pos: int, n: int) -> tuple[float, list[int]]:
        """n greedy steps from start_pos, each argmax fed back: (seconds, token ids)."""
        out, t0 = [], time.perf_counter()
        for i in range(n):
            out.append(token := int(np.argmax(self.forward(np.array([token]), start_pos + i))))
        return time.perf_counter() - t0, out

    def prefill(self, n: int) -> dict:
        return timed(self.forward, self.prompt[:n], 0)

    def decode(self, prompt: int, n: int) -> dict:
        first = int(np.argmax(self.forward(self.prompt[:prompt], 0)))  # untimed
        seconds, ids = self.steps(first, prompt, n)
        return {"seconds": seconds, "tokens": [first] + ids}

    def fill(self, start: int, end: int) -> dict:
        """Positions [start, end) in chunks of 512 (bounding the [H, T, S] attention temporaries)."""
        chunk, tokens = 512, self.context_prompt
        return timed(lambda: [self.forward(tokens[s:min(s + chunk, end)], s) for s in range(start, end, chunk)])

    def decode_at(self, ctx: int, steps: int) -> dict:
        """Steps at positions ctx.. (the next fill overwrites them)."""
        return {"seconds": self.steps(int(self.context_prompt[ctx - 1]), ctx, steps)[0]}


class Npllama(Session):
    def load_model(self):
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


class Torch(Session):
    def __init__(self, spec: dict, cfg: dict):
        import torch  # here, not at the top: npllama's worker's memory is npllama's alone
        super().__init__(spec, cfg)
        self.torch = torch
        torch.set_num_threads(cfg["threads"])

    def load_model(self):
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
        self.model = TorchLlama(args, state, getattr(self.torch, self.spec["torch_dtype"]), n)

    def new_cache(self):
        self.model.new_cache()

    def forward(self, tokens, start_pos: int) -> np.ndarray:
        return self.model.forward(self.torch.from_numpy(np.asarray(tokens, np.int64)), start_pos)[-1].numpy()  # [V]

    def describe(self) -> dict:
        m = self.model
        return {"dtype": str(m.dtype)[6:], "num_threads": self.torch.get_num_threads(),
                "weight_bytes": sum(w.nbytes for layer in m.layers for w in layer.values()) + m.output.nbytes}


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

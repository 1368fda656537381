"""llama.cpp's decode beside npllama's, when a llama-bench binary is given (--llama-bench PATH).

llama.cpp runs the F32 GGUF that prepare.f32_gguf writes (the model's metadata, npllama's decoded
float32 weights), so that it reads the same bytes per token as npllama and the torch baseline.
`LlamaBench` is asked like an interleave.Worker, and Interleaved runs it in the decode rounds,
idle and under load: each "decode" request is one `llama-bench -p 0 -n N -t T -r 1 -o json`, which
times N tokens decoded from an empty cache (npllama and torch decode after a short prompt), with
T threads, the torch baseline's. Its load and warm-up are not timed. Nothing of llama.cpp is part
of this repository: build it and pass the binary.
"""

from __future__ import annotations

import json
import subprocess

from machine import children_ns
from stats import progress


class LlamaBench:
    def __init__(self, tag: str, binary: str, gguf: str, threads: int):
        self.tag, self.binary, self.gguf, self.threads = tag, binary, gguf, threads
        self.error = None
        self.results = {"engine": "llama.cpp", "binary": binary, "gguf": gguf, "threads": threads}

    def ask(self, op: str, prompt: int, n: int) -> dict | None:
        """One llama-bench run of `n` decoded tokens (`op` is "decode"; `prompt` is not used), or
        None once it has failed."""
        if self.error:
            return None
        cmd = [self.binary, "-m", self.gguf, "-p", "0", "-n", str(n), "-t", str(self.threads),
               "-r", "1", "-o", "json"]
        cpu0 = children_ns()
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        except (OSError, subprocess.SubprocessError) as e:
            return self.fail(cmd, f"{type(e).__name__}: {e}")
        try:
            result = json.loads(run.stdout)[0]
            seconds = n / result["avg_ts"]
        except (ValueError, LookupError, ZeroDivisionError):
            return self.fail(cmd, f"exit code {run.returncode}, no result: {run.stderr.strip()[-500:]}")
        self.results.setdefault("build", {k: result.get(k) for k in (
            "build_commit", "build_number", "cpu_info", "backends", "model_type", "model_size", "n_threads",
            "type_k", "type_v")})
        return {"seconds": seconds, "cpu_seconds": (children_ns() - cpu0) / 1e9}

    def fail(self, cmd: list[str], why: str) -> None:
        self.error = f"{' '.join(cmd)}: {why}"
        progress(self.tag, f"FAILED: {self.error}")

    def close(self) -> dict:
        return dict(self.results, status="error" if self.error else "ok",
                    **({"error": self.error} if self.error else {}))

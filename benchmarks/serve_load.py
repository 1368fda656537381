"""A load run of `python -m npllama serve`: many requests from concurrent clients, bad ones and
hang-ups mixed in, every good answer checked, the server's memory watched.

    python benchmarks/serve_load.py [--requests 2000] [--clients 16] [--tokens 8]

The server (the default model, --parallel = clients, 128 positions a row) answers each of 16 prompts
alone first (greedy), and fills every row of its KV cache once (its pages are touched as positions
are first written: that is not growth); then the clients send --requests requests in all: every
tenth a bad one (which must get its 4xx), every fiftieth a stream the client drops after its first
chunk, the rest greedy completions whose text must equal the prompt's answer alone. The server's
RSS is read every 250 requests: at the end it must be no larger than after the first 100.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import itertools
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from harness import HERE, memory_mb, table, write
from serve import start_server

CONTEXT = 128
PROMPTS = [f"Question {i}: what is {i} plus {i * 3}? Answer:" for i in range(8)] + [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
    "The quick brown fox", "A haiku about the sea:", "To be or not to be,", "Dear diary, today I"]
BAD = [(b"{not json", 400), (b'{"prompt": 42}', 400), (b'{"prompt": "hi", "max_tokens": 0}', 400),
       (b'{"prompt": "hi", "temperature": "hot"}', 400), (b'{"prompt": "hi", "model": "gpt-4"}', 404),
       (b'{"prompt": "' + b"word " * 400 + b'"}', 400)]


def good(http: httpx.Client, url: str, prompt, tokens: int) -> str:
    r = http.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def one(http: httpx.Client, url: str, i: int, tokens: int, alone: dict) -> str:
    """Request number i, of its kind; the outcome."""
    if i % 10 == 9:
        body, status = BAD[i // 10 % len(BAD)]
        r = http.post(url + "/v1/completions", content=body)
        return "bad, refused" if r.status_code == status and "error" in r.json() else "bad, WRONG"
    prompt = PROMPTS[i % len(PROMPTS)]
    if i % 50 == 25:
        with http.stream("POST", url + "/v1/completions", json={"prompt": prompt, "max_tokens": 100, "stream": True}) as r:
            next(r.iter_lines())
        return "hung up"
    return "good, answered correctly" if good(http, url, prompt, tokens) == alone[prompt] else "good, WRONG"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve_load")
    a = p.parse_args()
    counts, rss, numbers, lock = collections.Counter(), {}, itertools.count(), threading.Lock()
    with tempfile.NamedTemporaryFile("w+", prefix="npllama-serve-", suffix=".log") as log:
        proc, url = start_server(["--parallel", str(a.clients), "--queue", str(4 * a.clients), "-c", str(CONTEXT),
                                  "--alias", "m"], log)
        try:
            with httpx.Client(timeout=600) as http:
                alone = {prompt: good(http, url, prompt, a.tokens) for prompt in PROMPTS}

            def fill_a_row(_) -> None:
                with httpx.Client(timeout=600) as http:
                    good(http, url, [1] * (CONTEXT - 4), 4)

            def client() -> None:
                with httpx.Client(timeout=600) as http:
                    while (i := next(numbers)) < a.requests:
                        if i % 250 == 100:
                            rss[f"after {i} requests"] = memory_mb(proc.pid)["VmRSS"]
                        outcome = one(http, url, i, a.tokens, alone)
                        with lock:
                            counts[outcome] += 1
            with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:  # every row to the end of the context
                list(pool.map(fill_a_row, range(a.clients)))
            start = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:
                for done in [pool.submit(client) for _ in range(a.clients)]:
                    done.result()  # raises what a client raised
            seconds = time.perf_counter() - start
            rss["at the end"] = memory_mb(proc.pid)["VmRSS"]
            ended = httpx.get(url + "/health").json()["ended"]
        finally:
            proc.terminate()
            proc.wait()
    ok = not {"bad, WRONG", "good, WRONG"} & set(counts) and rss["at the end"] <= rss.get("after 100 requests", rss["at the end"])
    write(a.out, "Load run of `npllama serve`",
          f"{a.requests} requests from {a.clients} concurrent clients ({a.tokens} tokens each) in {seconds:.0f} s; "
          f"server --parallel {a.clients}.\n\n" + table(["outcome", "requests"], sorted(counts.items())) + "\n\n" +
          "\n".join(f"- server RSS {k}: {v:,.1f} MB" for k, v in rss.items()) +
          f"\n- requests ended, by reason (the server's /health): {ended}\n- {'PASS' if ok else 'FAIL'}: every good "
          "request answered correctly, every bad one refused, RSS no larger than after the first 100 requests",
          {"requests": a.requests, "clients": a.clients, "tokens": a.tokens, "seconds": seconds, "outcomes": counts,
           "rss_mb": rss, "ended": ended, "pass": ok})
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

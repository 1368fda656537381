"""A load run of `python -m npllama serve`: many requests from concurrent clients, bad ones and
hang-ups mixed in, every good answer checked, the server's memory watched.

    python benchmarks/serve_load.py [--requests 2000] [--clients 16] [--tokens 8]

The server (the default model, --parallel = clients, 128 positions a row) answers each of 16
prompts alone first (greedy), and fills every row of its KV cache once (the cache is allocated
whole but its pages are touched as positions are first written: that is not growth); then `--clients` threads send `--requests` requests in all: every tenth a bad one (one
of several kinds, which must get its 4xx), every fiftieth a streamed one the client abandons
after its first chunk, the rest greedy completions whose text must equal the prompt's answer
alone. The server's RSS is read after the first 100 requests and at the end: it must not grow.
Results: benchmarks/results/serve_load.md.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import itertools
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import machine_info  # noqa: E402

CONTEXT = 128
PROMPTS = [f"Question {i}: what is {i} plus {i * 3}? Answer:" for i in range(8)] + [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
    "The quick brown fox", "A haiku about the sea:", "To be or not to be,", "Dear diary, today I"]
BAD = [(b"{not json", 400), (b'{"prompt": 42}', 400), (b'{"prompt": "hi", "max_tokens": 0}', 400),
       (b'{"prompt": "hi", "temperature": "hot"}', 400), (b'{"prompt": "hi", "model": "gpt-4"}', 404),
       (b'{"prompt": "' + b"word " * 400 + b'"}', 400)]


def rss_kb(pid: int) -> int:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1])


def start_server(clients: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "npllama", "serve", "--port", "0", "--parallel", str(clients),
                             "--queue", str(4 * clients), "-c", str(CONTEXT), "--alias", "m"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    return proc, re.search(r"on (http://[\d.]+:\d+)/v1", proc.stdout.readline())[1]


def good(http: httpx.Client, url: str, prompt: str, tokens: int) -> str:
    r = http.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": tokens,
                                                 "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8)
    a = p.parse_args()
    proc, url = start_server(a.clients)
    try:
        with httpx.Client(timeout=600) as http:
            alone = {prompt: good(http, url, prompt, a.tokens) for prompt in PROMPTS}
        with concurrent.futures.ThreadPoolExecutor(a.clients) as pool:  # every row to the end of the context
            list(pool.map(lambda _: httpx.post(url + "/v1/completions", timeout=600, json={
                "model": "m", "prompt": [1] * (CONTEXT - 4), "max_tokens": 4, "temperature": 0}), range(a.clients)))
        counts, wrong, rss = collections.Counter(), [], {}
        numbers, lock = itertools.count(), threading.Lock()

        def client() -> None:
            with httpx.Client(timeout=600) as http:
                while (i := next(numbers)) < a.requests:
                    if i % 250 == 100:
                        rss[f"after {i} requests"] = rss_kb(proc.pid)
                    if i % 10 == 9:
                        body, status = BAD[i // 10 % len(BAD)]
                        r = http.post(url + "/v1/completions", content=body)
                        kind = "bad, refused" if r.status_code == status and "error" in r.json() else "bad, WRONG"
                    elif i % 50 == 25:
                        with http.stream("POST", url + "/v1/completions", json={
                                "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 100, "stream": True}) as r:
                            next(r.iter_lines())
                        kind = "hung up"
                    else:
                        prompt = PROMPTS[i % len(PROMPTS)]
                        ok = good(http, url, prompt, a.tokens) == alone[prompt]
                        kind = "good, answered correctly" if ok else "good, WRONG"
                        if not ok:
                            wrong.append(i)
                    with lock:
                        counts[kind] += 1

        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        rss["at the end"] = rss_kb(proc.pid)
        health = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait()
    lines = [f"# Load run of `npllama serve` ({machine_info()['cpu']})", "",
             f"{a.requests} requests from {a.clients} concurrent clients ({a.tokens} tokens each) in {seconds:.0f} s; "
             f"server --parallel {a.clients}.", "",
             "| outcome | requests |", "|---|---|", *[f"| {k} | {v} |" for k, v in sorted(counts.items())], "",
             *[f"- server RSS {k}: {v:,} kB" for k, v in rss.items()],
             f"- requests ended, by reason (the server's /health): {health['ended']}"]
    ok = not wrong and counts["bad, WRONG"] == 0 and rss["at the end"] <= rss["after 100 requests"]
    lines.append(f"- {'PASS' if ok else 'FAIL'}: every good request answered correctly, every bad one refused, "
                 "RSS no larger than after the first 100 requests")
    report = "\n".join(lines) + "\n"
    print(report)
    (HERE / "results" / "serve_load.md").write_text(report)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

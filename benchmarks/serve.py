"""The OpenAI-compatible server: aggregate tok/s and time to first token (TTFT) with 1, 4, 8 and 16
concurrent streaming clients on SmolLM2 (serve's default model), idle and beside a busy core.

    python benchmarks/serve.py [--clients 1,4,8,16] [--tokens 64] [--requests 2] [--rounds 2]

One server (`python -m npllama serve --port 0 --parallel 16 -c 512`) serves every measurement; each
client streams --requests completions one after another (temperature 0, a prompt of its own).
tok/s = all completion tokens (usage counts) / the wall time from the first request sent to the
last one finished; TTFT = a request sent to its first chunk with text, median over all requests.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import tempfile
import time

import httpx
from harness import ROOT, Quiet, cell, parser, rounds, stat, summary, table, write

CONTEXT = 512  # positions a row: the prompts and --tokens fit many times over
PROMPTS = ["The history of the printing press began", "My favourite recipe for a rainy day is", "Volcanoes form when",
           "The three laws of motion state that", "Once upon a time in a small fishing village,",
           "To train for a marathon, a beginner should", "The main causes of the French Revolution were",
           "Photosynthesis is the process by which", "The best way to learn a new language is",
           "In the year 2050, cities will", "A good night's sleep matters because", "The rules of chess are simple:",
           "Dear hiring manager, I am writing to", "The first computers were built to",
           "The difference between weather and climate is", "Honeybees communicate with each other by"]
TARGETS = ((8, "tok_s", 3), (16, "tok_s", 4), (8, "ttft_ms", 2))  # clients, figure, x that of 1 client


def start_server(args: list[str], log) -> tuple[subprocess.Popen, str]:
    """`npllama serve` on a free port, once its /health answers: (process, address)."""
    proc = subprocess.Popen([sys.executable, "-m", "npllama", "serve", "--port", "0", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    for line in proc.stdout:
        if m := re.search(r"on (http://\S+)/v1", line):
            for _ in range(300):  # a minute
                time.sleep(0.2)
                try:
                    if httpx.get(f"{m[1]}/health", timeout=5).status_code == 200:
                        return proc, m[1]
                except httpx.TransportError:
                    pass
            break
    proc.kill()
    raise SystemExit(f"the server did not serve ({proc.wait()}): see {log.name}")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> dict:
    """One streamed completion: seconds to its first text, and the completion tokens it counted."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, usage = time.perf_counter(), None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):  # blank lines between events, and the last "data: [DONE]"
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if first is None and any(c.get("text") for c in chunk["choices"]):
                first = time.perf_counter() - t0
            usage = chunk.get("usage") or usage
    # A row that ends on its first token shows no text: its TTFT is then the whole answer's time.
    return {"ttft": first if first is not None else time.perf_counter() - t0, "tokens": usage["completion_tokens"]}


async def run_clients(url: str, clients: int, requests: int, tokens: int) -> dict:
    """`clients` clients at once, each sending `requests` requests one after another."""
    async def client_loop(client, i):
        return [await one_request(client, url, PROMPTS[(i + r) % len(PROMPTS)], tokens) for r in range(requests)]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 1)) as client:
        t0 = time.perf_counter()
        done = [d for ds in await asyncio.gather(*(client_loop(client, i) for i in range(clients))) for d in ds]
        wall = time.perf_counter() - t0
    total = sum(d["tokens"] for d in done)
    return {"tok_s": total / wall, "wall_s": wall, "completion_tokens": total, "ttft_ms": [d["ttft"] * 1e3 for d in done]}


def main() -> None:
    p = parser(__doc__, "serve", loads="idle,busy", n_rounds=2)
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends one after another")
    p.add_argument("--parallel", type=int, default=16, help="the server's --parallel: rows decoding at once")
    a = p.parse_args()
    server_args = ["--parallel", str(a.parallel), "-c", str(CONTEXT)]
    cases = [{"clients": int(n), "load": load} for n in a.clients.split(",") for load in a.loads]
    with tempfile.NamedTemporaryFile("w+", prefix="npllama-serve-", suffix=".log") as log:
        proc, url = start_server(server_args, log)
        try:
            asyncio.run(run_clients(url, 1, 1, 4))  # warm-up: first-call costs belong to no case
            rounds(cases, lambda c: asyncio.run(run_clients(url, c["clients"], a.requests, a.tokens)), a.rounds,
                   Quiet(a.max_wait, budget=20 * a.max_wait), own=lambda: [proc.pid], tag="serve")
        finally:
            proc.kill()
            proc.wait()
    by = {}
    for c in cases:
        c.update(tok_s=stat(c, "tok/s", "tok_s"), ttft_ms=summary([t for x in c["runs"] for t in x["ttft_ms"]], "ms"))
        by[c["clients"], c["load"]] = c

    def ratio(n, load, figure):  # n clients' median over 1 client's, under the same load
        return by[n, load][figure]["median"] / by[1, load][figure]["median"] if {(n, load), (1, load)} <= set(by) else None

    def target(load, n, figure, goal):
        x, more = ratio(n, load, figure), figure == "tok_s"  # tok/s: at least; TTFT: at most
        return (f"- {load}: {'tok/s' if more else 'TTFT'} with {n} clients {'>=' if more else '<='} {goal}x that of 1: "
                + ("not measured" if x is None else f"{'met' if (x >= goal if more else x <= goal) else 'MISSED'} ({x:.2f}x)"))
    rows = [[n, *(x for load in a.loads for x in (cell(by[n, load]["tok_s"]), f"{ratio(n, load, 'tok_s') or 0:.2f}",
                                                  f"{by[n, load]['ttft_ms']['median']:.0f}"))]
            for n in dict.fromkeys(c["clients"] for c in cases)]
    headers = ["clients", *(h for load in a.loads for h in (f"tok/s {load}", "x 1 client", f"TTFT {load} (ms)"))]
    write(a.out, f"Server: SmolLM2 over HTTP, {a.tokens} tokens x {a.requests} requests a client, median (min-max) of "
          f"{a.rounds} rounds", f"`npllama serve {' '.join(server_args)}`; busy = beside a busy loop on one core.\n\n"
          + table(headers, rows) + "\n\nTargets:\n\n" + "\n".join(target(load, *t) for load in a.loads for t in TARGETS)
          + "\n\nllama-server: not built here.",
          {"server_args": server_args, "tokens": a.tokens, "requests": a.requests, "rounds": a.rounds, "runs": cases})


if __name__ == "__main__":
    main()

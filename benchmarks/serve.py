"""The OpenAI-compatible server, `python -m npllama serve` on SmolLM2 (its default model), over HTTP.

Throughput (results/serve): aggregate tok/s and time to first token (TTFT) with 1, 4, 8 and 16
concurrent streaming clients, idle and beside a busy core. One server (`--parallel 16 -c 512`) serves
every measurement; each client streams --requests completions one after another (temperature 0, a
prompt of its own). tok/s = all completion tokens (usage counts) / the wall time from the first
request sent to the last one finished; TTFT = a request sent to its first chunk with text, median
over all requests.

    python benchmarks/serve.py [--clients 1,4,8,16] [--tokens 64] [--requests 2] [--rounds 2]

A load run, --soak (results/serve_load; `python benchmarks/serve_load.py` is the same): a server with
--parallel = --clients and 128 positions a row answers each of 16 prompts alone first (greedy), and
fills every row of its KV cache once (its pages are touched as positions are first written: that is
not growth); then the clients send --requests requests in all: every tenth a bad one (which must get
its 4xx), every fiftieth a stream the client drops after its first chunk, the rest greedy completions
whose text must equal the prompt's answer alone. The server's RSS is read every 250 requests, and,
idle (as a server is between bursts), after the first 100 and at the end, where it must be no
larger than after the first 100. Exit status 1 if anything fails.

    python benchmarks/serve.py --soak [--requests 2000] [--clients 16] [--tokens 8]
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from npllama.server import IDLE_SECONDS
from harness import HERE, ROOT, Quiet, cell, listed, memory_mb, parser, rounds, stat, summary, table, write

CONTEXT = 512  # positions a row: the prompts and --tokens fit many times over
PROMPTS = ["The history of the printing press began", "My favourite recipe for a rainy day is", "Volcanoes form when",
           "The three laws of motion state that", "Once upon a time in a small fishing village,",
           "To train for a marathon, a beginner should", "The main causes of the French Revolution were",
           "Photosynthesis is the process by which", "The best way to learn a new language is",
           "In the year 2050, cities will", "A good night's sleep matters because", "The rules of chess are simple:",
           "Dear hiring manager, I am writing to", "The first computers were built to",
           "The difference between weather and climate is", "Honeybees communicate with each other by"]
SOAK = dict(requests=2000, clients="16", tokens=8, out=HERE / "results" / "serve_load")
SOAK_CONTEXT = 128
FIRST = 100  # requests before the RSS the end is held to
SOAK_PROMPTS = [f"Question {i}: what is {i} plus {i * 3}? Answer:" for i in range(8)] + [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
    "The quick brown fox", "A haiku about the sea:", "To be or not to be,", "Dear diary, today I"]
BAD = [(b"{not json", 400), (b'{"prompt": 42}', 400), (b'{"prompt": "hi", "max_tokens": 0}', 400),
       (b'{"prompt": "hi", "temperature": "hot"}', 400), (b'{"prompt": "hi", "model": "gpt-4"}', 404),
       (b'{"prompt": "' + b"word " * 400 + b'"}', 400)]


@contextlib.contextmanager
def server(*args: str):
    """`npllama serve ARGS` on a free port: (process, address). It prints the address once it listens,
    so a request sent from then on waits for it; it is killed at the end."""
    with tempfile.NamedTemporaryFile("w+", prefix="npllama-serve-", suffix=".log") as log:
        proc = subprocess.Popen([sys.executable, "-m", "npllama", "serve", "--port", "0", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            url = next((m[1] for line in proc.stdout if (m := re.search(r"on (http://\S+)/v1", line))), None)
            if url is None:
                raise SystemExit(f"the server did not serve ({proc.wait()}):\n{Path(log.name).read_text()[-3000:]}")
            yield proc, url
        finally:
            proc.kill()
            proc.wait()


def async_client(clients: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 1))


# --- Throughput -----------------------------------------------------------------------------

async def streamed(http: httpx.AsyncClient, url: str, prompt: str, tokens: int) -> dict:
    """One streamed completion: seconds to its first text, and the completion tokens it counted."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, usage = time.perf_counter(), None, None
    async with http.stream("POST", f"{url}/v1/completions", json=body) as resp:
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
    async def client_loop(http, i):
        return [await streamed(http, url, PROMPTS[(i + r) % len(PROMPTS)], tokens) for r in range(requests)]
    async with async_client(clients) as http:
        t0 = time.perf_counter()
        done = [d for ds in await asyncio.gather(*(client_loop(http, i) for i in range(clients))) for d in ds]
        wall = time.perf_counter() - t0
    total = sum(d["tokens"] for d in done)
    return {"tok_s": total / wall, "wall_s": wall, "completion_tokens": total, "ttft_ms": [d["ttft"] * 1e3 for d in done]}


def throughput(a) -> int:
    server_args = ["--parallel", str(a.parallel), "-c", str(CONTEXT)]
    cases = [{"clients": n, "load": load} for n in a.clients for load in a.loads]
    with server(*server_args) as (proc, url):
        asyncio.run(run_clients(url, 1, 1, 4))  # warm-up: first-call costs belong to no case
        rounds(cases, lambda c: asyncio.run(run_clients(url, c["clients"], a.requests, a.tokens)), a.rounds,
               Quiet(a.max_wait, budget=20 * a.max_wait), own=lambda: [proc.pid], tag="serve")
    by = {}
    for c in cases:
        c.update(tok_s=stat(c, "tok/s", "tok_s"), ttft_ms=summary([t for x in c["runs"] for t in x["ttft_ms"]], "ms"))
        by[c["clients"], c["load"]] = c

    def vs_one(n: int, load: str, figure: str) -> str:  # n clients' median over 1 client's, under the same load
        return f"{by[n, load][figure]['median'] / by[1, load][figure]['median']:.2f}" if (1, load) in by else "-"
    rows = [[n, *(x for load in a.loads for x in (cell(by[n, load]["tok_s"]), vs_one(n, load, "tok_s"),
                                                  f"{by[n, load]['ttft_ms']['median']:.0f}", vs_one(n, load, "ttft_ms")))]
            for n in a.clients]
    headers = ["clients", *(h for load in a.loads for h in (f"tok/s {load}", "x 1 client", f"TTFT {load} (ms)", "x 1 client"))]
    write(a.out, f"Server: SmolLM2 over HTTP, {a.tokens} tokens x {a.requests} requests a client, median (min-max) of "
          f"{a.rounds} rounds", f"`npllama serve {' '.join(server_args)}`; busy = beside a busy loop on one core.\n\n"
          + table(headers, rows) + "\n\nllama-server: not built here.",
          {"server_args": server_args, "tokens": a.tokens, "requests": a.requests, "rounds": a.rounds, "runs": cases})
    return 0


# --- The load run ---------------------------------------------------------------------------

async def answer(http: httpx.AsyncClient, url: str, prompt, tokens: int) -> str:
    r = await http.post(url + "/v1/completions", json={"model": "m", "prompt": prompt, "max_tokens": tokens,
                                                       "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


async def request(http: httpx.AsyncClient, url: str, i: int, tokens: int, alone: dict) -> str:
    """Request number i, of its kind; the outcome."""
    if i % 10 == 9:
        body, status = BAD[i // 10 % len(BAD)]
        r = await http.post(url + "/v1/completions", content=body)
        return "bad, refused" if r.status_code == status and "error" in r.json() else "bad, WRONG"
    prompt = SOAK_PROMPTS[i % len(SOAK_PROMPTS)]
    if i % 50 == 25:
        body = {"prompt": prompt, "max_tokens": 100, "stream": True}
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            await anext(r.aiter_lines())
        return "hung up"
    return "good, answered correctly" if await answer(http, url, prompt, tokens) == alone[prompt] else "good, WRONG"


async def load_run(url: str, pid: int, a, clients: int) -> dict:
    """The answers alone, every row filled, then the requests, each client with connections of its
    own: their outcomes and the server's RSS."""
    counts, rss, numbers = collections.Counter(), {}, itertools.count()
    async with async_client(1) as http:
        alone = {prompt: await answer(http, url, prompt, a.tokens) for prompt in SOAK_PROMPTS}

    async def fill_a_row() -> None:  # to the end of the context
        async with async_client(1) as http:
            await answer(http, url, [1] * (SOAK_CONTEXT - 4), 4)

    async def client(until: int) -> None:
        async with async_client(1) as http:
            while (i := next(numbers)) < until:
                if i % 250 == 100:
                    rss[f"after {i} requests"] = memory_mb(pid)["VmRSS"]
                counts[await request(http, url, i, a.tokens, alone)] += 1

    async def idle_rss() -> float:  # as a server between bursts is: idle long enough to give memory back
        await asyncio.sleep(IDLE_SECONDS + 1)
        return memory_mb(pid)["VmRSS"]
    await asyncio.gather(*(fill_a_row() for _ in range(clients)))
    t0 = time.perf_counter()
    await asyncio.gather(*(client(FIRST) for _ in range(clients)))
    rss[f"after the first {FIRST}, idle"] = await idle_rss()
    numbers = itertools.count(FIRST)
    await asyncio.gather(*(client(a.requests) for _ in range(clients)))
    seconds = time.perf_counter() - t0 - IDLE_SECONDS - 1
    rss["at the end, idle"] = await idle_rss()
    async with async_client(1) as http:
        ended = (await http.get(url + "/health")).json()["ended"]
    return {"seconds": seconds, "outcomes": counts, "rss_mb": rss, "ended": ended}


def soak(a) -> int:
    clients = max(a.clients)
    with server("--parallel", str(clients), "--queue", str(4 * clients), "-c", str(SOAK_CONTEXT), "--alias", "m") as (
            proc, url):
        run = asyncio.run(load_run(url, proc.pid, a, clients))
    rss = run["rss_mb"]
    ok = not {"bad, WRONG", "good, WRONG"} & set(run["outcomes"]) and rss["at the end, idle"] <= rss[
        f"after the first {FIRST}, idle"]
    write(a.out, "Load run of `npllama serve`",
          f"{a.requests} requests from {clients} concurrent clients ({a.tokens} tokens each) in {run['seconds']:.0f} s; "
          f"server --parallel {clients}.\n\n" + table(["outcome", "requests"], sorted(run["outcomes"].items())) + "\n\n" +
          "\n".join(f"- server RSS {k}: {v:,.1f} MB" for k, v in rss.items()) +
          f"\n- requests ended, by reason (the server's /health): {run['ended']}\n- {'PASS' if ok else 'FAIL'}: every "
          "good request answered correctly, every bad one refused, RSS no larger than after the first 100 requests",
          {"requests": a.requests, "clients": clients, "tokens": a.tokens, **run, "pass": ok})
    return 0 if ok else 1


def main(argv=None) -> None:
    p = parser(__doc__, "serve", loads="idle,busy", n_rounds=2, tokens=64)
    p.add_argument("--clients", type=listed(int), default="1,4,8,16", help="concurrent clients (--soak: the largest)")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends one after another (--soak: in all)")
    p.add_argument("--parallel", type=int, default=16, help="the server's --parallel: rows decoding at once")
    p.preset("--soak", SOAK, "the load run", action="store_true")
    a = p.parse_args(argv)
    sys.exit(soak(a) if a.soak else throughput(a))


if __name__ == "__main__":
    main()

"""`npllama serve` on SmolLM2 over HTTP (benchmarks/README.md says how each figure is read): aggregate tok/s and
median time to first token with 1-16 concurrent streaming clients, idle and beside a busy core, on one
`--parallel 16 -c 512` server (results/serve); --soak, the load run (results/serve_load).

    python benchmarks/serve.py [--clients 1,4,8,16] [--tokens 64] [--requests 2] [--rounds 2]
    python benchmarks/serve.py --soak [--requests 2000] [--clients 16] [--tokens 8]
"""

import asyncio
import collections
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time

import httpx
from npllama.server import IDLE_SECONDS
from harness import HERE, ROOT, cell, listed, memory_mb, parser, preset, rounds, stat, summary, table, write

COMPLETIONS = "/v1/completions"
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
# Answers that end on a stop token and answers cut at --tokens, so that rows leave the batch at different steps.
SOAK_PROMPTS = [f"Question {i}: what is {i} plus {i * 3}? Answer:" for i in range(8)] + [
    "The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
    "The quick brown fox", "A haiku about the sea:", "To be or not to be,", "Dear diary, today I"]
BAD = [(b"{not json", 400), (b'{"prompt": 42}', 400), (b'{"prompt": "hi", "max_tokens": 0}', 400),
       (b'{"prompt": "hi", "temperature": "hot"}', 400), (b'{"prompt": "hi", "model": "gpt-4"}', 404),
       (b'{"prompt": "' + b"word " * 400 + b'"}', 400)]


@contextlib.contextmanager
def server(*args: str):
    """`npllama serve ARGS` on a free port: (process, address), once it listens (a request then waits for it)."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "npllama", "serve", "--port", "0", *args], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            url = next((m[1] for line in proc.stdout if (m := re.search(r"on (http://\S+)/v1", line))), None)
            if url is None:
                log.seek(0)
                raise SystemExit(f"the server did not serve ({proc.wait()}):\n{log.read()[-3000:]}")
            yield proc, url
        finally:
            proc.kill()
            proc.wait()


def async_client(url: str, connections: int = 1) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=connections + 1))


async def streamed(http: httpx.AsyncClient, prompt: str, tokens: int) -> dict:
    """One streamed completion: seconds to its first text, and the completion tokens it counted."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    async with http.stream("POST", COMPLETIONS, json=body) as resp:
        resp.raise_for_status()
        chunks = [(json.loads(line[6:]), time.perf_counter() - t0) async for line in resp.aiter_lines()
                  if line.startswith("data: {")]  # not the blank lines between events, nor the last "data: [DONE]"
    if "error" in (last := chunks[-1][0]):  # else the usage counts
        raise RuntimeError(last["error"]["message"])
    # A row that ends on its first token shows no text: its TTFT is then the whole answer's time.
    ttft = next((t for chunk, t in chunks if any(c.get("text") for c in chunk["choices"])), time.perf_counter() - t0)
    return {"ttft": ttft, "tokens": last["usage"]["completion_tokens"]}


async def run_clients(url: str, clients: int, requests: int, tokens: int) -> dict:
    """`clients` clients at once, each sending `requests` requests one after another."""
    async with async_client(url, clients) as http:
        async def client(i: int) -> list[dict]:
            return [await streamed(http, PROMPTS[(i + r) % len(PROMPTS)], tokens) for r in range(requests)]
        t0 = time.perf_counter()
        done = [d for ds in await asyncio.gather(*map(client, range(clients))) for d in ds]
        wall = time.perf_counter() - t0
    total = sum(d["tokens"] for d in done)
    return {"tok_s": total / wall, "wall_s": wall, "completion_tokens": total,
            "ttft_ms": [d["ttft"] * 1e3 for d in done]}


def throughput(a) -> None:
    """Every client count under every load, --rounds times, on one server: tok/s and TTFT, each x 1 client's."""
    server_args = ["--parallel", str(a.parallel), "-c", str(CONTEXT)]
    cases = [{"clients": n, "load": load} for n in a.clients for load in a.loads]
    with server(*server_args) as (proc, url):
        asyncio.run(run_clients(url, 1, 1, 4))  # warm-up: first-call costs belong to no case
        rounds(cases, lambda c: asyncio.run(run_clients(url, c["clients"], a.requests, a.tokens)), a.rounds,
               own=lambda: [proc.pid], tag="serve")
    for c in cases:
        c.update(tok_s=stat(c, "tok/s", "tok_s"), ttft_ms=summary([t for x in c["runs"] for t in x["ttft_ms"]], "ms"))
    one, rows = {c["load"]: c for c in cases if c["clients"] == 1}, {n: [n] for n in a.clients}
    for c in cases:  # client count by client count, each load in turn: the columns' order
        x1 = {k: f"{c[k]['median'] / one[c['load']][k]['median']:.2f}" if one else "-" for k in ("tok_s", "ttft_ms")}
        rows[c["clients"]] += [cell(c["tok_s"]), x1["tok_s"], f"{c['ttft_ms']['median']:.0f}", x1["ttft_ms"]]
    headers = [h for load in a.loads for h in (f"tok/s {load}", "x 1 client", f"TTFT {load} (ms)", "x 1 client")]
    write(a.out, f"Server: SmolLM2 over HTTP, {a.tokens} tokens x {a.requests} requests a client, median (min-max) of "
          f"{a.rounds} rounds", f"`npllama serve {' '.join(server_args)}`; busy = beside a busy loop on one core.\n\n"
          f"{table(['clients', *headers], rows.values())}\n\nllama-server: not built here.",
          {"server_args": server_args, "tokens": a.tokens, "requests": a.requests, "rounds": a.rounds, "runs": cases})


async def answer(http: httpx.AsyncClient, prompt, tokens: int) -> str:
    r = await http.post(COMPLETIONS, json={"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


async def request(http: httpx.AsyncClient, i: int, tokens: int, alone: dict) -> str:
    """Request number i: every tenth a bad one, every fiftieth a hang-up, the others greedy; its outcome."""
    if i % 10 == 9:
        body, status = BAD[i // 10 % len(BAD)]
        r = await http.post(COMPLETIONS, content=body)
        return "bad, refused" if r.status_code == status and "error" in r.json() else "bad, WRONG"
    prompt = SOAK_PROMPTS[i % len(SOAK_PROMPTS)]
    if i % 50 == 25:
        async with http.stream("POST", COMPLETIONS, json={"prompt": prompt, "max_tokens": 100, "stream": True}) as r:
            await anext(r.aiter_lines())
        return "hung up"
    return "good, answered correctly" if await answer(http, prompt, tokens) == alone[prompt] else "good, WRONG"


async def soak(a) -> int:
    """--requests requests from --clients clients: exit status 0 (PASS) if every good one was answered as its prompt
    alone is, every bad one refused, and the server's RSS at the end, idle, is no larger than after the first FIRST."""
    clients, outcomes, rss, seconds = max(a.clients), collections.Counter(), {}, 0.0
    server_args = ["--parallel", str(clients), "--queue", str(4 * clients), "-c", str(SOAK_CONTEXT), "--alias", "m"]
    with server(*server_args) as (proc, url):
        async with async_client(url, clients) as http:  # each prompt's answer alone, then every row filled
            alone = {prompt: await answer(http, prompt, a.tokens) for prompt in SOAK_PROMPTS}
            await asyncio.gather(*(answer(http, [1] * (SOAK_CONTEXT - 4), 4) for _ in range(clients)))

        async def client(numbers) -> None:  # the next request of `numbers`, an iterator the clients share
            async with async_client(url) as http:  # connections of its own
                for i in numbers:
                    if i % 250 == 100:
                        rss[f"after {i} requests"] = memory_mb(proc.pid)["VmRSS"]
                    outcomes[await request(http, i, a.tokens, alone)] += 1
        for start, end, when in ((0, FIRST, f"after the first {FIRST}, idle"), (FIRST, a.requests, "at the end, idle")):
            numbers, t0 = iter(range(start, end)), time.perf_counter()
            await asyncio.gather(*(client(numbers) for _ in range(clients)))
            seconds += time.perf_counter() - t0
            await asyncio.sleep(IDLE_SECONDS + 1)  # idle as a server between bursts is: long enough to give memory back
            rss[when] = memory_mb(proc.pid)["VmRSS"]
        ended = httpx.get(url + "/health").json()["ended"]
    grew_kb = 1024 * (rss["at the end, idle"] - rss[f"after the first {FIRST}, idle"])
    ok = not any("WRONG" in o for o in outcomes) and grew_kb <= 0
    write(a.out, "Load run of `npllama serve`", "\n".join([
        f"{a.requests} requests from {clients} concurrent clients ({a.tokens} tokens each) in {seconds:.0f} s; "
        f"server --parallel {clients}.\n", table(["outcome", "requests"], sorted(outcomes.items())) + "\n",
        *(f"- server RSS {when}: {mb:,.1f} MB" for when, mb in rss.items()),
        f"- requests ended, by reason (the server's /health): {ended}",
        f"- {'PASS' if ok else 'FAIL'}: every good request answered correctly, every bad one refused, RSS no larger "
        f"than after the first {FIRST} requests ({grew_kb:+,.0f} kB)"]), {"requests": a.requests, "clients": clients,
        "tokens": a.tokens, "seconds": seconds, "outcomes": outcomes, "rss_mb": rss, "ended": ended, "pass": ok})
    return 0 if ok else 1


def main() -> None:
    p = parser(__doc__, "serve", loads="idle,busy", n_rounds=2, tokens=64)
    p.add_argument("--clients", type=listed(int), default="1,4,8,16", help="concurrent clients (--soak: the largest)")
    p.add_argument("--requests", type=int, default=2, help="requests a client sends one after another (--soak: in all)")
    p.add_argument("--parallel", type=int, default=16, help="the server's --parallel: rows decoding at once")
    preset(p, "--soak", SOAK, "the load run", action="store_true")
    a = p.parse_args()
    sys.exit(asyncio.run(soak(a)) if a.soak else throughput(a))


if __name__ == "__main__":
    main()

"""The OpenAI-compatible server measured: aggregate tok/s and time to first token (TTFT) with 1, 4,
8 and 16 concurrent streaming clients on SmolLM2 (serve's default model), idle and beside a busy core.

    python benchmarks/serve.py [--clients 1,4,8,16] [--tokens 64] [--requests 2] [--rounds 2]

One server (`python -m npllama serve --port 0 --parallel 16 -c 512`) serves every measurement.
Each client streams --requests completions one after another (temperature 0, a prompt of its own).
tok/s = all completion tokens (usage counts: a row may end early on end-of-text) / wall time from
the first request sent to the last one finished; TTFT = request sent to its first chunk with text,
median over all requests. Rounds interleave client counts and idle/busy (machine.Spinner on one
core), so a drift in the machine's load hits all alike. Writes benchmarks/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import (ROOT, ForeignLoad, QuietMachine, Spinner, code_info, cpu_ns, machine_info,  # noqa: E402
                     wait_until_idle)
from stats import progress, summary  # noqa: E402

CONTEXT = 512  # positions a row: the prompts and --tokens fit many times over
PROMPTS = ["The history of the printing press began", "My favourite recipe for a rainy day is", "Volcanoes form when",
           "The three laws of motion state that", "Once upon a time in a small fishing village,",
           "To train for a marathon, a beginner should", "The main causes of the French Revolution were",
           "Photosynthesis is the process by which", "The best way to learn a new language is",
           "In the year 2050, cities will", "A good night's sleep matters because", "The rules of chess are simple:",
           "Dear hiring manager, I am writing to", "The first computers were built to",
           "The difference between weather and climate is", "Honeybees communicate with each other by"]


def start_server(parallel: int, log) -> tuple[subprocess.Popen, str, list[str]]:
    """The server on a free port: its address is in the line it prints once the model is loaded."""
    cmd = [sys.executable, "-m", "npllama", "serve", "--port", "0", "--parallel", str(parallel), "-c", str(CONTEXT)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    for line in proc.stdout:
        if m := re.match(r"serving .* on (http://\S+)/v1 ", line):
            for _ in range(300):  # a minute for /health to answer
                time.sleep(0.2)
                try:
                    if httpx.get(f"{m.group(1)}/health", timeout=5).status_code == 200:
                        return proc, m.group(1), cmd
                except httpx.TransportError:
                    pass
            break
    proc.kill()
    raise SystemExit(f"the server did not serve ({proc.wait()}):\n{Path(log.name).read_text()[-3000:]}")


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
    return {"tok_s": total / wall, "wall_s": wall, "completion_tokens": total,
            "ttft_ms": [d["ttft"] * 1e3 for d in done]}


def measure(url: str, server_pid: int, clients: int, load: str, a, quiet: QuietMachine) -> dict:
    """One configuration, once the server's BLAS threads stopped spinning and others' load is low."""
    spinner = Spinner() if load == "busy" else None
    own = [server_pid] + ([spinner.pid] if spinner else [])
    try:
        waited = wait_until_idle([server_pid]) + (quiet.wait(own, "serve") or 0)
        foreign, t0, ns0 = ForeignLoad(own), time.perf_counter(), cpu_ns(spinner.pid) if spinner else 0
        run = asyncio.run(run_clients(url, clients, a.requests, a.tokens))
        run.update(foreign_cores=foreign.cores(), waited_s=waited,
                   spinner_cores=spinner.cores(t0, ns0) if spinner else None)
    finally:
        if spinner:
            spinner.stop()
    return run


def ratio(s: dict, n: int, load: str, metric: str) -> float | None:
    """n clients' median over 1 client's, under the same load; None if either was not measured."""
    if f"{n} {load}" in s and f"1 {load}" in s:
        return s[f"{n} {load}"][metric]["median"] / s[f"1 {load}"][metric]["median"]
    return None  # the target's configurations were not all in --clients


def report(res: dict) -> str:
    m, s = res["machine"], res["summary"]
    lines = [f"# Server: {res['model']} over HTTP, {res['tokens']} tokens x {res['requests']} requests a client, "
             f"median of {res['rounds']} rounds (min-max)", "",
             f"Machine: {m.get('cpu', '?')}, {m['cores_available']} cores; `{' '.join(res['command'][1:])}` "
             f"(--parallel {res['parallel']}); busy = a busy loop on one core (machine.Spinner).", "",
             "| clients | tok/s idle | x 1 client | TTFT idle (ms) | tok/s busy | x 1 client | TTFT busy (ms) |",
             "|---|---|---|---|---|---|---|"]
    for n in res["clients"]:
        cells = []
        for load in ("idle", "busy"):
            t, x = s[f"{n} {load}"]["tok_s"], ratio(s, n, load, "tok_s")
            cells += [f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f})", "-" if x is None else f"{x:.2f}",
                      f"{s[f'{n} {load}']['ttft_ms']['median']:.0f}"]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "Targets:", ""]
    for load in ("idle", "busy"):
        for n, metric, goal in ((8, "tok_s", 3), (16, "tok_s", 4), (8, "ttft_ms", 2)):
            x, more = ratio(s, n, load, metric), metric == "tok_s"  # tok/s: at least; TTFT: at most
            met = x is not None and (x >= goal if more else x <= goal)
            lines.append(f"- {load}: {'tok/s' if more else 'TTFT'} with {n} clients {'>=' if more else '<='} {goal}x "
                         f"that of 1: " + ("not measured" if x is None else f"{'met' if met else 'MISSED'} ({x:.2f}x)"))
    return "\n".join(lines + ["", "llama-server: not built on this machine.", ""])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--tokens", type=int, default=64, help="max_tokens of each request")
    p.add_argument("--requests", type=int, default=2, help="requests each client sends one after another")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--parallel", type=int, default=16, help="the server's --parallel: rows decoding at once")
    p.add_argument("--max-wait", type=float, default=30, help="seconds to wait for a quiet machine (0: don't)")
    p.add_argument("--out", default=str(HERE / "results" / "serve"), help="where serve.{json,md} go")
    a = p.parse_args()
    clients, quiet = [int(n) for n in a.clients.split(",")], QuietMachine(a.max_wait, budget=20 * a.max_wait)
    runs, code = [], code_info()  # before the run: others edit npllama meanwhile
    with tempfile.NamedTemporaryFile("w+", prefix="npllama-serve-", suffix=".log") as log:
        proc, url, cmd = start_server(a.parallel, log)
        try:
            asyncio.run(run_clients(url, 1, 1, 4))  # warm-up: first-call costs belong to no configuration
            for r in range(a.rounds):
                for n in clients:  # idle first or busy first, alternately
                    for load in ("idle", "busy") if (r + clients.index(n)) % 2 == 0 else ("busy", "idle"):
                        run = measure(url, proc.pid, n, load, a, quiet)
                        runs.append({"round": r, "clients": n, "load": load, **run})
                        progress("serve", f"round {r + 1}, {n} clients, {load}: {run['tok_s']:.1f} tok/s, TTFT "
                                 f"{statistics.median(run['ttft_ms']):.0f} ms, others {run['foreign_cores']:.2f} cores")
        finally:
            proc.kill()
            proc.wait()
    summ = {f"{n} {load}": {"tok_s": summary([x["tok_s"] for x in sel], "tok/s"),
                            "ttft_ms": summary([t for x in sel for t in x["ttft_ms"]], "ms")}
            for n in clients for load in ("idle", "busy")
            for sel in [[x for x in runs if x["clients"] == n and x["load"] == load]]}
    res = {"machine": machine_info(), "code": code, "model": "SmolLM2 (serve's default)", "command": cmd,
           "parallel": a.parallel, "context": CONTEXT, "clients": clients, "tokens": a.tokens,
           "requests": a.requests, "rounds": a.rounds, "runs": runs, "summary": summ}
    Path(a.out).with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    Path(a.out).with_suffix(".md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()

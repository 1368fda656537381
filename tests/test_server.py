"""The OpenAI-compatible server (npllama/server.py): real HTTP on a free port, the official
`openai` client, the default model. Greedy answers equal the command line's; a request's answer
does not depend on the requests decoding beside it; bad input gets a 4xx naming the field and
the server goes on; a client that hangs up frees its row."""

from __future__ import annotations

import concurrent.futures
import io
import json
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

import npllama  # noqa: E402
from npllama import server  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three primary colors are",
           "In 1969, the first", "My favourite recipe for bread", "Water boils at", "The quick brown fox",
           "A haiku about the sea:", "import numpy as np\n", "The largest planet in the solar system",
           "To be or not to be,", "Photosynthesis is the process", "The French word for cat is",
           "Dear diary, today I", "The speed of light is"]
CONTEXT = 256


@pytest.fixture(scope="module")
def model(default_model_path):
    return npllama.load(default_model_path)


@contextmanager
def running(model, parallel=8, queue=32, api_key=None, context=CONTEXT, model_id="smollm2", **speculation):
    """The server in this process: the engine's thread, and uvicorn in a thread on a free port.
    Yields (base URL, the engine, the request log)."""
    engine = server.Engine(model, parallel, context, queue, **speculation)
    log = io.StringIO()
    app = server.make_app(engine, server.Requests(model, model_id, context), api_key, log=log)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    web = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [listener]}, daemon=True)
    engine.thread.start()
    thread.start()
    while not web.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", engine, log
    finally:
        web.should_exit = True
        thread.join()
        engine.stop()


@pytest.fixture(scope="module")
def url(model):
    with running(model) as (base, _, _):
        yield base


def client(url, **kwargs):
    return openai.OpenAI(base_url=url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


def complete(url, prompt, n=16, **kwargs):
    return client(url).completions.create(model="smollm2", prompt=prompt, max_tokens=n, temperature=0, **kwargs)


def cli(*argv) -> str:
    out = subprocess.run([sys.executable, "-m", "npllama", *argv, "--temperature", "0", "-c", str(CONTEXT)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_greedy_completion_equals_the_command_line_and_counts_tokens_as_the_tokenizer(url, model):
    prompt = PROMPTS[0]
    got = complete(url, prompt, n=16)
    assert got.choices[0].text == cli("-p", prompt, "-n", "16")[len(prompt):-1]  # the CLI prints the prompt, a newline
    tokens = model.tokenizer.encode(prompt)
    assert got.usage.prompt_tokens == len(tokens)
    assert got.usage.completion_tokens == 16 and got.usage.total_tokens == len(tokens) + 16
    assert got.choices[0].finish_reason == "length" and got.object == "text_completion" and got.model == "smollm2"


@pytest.mark.slow
def test_greedy_chat_equals_the_command_lines_chat(url):
    message = "What is the capital of France?"
    got = client(url).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": message}],
                                              max_tokens=24, temperature=0)
    assert got.choices[0].message.content == cli("--chat", "-p", message, "-n", "24")[:-1]
    assert got.choices[0].message.role == "assistant" and got.object == "chat.completion"


@pytest.mark.slow
def test_streamed_text_equals_the_whole_text(url):
    whole = complete(url, PROMPTS[1], n=24)
    chunks = list(client(url).completions.create(model="smollm2", prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason

    messages = [{"role": "user", "content": "Name three fruits."}]
    whole = client(url).chat.completions.create(model="smollm2", messages=messages, max_tokens=20, temperature=0)
    chunks = list(client(url).chat.completions.create(model="smollm2", messages=messages, max_tokens=20,
                                                      temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_the_stream_ends_with_done_as_server_sent_events(url):
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.slow
def test_sixteen_concurrent_clients_each_get_what_they_get_alone(url):
    alone = [complete(url, p, n=12).choices[0].text for p in PROMPTS]
    seeded = dict(prompt="Write a word:", max_tokens=12, temperature=0.9, seed=7)
    alone_sampled = client(url).completions.create(model="smollm2", **seeded).choices[0].text
    with concurrent.futures.ThreadPoolExecutor(17) as pool:
        crowd = [pool.submit(complete, url, p, 12) for p in PROMPTS]
        sampled = pool.submit(lambda: client(url).completions.create(model="smollm2", **seeded))
        assert [f.result().choices[0].text for f in crowd] == alone
        assert sampled.result().choices[0].text == alone_sampled


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lookup", "draft"])
def test_speculating_rows_each_get_their_unspeculated_answer(model, method):
    """Rows guessing each for itself (prompt lookup, or a draft model: the model itself), eight
    at a time, streamed or whole: each answer is generate's without speculation."""
    passage = "It was the best of times, it was the worst of times, it was the age of wisdom."
    prompts = [passage + " " + passage[:k] for k in (10, 20, 30, 40)] + PROMPTS[:4]
    stops = model.tokenizer.stop_ids
    alone = [model.tokenizer.decode([t for t in model.generate(model.tokenizer.encode(p), 20) if t not in stops])
             for p in prompts]
    with running(model, **({"lookup": True} if method == "lookup" else {"draft": model})) as (base, engine, _):
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            whole = [pool.submit(complete, base, p, 20) for p in prompts]
            streamed = pool.submit(lambda: "".join(c.choices[0].text for c in client(base).completions.create(
                model="smollm2", prompt=prompts[0], max_tokens=20, temperature=0, stream=True)))
            assert [f.result().choices[0].text for f in whole] == alone
            assert streamed.result() == whole[0].result().choices[0].text
        guesses = httpx.get(base + "/health").json()["guesses"]
    assert guesses["accepted"] > 0 and guesses["drafted"] >= guesses["accepted"]


@pytest.mark.slow
def test_stop_strings_echo_and_logprobs(url, model):
    base = complete(url, PROMPTS[2], n=24).choices[0].text
    stop = base[5:8]
    got = complete(url, PROMPTS[2], n=24, stop=[stop, "never appears"])
    assert got.choices[0].text == base[:base.index(stop)] and got.choices[0].finish_reason == "stop"
    streamed = client(url).completions.create(model="smollm2", prompt=PROMPTS[2], max_tokens=24, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == got.choices[0].text

    got = complete(url, PROMPTS[3], n=4, echo=True, logprobs=2)
    lp = got.choices[0].logprobs
    prompt_tokens = model.tokenizer.encode(PROMPTS[3])
    assert got.choices[0].text.startswith(PROMPTS[3])
    assert len(lp.tokens) == len(prompt_tokens) + 4 and lp.token_logprobs[0] is None
    # The chosen (greedy) token is the likeliest: its logprob tops the alternatives'.
    for chosen, top in zip(lp.token_logprobs[len(prompt_tokens):], lp.top_logprobs[len(prompt_tokens):]):
        assert chosen <= 0 and len(top) == 2 and chosen == pytest.approx(max(top.values()))


@pytest.mark.slow
def test_chat_logprobs_name_each_token_and_its_alternatives(url):
    got = client(url).chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Count to ten."}],
                                              max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    assert got.choices[0].message.content.startswith("".join(c.token for c in content[:2]))
    for c in content:  # greedy: each chosen token is the likeliest of its alternatives
        assert len(c.top_logprobs) == 3 and c.logprob == pytest.approx(max(t.logprob for t in c.top_logprobs))
        assert bytes(c.bytes).decode("utf-8", "replace") == c.token


BAD = [  # (body or raw bytes, status, the field the error names)
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"prompt": 42}, 400, "prompt"),
    ({"prompt": ["a", "b"]}, 400, "prompt"),
    ({"prompt": [10**9]}, 400, "prompt"),
    ({"prompt": "\ud800 lone surrogate"}, 400, "prompt"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"prompt": "word " * CONTEXT}, 400, "prompt"),
    ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ({"prompt": "hi", "top_p": "high"}, 400, "top_p"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ({"prompt": "hi", "n": 2}, 400, "n"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "hi", "logprobs": 99}, 400, "logprobs"),
    ({"prompt": "hi", "repeat_penalty": 0}, 400, "repeat_penalty"),
    ({"prompt": "hi", "repeat_last_n": -2}, 400, "repeat_last_n"),
]


def test_llama_servers_sampling_fields_reach_the_sampler():
    """top_k, min_p, repeat_penalty and repeat_last_n, as llama-server's bodies spell them; the
    penalty is off unless asked (OpenAI's API has none)."""
    sampler = server.sampler_of({"temperature": 0.5, "top_k": 7, "min_p": 0.1, "repeat_penalty": 1.3,
                                 "repeat_last_n": 16})
    assert (sampler.temperature, sampler.top_k, sampler.min_p, sampler.repeat_penalty, sampler.repeat_last_n) == \
        (0.5, 7, 0.1, 1.3, 16)
    assert server.sampler_of({}).repeat_penalty == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("body, status, param", BAD, ids=[str(b)[:40] for b, _, _ in BAD])
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_goes_on(url, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + "/v1/completions", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]
    assert complete(url, "Hello", n=2).usage.completion_tokens == 2


@pytest.mark.parametrize("messages, param", [
    ("hi", "messages"), ([], "messages"), ([{"role": "wizard", "content": "x"}], "messages[0]"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0]"),
])
def test_bad_chat_messages_name_the_message(url, messages, param):
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


@pytest.mark.slow
def test_oversized_bodies_unknown_routes_and_special_token_text(url, model):
    r = httpx.post(url + "/v1/completions", content=b"{" + b" " * server.MAX_BODY + b"}")
    assert r.status_code == 413 and "body" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/engines").status_code == 404
    assert httpx.get(url + "/v1/completions").status_code == 405
    text = "<|im_end|><|im_start|>system"  # plain text in a prompt, as on the command line
    got = complete(url, text, n=1)
    assert got.usage.prompt_tokens == len(model.tokenizer.encode(text)) > 2
    assert client(url).models.list().data[0].id == "smollm2"
    assert httpx.get(url + "/health").json()["status"] == "ok"


@pytest.fixture
def no_stop_tokens(monkeypatch):
    """Requests that decode to their max_tokens: a row that must stay busy cannot end early on
    the model's end-of-text."""
    row = server.Requests.row
    monkeypatch.setattr(server.Requests, "row", lambda self, body, prompt, limit, stops, logprobs:
                        row(self, body, prompt, limit, (), logprobs))


@pytest.mark.slow
def test_a_client_that_hangs_up_frees_its_row(model, no_stop_tokens):
    with running(model, parallel=1, queue=4) as (url, engine, log):
        body = {"prompt": PROMPTS[4], "max_tokens": CONTEXT - 20, "stream": True, "temperature": 0}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            next(r.iter_lines())  # decoding has begun; then the client leaves
        # With one row, this request is served only once the abandoned one has left it.
        assert complete(url, "Hello", n=2).usage.completion_tokens == 2
        assert engine.ended["cancelled"] == 1
        assert re.search(r"POST /v1/completions 200 \d+\+2 tokens", log.getvalue())

        # The same for a client that hangs up on a whole (unstreamed) request.
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        assert complete(url, "Hello", n=2).usage.completion_tokens == 2
        assert engine.ended["cancelled"] == 2


def test_requests_past_the_queue_get_503_with_retry_after(model, no_stop_tokens):
    with running(model, parallel=1, queue=0) as (url, _, _):
        body = {"prompt": "Once", "max_tokens": CONTEXT - 10, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the connection, a hang-up
            next(lines)
            busy = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "server_busy"


@pytest.mark.slow
def test_an_unexpected_error_fails_its_request_only(model, monkeypatch):
    class Failing(npllama.Sampler):
        def __call__(self, logits):
            raise RuntimeError("a bug in one request")

    sampler_of = server.sampler_of
    monkeypatch.setattr(server, "sampler_of", lambda body: Failing() if body.get("seed") == 666 else sampler_of(body))
    with running(model) as (url, engine, log):
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            good = [pool.submit(complete, url, p, 8) for p in PROMPTS[:2]]
            bad = httpx.post(url + "/v1/completions", json={"prompt": "x", "seed": 666, "max_tokens": 4}, timeout=60)
            assert [g.result().usage.completion_tokens for g in good] == [8, 8]
        assert bad.status_code == 500 and "a bug in one request" in bad.json()["error"]["message"]
        assert engine.ended["error"] == 1
        monkeypatch.setattr(server.Requests, "completion", lambda self, body: 1 / 0)
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert "ZeroDivisionError" in log.getvalue()
        assert httpx.get(url + "/health").status_code == 200


def test_the_api_key_is_enforced(model):
    with running(model, api_key="s3cret") as (url, _, _):
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").completions.create(model="smollm2", prompt="hi", max_tokens=1)
        assert client(url, api_key="s3cret").completions.create(model="smollm2", prompt="hi", max_tokens=1)
        assert httpx.get(url + "/health").status_code == 200  # for load balancers, as llama-server's


def test_text_arrives_in_whole_characters_and_stops_before_a_stop_string(model):
    tok = model.tokenizer
    text = "llamas 🦙🦙 and 中文 end"
    ids = tok.encode(text, bos=False)
    assert len(ids) > len(text.split())  # the emoji and the CJK are split over several tokens
    out = server.TextOut(tok, [])
    pieces = [out.push(t) for t in ids] + [out.finish()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    rng = np.random.default_rng(0)
    for _ in range(50):  # stop strings anywhere, as prefixes of each other, across tokens
        a = int(rng.integers(0, len(text) - 1))
        stops = [text[a:a + int(rng.integers(1, 5))], "🦙 a", "zz"]
        out = server.TextOut(tok, stops)
        got = "".join(out.push(t) for t in ids) + out.finish()
        first = min(i for i in (text.find(s) for s in stops) if i >= 0)
        assert got == text[:first] and out.stopped


HEAP_MAX = 64 << 20  # glibc reserves a thread arena's heap as this many bytes, aligned to as many


def thread_arenas(pid: int) -> int:
    """glibc thread arenas in a process's maps: a read-write mapping at a 64 MB boundary, the rest
    of its 64 MB reserved (---p)."""
    maps = re.findall(r"^([0-9a-f]+)-([0-9a-f]+) (\S+)", Path(f"/proc/{pid}/maps").read_text(), re.M)
    spans = [(int(start, 16), int(end, 16), perms) for start, end, perms in maps]
    return sum(start % HEAP_MAX == 0 and perms == "rw-p" and end == next_start and rest == "---p"
               and next_end == start + HEAP_MAX
               for (start, end, perms), (next_start, next_end, rest) in zip(spans, spans[1:]))


@pytest.mark.slow
def test_the_serve_command_prints_where_it_listens_and_a_line_per_request(default_model_path):
    proc = subprocess.Popen([sys.executable, "-m", "npllama", "serve", "--port", "0", "-c", "128", "--parallel", "2",
                             "--alias", "smollm2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)[1]
        assert complete(url, "Hello", n=3).usage.completion_tokens == 3
        if sys.platform.startswith("linux"):
            assert thread_arenas(proc.pid) == 0  # its engine's thread allocates from the main arena
    finally:
        proc.terminate()
        err = proc.communicate(timeout=30)[1]
    assert re.search(r"POST /v1/completions 200 \d+\+3 tokens [\d.]+ s", err), err


@pytest.mark.slow
def test_the_serve_command_refuses_a_port_in_use_before_loading():
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    out = subprocess.run([sys.executable, "-m", "npllama", "serve", "--port", str(taken.getsockname()[1])],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot listen on 127.0.0.1" in out.stderr and "loaded" not in out.stderr


@pytest.mark.slow
@pytest.mark.parametrize("dtype, weights", [("float32", "int16"), ("float32", "exact"), ("bfloat16", "exact")])
def test_every_dtype_and_weight_mode_serves_what_generate_gives(random_checkpoint, dtype, weights):
    """The server runs on the one engine: a streamed random model, in each dtype and storage,
    answers a batch of concurrent requests with generate's tokens for each prompt alone."""
    from oracle.checkpoints import tiny_args
    from npllama.tokenizer import StreamDecoder
    model = npllama.load(random_checkpoint(tiny_args(), seed=3), dtype=dtype, weights_budget=0, weights=weights)
    prompts = [[model.tokenizer.bos_id, 100 + i, 2000 + 7 * i] for i in range(5)]

    def text(tokens):
        decoder = StreamDecoder(model.tokenizer, skip_special=True)
        return "".join(decoder.push(t) for t in tokens) + decoder.flush()
    alone = [text(model.generate(p, 10)) for p in prompts]
    with running(model, parallel=3, context=32) as (url, _, _):
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            got = list(pool.map(lambda p: complete(url, p, n=10).choices[0].text, prompts))
    assert got == alone


ARENAS = """
import ctypes, sys, threading
import numpy as np
from npllama.server import one_malloc_arena
if sys.argv[1] == "one":
    one_malloc_arena()
thread = threading.Thread(target=lambda: [np.ones(1000) for _ in range(100)])  # 8 kB each: malloc's, not mmap's
thread.start()
thread.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
out = ctypes.c_void_p(libc.fopen(sys.argv[2].encode(), b"w"))
libc.malloc_info(0, out)
libc.fclose(out)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's arenas")
def test_serve_keeps_the_engine_thread_on_the_main_malloc_arena(tmp_path):
    """Issue 21's RSS: a thread started after one_malloc_arena (serve calls it before loading)
    allocates from glibc's main arena, the one whose free top malloc_trim gives back; without
    it, the thread gets an arena of its own (malloc_info lists each as a <heap>)."""
    heaps = {}
    for case in ("default", "one"):
        info = tmp_path / f"{case}.xml"
        subprocess.run([sys.executable, "-c", ARENAS, case, str(info)], check=True)
        heaps[case] = info.read_text().count("<heap nr=")
    assert heaps == {"default": 2, "one": 1}


def resident_pages(array: np.ndarray) -> float:
    """The share of an array's pages in RAM (/proc/self/pagemap's present bit)."""
    first, last = array.ctypes.data // 4096, (array.ctypes.data + array.nbytes - 1) // 4096
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        entries = np.frombuffer(f.read((last - first + 1) * 8), np.uint64)
    return float(np.mean(entries >> np.uint64(63)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/pagemap")
def test_the_engine_takes_its_reused_buffers_whole_before_serving(default_model_path):
    """Issue 21's RSS: the buffers of a pass of up to REUSED_ROWS token rows are written whole when
    the engine is made, so that a pass of more rows than any before takes no new pages mid-run (in
    the load run, 23 of the 38 pages that came after request 100 were theirs)."""
    model = npllama.load(default_model_path)
    assert model.buffers.reused == {}  # a model made alone takes them at its first pass
    server.Engine(model, parallel=2, context=32, max_waiting=0)
    assert {name: a.shape for name, a in model.buffers.reused.items()} == {
        name: (npllama.engine.REUSED_ROWS, width) for name, width in model.buffers.widths.items()}
    assert [resident_pages(a) for a in model.buffers.reused.values()] == [1.0] * len(model.buffers.widths)


def test_the_c_heap_is_trimmed_without_running_a_program(monkeypatch):
    """release_free_memory calls glibc through the process's own symbols: ctypes.util.find_library
    would run `ldconfig -p` in a subprocess at every idle spell."""
    def no_program(args, *_, **__):
        raise AssertionError(f"ran {args}")
    monkeypatch.setattr(subprocess, "Popen", no_program)
    server.release_free_memory()
    server.one_malloc_arena()


def test_an_idle_engine_gives_free_memory_back_once_per_idle_spell(model, monkeypatch):
    """Issue 21's RSS: after IDLE_SECONDS with nothing to do the engine trims the C heap once
    (malloc_trim), not during a burst of requests and not again until it has worked."""
    trims = []
    monkeypatch.setattr(server, "IDLE_SECONDS", 0.2)
    monkeypatch.setattr(server, "release_free_memory", lambda: trims.append(time.monotonic()))
    with running(model) as (url, _, _):
        time.sleep(0.8)
        assert len(trims) == 1  # once, though idle for four spells of IDLE_SECONDS
        started = time.monotonic()
        complete(url, "Hello", n=4)
        complete(url, "Hello", n=4)
        assert all(t < started for t in trims)  # a request waits for no trim
        time.sleep(0.8)
        assert len(trims) == 2

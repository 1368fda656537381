"""An OpenAI-compatible HTTP server on the one engine, with continuous batching.

    python -m npllama serve [-m MODEL] [--port 8080] [--parallel 8] [--api-key KEY]

Three parts, each on its own side of one thread boundary:
- `Engine`: one thread of its own runs the generation loop (`generate.Batch`). Up to
  `parallel` requests are rows of one batch: a request that arrives while others decode joins
  at the next step (its prompt prefilled then), a finished or abandoned one leaves at once and
  its row is taken by the next request waiting. Each new token goes back to its request's
  event loop with `call_soon_threadsafe`, so the web server never waits on the math.
- the requests: each body checked field by field into a `Row` (a sampler, a limit, stop
  tokens) and the text-level options (stop strings, echo, logprobs); what is wrong is a 4xx
  in OpenAI's error format, naming the field.
- the HTTP side (Starlette on uvicorn, the `serve` extra): /v1/completions and
  /v1/chat/completions, whole or streamed as server-sent events, /v1/models, /health.

A row's greedy tokens do not depend on the rows beside it: each row's attention reads only its
own slot of the KV cache, and its products are its own rows of the batch's matrix products.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import hmac
import json
import math
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

from .chat import chat_format_for
from .engine import REUSED_ROWS
from .errors import NpllamaError, shown
from .generate import Batch, Completion, Row, Sampler
from .speculative import drafter_for
from .tokenizer import StreamDecoder

MAX_BODY = 1 << 20  # bytes of a request body: a full context of text is far less
MAX_STOPS = 4  # stop strings a request may give, as OpenAI allows
MAX_TOP_LOGPROBS = 20
FINISH_REASONS = {"stop_token": "stop", "max_new_tokens": "length", "max_seq_len": "length"}


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# --- requests: what a client may send, checked field by field ---

def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code)


def number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, f"must be a number, got {shown(value)}", "invalid_type")
    if not low <= value <= high:
        raise invalid(name, f"must be from {low} to {high}, got {value}")
    return float(value)


def integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"must be an integer, got {shown(value)}", "invalid_type")
    if not low <= value <= high:
        raise invalid(name, f"must be from {low} to {high}, got {value}")
    return value


def flag(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is not None and not isinstance(value, bool):
        raise invalid(name, f"must be true or false, got {shown(value)}", "invalid_type")
    return bool(value)


def stop_texts(body: dict) -> list[str]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not (isinstance(stops, list) and all(isinstance(s, str) and s for s in stops)):
        raise invalid("stop", f"must be a non-empty string or a list of them, got {shown(stop)}", "invalid_type")
    if len(stops) > MAX_STOPS:
        raise invalid("stop", f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    return stops


def unsupported(body: dict, neutral: dict) -> None:
    """Fields of OpenAI's API npllama does not implement: accepted at their neutral value only."""
    for name, value in neutral.items():
        if body.get(name) not in (None, value):
            raise invalid(name, f"is not supported by npllama (only {json.dumps(value)})", "unsupported")


def sampler_of(body: dict) -> Sampler:
    """OpenAI's defaults (temperature 1, top_p 1), and llama-server's top_k, min_p, repeat_penalty
    and repeat_last_n extensions (penalty off unless asked: OpenAI has none)."""
    return Sampler(temperature=number(body, "temperature", 1.0, 0.0, 2.0), top_p=number(body, "top_p", 1.0, 0.0, 1.0)
                   or 1e-9, top_k=integer(body, "top_k", 0, 0, 1 << 20), seed=integer(body, "seed", None, 0, 2**63 - 1),
                   min_p=number(body, "min_p", 0.0, 0.0, 1.0),
                   repeat_penalty=number(body, "repeat_penalty", 1.0, 1e-3, 100.0),
                   repeat_last_n=integer(body, "repeat_last_n", 64, -1, 1 << 20))


@dataclass
class Request:
    """One request's row, and what shapes its text: stop strings, echo, logprobs, its format."""

    row: Row
    kind: str  # "text_completion" or "chat.completion"
    stream: bool
    stops: list[str] = field(default_factory=list)
    echo: str = ""  # text put before the completion's (completions' echo)
    logprobs: int | None = None  # top alternatives per token with logprobs; None: no logprobs
    include_usage: bool = False  # a final streamed chunk with the usage counts


class Requests:
    """Turns request bodies into `Request`s for one model and context length."""

    def __init__(self, model, model_id: str, context: int):
        self.model, self.model_id, self.context = model, model_id, context
        self.tokenizer = model.tokenizer
        self.chat_format = None  # found at the first chat request: a base model may have none

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if name is not None and name != self.model_id:
            raise ApiError(404, f"model: {shown(name)} is not served here; this server serves {self.model_id!r} "
                           "(GET /v1/models)", "model", "model_not_found")

    def completion(self, body: dict) -> Request:
        self.check_model(body)
        unsupported(body, {"n": 1, "best_of": 1, "suffix": None, "logit_bias": None,
                           "frequency_penalty": 0, "presence_penalty": 0})
        prompt, text = self.prompt_tokens(body.get("prompt"))
        logprobs = integer(body, "logprobs", None, 0, 5)
        echo = flag(body, "echo")
        limit = self.limit(body, ("max_tokens",), len(prompt), default=16)
        row = self.row(body, prompt, limit, self.tokenizer.stop_ids, logprobs)
        row.prompt_logprobs = echo and logprobs is not None
        if echo:
            row.done.tokens = list(prompt)
        return Request(row, "text_completion", flag(body, "stream"), stop_texts(body),
                       text if echo else "", logprobs, self.include_usage(body))

    def chat(self, body: dict) -> Request:
        self.check_model(body)
        unsupported(body, {"n": 1, "logit_bias": None, "frequency_penalty": 0, "presence_penalty": 0,
                           "tools": None, "tool_choice": None, "functions": None, "response_format": None})
        if self.chat_format is None:
            try:
                self.chat_format = chat_format_for(self.tokenizer)
            except NpllamaError as e:
                raise invalid("messages", str(e), "no_chat_format") from None
        prompt = self.encode(lambda: self.chat_format.encode_dialog(self.messages(body.get("messages"))), "messages")
        logprobs = integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if flag(body, "logprobs") else None
        limit = self.limit(body, ("max_completion_tokens", "max_tokens"), len(prompt), default=None)
        row = self.row(body, prompt, limit, self.chat_format.stop_ids, logprobs)
        return Request(row, "chat.completion", flag(body, "stream"), stop_texts(body), "", logprobs,
                       self.include_usage(body))

    def row(self, body: dict, prompt: list[int], limit: int, stops, logprobs: int | None) -> Row:
        row = Row(prompt, limit, sampler_of(body), set(stops), done=Completion([], prompt_tokens=len(prompt)))
        if logprobs is not None:
            row.done.logprobs, row.done.top_logprobs, row.top_logprobs = [], [], logprobs
        return row

    def prompt_tokens(self, prompt) -> tuple[list[int], str]:
        """A prompt's tokens and its text: a string, or token ids (one prompt; a list of one)."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokens = self.encode(lambda: self.tokenizer.encode(prompt), "prompt")
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            vocab = self.model.args.vocab_size
            if not all(0 <= t < vocab for t in prompt):
                raise invalid("prompt", f"token ids must be from 0 to {vocab - 1}")
            tokens, prompt = prompt, self.tokenizer.decode(prompt)
        else:
            raise invalid("prompt", "must be a string or a list of token ids (one prompt a request: send several "
                          f"requests at once instead, they decode together), got {shown(prompt)}", "invalid_type")
        if not tokens:
            raise invalid("prompt", "is empty and this model's tokenizer adds no begin-of-text token")
        return tokens, prompt

    def encode(self, make, param: str) -> list[int]:
        try:
            return make()
        except (NpllamaError, ValueError, TypeError) as e:  # text the tokenizer cannot represent, a bad message
            raise invalid(param, str(e)) from None

    @staticmethod
    def messages(messages) -> list[dict]:
        """OpenAI's messages as npllama's dialog: content a string or a list of text parts."""
        if not isinstance(messages, list) or not messages:
            raise invalid("messages", f"must be a non-empty list of messages, got {shown(messages)}", "invalid_type")
        dialog = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                                 isinstance(p.get("text"), str) for p in content):
                content = "".join(p["text"] for p in content)
            role = m.get("role") if isinstance(m, dict) else None
            role = "system" if role == "developer" else role
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise invalid(f"messages[{i}]", "must be {\"role\": \"system\", \"user\" or \"assistant\", \"content\": "
                              f"text}} (images, audio and tool calls are not supported), got {shown(m, 120)}")
            dialog.append({"role": role, "content": content})
        return dialog

    def limit(self, body: dict, names: tuple[str, ...], prompt: int, default: int | None) -> int:
        """max_tokens: at least 1, and room for it in the context after the prompt."""
        room = self.context - prompt
        if room < 1:
            raise ApiError(400, f"prompt: {prompt} tokens leave no room for a new one in this server's context of "
                           f"{self.context} tokens (-c); shorten it", "prompt", "context_length_exceeded")
        name = next((n for n in names if body.get(n) is not None), names[0])
        value = integer(body, name, default, 1, 1 << 30)
        if value is None:
            return room
        if value > room:
            raise ApiError(400, f"{name}: {value} new tokens and the prompt's {prompt} exceed this server's context "
                           f"of {self.context} tokens (-c); ask for at most {room}", name, "context_length_exceeded")
        return value

    @staticmethod
    def include_usage(body: dict) -> bool:
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise invalid("stream_options", f"must be an object, got {shown(options)}", "invalid_type")
        return flag(options, "include_usage")


# --- the engine thread ---

class Job:
    """A request's row on its way through the engine, and the channel back to its event loop."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop):
        self.request, self.row, self.loop = request, request.row, loop
        self.events: asyncio.Queue = asyncio.Queue()

    def send(self, event: tuple) -> None:
        """From the engine's thread: ("token", (id, k)) for the row's k-th new token, ("done",
        reason) or ("error", exception)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    def cancel(self) -> None:
        self.row.cancelled = True  # read by the engine's thread at its next step


IDLE_SECONDS = 1.0  # after this long with no request, the engine gives memory back
M_ARENA_MAX = -8  # glibc's mallopt parameter


def glibc(function: str, *args) -> None:
    """Call one of glibc's malloc functions; a no-op elsewhere (musl, macOS, Windows)."""
    try:
        process = ctypes.CDLL(None)  # the process's own symbols: no library search, no `ldconfig -p` run
    except (OSError, TypeError):  # Windows
        return
    if (call := getattr(process, function, None)) is not None:
        call(*args)


def one_malloc_arena() -> None:
    """Make every thread started from now on allocate from glibc's main arena. The engine's
    thread would otherwise get an arena of its own, and malloc_trim never shrinks the top of
    such an arena: the pages its last temporaries touched stay resident, so the server's idle
    RSS moved by megabytes from burst to burst. Called before the model loads, while no other
    arena exists to be handed on."""
    glibc("mallopt", M_ARENA_MAX, 1)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim), once each time the
    engine has been idle IDLE_SECONDS (a burst of requests pays nothing)."""
    glibc("malloc_trim", 0)


class Engine:
    """The generation loop in a thread of its own: jobs wait in order for a free row, join the
    batch at the next step, and leave it as soon as they are done or cancelled."""

    def __init__(self, model, parallel: int, context: int, max_waiting: int, lookup: bool = False, draft=None,
                 draft_max: int = 8, batch_size: int | None = None):
        # lookup, draft, draft_max: speculative decoding (speculative.py), each request's row its own guesses;
        # batch_size: prompt tokens a prefill pass (llama.cpp's -b)
        self.model, self.max_waiting = model, max_waiting
        self.cache = model.new_cache(context, rows=parallel)
        for buffer in model.buffers(REUSED_ROWS).values():  # written whole now: a pass of more rows than
            buffer.fill(0)  # any before would otherwise take new pages mid-run, the idle RSS creeping up
        self.drafter = drafter_for(model, self.cache, lookup, draft, draft_max)
        self.batch_size = batch_size
        self.batch = self.new_batch()
        self.waiting: collections.deque[Job] = collections.deque()
        self.jobs: dict[int, Job] = {}  # id(row) -> its job, for the rows in the batch
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self.run, name="npllama-engine", daemon=True)
        self.stopping = False
        self.ended = collections.Counter()  # requests by how they ended: stop_token, cancelled, error...
        self.guesses = collections.Counter()  # speculative decoding: tokens drafted, and accepted

    def new_batch(self) -> Batch:
        return Batch(self.model, self.cache, isolate=True, drafter=self.drafter, batch_size=self.batch_size)

    def submit(self, job: Job) -> None:
        with self.wake:
            if len(self.waiting) >= self.max_waiting + self.batch.free:
                raise ApiError(503, f"the server is busy: {len(self.cache.order)} requests decoding and "
                               f"{len(self.waiting)} waiting; retry in a moment", None, "server_busy",
                               "server_error", {"Retry-After": "1"})
            self.waiting.append(job)
            self.wake.notify()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join()

    @property
    def load(self) -> dict:
        return {"rows": len(self.cache.order), "decoding": len(self.jobs), "waiting": len(self.waiting),
                "ended": dict(self.ended), **({"guesses": dict(self.guesses)} if self.drafter else {})}

    def run(self) -> None:
        while True:
            with self.wake:
                trimmed = False
                while not self.waiting and not self.batch and not self.stopping:
                    if not self.wake.wait(timeout=IDLE_SECONDS) and not trimmed:
                        release_free_memory()
                        trimmed = True
                if self.stopping:
                    return
                while self.waiting and self.batch.free:
                    self.join(self.waiting.popleft())
            self.step()

    def join(self, job: Job) -> None:
        if job.row.cancelled:  # its client left while it waited
            self.ended["cancelled"] += 1
            job.send(("done", "cancelled"))
            return
        try:
            self.batch.add(job.row)
        except Exception as e:
            self.ended["error"] += 1
            job.send(("error", e))
            return
        self.jobs[id(job.row)] = job

    def step(self) -> None:
        rows = self.batch.going + self.batch.joining
        try:
            got = self.batch.step()
        except Exception as e:  # the forward pass itself: every row in it fails, the server goes on
            traceback.print_exc()
            self.ended["error"] += len(rows)
            for row in rows:
                self.jobs.pop(id(row)).send(("error", e))
            self.batch = self.new_batch()
            return
        for row in got:
            for k in range(row.done.new_tokens - row.fresh + 1, row.done.new_tokens + 1):
                self.jobs[id(row)].send(("token", (row.done.tokens[k - row.done.new_tokens - 1], k)))
        for row in rows:
            if row.done.stop_reason:
                self.ended[row.done.stop_reason] += 1
                if row.drafting:
                    self.guesses.update(drafted=row.drafting.drafted, accepted=row.drafting.accepted)
                job = self.jobs.pop(id(row))
                job.send(("error", row.error) if row.error else ("done", row.done.stop_reason))


# --- text: tokens to what the client sees ---

class TextOut:
    """A request's new tokens as text: whole characters only, cut before the first stop string,
    and holding back a tail that might still become one."""

    def __init__(self, tokenizer, stops: list[str]):
        self.decoder = StreamDecoder(tokenizer, skip_special=True)
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def push(self, token: int) -> str:
        """The text `token` makes visible ("" while a character or a stop string may be incomplete)."""
        if self.stopped:
            return ""
        self.text += self.decoder.push(token)
        return self.release(final=False)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self.decoder.flush()
        return self.release(final=True)

    def release(self, final: bool) -> str:
        found = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if found:
            self.text, self.stopped, final = self.text[:min(found)], True, True
        end = len(self.text) if final else len(self.text) - self.held()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def held(self) -> int:
        """Length of the longest tail of the text not yet sent that begins a stop string."""
        tail = self.text[self.sent:]
        return max((k for s in self.stops for k in range(1, min(len(s), len(tail) + 1)) if tail.endswith(s[:k])),
                   default=0)


class Response:
    """The OpenAI objects of one request: chunks while streaming, or the whole completion."""

    def __init__(self, request: Request, model_id: str, tokenizer):
        self.request, self.model_id, self.tokenizer = request, model_id, tokenizer
        self.kind = request.kind
        self.id = ("chatcmpl-" if self.kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.out = TextOut(tokenizer, request.stops)
        self.text, self.finish_reason, self.lead = "", None, request.echo  # lead: echo's text, sent first
        self.logprob_items: list = []  # completions: (token, logprob, top); chat: content entries
        self.logged = 0  # entries of row.done.logprobs turned into logprob items

    @property
    def usage(self) -> dict:
        done = self.request.row.done
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.new_tokens,
                "total_tokens": done.prompt_tokens + done.new_tokens}

    def on_token(self, token: int, k: int) -> tuple[str, list]:
        """The text and logprob entries the row's k-th new token adds (with echo and logprobs,
        the first brings the prompt's too)."""
        items = [] if self.out.stopped else self.logprobs_until(k)
        text = self.out.push(token)
        if self.out.stopped:
            self.finish_reason = "stop"
        return self.take_lead() + text, items

    def on_done(self, reason: str) -> str:
        text = self.out.finish()
        self.finish_reason = self.finish_reason or FINISH_REASONS.get(reason, "stop")
        return self.take_lead() + text

    def take_lead(self) -> str:
        lead, self.lead = self.lead, ""
        return lead

    def logprobs_until(self, k: int) -> list:
        """Logprob items up to the k-th new token's. The engine's thread may be further on: the
        lists it appends to are read only up to what it had when it sent token k."""
        row, done = self.request.row, self.request.row.done
        if self.request.logprobs is None:
            return []
        n_prompt = len(row.prompt) if row.prompt_logprobs else 0  # entries of the prompt's tokens first
        new = done.tokens[len(done.tokens) - done.new_tokens:] if done.tokens else []
        items = []
        for j in range(self.logged, n_prompt + k):
            token = row.prompt[j] if j < n_prompt else new[j - n_prompt]
            items.append(self.logprob_item(token, done.logprobs[j], done.top_logprobs[j]))
        self.logged = n_prompt + k
        return items

    def logprob_item(self, token: int, logprob: float | None, top: dict | None):
        piece = self.tokenizer.piece(token)
        if self.kind == "chat.completion":
            def entry(t, lp):
                return {"token": self.tokenizer.piece(t), "logprob": lp,
                        "bytes": list(self.tokenizer.decode_bytes([t]))}
            return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in (top or {}).items()]}
        return piece, logprob, None if top is None else {self.tokenizer.piece(t): lp for t, lp in top.items()}

    def logprobs(self, items: list, offset: int):
        if self.request.logprobs is None:
            return None
        if self.kind == "chat.completion":
            return {"content": items}
        offsets, at = [], offset
        for piece, _, _ in items:
            offsets.append(at)
            at += len(piece)
        return {"tokens": [i[0] for i in items], "token_logprobs": [i[1] for i in items],
                "top_logprobs": [i[2] for i in items], "text_offset": offsets}

    def choice(self, text: str, items: list, offset: int, delta: bool) -> dict:
        choice = {"index": 0, "logprobs": self.logprobs(items, offset), "finish_reason": self.finish_reason}
        if self.kind == "text_completion":
            return {"text": text, **choice}
        if delta:
            return {"delta": {"content": text} if text or self.finish_reason is None else {}, **choice}
        return {"message": {"role": "assistant", "content": text}, **choice}

    def envelope(self, chunk: bool, **fields) -> dict:
        kind = self.kind + (".chunk" if chunk and self.kind == "chat.completion" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id, **fields}

    def whole(self) -> dict:
        return self.envelope(False, choices=[self.choice(self.text, self.logprob_items, 0, delta=False)],
                             usage=self.usage)

    def chunk(self, text: str, items: list, offset: int) -> dict:
        return self.envelope(True, choices=[self.choice(text, items, offset, delta=True)])

    def first_chunk(self) -> dict | None:
        """Chat streams open with the assistant's role."""
        if self.kind == "chat.completion":
            return self.envelope(True, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}])
        return None


# --- HTTP ---

def make_app(engine: Engine, requests: Requests, api_key: str | None = None, log=sys.stderr):
    """The Starlette application: OpenAI's routes over `engine`."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def logged(request, status: int, started: float, usage: dict | None = None) -> None:
        tokens = f" {usage['prompt_tokens']}+{usage['completion_tokens']} tokens" if usage else ""
        print(f"{request.method} {request.url.path} {status}{tokens} {time.perf_counter() - started:.2f} s",
              file=log, flush=True)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), e.status, e.headers)

    def handler(work, authorized: bool = True):
        """`work(request)` as a route: its ApiError as OpenAI's error JSON, anything else a 500
        (logged) for this request only; each request logged in one line."""
        async def route(request):
            started = time.perf_counter()
            try:
                if authorized and api_key is not None:
                    check_key(request, api_key)
                response, usage = await work(request, started)
            except ApiError as e:
                response, usage = error(e), None
            except Exception as e:
                print(f"{request.method} {request.url.path}: unexpected error", file=log)
                traceback.print_exc(file=log)
                response, usage = error(ApiError(500, f"internal error: {type(e).__name__}: {e}", None,
                                                 "internal_error", "server_error")), None
            if not isinstance(response, StreamingResponse):  # a stream logs itself when it ends
                logged(request, response.status_code, started, usage)
            return response
        return route

    async def body_of(request) -> dict:
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes", None, "body_too_large")
        data = b""
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes", None, "body_too_large")
        try:
            body = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, f"the body must be a JSON object, got {shown(body)}", None, "invalid_json")
        return body

    async def generate(request, started: float, parse):
        job = Job(parse(await body_of(request)), asyncio.get_running_loop())
        engine.submit(job)
        answer = Response(job.request, requests.model_id, requests.tokenizer)
        if job.request.stream:
            return StreamingResponse(stream(request, job, answer, started), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"}), None
        gone = asyncio.ensure_future(disconnected(request))
        gone.add_done_callback(lambda _: job.cancel())  # the client hung up: its row is freed
        try:
            async for text, items in events(job, answer):
                answer.text += text
                answer.logprob_items += items
        finally:
            gone.cancel()
        return JSONResponse(answer.whole()), answer.usage

    async def stream(request, job: Job, answer: Response, started: float):
        status = 200
        try:
            first = answer.first_chunk()
            if first:
                yield sse(first)
            offset = 0
            async for text, items in events(job, answer):
                if text or items or answer.finish_reason:
                    yield sse(answer.chunk(text, items, offset))
                offset += len(text)
            if answer.request.include_usage:
                yield sse(answer.envelope(True, choices=[], usage=answer.usage))
        except ApiError as e:  # after the headers are sent, an error is one last event
            status = e.status
            yield sse(e.body())
        finally:
            job.cancel()  # the client hung up: its row is freed at the engine's next step
            logged(request, status, started, answer.usage)
        yield "data: [DONE]\n\n"

    async def events(job: Job, answer: Response):
        """(text, logprob entries) as the job's tokens arrive, the last with finish_reason set."""
        while True:
            kind, value = await job.events.get()
            if kind == "token":
                yield answer.on_token(*value)
            elif kind == "done":
                yield answer.on_done(value), []
                return
            else:
                raise ApiError(500, f"internal error while generating: {type(value).__name__}: {value}", None,
                               "internal_error", "server_error")

    async def completions(request, started):
        return await generate(request, started, requests.completion)

    async def chat_completions(request, started):
        return await generate(request, started, requests.chat)

    async def models(request, started):
        return JSONResponse({"object": "list", "data": [{"id": requests.model_id, "object": "model", "created":
                                                         int(time.time()), "owned_by": "npllama"}]}), None

    async def health(request, started):
        return JSONResponse({"status": "ok", **engine.load}), None

    async def not_found(request, exc):
        e = ApiError(exc.status_code, f"{request.method} {request.url.path}: no such route here (see "
                     "/v1/completions, /v1/chat/completions, /v1/models, /health)", None, "not_found")
        logged(request, e.status, time.perf_counter())
        return error(e)

    routes = [Route("/v1/completions", handler(completions), methods=["POST"]),
              Route("/v1/chat/completions", handler(chat_completions), methods=["POST"]),
              Route("/v1/models", handler(models), methods=["GET"]),
              Route("/health", handler(health, authorized=False), methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def check_key(request, api_key: str) -> None:
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "a valid API key is needed: send the header Authorization: Bearer KEY (--api-key)",
                       None, "invalid_api_key")


async def disconnected(request) -> None:
    """Returns when the client hangs up (a whole request's body has already been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

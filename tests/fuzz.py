"""Fuzzing npllama's checkpoint readers: whatever a model's files hold, loading them must end in
a working model or an NpllamaError, within seconds and bounded memory, and never run their code.

    python -m tests.fuzz --minutes 30
    python -m tests.fuzz --inputs 20000 --seed 3 --formats meta,gguf --out failures/

Seeds are tiny valid models written here in code: a Meta directory, a GGUF file, a Hugging Face
directory (single and sharded). Each input is a seed with one to four mutations: bits flipped,
bytes overwritten, cut, inserted or deleted; or structured edits that get past the parser to the
checks behind it, which random bytes almost never reach: a JSON value replaced (2**64-1, NaN,
100000 nested lists...), a GGUF header integer, a data.pkl opcode, a zip header field, a
tokenizer.model line, a pickle that would run code; or a file swapped for a FIFO, a directory or
a symlink to /dev/zero.

Inputs run in worker processes, one per core, each running many in a row under an address-space
limit of its own size + 500 MB; a worker that spends over 2 s on one input is killed. Outcomes:
ok and npllama_error are fine; other_exception, memory, hang, crash and code_executed are bugs,
and make the exit status 1. --out DIR keeps each failing input and its outcome.json.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import faulthandler
import functools
import importlib
import io
import json
import os
import pickle
import pickletools
import random
import re
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zipfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import npllama
from npllama.errors import NpllamaError

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TARGET = "tests.fuzz:load_and_run"
MEMORY_HEADROOM = 500 << 20  # bytes a worker may map beyond what it holds after its imports
BUGS = ("other_exception", "memory", "hang", "crash", "code_executed")
OUTCOMES = ("ok", "npllama_error", *BUGS)
# A worker that died with one of these on stderr ran out of memory in native code (Rust's
# allocation failure handler, C++'s bad_alloc) rather than crashing on its own.
OUT_OF_MEMORY_SIGNS = ("memory allocation of", "bad_alloc", "Cannot allocate memory", "MemoryError")
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that started it exits


def load_and_run(path: str) -> None:
    """The default target: what a user does with a downloaded model, in miniature."""
    model = npllama.load(path)
    ids = [i % model.args.vocab_size for i in (1, 2, 3)]  # valid ids: the file decides the vocabulary
    model.forward(ids)
    list(model.generate(ids, 2))


# --- Seeds: tiny valid models (oracle/checkpoints.py) ---------------------------------------

@dataclass
class Seed:
    name: str  # meta, gguf, hf, hf-sharded
    format: str
    files: dict[str, bytes]
    entry: str = ""  # what npllama.load is given: the directory, or this file in it


def make_seeds(fmt: str) -> list[Seed]:
    from oracle.checkpoints import TINY_ENTRY, TINY_FORMATS, tiny_model_files  # torch: the parent only
    return [Seed(name, fmt, tiny_model_files(name), TINY_ENTRY[name])
            for name, of in TINY_FORMATS.items() if of == fmt]


FORMATS = ("meta", "gguf", "hf")


# --- Mutations ------------------------------------------------------------------------------
# Each takes a file's bytes and a random.Random and returns (new content, what it did); a
# structured one returns None where it does not apply (JSON that an earlier mutation broke).
# New content is bytes, or one of SPECIAL_FILES, which write_input makes instead of a file.

SPECIAL_FILES = ("fifo", "directory", "symlink to /dev/zero", "symlink loop", "missing")
INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80)
RUN_LENGTHS = (1, 3, 8, 64, 4096)


def position(data: bytes, rng: random.Random) -> int:
    """Where to mutate: headers (a file's start, a zip's directory at its end) more often than
    weights, whose bytes any value is valid for."""
    r = rng.random()
    if r < 0.4:
        return rng.randint(0, min(len(data), 4096))
    if r < 0.6:
        return rng.randint(max(0, len(data) - 1024), len(data))
    return rng.randint(0, len(data))


def flip_bits(data, rng):
    if not data:
        return data, "no bits to flip in an empty file"
    out, spots = bytearray(data), sorted(min(position(data, rng), len(data) - 1) for _ in range(rng.randint(1, 8)))
    for p in spots:
        out[p] ^= 1 << rng.randrange(8)
    return bytes(out), f"flip bits at {spots}"


def overwrite_bytes(data, rng):
    p, n, value = position(data, rng), rng.choice((1, 2, 4, 8)), rng.choice(INTERESTING_BYTES)
    return data[:p] + bytes([value]) * n + data[p + n:], f"overwrite {n} bytes at {p} with {value:#04x}"


def truncate(data, rng):
    p = position(data, rng)
    return data[:p], f"truncate to {p} of {len(data)} bytes"


def insert_run(data, rng):
    p, n = position(data, rng), rng.choice(RUN_LENGTHS)
    if rng.random() < 0.5:
        return data[:p] + rng.randbytes(n) + data[p:], f"insert {n} random bytes at {p}"
    value = rng.choice(INTERESTING_BYTES)
    return data[:p] + bytes([value]) * n + data[p:], f"insert {n} bytes {value:#04x} at {p}"


def delete_run(data, rng):
    p, n = position(data, rng), rng.choice(RUN_LENGTHS)
    return data[:p] + data[p + n:], f"delete {n} bytes at {p}"


BYTE_MUTATIONS = (flip_bits, overwrite_bytes, truncate, insert_run, delete_run)


def interesting_int(width: int, old: int, rng: random.Random) -> int:
    """A value for a `width`-byte unsigned field that was `old`: limits, off-by-ones, sign bits."""
    top = 1 << (8 * width)
    return rng.choice((0, 1, old - 1, old + 1, 2 * old, old + 4096, top - 1, top // 2, top // 2 - 1,
                       1 << 31, 1 << 40, rng.randrange(top))) % top


def overwrite_field(data: bytes, offset: int, width: int, label: str, rng) -> tuple[bytes, str]:
    old = int.from_bytes(data[offset:offset + width], "little")
    new = rng.randrange(42) if label.endswith("type") and rng.random() < 0.5 else interesting_int(width, old, rng)
    new = new if new != old else old ^ 1  # always a change
    return data[:offset] + new.to_bytes(width, "little") + data[offset + width:], f"{label} {old} -> {new}"


# JSON: a value anywhere replaced by one of these (raw JSON text: Python's json writes neither
# 5000-digit integers nor 100000 nested lists), or a key deleted.
HOSTILE_JSON = ["1000000000000", str(2**63), str(2**64 - 1), "-1", str(-2**63), "0", "0.5", "NaN",
                "Infinity", "-Infinity", "1e300", "1e-300", '"text"', '"' + "x" * 10**6 + '"', "[]",
                "{}", "null", "true", "[1, [2, [3]]]", "9" * 5000, "[" * 100_000 + "]" * 100_000]
PLACEHOLDER = "\ue000"


def short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def random_path(doc, rng) -> list:
    """A path into `doc` by a random walk from the root: shallow keys are chosen more often than
    the vocabulary's thousands of entries, yet every value can be reached."""
    path = []
    while isinstance(doc, (dict, list)) and doc and rng.random() < 0.75:
        key = rng.choice(list(doc) if isinstance(doc, dict) else range(len(doc)))
        path.append(key)
        doc = doc[key]
    return path


def json_edit(data, rng):
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        return None
    path = random_path(doc, rng)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    where = ".".join(map(str, path)) or "the whole document"
    if path and rng.random() < 0.2:
        del parent[path[-1]]
        return json.dumps(doc).encode(), f"delete {where}"
    raw = rng.choice(HOSTILE_JSON)
    if not path:
        return raw.encode(), f"{where} = {short(raw)}"
    parent[path[-1]] = PLACEHOLDER
    return json.dumps(doc).replace(json.dumps(PLACEHOLDER), raw).encode(), f"{where} = {short(raw)}"


def safetensors_header(data, rng):
    """The 8-byte header length, or a JSON edit of the header with the length kept right."""
    if len(data) < 8:
        return None
    if rng.random() < 0.3:
        return overwrite_field(data, 0, 8, "header length", rng)
    n = int.from_bytes(data[:8], "little")
    edited = json_edit(data[8:8 + n], rng)
    if edited is None:
        return None
    header, what = edited
    return len(header).to_bytes(8, "little") + header + data[8 + n:], f"header: {what}"


GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@functools.lru_cache(maxsize=8)  # most inputs mutate the seed itself: parse it once
def gguf_fields(data: bytes) -> list[tuple[int, int, str]]:
    """(offset, width, label) of the integers in a GGUF header: counts, lengths, types, dims,
    offsets; read as far as the header makes sense (an earlier mutation may have broken it)."""
    fields, pos = [], 4

    def integer(width: int, label: str | None) -> int:
        """Read an unsigned integer, and list it as a field if it has a label."""
        nonlocal pos
        if pos + width > len(data):
            raise IndexError
        if label:
            fields.append((pos, width, label))
        pos += width
        return int.from_bytes(data[pos - width:pos], "little")

    def string(label: str | None) -> str:
        nonlocal pos
        n = integer(8, label and f"{label} length")
        pos += n
        return data[pos - n:pos].decode(errors="replace")

    def value(kind: int, label: str) -> None:
        nonlocal pos
        if kind == 8:
            string(label)
        elif kind == 9:
            item, count = integer(4, f"{label} item type"), integer(8, f"{label} count")
            if item in GGUF_SCALAR_SIZES:
                pos += count * GGUF_SCALAR_SIZES[item]
                return
            for i in range(count):  # every item takes a byte at least: bounded by the file's size
                if pos > len(data):
                    raise IndexError
                if item == 8:  # the vocabulary's strings: a few of their lengths are fields enough
                    string(f"{label}[{i}]" if i < 3 else None)
                else:  # an array of arrays; an unknown item type raises KeyError, ending the header
                    value(item, f"{label}[{i}]")
        else:  # a number or bool: block_count, bos_token_id, rope.freq_base's bits...
            integer(GGUF_SCALAR_SIZES[kind], f"{label} value")

    try:
        integer(4, "version")
        n_tensors, n_kv = integer(8, "tensor count"), integer(8, "metadata count")
        for _ in range(n_kv):
            key = string("key")
            value(integer(4, f"{key} type"), key)
        for _ in range(n_tensors):
            name = string("tensor name")
            n_dims = integer(4, f"{name} n_dims")
            if n_dims > 4:  # GGUF's most: what follows is not a header any more
                raise IndexError
            for d in range(n_dims):
                integer(8, f"{name} dim {d}")
            integer(4, f"{name} ggml type")
            integer(8, f"{name} offset")
    except (IndexError, KeyError, RecursionError):  # where the header stops making sense
        pass
    return fields


def gguf_field(data, rng):
    fields = gguf_fields(data)
    return overwrite_field(data, *rng.choice(fields), rng) if fields else None


# A zip's header fields, by record signature: (offset from the signature, width).
ZIP_RECORDS = {
    b"PK\x03\x04": ("local header", {"version needed": (4, 2), "flags": (6, 2), "method": (8, 2),
                    "crc": (14, 4), "compressed size": (18, 4), "size": (22, 4), "name length": (26, 2),
                    "extra length": (28, 2)}),
    b"PK\x01\x02": ("central directory entry", {"version needed": (6, 2), "flags": (8, 2), "method": (10, 2),
                    "crc": (16, 4), "compressed size": (20, 4), "size": (24, 4), "name length": (28, 2),
                    "extra length": (30, 2), "comment length": (32, 2), "disk": (34, 2),
                    "local header offset": (42, 4)}),
    b"PK\x05\x06": ("end of central directory", {"disk": (4, 2), "directory disk": (6, 2),
                    "entries on disk": (8, 2), "entries": (10, 2), "directory size": (12, 4),
                    "directory offset": (16, 4), "comment length": (20, 2)}),
    b"PK\x06\x06": ("zip64 end of central directory", {"entries": (32, 8), "directory size": (40, 8),
                    "directory offset": (48, 8)}),
}


def zip_field(data, rng):
    records = [(m.start(), sig) for sig in ZIP_RECORDS for m in re.finditer(re.escape(sig), data)]
    if not records:
        return None
    start, sig = rng.choice(records)
    record, fields = ZIP_RECORDS[sig]
    label = rng.choice(list(fields))
    offset, width = fields[label]
    if start + offset + width > len(data):
        return None
    return overwrite_field(data, start + offset, width, f"zip {record} at {start}: {label}", rng)


# Pickle edits of data.pkl, made opcode by opcode (pickletools.genops finds them).
HOSTILE_INTS = (10**12, 2**63, 2**64 - 1, -1, -2**31, 0, 2**31 - 1, 10**100)
MEMO_OPS = {"BINPUT": b"r", "LONG_BINPUT": b"r", "BINGET": b"j", "LONG_BINGET": b"j"}
INT_OPS = ("BININT", "BININT1", "BININT2", "LONG1")
GLOBALS = [("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"),
           ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
           ("torch", "BFloat16Storage"), ("torch", "FloatStorage"), ("torch", "LongStorage"),
           ("torch", "bfloat16"), ("torch", "complex32"), ("torch", "Tensor"), ("builtins", "getattr"),
           ("builtins", "dict"), ("copyreg", "_reconstructor"), ("__builtin__", "set"),
           ("numpy.core.multiarray", "_reconstruct"), ("collections", "OrderedDict.fromkeys")]
# Inserted between two opcodes: one out of place, or a run that strains the unpickler.
INSERTS = {"BUILD": b"b", "REDUCE": b"R", "SETITEMS": b"u", "STOP": b".", "100000 MARKs": b"(" * 100_000,
           "LONG_BINPUT 4294967295": b"r\xff\xff\xff\xff", "LONG_BINGET 4294967295": b"j\xff\xff\xff\xff",
           "100000 nested tuples": b"(" * 100_000 + b"t" * 100_000 + b"0",
           "100000 nested lists": b"]" * 100_000 + b"a" * 99_999 + b"0"}
# Opcodes that close a MARK: the run from the MARK to one of them is a unit (a tuple, SETITEMS).
MARK_CLOSERS = ("TUPLE", "LIST", "DICT", "APPENDS", "SETITEMS", "OBJ", "INST", "POP_MARK", "FROZENSET", "ADDITEMS")


def encode_int(value: int) -> bytes:
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if -2**31 <= value < 2**31:
        return b"J" + struct.pack("<i", value)
    encoded = pickle.encode_long(value)
    return b"\x8a" + bytes([len(encoded)]) + encoded


def opcode_spans(p: bytes) -> list[tuple[str, object, int, int]] | None:
    """(name, argument, start, end) of every opcode, or None if `p` does not parse."""
    try:
        ops = list(pickletools.genops(p))
    except Exception:  # whatever an earlier mutation broke: genops raises ValueError and more
        return None
    ends = [pos for _, _, pos in ops[1:]] + [len(p)]
    return [(op.name, arg, pos, end) for (op, arg, pos), end in zip(ops, ends)]


def pickle_edit(p: bytes, rng):
    """One of data.pkl's opcodes re-argued, renamed, repeated or deleted, or another inserted."""
    spans = opcode_spans(p)
    if not spans:
        return None
    kind = rng.choice(("int", "global", "insert", "duplicate unit", "delete", "duplicate"))
    if kind == "int" and (chosen := [s for s in spans if s[0] in INT_OPS or s[0] in MEMO_OPS]):
        name, arg, start, end = rng.choice(chosen)
        if name in MEMO_OPS:
            value = rng.choice((2**32 - 1, 2**31, 10**6))
            new = MEMO_OPS[name] + struct.pack("<I", value)
        else:
            value = rng.choice(HOSTILE_INTS)
            new = encode_int(value)
        return p[:start] + new + p[end:], f"{name} {arg} at {start} -> {value}"
    if kind == "global" and (chosen := [s for s in spans if s[0] == "GLOBAL"]):
        _, arg, start, end = rng.choice(chosen)
        module, name = rng.choice(GLOBALS)
        return p[:start] + f"c{module}\n{name}\n".encode() + p[end:], f"GLOBAL {arg} -> {module} {name}"
    if kind == "duplicate unit" and (units := mark_units(spans)):
        setitems = [u for u in units if u[0] == "SETITEMS"]  # the state dict's entries, set twice
        name, start, end = rng.choice(setitems if setitems and rng.random() < 0.5 else units)
        return p[:end] + p[start:end] + p[end:], f"repeat the MARK..{name} at {start}-{end}"
    name, arg, start, end = rng.choice(spans)
    if kind == "delete":
        return p[:start] + p[end:], f"delete {name} at {start}"
    if kind == "duplicate":
        return p[:end] + p[start:end] + p[end:], f"repeat {name} at {start}"
    what = rng.choice(list(INSERTS))
    return p[:start] + INSERTS[what] + p[start:], f"insert {what} at {start}"


def mark_units(spans) -> list[tuple[str, int, int]]:
    """(closing opcode, start, end) of each run from a MARK to the opcode that consumes it."""
    marks, units = [], []
    for name, _, start, end in spans:
        if name == "MARK":
            marks.append(start)
        elif name in MARK_CLOSERS and marks:
            units.append((name, marks.pop(), end))
    return units


def code_payloads(marker: str) -> dict[str, str]:
    """Stack-neutral pickle fragments that create `marker` if the unpickler calls what they name."""
    code = f"open({marker!r}, 'w')"
    return {"GLOBAL builtins.open + REDUCE": f"cbuiltins\nopen\n(V{marker}\nVw\ntR0",
            "GLOBAL os.system + REDUCE": f"cos\nsystem\n(Vtouch {marker}\ntR0",
            "STACK_GLOBAL builtins.exec + REDUCE": f"Vbuiltins\nVexec\n\x93(V{code}\ntR0",
            "GLOBAL __builtin__.eval (Python 2's name)": f"c__builtin__\neval\n(V{code}\ntR0",
            "INST builtins.open": f"(V{marker}\nVw\nibuiltins\nopen\n0",
            "OBJ builtins.open": f"(cbuiltins\nopen\nV{marker}\nVw\no0"}


def inject_code(p: bytes, rng, marker: str):
    spans = opcode_spans(p)
    if not spans:
        return None
    what, payload = rng.choice(list(code_payloads(marker).items()))
    start = rng.choice(spans)[2]
    return p[:start] + payload.encode("latin-1") + p[start:], f"inject {what} at {start}"


def in_data_pkl(edit):
    """A pickle edit applied to the data.pkl of a torch.save zip, rezipped with its CRC right."""
    def mutation(data, rng):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                members = [(info.filename, z.read(info)) for info in z.infolist()]
        except Exception:  # whatever an earlier mutation broke: zipfile raises a dozen types
            return None
        pkl = next((i for i, (name, _) in enumerate(members) if name.endswith("/data.pkl")), None)
        edited = edit(members[pkl][1], rng) if pkl is not None else None
        if edited is None:
            return None
        members[pkl] = (members[pkl][0], edited[0])
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w") as z:  # stored, as torch writes it; a fixed date keeps inputs reproducible
            for name, body in members:
                z.writestr(zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0)), body)
        return out.getvalue(), f"data.pkl: {edited[1]}"
    return mutation


HOSTILE_RANKS = (b"99999999999999999999", b"-1", b"1e3", b"9" * 5000, "٣".encode(), b"")


def tokenizer_line(data, rng):
    """A line of tokenizer.model ("<base64> <rank>") changed, repeated, swapped or dropped."""
    lines = data.split(b"\n")
    i, j = rng.randrange(len(lines)), rng.randrange(len(lines))
    kind = rng.choice(("rank", "token", "repeat", "swap", "drop"))
    if kind == "rank":
        rank = rng.choice(HOSTILE_RANKS)
        lines[i] = lines[i].split(b" ")[0] + b" " + rank
        what = f"line {i + 1}'s rank = {short(rank.decode())}"
    elif kind == "token":
        token = rng.choice((base64.b64encode(rng.randbytes(10**6)), b"!!!!", b""))
        lines[i] = token + b" " + lines[i].split(b" ")[-1]
        what = f"line {i + 1}'s token = {short(token.decode())}"
    elif kind == "repeat":
        lines.insert(i, lines[j])
        what = f"line {j + 1} repeated before line {i + 1}"
    elif kind == "swap":
        lines[i], lines[j] = lines[j], lines[i]
        what = f"lines {i + 1} and {j + 1} swapped"
    else:
        del lines[i]
        what = f"line {i + 1} dropped"
    return b"\n".join(lines), what


def structured_mutations(name: str, marker: str) -> list:
    """The mutations that know how file `name` is built; `marker` is the file a code payload creates."""
    if name.endswith(".json"):
        return [json_edit]
    if name.endswith(".gguf"):
        return [gguf_field]
    if name.endswith(".safetensors"):
        return [safetensors_header]
    if name.endswith(".pth"):
        inject = in_data_pkl(functools.partial(inject_code, marker=marker))
        return [in_data_pkl(pickle_edit), in_data_pkl(pickle_edit), inject, zip_field]
    if name == "tokenizer.model":
        return [tokenizer_line]
    return []


def mutate(name: str, data: bytes, rng, marker: str) -> tuple[bytes | str, str]:
    r = rng.random()
    if r < 0.03:  # rare: a FIFO makes a careless reader wait 2 s for the timeout
        kind = rng.choice(SPECIAL_FILES)
        return kind, f"replaced by {kind}"
    structured = structured_mutations(name, marker)  # preferred: they get further into a reader
    if structured and r < 0.6 and (done := rng.choice(structured)(data, rng)) is not None:
        return done
    return rng.choice(BYTE_MUTATIONS)(data, rng)


@dataclass
class Input:
    index: int
    format: str
    seed: str
    entry: str
    files: dict[str, bytes | str]
    mutations: list[str] = field(default_factory=list)


def make_input(index: int, seeds: dict[str, list[Seed]], run_seed: int, marker: Path) -> Input:
    """Input `index` of the run: the same for the same run seed, however the workers are scheduled."""
    rng = random.Random(f"{run_seed}:{index}")
    formats = sorted(seeds)
    seed = rng.choice(seeds[formats[index % len(formats)]])
    item = Input(index, seed.format, seed.name, seed.entry, dict(seed.files))
    # Mostly one file: a reader stops at the first broken file, so mutations spread over
    # several would mostly test the first one read.
    focus = rng.choice(sorted(seed.files))
    for _ in range(rng.choice((1, 1, 2, 2, 3, 4))):
        names = sorted(n for n, content in item.files.items() if isinstance(content, bytes))
        if not names:
            break
        name = focus if focus in names and rng.random() < 0.75 else rng.choice(names)
        item.files[name], what = mutate(name, item.files[name], rng, str(marker))
        item.mutations.append(f"{name}: {what}")
    return item


def write_input(files: dict[str, bytes | str], directory: Path) -> None:
    directory.mkdir(parents=True)
    for name, content in files.items():
        path = directory / name
        match content:
            case bytes():
                path.write_bytes(content)
            case "fifo":
                os.mkfifo(path)
            case "directory":
                path.mkdir()
            case "symlink to /dev/zero":
                path.symlink_to("/dev/zero")
            case "symlink loop":
                path.symlink_to(name)
            case "missing":
                pass


# --- The worker: runs inputs one after another, under a memory limit ------------------------

@dataclass
class Outcome:
    outcome: str
    seconds: float = 0.0
    peak_mb: float = 0.0  # the worker's peak resident memory during the input
    type: str = ""
    message: str = ""
    where: str = ""  # the innermost frame in npllama (else the innermost): "formats/meta.py read_pth"
    traceback: str = ""


def proc_status(key: str) -> int:
    """A /proc/self/status figure (VmSize, VmHWM...) in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def frame_name(filename: str, function: str) -> str:
    return f"{filename.rpartition('/npllama/')[2] if '/npllama/' in filename else Path(filename).name} {function}"


def innermost(frames: list[tuple[str, str]]) -> str:
    """`frames` innermost last; the innermost one in npllama, else the innermost of all."""
    ours = [f for f in frames if "/npllama/" in f[0]] or frames
    return frame_name(*ours[-1]) if ours else ""


def run_one(target, path: str) -> Outcome:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, so it measures this input alone
    start = time.perf_counter()
    try:
        target(path)
        return Outcome("ok", time.perf_counter() - start, proc_status("VmHWM") / 2**20)
    except BaseException as e:
        outcome = ("memory" if isinstance(e, MemoryError) else
                   "npllama_error" if isinstance(e, NpllamaError) else "other_exception")
        frames = [(f.filename, f.name) for f in traceback.extract_tb(e.__traceback__)]
        try:
            message = str(e)[:500]
        except Exception:  # str() itself may fail, e.g. on a 5000-digit integer
            message = "(unprintable)"
        return Outcome(outcome, time.perf_counter() - start, proc_status("VmHWM") / 2**20, type(e).__name__,
                       message, innermost(frames),
                       "" if outcome == "npllama_error" else traceback.format_exc()[-4000:])


def worker_main(target_spec: str) -> None:
    """Answer each input path read from stdin with one JSON line: its Outcome."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the parent, even if stuck on a FIFO
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the target prints goes to the log, not among the answers
    faulthandler.enable()  # a crash's Python stack goes to the log...
    faulthandler.register(signal.SIGUSR1)  # ...and so does a hang's, when the parent asks before killing
    module, _, function = target_spec.partition(":")
    target = getattr(importlib.import_module(module), function)
    importlib.import_module("gguf")  # npllama imports it for rare types: not an input's memory
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (proc_status("VmSize") + MEMORY_HEADROOM, hard))
    print("ready", file=answers, flush=True)
    for line in sys.stdin:
        print(json.dumps(asdict(run_one(target, json.loads(line)))), file=answers, flush=True)


# --- The parent: workers, deadlines, the report ---------------------------------------------

# One BLAS thread per worker: a worker per core, and a small, stable address space to limit.
SINGLE_THREADED = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
FAULTHANDLER_FRAME = re.compile(r'File "(.+)", line \d+ in (\S+)')


class Worker:
    """A worker process, started when first needed and again after it dies or is killed."""

    def __init__(self, target: str, log: Path):
        self.target, self.log, self.proc = target, log, None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "tests.fuzz", "--worker", self.target], cwd=REPO,
                                         env={**os.environ, **SINGLE_THREADED}, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log)
        if self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError(f"a fuzz worker did not start: see {self.log}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, path: Path, timeout: float) -> Outcome:
        if self.proc is None:
            self.start()
        log_start = self.log.stat().st_size
        start = time.perf_counter()
        self.proc.stdin.write(json.dumps(str(path)).encode() + b"\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.proc.send_signal(signal.SIGUSR1)  # faulthandler: where it is stuck, into the log
            time.sleep(0.2)
            self.stop()
            return self.from_log("hang", time.perf_counter() - start, log_start, f"no answer in {timeout:g} s")
        line = self.proc.stdout.readline()
        if line:
            return Outcome(**json.loads(line))
        code = self.proc.wait()
        self.proc = None
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return self.from_log("crash", time.perf_counter() - start, log_start, f"the worker {how}")

    def from_log(self, outcome: str, seconds: float, log_start: int, message: str) -> Outcome:
        """The Outcome of an input that got no answer, from what the worker logged meanwhile."""
        with open(self.log, "rb") as f:
            f.seek(log_start)
            logged = f.read().decode(errors="replace")
        if outcome == "crash" and any(sign in logged for sign in OUT_OF_MEMORY_SIGNS):
            outcome = "memory"
        frames = FAULTHANDLER_FRAME.findall(logged)[::-1]  # faulthandler lists the innermost first
        return Outcome(outcome, seconds, message=message, where=innermost(frames), traceback=logged[-4000:])


def save(item: Input, outcome: Outcome, out: Path) -> None:
    directory = out / f"{item.index:06d}-{item.seed}"
    write_input(item.files, directory / "input")
    (directory / "outcome.json").write_text(json.dumps(
        {"index": item.index, "format": item.format, "seed": item.seed, "mutations": item.mutations,
         "path": str(Path("input") / item.entry), **asdict(outcome)}, indent=1))


def fuzz(seeds: dict[str, list[Seed]], run_seed: int, n_inputs: float, deadline: float, target: str,
         n_workers: int, timeout: float, workdir: Path, out: Path | None) -> list[tuple[Input, Outcome]]:
    """Run inputs 0, 1, 2... until n_inputs or the deadline (time.monotonic()), whichever is first."""
    records, lock, indices, stop = [], threading.Lock(), iter(range(sys.maxsize)), threading.Event()
    markers = workdir / "markers"
    markers.mkdir()

    def slot(k: int) -> None:
        worker = Worker(target, workdir / f"worker{k}.log")
        directory = workdir / f"input{k}"
        try:
            while not stop.is_set() and (index := next(indices)) < n_inputs and time.monotonic() < deadline:
                marker = markers / str(index)
                item = make_input(index, seeds, run_seed, marker)
                shutil.rmtree(directory, ignore_errors=True)
                write_input(item.files, directory)
                outcome = worker.run(directory / item.entry, timeout)
                if marker.exists():
                    outcome.outcome, outcome.message = "code_executed", f"{marker} was created: code from the file ran"
                with lock:
                    records.append((item, outcome))
                if out is not None and outcome.outcome in BUGS:
                    save(item, outcome, out)
        finally:
            worker.stop()

    with ThreadPoolExecutor(n_workers) as pool:
        try:
            for done in [pool.submit(slot, k) for k in range(n_workers)]:
                done.result()  # a worker that cannot start is the fuzzer's failure: raise it
        finally:  # on that or on Ctrl-C, the other slots stop after their current input
            stop.set()
    return sorted(records, key=lambda r: r[0].index)


def describe(item: Input, limit: int = 300) -> str:
    return f"#{item.index} {item.seed}: {short('; '.join(item.mutations), limit)}"


def report(records: list[tuple[Input, Outcome]], seconds: float, formats: list[str], header: str) -> str:
    lines = [f"{header}: {len(records)} inputs in {seconds:.1f} s ({len(records) / max(seconds, 1e-9):.1f} inputs/s)",
             f"{'format':<8}" + "".join(f"{o:>{len(o) + 2}}" for o in OUTCOMES)]
    for fmt in formats:
        counts = [sum(1 for i, o in records if i.format == fmt and o.outcome == kind) for kind in OUTCOMES]
        lines.append(f"{fmt:<8}" + "".join(f"{c:>{len(o) + 2}}" for c, o in zip(counts, OUTCOMES)))
    if records:
        item, o = max(records, key=lambda r: r[1].seconds)
        lines.append(f"slowest: {o.seconds:.2f} s ({o.outcome}), {describe(item, 150)}")
        item, o = max(records, key=lambda r: r[1].peak_mb)
        lines.append(f"largest peak RSS: {o.peak_mb:.0f} MB ({o.outcome}), {describe(item, 150)}")
    signatures = defaultdict(list)  # one per kind of bug: outcome, exception type, where it happened
    for item, o in records:
        if o.outcome in BUGS:
            signatures[o.outcome, o.type, o.where].append((item, o))
    if signatures:
        lines.append(f"bugs, {len(signatures)} signatures (outcome, exception, innermost npllama frame):")
    for (outcome, kind, where), found in sorted(signatures.items(), key=lambda s: -len(s[1])):
        item, o = found[0]
        formats_hit = ",".join(sorted({i.format for i, _ in found}))
        lines += [f"  {len(found):5d} x {outcome} {kind} at {where or '?'} [{formats_hit}]",
                  f"          {short(o.message.splitlines()[0] if o.message else '', 200)}",
                  f"          e.g. {describe(item)}"]
    return "\n".join(lines)


def check_seeds(seeds: dict[str, list[Seed]], workdir: Path) -> None:
    """Each seed must load and run unmutated, or every mutant of it tests nothing."""
    for seed in (s for group in seeds.values() for s in group):
        write_input(seed.files, workdir / "seeds" / seed.name)
        load_and_run(str(workdir / "seeds" / seed.name / seed.entry))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, help="stop after this long (default 1, unless --inputs)")
    parser.add_argument("--inputs", type=int, help="stop after this many inputs")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed: input i is the same for the same seed")
    parser.add_argument("--out", type=Path, help="save each failing input and its outcome.json here")
    parser.add_argument("--formats", default="meta,gguf,hf", help="comma-separated, of: meta, gguf, hf")
    parser.add_argument("--target", default=DEFAULT_TARGET, help="module:function each input's path is given to")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds an input may take")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: be a worker for this target
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    formats = args.formats.split(",")
    if unknown := set(formats) - set(FORMATS):
        parser.error(f"unknown formats {sorted(unknown)}; known: {', '.join(FORMATS)}")
    minutes = 1.0 if args.minutes is None and args.inputs is None else args.minutes
    seeds = {fmt: make_seeds(fmt) for fmt in formats}
    workdir = Path(tempfile.mkdtemp(prefix="npllama-fuzz-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    try:
        check_seeds(seeds, workdir)
        print(f"seeds load and run unmutated: {', '.join(s.name for g in seeds.values() for s in g)}", flush=True)
        start = time.monotonic()
        records = fuzz(seeds, args.seed, float("inf") if args.inputs is None else args.inputs,
                       start + 60 * minutes if minutes is not None else float("inf"), args.target,
                       args.workers, args.timeout, workdir, args.out)
        seconds = time.monotonic() - start
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(report(records, seconds, formats, f"npllama fuzz (seed {args.seed}, {args.workers} workers, "
                                            f"target {args.target})"))
    return 1 if any(o.outcome in BUGS for _, o in records) else 0


if __name__ == "__main__":
    sys.exit(main())

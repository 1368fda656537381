"""Every command the README and the docs show is run, on the default model, as the page shows it.

A fenced `bash` or `text` block whose `$ ` lines include `npllama` is one example: its `$ `
lines run in order through bash, in a scratch directory (where `tests/` leads to this repo's, so
`-f tests/data/passage.txt` works), with this Python's `npllama` and `python` first on PATH. The
lines after a command, up to the next, are what the page says it printed, and are checked:

- each must be found in one line of the command's stdout, a number with a decimal point there
  within 1e-4 of the page's (relative: float32 sums differ in their last digits between CPUs,
  whose BLAS kernels add in different orders), or, with every number taken as any number
  (timings, sizes), in one line of its stderr; `...` in a line stands for anything in between;
- a line starting with `> ` is what a person typed (a chat's turns): it is fed to stdin;
- the exit status is 2 where the page shows an `error:` line, 1 where it shows `FAIL:`, else 0.

`npllama serve` runs in the background until the block's end, once it says it is serving; the
output of commands other than npllama's (curl's ids and times) is not compared.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


@dataclass
class Command:
    line: str
    shown: list[str] = field(default_factory=list)  # what the page says it printed

    @property
    def typed(self) -> str:
        return "".join(s[2:] + "\n" for s in self.shown if s.startswith("> "))

    @property
    def status(self) -> int:
        return 2 if any(s.startswith("error:") for s in self.shown) else 1 if any(s.startswith("FAIL:") for s in self.shown) else 0


def examples(page: Path) -> list[list[Command]]:
    found = []
    for lang, body in FENCE.findall(page.read_text()):
        if lang not in ("bash", "text"):
            continue
        commands = []
        for line in body.splitlines():
            if line.startswith("$ "):
                commands.append(Command(line[2:].split("  #")[0].strip()))
            elif commands and line.strip():
                commands[-1].shown.append(line)
        if any("npllama" in c.line for c in commands):
            found.append(commands)
    return found


CASES = [pytest.param(page, i, id=f"{page.relative_to(REPO)}#{i + 1}")
         for page in PAGES if page.is_file() for i in range(len(examples(page)))]


NUMBER = r"\d+(?:\.\d+)?(?:e[-+]?\d+)?"


def numbers_as_any(text: str) -> str:
    return re.sub(NUMBER, "0", text)


def printed(shown: str, lines: list[str], rtol: float = 0.0) -> bool:
    """The page's line is in one of `lines`: its pieces around `...` in order, each number with a
    decimal point within `rtol` of the page's (relative), the other numbers as shown."""
    decimals = [float(x) for x in re.findall(r"\d+\.\d+", shown)]
    literal = re.escape(shown).replace(re.escape("..."), ".*?")
    wanted = re.sub(r"\d+\\\.\d+", lambda _: f"({NUMBER})", literal)  # a decimal (escaped): any number
    return any(all(abs(float(got) - want) <= rtol * abs(want) for got, want in zip(m.groups(), decimals))
               for line in lines for m in re.finditer(wanted, line))


@pytest.mark.slow
@pytest.mark.parametrize("page, index", CASES)
def test_the_pages_commands_print_what_the_page_shows(page, index, tmp_path, default_model_path):
    (tmp_path / "tests").symlink_to(REPO / "tests")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    servers = []
    try:
        for command in examples(page)[index]:
            if "npllama serve" in command.line:
                servers.append(start_server(command.line, tmp_path, env))
                continue
            done = subprocess.run(["bash", "-c", command.line], cwd=tmp_path, env=env, input=command.typed,
                                  capture_output=True, text=True, timeout=600)
            where = f"{page.name}: $ {command.line}\n{done.stderr[-2000:]}"
            assert done.returncode == command.status, where
            if "npllama" not in command.line:
                continue
            out, err = done.stdout.splitlines(), [numbers_as_any(line) for line in done.stderr.splitlines()]
            for shown in command.shown:
                if shown.startswith("> ") or shown.strip() == "...":
                    continue
                assert printed(shown, out, rtol=1e-4) or printed(numbers_as_any(shown), err), \
                    f"{where}\nthe page shows: {shown!r}\nstdout:\n{done.stdout[-3000:]}"
    finally:
        for server in servers:
            server.send_signal(signal.SIGINT)
            server.wait(timeout=30)


def start_server(line: str, cwd: Path, env: dict) -> subprocess.Popen:
    server = subprocess.Popen(["bash", "-c", f"exec {line.rstrip(' &')}"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    for text in server.stdout:
        if text.startswith("serving"):
            return server
    raise AssertionError(f"$ {line} ended before serving (exit {server.wait()})")

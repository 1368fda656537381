"""What the test modules share: the seed prompt, the real Llama 3 tokenizer, random Meta
checkpoints written once per session, and the default model's file. No test module imports
another; what two need is here."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from npllama.config import ModelArgs
from npllama.threads import ENV, available_cores
from npllama.formats.meta import read_tokenizer_model
from npllama.tokenizer import Tokenizer
from oracle.checkpoints import llama3_tokenizer_path, write_random_checkpoint

# The suite compares logits bit for bit between loads and passes, which holds for a fixed thread
# count (-t N): the default count follows the machine's load, and resident products then differ
# in their last bits from one count to another (README, "Same input, same bits"). Set here, the
# count reaches every subprocess too; tests/test_threads.py unsets it to test the adaptive count.
os.environ.setdefault(ENV, str(available_cores()))


def _test_cache() -> None:
    """The int16 copies the tests' streamed models make (formats/int16.py) go to a cache of the
    session's own, not the user's; the default model, if the user's cache has it, is linked in
    (else the first test that needs it fetches it there). Set here, subprocesses inherit it."""
    from npllama.formats.default_model import FILENAME, cache_dir
    user = cache_dir() / FILENAME
    session = Path(tempfile.mkdtemp(prefix="npllama-test-cache-"))
    if user.is_file():
        (session / FILENAME).symlink_to(user.resolve())
    os.environ["NPLLAMA_CACHE"] = str(session)
    atexit.register(shutil.rmtree, session, ignore_errors=True)


_test_cache()


@pytest.fixture(scope="session")
def seed_prompt() -> str:
    """The notebook's prompt: 17 Llama 3 tokens, after which Meta-Llama-3-8B predicts "42"."""
    return "the answer to the ultimate question of life, the universe, and everything is "


@pytest.fixture(scope="session")
def tok() -> Tokenizer:
    """Meta's Llama 3 tokenizer.model, from the llama-models wheel."""
    return read_tokenizer_model(llama3_tokenizer_path())


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    """random_checkpoint(args, seed=0): the path of a Meta checkpoint directory (params.json,
    consolidated.00.pth of random bf16 weights, the real tokenizer.model) for `args`, written once
    per session and shared by every test that asks for the same args and seed. Tests that change
    files write their own."""
    written: dict[tuple[ModelArgs, int], object] = {}

    def make(args: ModelArgs, seed: int = 0):
        if (args, seed) not in written:
            written[args, seed] = write_random_checkpoint(tmp_path_factory.mktemp("meta"), args, seed)
        return written[args, seed]
    return make


@pytest.fixture(scope="session")
def default_model_path():
    """SmolLM2-135M-Instruct's GGUF, found or fetched as `python -m npllama` does; the tests that
    need it are skipped where it can be had no way (no network, no cache)."""
    from npllama.formats.default_model import DownloadError, ensure_default_model
    try:
        return ensure_default_model(verbose=False)
    except DownloadError as e:
        pytest.skip(f"SmolLM2-135M-Instruct is not installed, cached or downloadable here: {e}")

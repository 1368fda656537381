"""The command line, `npllama` / `python -m npllama`: the story, streaming, the chat, --batch,
every flag's errors (one line, before loading), the help of every subcommand, and llama.cpp's
spellings meaning what llama.cpp means. The subcommands' own work is tested with their modules
(test_explain, test_compare, test_perplexity, test_server)."""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import npllama
import npllama.engine
import npllama.formats
import npllama.tokenizer
from npllama import cli
from npllama.chat import Llama3Chat
from npllama.cli import run
from npllama.generate import Sampler
from npllama.formats.meta import read_bpe_ranks
from oracle.checkpoints import llama3_tokenizer_path, tiny_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    """A tiny Llama 3 in Meta's on-disk format with the real 128256-token tokenizer."""
    return random_checkpoint(tiny_args(), 1)


@pytest.fixture(scope="module")
def model(checkpoint):
    return npllama.load(checkpoint)


@pytest.fixture
def load_once(monkeypatch):
    """The CLI tests run main() many times on one checkpoint: load it once per max_seq_len (the
    models are never modified; loading itself is tested in test_meta.py)."""
    real_load, loaded = npllama.formats.load, LOADED

    def load(path, **kwargs):
        key = (str(path), kwargs.get("dtype"), kwargs.get("max_seq_len"))
        if key not in loaded:
            loaded[key] = real_load(path, **kwargs)
        return loaded[key]

    monkeypatch.setattr(npllama.formats, "load", load)


LOADED = {}


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_cli_story_shows_prompt_tokens_and_top5(load_once, checkpoint, model, tok, capsys):
    code, out, err = run_cli(capsys, "-m", checkpoint, "-p", "the answer is")
    assert code == 0
    ids = tok.encode("the answer is")
    lines = out.splitlines()
    assert lines[0] == f"prompt: {len(ids)} tokens"
    assert [int(line.split()[0]) for line in lines[1:1 + len(ids)]] == ids
    assert lines[1 + len(ids)] == "next token, top 5:"
    top5 = [int(line.split()[0]) for line in lines[2 + len(ids):7 + len(ids)]]
    assert all("p = " in line for line in lines[2 + len(ids):7 + len(ids)])
    assert top5 == list(np.argsort(-model.forward(ids)[-1])[:5])
    assert "continuation:" in out and "the answer is" in out.split("continuation:")[1]
    assert f"{run.STORY_TOKENS} new tokens" in err or "stop_token" in err


def visible(tok, ids):
    return tok.decode([i for i in ids if not tok.is_special(i)])


def test_cli_sampling_is_seeded_and_wired_to_the_sampler(load_once, checkpoint, model, tok, capsys):
    flags = ["-m", checkpoint, "-p", "Once upon a time", "-n", 8, "--temperature", 0.7, "--top-p", 0.9]
    runs = [run_cli(capsys, *flags, "-s", seed) for seed in (1, 1, 2)]
    assert all(code == 0 for code, _, _ in runs)
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]
    assert "tok/s" in runs[0][2] and "8 new tokens" in runs[0][2]
    # The same sampler through the library prints the same text: the flags reach it unchanged.
    ids = list(model.generate(tok.encode("Once upon a time"), 8, Sampler(0.7, 0.9, 0, 1)))
    assert runs[0][1] == "Once upon a time" + visible(tok, ids) + "\n"


def test_cli_chat_one_turn(load_once, checkpoint, model, tok, capsys):
    code, out, err = run_cli(capsys, "-m", checkpoint, "--chat", "--system", "Be brief.", "-p", "hi", "-n", 6)
    assert code == 0
    fmt = Llama3Chat(tok)
    dialog = fmt.encode_dialog([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert f"{len(dialog)} prompt tokens" in err
    reply = list(model.generate(dialog, 6, Sampler(0), stop_ids=fmt.stop_ids))
    assert out == visible(tok, reply) + "\n"


def test_cli_chat_reuses_the_cache_across_turns(load_once, checkpoint, model, tok, capsys, monkeypatch):
    """Interactive --chat: the second turn feeds only the tokens not yet cached, and still
    answers exactly what a fresh greedy generation over the whole dialog answers."""
    typed = iter(["hi", "tell me more", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(typed))
    code, out, err = run_cli(capsys, "-m", checkpoint, "--chat", "-n", 6)
    assert code == 0
    fmt = Llama3Chat(tok)
    messages = [{"role": "user", "content": "hi"}]
    first = fmt.encode_dialog(messages)
    reply1 = list(model.generate(first, 6, Sampler(0), stop_ids=fmt.stop_ids))
    messages += [{"role": "assistant", "content": tok.decode([t for t in reply1 if t not in fmt.stop_ids])},
                 {"role": "user", "content": "tell me more"}]
    second = fmt.encode_dialog(messages)
    reply2 = list(model.generate(second, 6, Sampler(0), stop_ids=fmt.stop_ids))
    assert out == visible(tok, reply1) + "\n" + visible(tok, reply2) + "\n"
    fed = [int(line.split()[0].lstrip("[")) for line in err.splitlines() if "prompt tokens" in line]
    assert fed[0] == len(first)
    assert fed[1] <= len(second) - len(first)  # the whole first dialog came from the cache


def test_cli_missing_model(tmp_path, capsys):
    code, _, err = run_cli(capsys, "-m", tmp_path / "nowhere", "-p", "hi")
    assert code == 2
    assert err.startswith("error:") and "nowhere" in err


def test_cli_prompt_and_file_together(tmp_path, capsys):
    """Flags that contradict each other or make no sense: one line, exit status 2, no model loaded."""
    (tmp_path / "p.txt").write_text("hi")
    code, _, err = run_cli(capsys, "-p", "hi", "-f", tmp_path / "p.txt")
    assert code == 2 and err.startswith("error:") and "-p" in err and "-f" in err
    for argv, message in ((["-f", tmp_path / "none.txt"], "none.txt not found"),
                          (["-f", tmp_path], "is a directory"), (["-f", "/dev/null"], "not a regular file"),
                          (["-n", "-3"], "-n (--n-predict) must be >= 0"),
                          (["--repeat-penalty", "0"], "repeat_penalty (--repeat-penalty)"),
                          (["--repeat-last-n", "-2"], "repeat_last_n (--repeat-last-n)"),
                          (["--min-p", "2"], "min_p (--min-p)"), (["-b", "0"], "-b (--batch-size)"), (["--max-seq-len", "1"], "--max-seq-len"),
                          (["-s", "-1"], "seed (--seed) is -1"), (["--top-p", "nan"], "top_p (--top-p)"),
                          (["--weights-budget-gb", "nan"], "--weights-budget-gb"),
                          (["--weights-budget-gb", "inf"], "--weights-budget-gb"),
                          (["--weights-budget-gb", "1e300"], "--weights-budget-gb")):
        code, _, err = run_cli(capsys, "-m", tmp_path / "no-model-needed", *argv)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error:") and message in err, err


def test_cli_prompt_too_long(load_once, checkpoint, capsys):
    long = "word " * 40
    for mode in ([], ["-n", 4]):  # story mode fails in its forward pass, -n in generate
        code, _, err = run_cli(capsys, "-m", checkpoint, "-p", long, "--max-seq-len", 16, *mode)
        assert code == 2
        assert err.splitlines()[-1].startswith("error:") and "16" in err.splitlines()[-1]
    code, out, err = run_cli(capsys, "-m", checkpoint, "-p", long, "--max-seq-len", 16, "-n", 4, "--truncate")
    assert code == 0 and "truncated from 42 to 7 tokens" in err and "4 new tokens" in err


def story_tokens(out: str) -> list[int]:
    """The prompt token ids story mode prints, one per line after "prompt: N tokens"."""
    lines = out.splitlines()
    n = int(lines[0].split()[1])
    return [int(line.split()[0]) for line in lines[1:1 + n]]


def without_bos(model):
    """The same model with Llama 3's vocabulary minus the begin-of-text convention (as SmolLM2)."""
    tok = model.tokenizer
    no_bos = npllama.tokenizer.Tokenizer(tok.name, npllama.tokenizer.LLAMA3_PAT_STR,
                                         read_bpe_ranks(llama3_tokenizer_path()), tok.special_tokens,
                                         bos_id=None, eos_id=tok.eos_id, stop_ids=tok.stop_ids, add_bos=False)
    other = copy.copy(model)
    other.tokenizer = no_bos
    return other


@pytest.mark.parametrize("bos", [True, False], ids=["with-bos", "without-bos"])
def test_cli_truncate_keeps_the_end_and_only_a_real_bos(load_once, checkpoint, model, capsys, monkeypatch, bos):
    """--max-seq-len 16 leaves room for a 15-token prompt; --truncate keeps the last 7 (half of it,
    the other half to generate), plus BOS in front when the tokenizer has one. A tokenizer
    without BOS keeps 7 tokens of the end: its first token is text, not a BOS to keep."""
    if not bos:
        model = without_bos(model)
        load = npllama.formats.load
        monkeypatch.setattr(npllama.formats, "load", lambda *args, **kwargs: without_bos(load(*args, **kwargs)))
    ids = model.tokenizer.encode(" ".join(f"w{i}" for i in range(30)))
    code, out, err = run_cli(capsys, "-m", checkpoint, "-p", model.tokenizer.decode(ids[bos:]),
                             "--max-seq-len", 16, "--truncate")
    assert code == 0 and f"truncated from {len(ids)} to 7 tokens" in err
    assert story_tokens(out) == ([ids[0]] + ids[-6:] if bos else ids[-7:])


@pytest.mark.parametrize("flag", [["--temperature", "-1"], ["--top-p", "0"], ["--top-k", "-2"]])
def test_cli_bad_sampling_flags(load_once, checkpoint, capsys, flag):
    try:
        code = cli.main(["-m", str(checkpoint), "-p", "hi", "-n", "2", *flag])
    except SystemExit as e:
        code = e.code
    assert code == 2 or (isinstance(code, str) and code.startswith("error:"))


FLAGS = ["-m", "--model", "-p", "--prompt", "-f", "--file", "-n", "--max-new-tokens", "--temperature",
         "--top-p", "--top-k", "-s", "--seed", "--max-seq-len", "--truncate", "--chat", "--system",
         "--dtype", "--weights-budget-gb", "-t", "--threads", "download"]


@pytest.mark.slow
def test_help_mentions_every_flag():
    result = subprocess.run([sys.executable, "-m", "npllama", "--help"], capture_output=True, text=True,
                            timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    declared = [s for a in cli.build_parser()._actions for s in a.option_strings]
    for flag in {*FLAGS, *declared}:
        assert flag in result.stdout, flag


@pytest.mark.parametrize("subcommand", [[], ["explain"], ["compare"], ["download"]])
def test_help_states_each_default_once(subcommand, capsys):
    with pytest.raises(SystemExit):
        cli.main([*subcommand, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "(default: None)" not in text and "(default: False)" not in text
    for option in text.split("  -")[1:]:
        assert option.count("default") <= 1, option
    if not subcommand:
        assert "(default: 0; llama.cpp's is 0.8)" in text and "(default: 2048)" in text  # --temp, -c


def test_cli_prompt_file_that_is_not_utf8(tmp_path, capsys):
    """A binary --file is a one-line error naming the file, before any model is loaded."""
    (tmp_path / "p.bin").write_bytes(b"caf\xe9 \xff\xfe")
    code, _, err = run_cli(capsys, "-m", tmp_path / "no-model-needed", "-f", tmp_path / "p.bin")
    assert code == 2 and err.startswith("error:") and "p.bin" in err and "UTF-8" in err


# ---- batches: generate_batch's rows stop, and score their tokens, as model.generate ------


# --- combinations refused before anything loads, help --------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--chat", "--batch"], "--chat and --batch do not go together"),
    (["perplexity", "-f", "x.txt", "-c", "1"], "-c, --ctx-size"),
    (["-t", "0"], "threads (-t) is 0"),
    (["explain", "--weights-budget-gb", "-1"], "--weights-budget-gb"),
    (["--weights", "int16", "--dtype", "bfloat16"], "--weights int16 with --dtype bfloat16"),
])
def test_a_combination_that_cannot_work_is_one_line(tmp_path, capsys, argv, message):
    """Refused in one `error:` line, exit status 2, before any model is looked for."""
    code = cli.main(argv + ["-m", str(tmp_path / "no-model-needed")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("subcommand", ["", "explain", "compare", "perplexity", "serve"])
def test_every_subcommand_takes_the_model_options(subcommand, capsys):
    """-m, --dtype, -c (--ctx-size, --max-seq-len), --weights-budget-gb and -t, one definition."""
    with pytest.raises(SystemExit):
        cli.main([subcommand, "--help"] if subcommand else ["--help"])
    text = capsys.readouterr().out
    for option in ("--model", "--dtype", "--ctx-size", "--max-seq-len", "--weights-budget-gb", "--threads"):
        assert option in text, (subcommand, option)


def test_the_top_level_help_lists_every_subcommand(capsys):
    from npllama.cli import SUBCOMMANDS
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = [line.split()[0] for line in capsys.readouterr().out.split("subcommands:")[1].splitlines()[2:]
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == list(SUBCOMMANDS)
    assert set(SUBCOMMANDS) == {"explain", "compare", "perplexity", "download", "serve"}


# --- llama.cpp's spellings ------------------------------------------------------------------

def parsed(*argv):
    return cli.build_parser().parse_args([str(a) for a in argv])


@pytest.mark.parametrize("ours, theirs", [
    (["--max-seq-len", 256], ["-c", 256]), (["--max-seq-len", 256], ["--ctx-size", 256]),
    (["--max-new-tokens", 8], ["-n", 8]), (["--max-new-tokens", 8], ["--n-predict", 8]),
    (["--temperature", 0.5], ["--temp", 0.5]), (["--chat"], ["-cnv"]), (["--chat"], ["--conversation"]),
    (["--system", "be brief"], ["-sys", "be brief"]), (["--system", "be brief"], ["--system-prompt", "be brief"]),
    (["--model-draft", "d"], ["-md", "d"]),
])
def test_llama_cpp_spellings_set_the_same_option(ours, theirs):
    assert parsed(*ours) == parsed(*theirs) != parsed()


@pytest.mark.parametrize("subcommand", ["perplexity", "serve", "explain", "compare"])
def test_ctx_size_is_the_context_everywhere(subcommand):
    extra = ["-f", "x"] if subcommand == "perplexity" else []
    assert parsed(subcommand, *extra, "-c", 64).max_seq_len == parsed(subcommand, *extra, "--ctx-size", 64).max_seq_len == 64


def test_perplexity_spells_windows_a_pass_np_and_positions_a_pass_b():
    assert parsed("perplexity", "-f", "x", "-np", 3).parallel == parsed("perplexity", "-f", "x", "--parallel", 3).parallel == 3
    assert parsed("perplexity", "-f", "x", "-b", 128).batch_size == 128
    assert parsed("perplexity", "-f", "x").batch_size == 2048  # llama.cpp's default


def test_the_help_says_where_defaults_differ_from_llama_cpp(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "greedy unless --temp is given (llama.cpp samples at --temp 0.8 by default)" in text
    for differs in ("llama.cpp's is 0.8", "llama.cpp's is 40", "llama.cpp's is 0.95", "llama.cpp's is 0.05"):
        assert differs in text


@pytest.mark.slow
def test_the_npllama_command_is_python_m_npllama(checkpoint):
    """The console script setup.cfg declares, installed beside this Python, prints what
    `python -m npllama` prints (the issue's example: -p "hi" -n 8 -c 256 --temp 0)."""
    script = Path(sys.executable).parent / "npllama"
    assert script.is_file(), "pip install -e . installs the npllama command"
    argv = ["-m", str(checkpoint), "-p", "hi", "-n", "8", "-c", "256", "--temp", "0"]
    ours = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=120)
    module = subprocess.run([sys.executable, "-m", "npllama", *argv], capture_output=True, text=True, timeout=120,
                            cwd=REPO)
    assert ours.returncode == module.returncode == 0, ours.stderr
    assert ours.stdout == module.stdout and ours.stdout.startswith("hi")
    assert "8 new tokens" in ours.stderr
    help_ = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert help_.stdout.startswith("usage: npllama [options]") and "perplexity" in help_.stdout


def test_n_predict_minus_one_runs_to_the_context_end(load_once, checkpoint, model, tok, capsys):
    """-n -1 (llama.cpp: until the end of generation): every position -c leaves, unless a stop
    token comes first; the same text as -n with exactly that many."""
    prompt = tok.encode("the answer is")
    room = 24 - len(prompt)
    code, out, err = run_cli(capsys, "-m", checkpoint, "-p", "the answer is", "-n", -1, "-c", 24)
    ids = list(model.generate(prompt, room, Sampler(0), stop_ids=()))
    assert code == 0
    if not set(ids) & tok.stop_ids:
        assert f"{room} new tokens" in err and "stopped: max_seq_len" in err
    assert out == run_cli(capsys, "-m", checkpoint, "-p", "the answer is", "-n", room, "-c", 24)[1]


def test_min_p_one_leaves_only_the_likeliest_token(load_once, checkpoint, capsys):
    """--min-p reaches the sampler: at 1 only the argmax survives, so a hot temperature samples
    the greedy text."""
    greedy = run_cli(capsys, "-m", checkpoint, "-p", "Once upon a time", "-n", 8)[1]
    hot = run_cli(capsys, "-m", checkpoint, "-p", "Once upon a time", "-n", 8, "--temp", 5, "-s", 3)[1]
    assert run_cli(capsys, "-m", checkpoint, "-p", "Once upon a time", "-n", 8, "--temp", 5, "-s", 3,
                   "--min-p", 1)[1] == greedy != hot


def test_batch_size_feeds_the_prompt_in_passes_to_the_same_text(load_once, checkpoint, capsys, monkeypatch):
    """-b 3: a 13-token prompt in 5 passes (the forward_rows calls are counted); the greedy
    text is the one pass's."""
    prompt = "the quick brown fox jumps over the lazy dog again and again"
    passes = []
    forward = npllama.engine.forward
    monkeypatch.setattr(npllama.engine, "forward", lambda m, tokens, *a, **k: passes.append(tokens.shape) or
                        forward(m, tokens, *a, **k))
    whole = run_cli(capsys, "-m", checkpoint, "-p", prompt, "-n", 6)
    prefill = passes[0]
    passes.clear()
    chunked = run_cli(capsys, "-m", checkpoint, "-p", prompt, "-n", 6, "-b", 3)
    assert chunked[1] == whole[1] and chunked[0] == 0
    n = prefill[1]
    assert passes[:-(6 - 1)] == [(1, 3)] * (n // 3) + [(1, n % 3)] * (n % 3 > 0)


def test_repeat_penalty_flags_reach_the_sampler(load_once, checkpoint, model, tok, capsys):
    """--repeat-penalty / --repeat-last-n print what the library's Sampler with them gives, and
    the penalty changes the greedy text (below 1 it favours the prompt's own tokens, whose
    positive logits it multiplies)."""
    prompt = "the quick brown fox jumps over the lazy dog"
    flags = ["-m", checkpoint, "-p", prompt, "-n", 12]
    code, out, _ = run_cli(capsys, *flags, "--repeat-penalty", 0.05, "--repeat-last-n", -1)
    ids = list(model.generate(tok.encode(prompt), 12, Sampler(repeat_penalty=0.05, repeat_last_n=-1)))
    assert code == 0 and out == prompt + visible(tok, ids) + "\n"
    assert out != run_cli(capsys, *flags)[1]

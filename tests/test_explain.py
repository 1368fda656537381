"""`python -m npllama explain`: every step of the notebook's walk, its values the forward pass's own,
and the figures drawn from the same trace."""

import re
import struct
import sys

import numpy as np
import pytest

import npllama
import npllama.cli.explain
from npllama import cli
from npllama.cli.explain import check_layer_head, explain_steps, residual_rms, write_figures
from oracle.checkpoints import tiny_args

# Sizes unlike the 8B's and unlike each other, so a hard-coded 32, 128 or `head // 4` would show:
# 12 heads of 8, 4 kv heads (3 query heads each), 3 layers.
ARGS = tiny_args(dim=96, n_heads=12, n_kv_heads=4, n_layers=3, ffn_dim_multiplier=1.5, multiple_of=64)
LAYER, HEAD = 2, 7  # head 7 reads kv head 7 // 3 = 2

# The notebook's names, in its order, for the layer shown.
STEP_NAMES = [
    "tokens", "token_embeddings_unnormalized", "token_embeddings",
    "q_per_token", "k_per_token", "v_per_token", "freqs_cis", "q_per_token_rotated", "k_per_token_rotated",
    "qk_per_token", "qk_per_token_after_masking", "qk_per_token_after_masking_after_softmax",
    "qkv_attention", "stacked_qkv_attention", "embedding_delta", "embedding_after_edit",
    "embedding_after_edit_normalized", "gate", "silu_gate", "up", "hidden", "output",
    f"layer_{LAYER}_embedding", "residual_stream_rms", "final_embedding", "logits", "next_token",
]


@pytest.fixture(scope="module")
def checkpoint(random_checkpoint):
    return random_checkpoint(ARGS, seed=3)


@pytest.fixture(scope="module")
def run(checkpoint, seed_prompt):
    """One forward pass with its trace, and the walk through it."""
    model = npllama.load(checkpoint)
    tokens = model.tokenizer.encode(seed_prompt)
    trace = {}
    logits = model.forward(tokens, trace=trace)
    return model, tokens, trace, logits, explain_steps(model, tokens, trace, LAYER, HEAD)


def test_steps_are_the_notebooks_in_its_order(run):
    *_, steps = run
    assert [s.name for s in steps] == STEP_NAMES


def expected_sources(model, trace):
    """Step name -> the trace entry it must show (written out here independently of explain.py)."""
    a, p, kv = model.args, f"layers.{LAYER}.", HEAD // (model.args.n_heads // model.args.n_kv_heads)
    hd = a.dim // a.n_heads
    return {
        "token_embeddings_unnormalized": trace["embedding"],
        "token_embeddings": trace[p + "attention_norm"],
        "q_per_token": trace[p + "q"][HEAD], "k_per_token": trace[p + "k"][kv], "v_per_token": trace[p + "v"][kv],
        "q_per_token_rotated": trace[p + "q_rot"][HEAD], "k_per_token_rotated": trace[p + "k_rot"][kv],
        "qk_per_token": trace[p + "scores"][HEAD], "qk_per_token_after_masking": trace[p + "masked_scores"][HEAD],
        "qk_per_token_after_masking_after_softmax": trace[p + "probs"][HEAD],
        "qkv_attention": trace[p + "attention"][:, HEAD * hd:(HEAD + 1) * hd],
        "stacked_qkv_attention": trace[p + "attention"], "embedding_delta": trace[p + "attention_out"],
        "embedding_after_edit": trace[p + "residual"], "embedding_after_edit_normalized": trace[p + "ffn_norm"],
        "gate": trace[p + "gate"], "silu_gate": trace[p + "silu_gate"], "up": trace[p + "up"],
        "hidden": trace[p + "hidden"], "output": trace[p + "ffn_out"], f"layer_{LAYER}_embedding": trace[p + "out"],
        "final_embedding": trace["norm"], "logits": trace["logits"],
    }


def test_every_array_is_the_traces_own(run):
    """Not recomputed: each step's array is (a view into) the very array the forward pass recorded."""
    model, tokens, trace, _, steps = run
    by_name = {s.name: s for s in steps}
    expected = expected_sources(model, trace)
    for name, array in expected.items():
        step = by_name[name]
        assert np.shares_memory(step.array, array), name
        np.testing.assert_array_equal(step.array, array, err_msg=name)
    np.testing.assert_array_equal(by_name["tokens"].array, tokens)


def test_sizes_come_from_the_model(run):
    model, tokens, trace, _, steps = run
    a, T = model.args, len(tokens)
    by_name = {s.name: s for s in steps}
    assert by_name["q_per_token"].array.shape == (T, a.head_dim) == (T, 8)
    assert by_name["qk_per_token"].array.shape == (T, T)
    assert by_name["stacked_qkv_attention"].array.shape == (T, a.n_heads * a.head_dim)
    assert by_name["gate"].array.shape == (T, a.hidden_dim)
    assert by_name["logits"].array.shape == (T, a.vocab_size)
    assert "split into 12 heads of 8" in by_name["q_per_token"].math
    assert "split into 4 heads of 8" in by_name["k_per_token"].math
    assert "kv head 2 of 4, shared by query heads 6..8" in by_name["k_per_token"].note
    assert f"{a.dim} -> {a.hidden_dim}" in by_name["gate"].math
    # freqs_cis is the table the forward pass rotated with, as complex numbers, and q_rot is q times it.
    freqs_cis = by_name["freqs_cis"].array
    assert freqs_cis.shape == (T, a.head_dim // 2)
    angles = np.outer(np.arange(T, dtype=np.float32), model.rope_freqs)  # [T, hd/2]
    np.testing.assert_array_equal(freqs_cis.real, np.cos(angles))
    np.testing.assert_array_equal(freqs_cis.imag, np.sin(angles))
    q, q_rot = by_name["q_per_token"].array, by_name["q_per_token_rotated"].array
    rotated = (q[:, 0::2] + 1j * q[:, 1::2]) * freqs_cis
    np.testing.assert_allclose(q_rot[:, 0::2] + 1j * q_rot[:, 1::2], rotated, rtol=1e-5, atol=1e-5)


def test_mask_softmax_and_next_token(run):
    model, tokens, trace, logits, steps = run
    by_name = {s.name: s for s in steps}
    masked = by_name["qk_per_token_after_masking"].array
    assert np.all(np.isneginf(masked[np.triu_indices(len(tokens), 1)]))
    np.testing.assert_allclose(by_name["qk_per_token_after_masking_after_softmax"].array.sum(-1), 1, rtol=1e-5)
    # The top 5 are the last position's 5 largest logits, the first of them what greedy decoding picks.
    top5 = np.argsort(-logits[-1])[:5]
    assert by_name["next_token"].note == f"next_token = {top5[0]}"
    assert next(model.generate(tokens, 1)) == top5[0]
    listed = [int(line.split()[0]) for line in by_name["next_token"].details]
    assert listed == list(top5)
    # One line per layer (and the embedding) in the summary of the residual stream.
    rms = by_name["residual_stream_rms"]
    assert len(rms.details) == model.args.n_layers + 1 and "<- shown above" in rms.details[LAYER + 1]
    np.testing.assert_allclose(rms.array[-1], np.sqrt(np.mean(trace[f"layers.{model.args.n_layers - 1}.out"]
                                                              .astype(np.float64) ** 2, axis=-1)))


def blocks(text: str) -> dict[str, list[str]]:
    """The printed steps: name -> its lines."""
    out, name = {}, None
    for line in text.splitlines():
        if m := re.match(r"^\[\d+\] (\S+)$", line):
            name = m.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


def test_printed_shapes_and_values_are_the_traces(run, checkpoint, capsys):
    """What the command prints (shape, checksum, first value) matches the trace of a forward pass."""
    model, tokens, trace, _, _ = run
    assert cli.main(["explain", "-m", str(checkpoint), "--layer", str(LAYER), "--head", str(HEAD)]) == 0
    printed = blocks(capsys.readouterr().out)
    assert list(printed) == STEP_NAMES
    for name, array in expected_sources(model, trace).items():
        lines = printed[name]
        m = re.search(r"shape \[([\d, ]+)\]  (\w+)  sum (\S+)", lines[1])
        assert m, (name, lines)
        assert tuple(int(n) for n in m.group(1).split(", ")) == array.shape, name
        assert m.group(2) == str(array.dtype)
        finite = array[np.isfinite(array)].astype(np.float64)
        np.testing.assert_allclose(float(m.group(3)), finite.sum(), rtol=1e-3, atol=1e-3, err_msg=name)
        first_row = next(line for line in lines if line.strip().startswith("[["))
        first = float(first_row.strip("[ ").split()[0])
        np.testing.assert_allclose(first, array.flat[0], rtol=1e-3, err_msg=name)
    assert "-inf" in "\n".join(printed["qk_per_token_after_masking"])
    assert "split into 12 heads of 8; head 7" in "\n".join(printed["q_per_token"])


@pytest.mark.slow
def test_bfloat16_flow_marks_rounded_steps(checkpoint, capsys):
    model = npllama.load(checkpoint, dtype="bfloat16")
    tokens = model.tokenizer.encode("hello world")
    trace = {}
    model.forward(tokens, trace=trace)
    by_name = {s.name: s for s in explain_steps(model, tokens, trace, 0, 0)}
    # The notebook's flow keeps rotated q, k and the scores float32; everything else is rounded to bf16.
    assert by_name["q_per_token"].bf16 and by_name["qk_per_token_after_masking_after_softmax"].bf16
    assert not by_name["q_per_token_rotated"].bf16 and not by_name["qk_per_token"].bf16
    q = by_name["q_per_token"].array
    np.testing.assert_array_equal(q, q.astype(npllama.model.round_to_bf16(q).dtype))
    assert cli.main(["explain", "-m", str(checkpoint), "--dtype", "bfloat16", "-p", "hello world"]) == 0
    assert "float32 (bf16-rounded values)" in capsys.readouterr().out


@pytest.mark.parametrize("option, value, message", [
    ("--layer", 3, "--layer 3 is out of range: this model has 3 layers, numbered 0..2"),
    ("--layer", -1, "--layer -1 is out of range"),
    ("--head", 12, "--head 12 is out of range: this model has 12 attention heads per layer, numbered 0..11"),
])
def test_bad_layer_or_head(checkpoint, capsys, option, value, message):
    assert cli.main(["explain", "-m", str(checkpoint), option, str(value)]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("error: ") and message in last
    with pytest.raises(ValueError, match=re.escape(message)):
        check_layer_head(ARGS, **{option[2:]: value, ("head" if option == "--layer" else "layer"): 0})


# --- figures ------------------------------------------------------------------------------------

def png_size(path) -> tuple[int, int]:
    """Width and height from a PNG's header, after checking its signature."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_figures_are_pngs_of_the_trace(checkpoint, tmp_path, monkeypatch, capsys):
    """`explain --plots DIR` writes four PNGs, and what each drew is the trace of its forward pass."""
    matplotlib_image = pytest.importorskip("matplotlib.image")
    seen = {}

    def recording_write_figures(directory, model, tokens, trace, layer, head):
        seen.update(model=model, tokens=tokens, trace=trace)
        seen["figures"] = write_figures(directory, model, tokens, trace, layer, head)
        return seen["figures"]

    monkeypatch.setattr(npllama.cli.explain, "write_figures", recording_write_figures)
    assert cli.main(["explain", "-m", str(checkpoint), "--layer", str(LAYER), "--head", str(HEAD),
                     "--plots", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    model, tokens, trace = seen["model"], seen["tokens"], seen["trace"]
    figures = {f.path.name: f for f in seen["figures"]}
    assert sorted(figures) == ["attention.png", "next_token.png", "residual_rms.png", "rope.png"]
    for name, fig in figures.items():
        assert fig.path == tmp_path / name and f"wrote {fig.path}" in err
        assert 20_000 < fig.path.stat().st_size < 5_000_000, (name, fig.path.stat().st_size)
        width, height = png_size(fig.path)
        assert 500 <= width <= 4000 and 300 <= height <= 3000, (name, width, height)
        assert matplotlib_image.imread(fig.path).shape[:2] == (height, width)
        assert fig.title

    # What the heatmaps drew is the chosen head's scores, masked scores (-inf included) and probs.
    drawn, p = figures["attention.png"].data, f"layers.{LAYER}."
    np.testing.assert_array_equal(drawn["scores"], trace[p + "scores"][HEAD])
    np.testing.assert_array_equal(drawn["masked_scores"], trace[p + "masked_scores"][HEAD])
    np.testing.assert_array_equal(drawn["probs"], trace[p + "probs"][HEAD])
    assert np.isneginf(drawn["masked_scores"]).sum() == len(tokens) * (len(tokens) - 1) // 2

    # The RoPE arrows are the last position's angles, pos * freq, with the model's own frequencies.
    last = len(tokens) - 1
    np.testing.assert_array_equal(figures["rope.png"].data["cos"], np.cos(np.float32(last) * model.rope_freqs))
    np.testing.assert_array_equal(figures["rope.png"].data["sin"], np.sin(np.float32(last) * model.rope_freqs))
    assert len(figures["rope.png"].data["cos"]) == model.args.head_dim // 2

    # One RMS curve per token: the embedding, then each layer's output.
    expected = np.stack([np.sqrt(np.mean(np.square(trace[k], dtype=np.float64), axis=-1)) for k in
                         ["embedding"] + [f"layers.{i}.out" for i in range(model.args.n_layers)]])
    np.testing.assert_allclose(figures["residual_rms.png"].data["rms"], expected, rtol=1e-12)
    np.testing.assert_array_equal(residual_rms(trace, model.args.n_layers), expected)

    # The bars: the largest next-token probabilities, in order.
    z = trace["logits"][-1].astype(np.float64)
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    bars = figures["next_token.png"].data["probs"]
    np.testing.assert_allclose(bars, np.sort(probs)[::-1][:len(bars)], rtol=1e-9)


@pytest.mark.slow
def test_long_prompts_get_thinned_labels_and_a_capped_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from npllama.cli.plots import MAX_TICK_LABELS, plot_attention, thinned_ticks

    ticks = thinned_ticks(300)
    assert len(ticks) <= MAX_TICK_LABELS + 1 and ticks[0] == 0 and ticks[-1] == 299
    np.testing.assert_array_equal(thinned_ticks(5), np.arange(5))
    n = 60  # > MAX_TICK_LABELS: labels are thinned
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((n, n)).astype(np.float32)
    masked = np.where(np.triu(np.ones((n, n), bool), 1), -np.inf, scores).astype(np.float32)
    probs = np.exp(masked - masked.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    fig = plot_attention(tmp_path / "long.png", scores, masked, probs, [f"t{i}" for i in range(n)], 0, 0)
    width, height = png_size(fig.path)
    assert width <= 4000 and height <= 3000
    np.testing.assert_array_equal(fig.data["masked_scores"], masked)


def test_plots_without_matplotlib_say_how_to_install_it(checkpoint, tmp_path, monkeypatch, capsys):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # `import` of these now raises ImportError
    code = cli.main(["explain", "-m", str(checkpoint), "--plots", str(tmp_path / "figs")])
    assert code == 2
    assert 'pip install "npllama[plot]"' in capsys.readouterr().err
    assert not (tmp_path / "figs").exists()


# --- the default model, when it is here --------------------------------------------------------

@pytest.mark.slow
def test_explain_on_the_default_model(capsys, default_model_path, seed_prompt):
    path = default_model_path
    model = npllama.load(path, max_seq_len=256)
    tokens = model.tokenizer.encode(seed_prompt)
    trace = {}
    model.forward(tokens, trace=trace)
    a = model.args
    steps = explain_steps(model, tokens, trace, a.n_layers - 1, a.n_heads - 1)
    assert [s.name for s in steps][:-5] == STEP_NAMES[:-5]
    by_name = {s.name: s for s in steps}
    assert by_name["q_per_token"].array.shape == (len(tokens), a.head_dim)
    assert f"split into {a.n_heads} heads of {a.head_dim}" in by_name["q_per_token"].math
    assert len(by_name["residual_stream_rms"].details) == a.n_layers + 1
    assert cli.main(["explain", "-m", str(path), "--layer", str(a.n_layers - 1)]) == 0
    assert "next_token" in capsys.readouterr().out

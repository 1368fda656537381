"""The forward pass against the torch oracle, step by step, on real Meta-format checkpoints."""

import json
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest
import torch

import npllama
from npllama.config import ModelArgs
from npllama.formats.meta import load_params
from npllama.formats.shared import LazyRows
from npllama.layers import keep
from npllama.model import LAYER_TRACE_NAMES
from npllama.resident_or_streamed import StreamedWeight, TilePool
from npllama.threads import Threads
from oracle.checkpoints import (llama3_8b_args, llama32_1b_args, random_state_dict, tiny_args,
                                write_random_checkpoint, write_shards)
from oracle.compare import BFLOAT16_BOUND, FLOAT32_BOUND, compare_traces, format_table
from oracle.reference import Oracle

CONFIGS = {
    "gqa-4to1": tiny_args(),
    "mha": tiny_args(n_kv_heads=8),
    "odd-dims": tiny_args(dim=72, n_heads=6, n_kv_heads=3, ffn_dim_multiplier=None, multiple_of=7),
    "gqa-3to1-multiplier": tiny_args(dim=96, n_heads=12, n_kv_heads=4, n_layers=3,
                                     ffn_dim_multiplier=1.5, multiple_of=64),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, random_checkpoint):
    return random_checkpoint(CONFIGS[request.param], seed=7)


def oracle_for(directory, dtype=torch.float32, max_seq_len=64):
    args = load_params(directory / "params.json")
    state = torch.load(directory / "consolidated.00.pth", mmap=True, weights_only=True)
    return Oracle(args, state, dtype=dtype, max_seq_len=max_seq_len)


def traces(directory, dtype, prompt):
    model = npllama.load(directory, dtype=dtype)
    tokens = model.tokenizer.encode(prompt)
    ours, theirs = {}, {}
    logits = model.forward(tokens, trace=ours)
    oracle_logits = oracle_for(directory, torch.bfloat16 if dtype == "bfloat16" else torch.float32).forward(
        tokens, trace=theirs)
    return model, logits, oracle_logits, ours, theirs


@pytest.mark.slow
def test_float32_every_step_matches_oracle(checkpoint, seed_prompt):
    model, logits, oracle_logits, ours, theirs = traces(checkpoint, "float32", seed_prompt)
    rows = compare_traces(ours, theirs, FLOAT32_BOUND)
    print("\n" + format_table(rows))
    assert all(r.ok for r in rows), format_table([r for r in rows if not r.ok])
    assert np.argmax(logits[-1]) == np.argmax(oracle_logits[-1])
    # The fast path (no trace) is held to the same bound at the end of the pass.
    fast = model.forward(model.tokenizer.encode(seed_prompt))
    np.testing.assert_allclose(fast, oracle_logits, rtol=0, atol=FLOAT32_BOUND * np.abs(oracle_logits).max())


@pytest.mark.slow
def test_bfloat16_flow_matches_oracle_bit_for_bit_mostly(checkpoint, seed_prompt):
    """Both sides round to bf16 at the same points: measured >= 99.9% of the elements of each
    early step and >= 94% of the logits are bit-identical; the rest differ by a bf16 ulp that
    then propagates, bounded by BFLOAT16_BOUND of each step's largest magnitude."""
    _, logits, oracle_logits, ours, theirs = traces(checkpoint, "bfloat16", seed_prompt)
    rows = compare_traces(ours, theirs, BFLOAT16_BOUND)
    print("\n" + format_table(rows))
    assert all(r.ok for r in rows), format_table([r for r in rows if not r.ok])
    by_name = {r.name: r for r in rows}
    for name in ("embedding", "layers.0.attention_norm", "layers.0.q", "layers.0.probs",
                 "layers.0.attention_out", "layers.0.residual"):
        assert by_name[name].identical >= 0.999, by_name[name]
    assert by_name["logits"].identical >= 0.9, by_name["logits"]
    # bf16 really is a different computation from float32: it must not silently run float32.
    f32 = npllama.load(checkpoint).forward(npllama.load(checkpoint).tokenizer.encode(seed_prompt))
    assert not np.array_equal(f32, logits)


@pytest.mark.slow
def test_trace_records_every_documented_step(checkpoint, seed_prompt):
    model = npllama.load(checkpoint)
    trace = {}
    tokens = model.tokenizer.encode(seed_prompt)
    logits = model.forward(tokens, trace=trace)
    a, T = model.args, len(tokens)
    expected = ["embedding"] + [f"layers.{i}.{n}" for i in range(a.n_layers) for n in LAYER_TRACE_NAMES]
    assert sorted(trace) == sorted(expected + ["norm", "logits"])
    assert trace["layers.0.q"].shape == (a.n_heads, T, a.head_dim)
    assert trace["layers.0.k_rot"].shape == (a.n_kv_heads, T, a.head_dim)
    assert trace["layers.0.probs"].shape == (a.n_heads, T, T)
    assert trace["layers.0.gate"].shape == (T, a.hidden_dim)
    np.testing.assert_array_equal(trace["logits"], logits)
    # A trace records model.py's path; untraced, the engine computes the same numbers to float32
    # rounding (tests/test_engine.py), and in float32 its step hook costs one call.
    np.testing.assert_allclose(model.forward(tokens), logits, rtol=0, atol=1e-5 * np.abs(logits).max())
    assert model.bf16_step is keep


def test_hidden_dim_follows_meta_formula():
    """Meta's published sizes: 8B 14336, 70B 28672, 3.2-1B 8192, 3.2-3B 8192."""
    assert ModelArgs(4096, 32, 32, 8, 128256, 1e-5, 5e5, 1024, 1.3).hidden_dim == 14336
    assert ModelArgs(8192, 80, 64, 8, 128256, 1e-5, 5e5, 4096, 1.3).hidden_dim == 28672
    assert ModelArgs(2048, 16, 32, 8, 128256, 1e-5, 5e5, 256, 1.5).hidden_dim == 8192
    assert ModelArgs(3072, 28, 24, 8, 128256, 1e-5, 5e5, 256, 1.0).hidden_dim == 8192


@pytest.mark.slow
def test_params_come_from_params_json(tmp_path, seed_prompt):
    """eps and theta are read, never defaulted: a Llama 2-era 1e-6 / 10000 would change the model."""
    args = tiny_args(norm_eps=3e-5, rope_theta=12345.0)
    write_random_checkpoint(tmp_path, args)
    model = npllama.load(tmp_path)
    assert model.args.norm_eps == 3e-5 and model.args.rope_theta == 12345.0
    # The RoPE table's first non-trivial frequency is theta^(-2/hd).
    np.testing.assert_allclose(model.rope_freqs[1], 12345.0 ** (-2 / args.head_dim), rtol=1e-6)
    tokens = model.tokenizer.encode(seed_prompt)
    oracle = oracle_for(tmp_path).forward(tokens)
    np.testing.assert_allclose(model.forward(tokens), oracle, atol=FLOAT32_BOUND * np.abs(oracle).max())


@pytest.mark.slow
def test_forward_pass_never_imports_torch(tmp_path):
    write_random_checkpoint(tmp_path, tiny_args())
    code = ("import sys, npllama; m = npllama.load(sys.argv[1]); "
            "m.forward(m.tokenizer.encode('hello')); list(m.generate(m.tokenizer.encode('hi'), 3)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streamed_weights_equal_resident_weights(tmp_path, dtype, seed_prompt):
    """weights_budget=0 keeps every matrix a bf16 memory map, streamed through the matmul in float32
    tiles. Same math, but BLAS sums tiles in its own order: equal to float32 rounding."""
    write_random_checkpoint(tmp_path, tiny_args(n_layers=3))
    resident = npllama.load(tmp_path, dtype=dtype)
    streamed = npllama.load(tmp_path, dtype=dtype, weights_budget=0, weights="exact")
    assert resident.resident and not streamed.resident
    assert isinstance(streamed.layers[0].w1, StreamedWeight) and isinstance(streamed.layers[0].w13, StreamedWeight)
    tokens = resident.tokenizer.encode(seed_prompt)
    expected = resident.forward(tokens)
    atol = (1e-5 if dtype == "float32" else BFLOAT16_BOUND) * np.abs(expected).max()
    np.testing.assert_allclose(streamed.forward(tokens), expected, rtol=0, atol=atol)
    # Decoding through the KV cache, one token at a time.
    cache = streamed.new_cache(len(tokens))
    for pos, t in enumerate(tokens):
        step_logits = streamed.forward([t], pos, cache)
    np.testing.assert_allclose(step_logits[-1], expected[-1], rtol=0, atol=atol)


@pytest.mark.parametrize("tile_rows", [7, 1000])
@pytest.mark.parametrize("n_tokens", [1, 3, 40])
@pytest.mark.parametrize("parts", [[1000], [600, 150, 250]], ids=["one", "stacked"])
def test_streamed_matmul_equals_the_float32_matmul_whatever_the_threads(tile_rows, n_tokens, parts):
    """Any tiling of the rows (ragged last tiles, parts stacked as q|k|v are) gives x @ w.T; and
    the same bits on 1, 2 or 3 threads, because tiles start at fixed rows whatever the count."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((sum(parts), 40)).astype(ml_dtypes.bfloat16)
    x = rng.standard_normal((n_tokens, 40)).astype(np.float32)
    cuts = np.cumsum([0, *parts])
    results = []
    for n_threads in (1, 2, 3):
        streamed = StreamedWeight([w[a:b] for a, b in zip(cuts, cuts[1:])], TilePool(Threads(n_threads)))
        streamed.tile_rows = tile_rows
        results.append(x @ streamed.T)
    expected = x @ w.astype(np.float32).T  # [T, 1000]
    # Tiles take different BLAS kernels than the whole product, which sum in different orders: a
    # few float32 ulps of the largest term apart. A wrong row or tile would be off by O(1).
    bound = 40 * np.finfo(np.float32).eps * (np.abs(x) @ np.abs(w.astype(np.float32)).T).max()
    np.testing.assert_allclose(results[0], expected, rtol=0, atol=bound)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_streamed_matmul_gives_blas_its_threads_back():
    from threadpoolctl import threadpool_info
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    w = np.ones((64, 16), ml_dtypes.bfloat16)
    assert (np.ones((1, 16), np.float32) @ StreamedWeight(w, TilePool(Threads(2))).T == 16).all()
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before


# --- bad input: a clear error that names the file, tensor or argument -------------------------

def test_missing_model_directory(tmp_path):
    with pytest.raises(npllama.ModelNotFoundError, match="does not exist"):
        npllama.load(tmp_path / "nope")
    with pytest.raises(npllama.ModelNotFoundError, match="params.json"):
        npllama.load(tmp_path)


@pytest.mark.parametrize("key", ["rope_theta", "norm_eps", "dim"])
def test_params_without_a_required_key(tmp_path, key):
    write_random_checkpoint(tmp_path, tiny_args())
    params = json.loads((tmp_path / "params.json").read_text())
    del params[key]
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(npllama.ConfigError, match=f"params.json has no {key}"):
        npllama.load(tmp_path)


def test_params_that_disagree_with_the_weights(tmp_path):
    write_random_checkpoint(tmp_path, tiny_args())
    params = json.loads((tmp_path / "params.json").read_text())
    params["ffn_dim_multiplier"] = 2.0
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(npllama.CheckpointError, match=r"layers\.0\.feed_forward\.w1\.weight"):
        npllama.load(tmp_path)


def test_missing_tokenizer(tmp_path):
    write_random_checkpoint(tmp_path, tiny_args())
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(npllama.ModelNotFoundError, match="tokenizer.model"):
        npllama.load(tmp_path)


@pytest.mark.slow
def test_bad_tokens_and_too_long_prompts(tmp_path):
    write_random_checkpoint(tmp_path, tiny_args())
    model = npllama.load(tmp_path, max_seq_len=16)
    with pytest.raises(npllama.PromptTooLongError, match="max_seq_len is 16"):
        model.forward(list(range(17)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.forward([model.args.vocab_size])
    with pytest.raises(ValueError, match="start_pos"):
        model.forward([1, 2], start_pos=3)
    with pytest.raises(ValueError, match="dtype"):
        npllama.load(tmp_path, dtype="float16")


@pytest.mark.slow
@pytest.mark.parametrize("n_shards", [2, 4])
def test_sharded_checkpoint_gives_identical_logits(tmp_path, n_shards, seed_prompt):
    """A model-parallel checkpoint (consolidated.00..0N.pth) loads to the same model."""
    whole = write_random_checkpoint(tmp_path / "whole", tiny_args())
    sharded = tmp_path / "sharded"
    write_shards(sharded, torch.load(whole / "consolidated.00.pth", weights_only=True), n_shards)
    for name in ("params.json", "tokenizer.model"):
        (sharded / name).write_bytes((whole / name).read_bytes())
    a, b = npllama.load(whole), npllama.load(sharded)
    tokens = a.tokenizer.encode(seed_prompt)
    np.testing.assert_array_equal(a.forward(tokens), b.forward(tokens))


def test_resident_weights_are_stacked_views(random_checkpoint):
    """q|k|v and w1|w3 are one float32 copy each; wq..w3, which the plain pass reads, are views
    of them, so a layer's weights are held once."""
    model = npllama.load(random_checkpoint(tiny_args()))
    for layer in model.layers:
        for part in (layer.wq, layer.wk, layer.wv):
            assert part.base is layer.wqkv
        assert layer.w1.base is layer.w13 and layer.w3.base is layer.w13
        assert layer.wqkv.shape[0] == len(layer.wq) + len(layer.wk) + len(layer.wv)


# --- configuration: params.json keys that change the model ----------------------------------

def test_rope_scaling_factor_is_read_from_params_json(tmp_path):
    """Llama 3.2 ships rope_scaling_factor 32; silently using Llama 3.1's 8 changes every angle
    beyond 8192 / (2 pi) positions' wavelengths."""
    from npllama.config import RopeScaling
    from npllama.formats.meta import load_params
    from npllama.layers import rope_frequencies

    args = tiny_args(rope_scaling=RopeScaling(factor=32.0))
    write_random_checkpoint(tmp_path, args)
    assert json.loads((tmp_path / "params.json").read_text())["rope_scaling_factor"] == 32.0
    assert load_params(tmp_path / "params.json").rope_scaling == RopeScaling(factor=32.0)
    model = npllama.load(tmp_path, max_seq_len=64)
    freqs = rope_frequencies(args.head_dim, args.rope_theta, RopeScaling(factor=32.0))  # [hd/2]
    np.testing.assert_array_equal(model.rope_freqs, freqs)
    eight = rope_frequencies(args.head_dim, args.rope_theta, RopeScaling(factor=8.0))  # [hd/2]
    assert not np.allclose(freqs, eight)  # the factor matters for this head_dim


# --- bf16 mode rounds every weight, whatever its stored dtype ----------------------------------

class IdentityRows(LazyRows):
    """A lazily produced matrix, as GGUF's quantized tensors and HF's permuted q/k are."""

    def __init__(self, w: np.ndarray):
        super().__init__(w.shape, w.dtype)
        self.w = w

    def rows(self, index) -> np.ndarray:
        return self.w[index]


@pytest.mark.parametrize("stored", ["float32", "float16", "lazy float32"])
@pytest.mark.parametrize("budget", [None, 0], ids=["resident", "streamed"])
def test_bfloat16_mode_rounds_weights_of_any_dtype(stored, budget):
    """bf16 mode on float32 / float16 weights (GGUF norms, HF, SmolLM2, streamed matrices) equals
    bf16 mode on the same weights rounded to bf16 first: every weight is rounded, vectors and
    matrices, resident and streamed."""
    args = tiny_args(vocab_size=256)
    state = random_state_dict(args, seed=5, dtype=torch.float32)
    dtype = np.float16 if stored == "float16" else np.float32
    weights = {name: t.numpy().astype(dtype) for name, t in state.items()}
    rounded = {name: w.astype(ml_dtypes.bfloat16) for name, w in weights.items()}
    if stored.startswith("lazy"):
        weights = {name: IdentityRows(w) if w.ndim == 2 else w for name, w in weights.items()}
    tokens = list(range(3, 20))
    ours = npllama.Llama(args, weights, dtype="bfloat16", weights_budget=budget).forward(tokens)
    reference = npllama.Llama(args, rounded, dtype="bfloat16", weights_budget=budget).forward(tokens)
    np.testing.assert_array_equal(ours, reference)
    plain = npllama.Llama(args, weights, dtype="float32", weights_budget=budget).forward(tokens)
    assert not np.array_equal(ours, plain)  # rounding the weights is visible in the logits


# --- the tokenizer may be smaller than the embedding (padded vocabularies), never larger ------

@pytest.mark.slow
def test_padded_vocabulary_loads_and_a_too_small_one_is_refused(tmp_path, seed_prompt):
    padded = write_random_checkpoint(tmp_path / "padded", tiny_args(vocab_size=128256 + 64))
    model = npllama.load(padded)
    assert model.tokenizer.n_words == 128256 and model.args.vocab_size == 128320
    assert model.forward(model.tokenizer.encode(seed_prompt)).shape[-1] == 128320
    small = write_random_checkpoint(tmp_path / "small", tiny_args(vocab_size=128000))
    with pytest.raises(npllama.ConfigError, match="128256 tokens but the model's vocab_size is 128000"):
        npllama.load(small)


# --- shapes: checked against Meta's published ones, not against the code that makes them ------

LLAMA3_8B_LAYER = {"attention.wq.weight": (4096, 4096), "attention.wk.weight": (1024, 4096),
                   "attention.wv.weight": (1024, 4096), "attention.wo.weight": (4096, 4096),
                   "feed_forward.w1.weight": (14336, 4096), "feed_forward.w2.weight": (4096, 14336),
                   "feed_forward.w3.weight": (14336, 4096), "attention_norm.weight": (4096,),
                   "ffn_norm.weight": (4096,)}
LLAMA32_1B_LAYER = {"attention.wq.weight": (2048, 2048), "attention.wk.weight": (512, 2048),
                    "attention.wv.weight": (512, 2048), "attention.wo.weight": (2048, 2048),
                    "feed_forward.w1.weight": (8192, 2048), "feed_forward.w2.weight": (2048, 8192),
                    "feed_forward.w3.weight": (8192, 2048), "attention_norm.weight": (2048,),
                    "ffn_norm.weight": (2048,)}


@pytest.mark.parametrize("args, layer, globals_", [
    (llama3_8b_args(), LLAMA3_8B_LAYER, {"tok_embeddings.weight": (128256, 4096), "norm.weight": (4096,),
                                         "output.weight": (128256, 4096)}),
    (llama32_1b_args(), LLAMA32_1B_LAYER, {"tok_embeddings.weight": (128256, 2048), "norm.weight": (2048,)}),
], ids=["Meta-Llama-3-8B", "Llama-3.2-1B"])
def test_weight_shapes_are_metas(args, layer, globals_):
    """The shapes of Meta's consolidated.00.pth (8B: 291 tensors; 3.2-1B: 146, tied output)."""
    expected = dict(globals_)
    for i in range(args.n_layers):
        expected.update({f"layers.{i}.{name}": shape for name, shape in layer.items()})
    assert args.weight_shapes() == expected


# --- params.json: every key is read, ignored on purpose, or refused ---------------------------

def edit_params(directory, **changes):
    params = json.loads((directory / "params.json").read_text())
    params.update(changes)
    (directory / "params.json").write_text(json.dumps({k: v for k, v in params.items() if v is not None}))


@pytest.mark.slow
@pytest.mark.parametrize("changes, message", [
    ({"ffn_hidden_dim": 256}, "keys npllama does not know: ffn_hidden_dim"),
    ({"rope_scaling": {"factor": 32}}, "keys npllama does not know: rope_scaling"),
    ({"vision_chunk_size": 560}, "sets vision_chunk_size: it describes a vision model"),
    ({"vision_model": {"cross_attention_adapter": {"num_layers": 8}}}, "a vision model"),
    ({"quantization_args": {"scheme": "int4_weight_int8_dynamic_activation"}}, "a quantized checkpoint"),
    ({"lora_args": {"rank": 16, "scale": 2.0}}, "LoRA adapters"),
    ({"moe_args": {"num_experts": 16}}, "mixture-of-experts"),
    ({"rope_scaling_factor": 32.0, "use_scaled_rope": False}, "rope_scaling_factor 32.0 but not use_scaled_rope"),
    ({"rope_scaling_factor": 32.0, "use_scaled_rope": None}, "rope_scaling_factor 32.0 but not use_scaled_rope"),
])
def test_params_keys_that_would_change_the_model_are_refused(tmp_path, changes, message):
    write_random_checkpoint(tmp_path, tiny_args())
    edit_params(tmp_path, **changes)
    with pytest.raises(npllama.ConfigError, match=message) as e:
        npllama.load(tmp_path)
    assert "params.json" in str(e.value)


@pytest.mark.slow
def test_params_keys_that_do_not_change_the_model_are_accepted(tmp_path):
    write_random_checkpoint(tmp_path, tiny_args())
    reference = npllama.load(tmp_path).forward([1, 2, 3])
    edit_params(tmp_path, max_batch_size=32, vision_chunk_size=-1, vision_max_num_chunks=4,
                vision_num_cross_attention_layers=-1, quantization_args=None, lora_args=None)
    np.testing.assert_array_equal(npllama.load(tmp_path).forward([1, 2, 3]), reference)


@pytest.mark.slow
def test_params_max_seq_len_is_the_default_context(tmp_path):
    write_random_checkpoint(tmp_path, tiny_args())
    assert npllama.load(tmp_path).args.max_seq_len == 8192  # Llama 3's, when the file says nothing
    edit_params(tmp_path, max_seq_len=64)
    model = npllama.load(tmp_path)
    assert model.args.max_seq_len == 64 and model.context_length() == 64
    assert npllama.load(tmp_path, max_seq_len=128).args.max_seq_len == 128  # the caller's wins

"""GGUF files: small ones written here with gguf-py's GGUFWriter (every storage type, every
error), then the real default model, SmolLM2-135M-Instruct (Q4_1), against the torch oracle."""

import copy
import dataclasses
import math
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quantize

import npllama
from npllama.config import RopeScaling
from npllama.errors import CheckpointError, ConfigError, ModelNotFoundError, TokenizerError
from npllama.config import meta_name
from npllama.formats.gguf import GGML_TYPES, QuantizedTensor, dequantize_rows, ggml_type, read_gguf, read_gguf_file
from npllama.formats.shared import LazyRows
from npllama.generate import Sampler
from npllama.model import Llama
from npllama.tokenizer import gpt2_bytes_to_unicode
from oracle.checkpoints import random_state_dict, tiny_args
from oracle.compare import FLOAT32_BOUND, compare_traces, format_table
from oracle.reference import Oracle

DATA = Path(__file__).parent / "data"

# ---- writing small GGUF files -------------------------------------------------------------

BYTE_TOKENS = [gpt2_bytes_to_unicode()[b] for b in range(256)]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "Ġ Ġ"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENS = BYTE_TOKENS + [m.replace(" ", "") for m in MERGES] + SPECIALS
TYPES = [1] * (256 + len(MERGES)) + [3] * len(SPECIALS)
VOCAB = len(TOKENS)  # 265
ARGS = tiny_args(vocab_size=VOCAB, tie_embeddings=False)
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a test.<|im_end|>\n' }}{% endif %}...{% endfor %}")

# Meta name -> llama.cpp name, spelled here independently of npllama.config's table.
GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v", "attention.wo": "attn_output", "ffn_norm": "ffn_norm",
              "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down", "feed_forward.w3": "ffn_up"}


def gguf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{GGUF_NAMES['.'.join(parts[2:-1])]}.weight"
    return f"{GGUF_NAMES[parts[0]]}.weight"


def metadata(args=ARGS, **changes) -> dict:
    md = {
        "llama.block_count": args.n_layers, "llama.context_length": 8192,
        "llama.embedding_length": args.dim, "llama.feed_forward_length": args.hidden_dim,
        "llama.attention.head_count": args.n_heads, "llama.attention.head_count_kv": args.n_kv_heads,
        "llama.rope.freq_base": float(args.rope_theta), "llama.attention.layer_norm_rms_epsilon": args.norm_eps,
        "llama.rope.dimension_count": args.head_dim, "llama.vocab_size": args.vocab_size,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": TOKENS,
        "tokenizer.ggml.token_type": TYPES, "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 263, "tokenizer.ggml.eos_token_id": 264,
        "tokenizer.ggml.add_bos_token": False, "tokenizer.chat_template": TEMPLATE,
    }
    md.update(changes)
    return {k: v for k, v in md.items() if v is not None}


def random_weights(args=ARGS, seed=0) -> dict[str, np.ndarray]:
    return {name: t.numpy() for name, t in random_state_dict(args, seed, torch.float32).items()}


def write_gguf(path, weights, md=None, qtypes=None, arch="llama", extra_tensors=None) -> Path:
    """weights: Meta-named float32 arrays, stored as qtypes[name] (default F32), or uint8 rows
    of blocks already of type qtypes[name] (gguf-py cannot quantize to K-quants)."""
    md = metadata() if md is None else md
    writer = GGUFWriter(str(path), arch)
    for key, value in md.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, w in weights.items():
        qtype = (qtypes or {}).get(name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name(name), w.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name(name), w.astype(np.float16))
        elif qtype == Q.BF16:
            writer.add_tensor(gguf_name(name), w.astype(ml_dtypes.bfloat16).view(np.uint16),
                              raw_shape=w.shape, raw_dtype=Q.BF16)
        else:
            blocks = w if w.dtype == np.uint8 else quantize(w, qtype)
            writer.add_tensor(gguf_name(name), blocks, raw_dtype=qtype)
    for name, w in (extra_tensors or {}).items():
        writer.add_tensor(name, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    writer.close()
    return Path(path)


@pytest.fixture(scope="module")
def weights():
    return random_weights()


@pytest.fixture(scope="module")
def f32_file(weights, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", weights)


TOKENS_IN = [263, 104, 101, 108, 108, 111, 256, 258, 32, 49, 50]


# ---- small files: configuration, storage types, logits -------------------------------------

def test_config_and_tokenizer_from_metadata(f32_file):
    args, _, tok = read_gguf(f32_file)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size) == (64, 2, 8, 2, VOCAB)
    assert args.hidden_dim == ARGS.hidden_dim and args.ffn_hidden_dim == ARGS.hidden_dim
    assert args.rope_theta == ARGS.rope_theta and args.norm_eps == np.float32(ARGS.norm_eps)
    assert not args.tie_embeddings and args.rope_scaling is None
    assert tok.n_words == VOCAB and (tok.bos_id, tok.eos_id, tok.add_bos) == (263, 264, False)
    assert tok.special_tokens == {"<|endoftext|>": 262, "<|im_start|>": 263, "<|im_end|>": 264}
    assert tok.stop_ids == {262, 264}  # eos, and <|endoftext|> as llama.cpp's end-of-generation list
    assert tok.chat_template == TEMPLATE
    assert tok.encode(" the in a") == [258, 32, 259, 260]  # " the", " ", "in", " a"
    assert [tok.piece(i) for i in tok.encode("a  12")] == ["a", "  ", "1", "2"]


@pytest.mark.parametrize("pre, adds_bos", [("llama-bpe", True), ("smollm", False), ("gpt2", False)])
def test_add_bos_defaults_to_llama_cpps_rule(tmp_path, pre, adds_bos):
    """Without tokenizer.ggml.add_bos_token, llama.cpp adds BOS for Llama 3's tokenizer only."""
    path = write_gguf(tmp_path / "no-add-bos.gguf", random_weights(),
                      metadata(**{"tokenizer.ggml.add_bos_token": None, "tokenizer.ggml.pre": pre}))
    _, _, tok = read_gguf(path)
    assert tok.add_bos is adds_bos
    assert (tok.encode("hi")[0] == 263) is adds_bos


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16])
def test_float_tensors_are_zero_copy_views(weights, tmp_path, qtype):
    path = write_gguf(tmp_path / "m.gguf", weights, qtypes={n: qtype for n in weights if n.endswith("wq.weight")})
    _, loaded, _ = read_gguf(path)
    dtype = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: ml_dtypes.bfloat16}[qtype]
    for name, w in weights.items():
        got = loaded[name]
        assert isinstance(got, np.ndarray) and not got.flags.writeable and not got.flags.owndata
        expected = w.astype(dtype) if name.endswith("wq.weight") else w
        assert got.dtype == expected.dtype and got.shape == w.shape  # [out, in], GGUF's ne reversed
        np.testing.assert_array_equal(got, expected)


def test_f32_file_gives_identical_logits(weights, f32_file):
    args, loaded, tok = read_gguf(f32_file)
    # Bit-equal only at one thread count: by default each model follows the machine's load.
    ours = Llama(args, loaded, tok, threads=2).forward(TOKENS_IN)
    reference = Llama(args, weights, threads=2).forward(TOKENS_IN)
    np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_1])
def test_quantized_tensors_decode_lazily_and_exactly(weights, tmp_path, qtype):
    matrices = {n: qtype for n, w in weights.items() if w.ndim == 2}
    path = write_gguf(tmp_path / "q.gguf", weights, qtypes=matrices)
    args, loaded, tok = read_gguf(path)
    decoded = {}
    for name, w in weights.items():
        got = loaded[name]
        if name in matrices:
            assert isinstance(got, QuantizedTensor) and got.shape == w.shape and got.dtype == np.float32
            expected = dequantize(quantize(w, qtype), qtype)
            np.testing.assert_array_equal(np.asarray(got), expected)
            np.testing.assert_array_equal(got[[5, 2, 5]], expected[[5, 2, 5]])  # only those rows
            decoded[name] = expected
        else:
            decoded[name] = got
    # The resident model decodes each matrix once; the streamed one tile by tile, per forward pass.
    # Bit-equal only at one thread count: by default each model follows the machine's load.
    reference = Llama(args, decoded, threads=2).forward(TOKENS_IN)
    np.testing.assert_array_equal(Llama(args, loaded, tok, threads=2).forward(TOKENS_IN), reference)
    streamed = Llama(args, loaded, tok, weights_budget=0)
    assert not streamed.resident
    np.testing.assert_allclose(streamed.forward(TOKENS_IN), reference, rtol=0,
                               atol=FLOAT32_BOUND * np.abs(reference).max())


# Where each type keeps its float16 scales: byte offsets within a block.
FLOAT16_FIELDS = {Q.Q8_0: [0], Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def every_pattern_blocks(qtype, seed=0) -> np.ndarray:
    """2^16 blocks, uint8 [65536, bytes per block]: each float16 scale field takes every one of the
    65536 bit patterns (NaNs with their payloads, infinities, subnormals, -0), every other byte
    (packed scales, quants) every one of the 256 values 256 times, the columns shuffled apart."""
    from gguf import GGML_QUANT_SIZES
    size = GGML_QUANT_SIZES[qtype][1]
    rng = np.random.default_rng(seed)
    blocks = np.empty((1 << 16, size), np.uint8)
    for column in range(size):
        blocks[:, column] = rng.permutation(np.arange(1 << 16) % 256)
    for start in FLOAT16_FIELDS[qtype]:
        blocks[:, start:start + 2] = rng.permutation(1 << 16).astype(np.uint16).view(np.uint8).reshape(-1, 2)
    return blocks


def assert_same_bits(ours: np.ndarray, theirs: np.ndarray) -> None:
    """Equal as float32 bit patterns: NaN payloads and the sign of zero count."""
    assert ours.dtype == theirs.dtype == np.float32 and ours.shape == theirs.shape
    mismatched = np.flatnonzero(ours.view(np.uint32) != theirs.view(np.uint32))
    assert not len(mismatched), (f"{len(mismatched)} values differ, first at flat index {mismatched[0]}: "
                                 f"{ours.flat[mismatched[0]]!r} vs gguf-py's {theirs.flat[mismatched[0]]!r}")


@pytest.mark.slow
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_fast_kernels_equal_gguf_py_bit_for_bit(qtype):
    """On arbitrary bytes: every float16 scale (NaN and inf included), every byte of packed
    scales and quants; as rows, one long row, a single row and a single block."""
    blocks = every_pattern_blocks(qtype)
    ours = ggml_type(qtype)
    with np.errstate(all="ignore"):
        rows = blocks.reshape(256, -1)  # [rows, bytes per row]: 256 blocks a row
        assert_same_bits(dequantize_rows(rows, ours), dequantize(rows, qtype))
        assert_same_bits(dequantize_rows(rows[4], ours), dequantize(rows[4], qtype))
        assert_same_bits(dequantize_rows(rows[4:5], ours), dequantize(rows[4:5], qtype))
        odd = blocks[:4099].reshape(-1)  # one row of 4099 blocks: not a whole number of pieces
        assert_same_bits(dequantize_rows(odd, ours), dequantize(odd, qtype))
        assert_same_bits(dequantize_rows(blocks[7], ours), dequantize(blocks[7], qtype))


def test_type_table_agrees_with_gguf_py():
    from gguf import GGML_QUANT_SIZES
    assert {t.id: (t.name, t.block_size, t.type_size) for t in GGML_TYPES.values()} == \
        {int(q): (q.name, *sizes) for q, sizes in GGML_QUANT_SIZES.items()}


def random_k_quant_blocks(shape: tuple[int, int], qtype, rng) -> np.ndarray:
    """Random blocks of a K-quant whose float16 scales are small and finite, so a model computes
    finite numbers: uint8 [rows, bytes per row]."""
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)
    for start in FLOAT16_FIELDS[qtype]:
        scale = rng.uniform(0.5, 1.0, len(blocks)) / (64 * math.sqrt(shape[1]))
        blocks[:, start:start + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1)


@pytest.mark.slow
def test_gguf_py_is_only_needed_for_other_quant_types(weights, tmp_path):
    """The default model's types (F32, Q4_1, Q8_0) and those of Q4_K_M and Q5_K_M files (Q4_K,
    Q5_K, Q6_K) load without gguf-py, giving gguf-py's numbers; others say what to install."""
    import subprocess
    import sys
    q4 = write_gguf(tmp_path / "q4.gguf", weights, qtypes={n: Q.Q4_1 for n, w in weights.items() if w.ndim == 2})
    q5 = write_gguf(tmp_path / "q5.gguf", weights, qtypes={"layers.1.feed_forward.w2.weight": Q.Q5_0})
    # K-quant rows hold 256 values: a model whose every matrix row is a multiple of 256 long.
    args = dataclasses.replace(ARGS, dim=256, multiple_of=256)
    rng = np.random.default_rng(0)
    k_types = [Q.Q4_K, Q.Q5_K, Q.Q6_K]
    k_weights, k_qtypes = {}, {}
    for i, (name, w) in enumerate(random_weights(args).items()):
        if w.ndim == 2:
            k_qtypes[name] = k_types[i % 3]
            w = random_k_quant_blocks(w.shape, k_qtypes[name], rng)
        k_weights[name] = w
    assert set(k_qtypes.values()) == set(k_types)
    kq = write_gguf(tmp_path / "kq.gguf", k_weights, metadata(args), qtypes=k_qtypes)
    code = ("import sys; sys.modules['gguf'] = None; import numpy as np; import npllama; "
            "m = npllama.load(sys.argv[1]); print(m.forward([1, 2, 3]).shape); "
            "np.save(sys.argv[4], npllama.load(sys.argv[3], threads=2).forward([1, 2, 3])); npllama.load(sys.argv[2])")
    run = subprocess.run([sys.executable, "-c", code, str(q4), str(q5), str(kq), str(tmp_path / "kq.npy")],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert run.stdout == f"(3, {VOCAB})\n"
    assert "tensor blk.1.ffn_down.weight: decoding Q5_0 tensors needs gguf-py: pip install gguf" in run.stderr
    decoded = {name: dequantize(w, k_qtypes[name]) if name in k_qtypes else w
               for name, w in k_weights.items()}
    # Bit-equal only at one thread count (2, as in the subprocess): by default each follows the machine's load.
    reference = Llama(read_gguf(kq)[0], decoded, threads=2).forward([1, 2, 3])
    assert np.isfinite(reference).all()
    np.testing.assert_array_equal(np.load(tmp_path / "kq.npy"), reference)


def test_lazy_rows_index_like_an_array():
    class Doubled(LazyRows):
        def __init__(self, a):
            super().__init__(a.shape, a.dtype)
            self.a = a

        def rows(self, index):
            return self.a[index] * 2

    a = np.arange(24, dtype=np.float32).reshape(6, 4)
    t = Doubled(a)
    assert (t.shape, t.ndim, t.size, len(t), t.dtype) == ((6, 4), 2, 24, 6, np.float32)
    for index in [3, -1, slice(1, 4), [4, 0, 4], np.array([2, 5]), (2, 1), (slice(None, 2), slice(1, 3)),
                  (np.array([1, 3]), 0), ..., (..., 2)]:
        np.testing.assert_array_equal(t[index], (a * 2)[index])
    np.testing.assert_array_equal(np.ascontiguousarray(t, dtype=np.float64), a * 2)
    assert t.astype(np.float16).dtype == np.float16


def test_header_parser_agrees_with_gguf_reader(weights, tmp_path):
    path = write_gguf(tmp_path / "m.gguf", weights, qtypes={"layers.0.attention.wq.weight": Q.Q8_0},
                      md=metadata(**{"test.int8s": [-3, 4], "test.floats": [1.5, -2.0], "test.u64": 7,
                                     "test.bool": True}))
    ours, reader = read_gguf_file(path), GGUFReader(path)
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected = field.contents()
        assert ours.metadata[key] == (pytest.approx(expected) if key == "test.floats" else expected), key
    assert set(ours.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        info = ours.tensors[t.name]
        assert info.qtype.id == t.tensor_type and info.shape == tuple(reversed([int(d) for d in t.shape]))
        np.testing.assert_array_equal(ours.array(info).view(np.uint8).ravel(), t.data.view(np.uint8).ravel())


def test_tied_embeddings_and_llama31_rope_freqs(tmp_path):
    """Llama 3.2 has no output tensor; llama.cpp writes Llama 3.1's RoPE scaling as rope_freqs."""
    args = tiny_args(vocab_size=VOCAB, tie_embeddings=True, rope_scaling=RopeScaling(factor=32.0),
                     dim=128, n_heads=2, n_kv_heads=1)
    w = random_weights(args)
    # convert_hf_to_gguf.py's rope_factors for rope_type llama3
    base_freqs = 1.0 / (args.rope_theta ** (np.arange(0, args.head_dim, 2, dtype=np.float32) / args.head_dim))
    s = args.rope_scaling
    factors = []
    for freq in base_freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < s.original_max_seq_len / s.high_freq_factor:
            factors.append(1.0)
        elif wavelen > s.original_max_seq_len / s.low_freq_factor:
            factors.append(s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            factors.append(1 / ((1 - smooth) / s.factor + smooth))
    rope_freqs = {"rope_freqs.weight": np.array(factors, np.float32)}
    path = write_gguf(tmp_path / "m.gguf", w, metadata(args), extra_tensors=rope_freqs)
    got, loaded, _ = read_gguf(path)
    assert got.tie_embeddings and "output.weight" not in loaded
    assert got.rope_scaling == RopeScaling(factor=32.0)
    rope_freqs["rope_freqs.weight"][3] *= 1.5
    write_gguf(path, w, metadata(args), extra_tensors=rope_freqs)
    with pytest.raises(ConfigError, match="rope_freqs.weight holds RoPE divisors that are not Llama 3.1's"):
        read_gguf(path)


def test_load_dispatches_on_gguf(f32_file, tmp_path):
    model = npllama.load(f32_file, max_seq_len=64)
    assert model.args.max_seq_len == 64 and model.tokenizer.n_words == VOCAB
    renamed = tmp_path / "model.bin"  # recognised by its magic, whatever its name
    renamed.write_bytes(f32_file.read_bytes())
    assert npllama.load(renamed).args.dim == 64
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x.gguf").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"holding x.gguf: npllama expected .* pass .*x.gguf"):
        npllama.load(tmp_path / "dir")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelNotFoundError, match=r"notes.txt is a file that is not GGUF \(it starts with b'hell'\)"):
        npllama.load(tmp_path / "notes.txt")


# ---- small files: errors ------------------------------------------------------------------

@pytest.mark.parametrize("changes, error, message", [
    ({"llama.block_count": None}, ConfigError, "has no metadata key llama.block_count"),
    ({"llama.attention.layer_norm_rms_epsilon": "1e-5"}, ConfigError,
     "metadata llama.attention.layer_norm_rms_epsilon is '1e-5'; expected a int or float"),
    ({"llama.feed_forward_length": 100}, CheckpointError,
     r"layers.0.feed_forward.w1.weight has shape \(224, 64\) but its GGUF metadata implies \(100, 64\)"),
    ({"llama.block_count": 3}, CheckpointError, "has no layers.2.attention.wq.weight"),
    ({"llama.vocab_size": 999}, ConfigError, "llama.vocab_size is 999 but token_embd.weight has 265 rows"),
    ({"llama.rope.dimension_count": 4}, ConfigError, "llama.rope.dimension_count is 4 but"),
    ({"llama.expert_count": 8}, ConfigError, "mixture-of-experts"),
    ({"llama.rope.scaling.type": "yarn"}, ConfigError, "RoPE scaling yarn is not supported"),
    ({"tokenizer.ggml.pre": "qwen2"}, TokenizerError,
     "pre-tokenizer 'qwen2' is not supported; npllama knows llama-bpe, smollm, gpt2"),
    ({"tokenizer.ggml.model": "llama"}, TokenizerError, r"the tokenizer is SentencePiece \(Llama 1/2\)"),
    ({"tokenizer.ggml.eos_token_id": None}, TokenizerError, "has no tokenizer.ggml.eos_token_id"),
    ({"tokenizer.ggml.bos_token_id": 5000}, TokenizerError, "bos_token_id is 5000, outside the 265-token vocabulary"),
    ({"tokenizer.ggml.merges": ["h e", "Ġ t"]}, TokenizerError, r"merge 1 \('Ġ t'\) makes token id 256, lower than"),
    ({"tokenizer.ggml.tokens": TOKENS[:100] + ["not byte-level"] + TOKENS[101:]}, TokenizerError,
     r"token 100 \('not byte-level'\) is not a byte-level BPE token"),
])
def test_metadata_errors_name_the_key(weights, tmp_path, changes, error, message):
    path = write_gguf(tmp_path / "bad.gguf", weights, metadata(**changes))
    with pytest.raises(error, match=message) as e:
        read_gguf(path)
    assert "bad.gguf" in str(e.value)


def test_other_architectures_and_tensors_refused(weights, tmp_path):
    with pytest.raises(ConfigError, match="general.architecture is 'qwen2'; npllama runs Llama models"):
        read_gguf(write_gguf(tmp_path / "a.gguf", weights, arch="qwen2"))
    extra = {"blk.0.attn_q.bias": np.zeros(64, np.float32)}
    with pytest.raises(CheckpointError, match="holds tensor blk.0.attn_q.bias, which a Llama model does not have"):
        read_gguf(write_gguf(tmp_path / "b.gguf", weights, extra_tensors=extra))


def test_truncated_and_foreign_files(f32_file, tmp_path):
    data = f32_file.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated: tensor blk.1.ffn_up.weight ends \d+ "
                                              "bytes past the end of the file; download it again"):
        read_gguf(path)
    path.write_bytes(data[:3000])  # inside the vocabulary
    with pytest.raises(CheckpointError, match=r"cut.gguf is truncated: it ends inside tokenizer.ggml.tokens"):
        read_gguf(path)
    path.write_bytes(data[:10])
    with pytest.raises(CheckpointError, match="too short for a GGUF header"):
        read_gguf(path)
    path.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(CheckpointError, match=r"is not a GGUF file \(it starts with b'PK"):
        read_gguf(path)
    path.write_bytes(data[:4] + (1).to_bytes(4, "little") + data[8:])
    with pytest.raises(CheckpointError, match="GGUF version 1, npllama reads versions 2 and 3"):
        read_gguf(path)
    path.write_bytes(data[:4] + (3).to_bytes(4, "big") + data[8:])
    with pytest.raises(CheckpointError, match="looks big-endian"):
        read_gguf(path)
    with pytest.raises(ModelNotFoundError, match="nope.gguf not found"):
        read_gguf(tmp_path / "nope.gguf")


def test_meta_names():
    for name in ARGS.weight_shapes():
        assert meta_name(gguf_name(name), "gguf") == name
    assert meta_name("blk.12.ffn_gate.weight", "gguf") == "layers.12.feed_forward.w1.weight"
    for other in ("blk.0.attn_q.bias", "blk.x.attn_q.weight", "blk.1.attn_q.weight.x", "rope_freqs.weight"):
        assert meta_name(other, "gguf") is None


# ---- SmolLM2-135M-Instruct ----------------------------------------------------------------

PASSAGE = (DATA / "passage.txt").read_text()
# Layers whose every intermediate is compared with the oracle (with embedding, norm, logits).
COMPARED_LAYERS = (0, 29)


@pytest.fixture(scope="module")
def smollm2(default_model_path):
    return npllama.load(default_model_path, max_seq_len=512)


class SomeLayers(dict):
    """A trace that keeps only the compared layers (a whole trace of 30 layers is ~400 MB)."""

    def __setitem__(self, name, value):
        if not name.startswith("layers.") or int(name.split(".")[1]) in COMPARED_LAYERS:
            super().__setitem__(name, value)


def perplexity(logits: np.ndarray, tokens: list[int]) -> float:
    z = logits[:-1].astype(np.float64)  # position t predicts token t+1
    log_norm = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return float(np.exp(np.mean(log_norm - z[np.arange(len(z)), tokens[1:]])))


@pytest.fixture(scope="module")
def passage_run(smollm2):
    """The passage through npllama and through the oracle (built from the same dequantized
    float32 weights), each with a trace of the compared layers."""
    tokens = smollm2.tokenizer.encode(PASSAGE)
    ours, theirs = SomeLayers(), SomeLayers()
    logits = smollm2.forward(tokens, trace=ours)
    state = {name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in smollm2.weights.items()}
    oracle = Oracle(smollm2.args, state, torch.float32, max_seq_len=len(tokens))
    oracle_logits = oracle.forward(tokens, trace=theirs)
    return tokens, logits, oracle_logits, ours, theirs


def test_smollm2_metadata(smollm2):
    a = smollm2.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.vocab_size, a.hidden_dim) == (576, 30, 9, 3, 49152, 1536)
    assert a.rope_theta == 100000.0 and a.tie_embeddings and a.rope_scaling is None
    assert smollm2.weights.qtypes() == {"Q8_0": 1, "F32": 61, "Q4_1": 210}


def test_smollm2_knows_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    prompt = tok.encode("The capital of France is")
    out = list(smollm2.generate(prompt, 8, Sampler(temperature=0)))
    assert "Paris" in tok.decode(out), tok.decode(out)


@pytest.mark.slow
def test_smollm2_perplexity_matches_oracle(passage_run):
    tokens, logits, oracle_logits, _, _ = passage_run
    ours, theirs = perplexity(logits, tokens), perplexity(oracle_logits, tokens)
    print(f"\nSmolLM2-135M-Instruct Q4_1 perplexity on tests/data/passage.txt ({len(tokens)} tokens): "
          f"npllama {ours:.6f}, oracle {theirs:.6f}")
    assert 150 <= len(tokens) <= 300
    assert abs(ours - theirs) <= 1e-4 * theirs
    assert ours < 15  # English the model reads well (8.07 when this test was written)


def test_smollm2_first_and_last_layer_match_oracle(passage_run):
    _, _, _, ours, theirs = passage_run
    rows = compare_traces(ours, theirs, FLOAT32_BOUND)
    print("\n" + format_table(rows))
    assert {r.name.split(".")[1] for r in rows if r.name.startswith("layers.")} == {str(i) for i in COMPARED_LAYERS}
    assert all(r.ok for r in rows), format_table([r for r in rows if not r.ok])


def test_gguf_qk_rows_are_meta_layout(smollm2, passage_run):
    """llama.cpp's converter undoes HF's q/k permutation: the rows as stored give a low perplexity,
    the same rows with HF's permutation undone once more a far higher one."""
    from npllama.formats.hf import meta_rows_of_hf
    tokens, logits, *_ = passage_run
    a = smollm2.args
    permuted = copy.copy(smollm2)
    permuted.layers = []
    for layer in smollm2.layers:  # q|k|v restacked: the engine multiplies the stacked rows
        wq = layer.wq[meta_rows_of_hf(a.dim, a.n_heads)]
        wk = layer.wk[meta_rows_of_hf(a.n_kv_heads * a.head_dim, a.n_kv_heads)]
        permuted.layers.append(dataclasses.replace(layer, wq=wq, wk=wk, wqkv=np.concatenate([wq, wk, layer.wv])))
    short = tokens[:96]
    as_stored, hf_undone = perplexity(logits[:96], short), perplexity(permuted.forward(short), short)
    print(f"\nperplexity of the passage's first 96 tokens: q/k as stored {as_stored:.2f}, "
          f"with HF's permutation undone {hf_undone:.2f}")
    assert hf_undone > 4 * as_stored


# ---- SmolLM2's tokenizer --------------------------------------------------------------------

TOKENIZER_TEXTS = [
    PASSAGE,
    "Le cœur a ses raisons que la raison ne connaît point. Größe: 3½ Zoll. Быстрая лиса. 東京は日本の首都です。"
    "北京是中国的首都。서울은 수도입니다. مرحبا بالعالم ١٢٣ नमस्ते Ελληνικά 🦙👍🏽 👨‍👩‍👧",
    "def f(x: int) -> int:\n    return x**2 + 3*x - 1  # comment\n\tfor (i = 0; i < n; ++i) { a[i] = b[i]; }\n",
    "a  1, a   22, x \t 3, end 9   \n\n\n  12345 3.14159 1,000,000 0xDEADBEEF 1e-10 ² ① ٣",
    "I'm you're he's don't IT'S O'Neil 'quoted' rock'n'roll",
    "  leading, trailing   \r\n\r\nCRLF lines\u00a0nbsp\u2028sep",
]


def test_smollm2_tokenizer_round_trips(smollm2):
    tok = smollm2.tokenizer
    for text in TOKENIZER_TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_smollm2_digits_are_single_tokens(smollm2):
    tok = smollm2.tokenizer
    assert [tok.piece(i) for i in tok.encode("12345")] == ["1", "2", "3", "4", "5"]
    assert [tok.piece(i) for i in tok.encode("a  1")] == ["a", "  ", "1"]
    assert [tok.piece(i) for i in tok.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


def test_smollm2_unrepresentable_byte_is_a_clear_error(smollm2):
    tok = smollm2.tokenizer
    with pytest.raises(TokenizerError, match=r"text\[3\] = '\\x04' \(U\+0004\): its UTF-8 byte 0x04 has no token "
                                             r"in .*lacks 21 of the 256 bytes .*text.replace\('\\x04', ' '\)"):
        tok.encode("abc\x04def")


def test_smollm2_ids_equal_hugging_face_tokenizers(smollm2, default_model_path):
    """The same vocabulary and merges run by Hugging Face's `tokenizers` with SmolLM2's
    tokenizer.json pre-tokenizer (Digits(individual_digits) then ByteLevel)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers
    file = read_gguf_file(default_model_path)
    tokens, merges = file.metadata["tokenizer.ggml.tokens"], file.metadata["tokenizer.ggml.merges"]
    library = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                              [tuple(m.split(" ")) for m in merges]))
    library.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    library.decoder = decoders.ByteLevel()
    tok = smollm2.tokenizer
    for text in TOKENIZER_TEXTS:
        for piece in [text, *text.split("\n")]:
            assert tok.encode(piece) == library.encode(piece).ids, piece


def test_smollm2_chat_prompt_is_the_templates(smollm2):
    """ChatML with the template's default system message, token for token what the Jinja
    template renders (rendered here with jinja2, which npllama itself does not use)."""
    jinja2 = pytest.importorskip("jinja2")
    from npllama.chat import ChatML, chat_format_for
    tok = smollm2.tokenizer
    fmt = chat_format_for(tok)
    assert isinstance(fmt, ChatML)
    assert fmt.default_system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    messages = [{"role": "user", "content": "What is 2+2?"}]
    rendered = jinja2.Template(tok.chat_template).render(messages=messages, add_generation_prompt=True)
    assert fmt.encode_dialog(messages) == tok.encode(rendered, allow_special=True)
    assert fmt.stop_ids >= {tok.id_of("<|im_end|>")}

"""Checkpoints written for tests, fuzzing and benchmarks: random Llama 3 weights in Meta's exact
on-disk format, and tiny valid models of every format npllama reads.

`write_random_checkpoint(dir, args)` writes what Meta ships in a model directory:
params.json, consolidated.00.pth (a torch.save'd dict of bf16 tensors with Meta's
names) and tokenizer.model (the real Llama 3 one, from the `llama-models` wheel).
Any shape works, from a 2-layer toy up to the full Meta-Llama-3-8B. `write_shards` splits a
state dict the way Meta saves a model-parallel checkpoint (consolidated.00.pth, .01, ...).
`tiny_model_files(format)` gives the files of a tiny valid Meta, GGUF or Hugging Face model (a
256-byte vocabulary, dim 16): the seeds that tests/fuzz.py mutates and tests/test_hostile.py edits.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import tempfile
import zipfile
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from npllama.config import ModelArgs, RopeScaling, layer_name, split_layer_name
from npllama.formats.meta import params_json
from npllama.tokenizer import gpt2_bytes_to_unicode

LLAMA3_VOCAB_SIZE = 128256  # 128000 BPE ranks + 256 special tokens


def llama3_tokenizer_path() -> Path:
    """Meta's Llama 3 tokenizer.model, as shipped inside the `llama-models` wheel."""
    return Path(str(resources.files("llama_models") / "llama3" / "tokenizer.model"))


def tiny_args(**overrides) -> ModelArgs:
    """A small Llama 3: real vocabulary, 4:1 GQA, Llama 3's theta and eps."""
    base = dict(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=LLAMA3_VOCAB_SIZE,
                multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)
    base.update(overrides)
    return ModelArgs(**base)


def llama3_8b_args() -> ModelArgs:
    """Meta-Llama-3-8B's params.json."""
    return ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=LLAMA3_VOCAB_SIZE,
                     multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0)


def llama32_1b_args() -> ModelArgs:
    """Llama-3.2-1B's params.json (tied embeddings, scaled RoPE)."""
    from npllama.config import RopeScaling
    return ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=LLAMA3_VOCAB_SIZE,
                     multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True)


def random_state_dict(args: ModelArgs, seed: int = 0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Meta-named tensors with activations of sensible size: each linear layer ~N(0, 1/fan_in),
    so the residual stream neither explodes nor vanishes and softmax is not saturated."""
    gen = torch.Generator().manual_seed(seed)
    return {name: random_values(name, shape, shape, gen).to(dtype)
            for name, shape in args.weight_shapes().items()}


def random_values(name: str, size, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """`size` random values for (a part of) tensor `name` of full shape `shape`: norms near 1,
    embeddings N(0, 1), linear layers N(0, 1/fan_in)."""
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * torch.randn(size, generator=gen)
    if name == "tok_embeddings.weight":
        return torch.randn(size, generator=gen)
    return torch.randn(size, generator=gen) / shape[1] ** 0.5


def write_random_checkpoint(directory: str | Path, args: ModelArgs, seed: int = 0,
                            dtype=torch.bfloat16) -> Path:
    """Write params.json, consolidated.00.pth and tokenizer.model into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params_json(args), indent=2))
    torch.save(random_state_dict(args, seed, dtype), directory / "consolidated.00.pth")
    shutil.copyfile(llama3_tokenizer_path(), directory / "tokenizer.model")
    return directory


# Meta's model-parallel split (fairscale's column- and row-parallel layers), restated here so the
# tests of npllama's shard reader do not trust the table it reads from.
SPLIT_ON_AXIS_0 = ("wq", "wk", "wv", "w1", "w3", "output", "tok_embeddings")
SPLIT_ON_AXIS_1 = ("wo", "w2")


def write_shards(directory: Path, state: dict[str, torch.Tensor], n: int) -> Path:
    """`state` as Meta saves an n-way model-parallel checkpoint: consolidated.00.pth .. {n-1:02d}."""
    shards = [{} for _ in range(n)]
    for name, t in state.items():
        module = name.split(".")[-2]
        if module in SPLIT_ON_AXIS_0 or module in SPLIT_ON_AXIS_1:
            parts = t.chunk(n, dim=0 if module in SPLIT_ON_AXIS_0 else 1)
        else:
            parts = [t] * n
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()  # compact, as Meta's files are
    directory.mkdir(exist_ok=True)
    for i, shard in enumerate(shards):
        torch.save(shard, directory / f"consolidated.{i:02d}.pth")
    return directory


def write_torch_zip(path: Path, data_pkl: bytes) -> Path:
    """A torch-format archive around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", b"little")
        z.writestr("archive/version", b"3\n")
    return path


# --- Tiny valid models of every format ------------------------------------------------------------
# Each holds every optional setting npllama reads (scaled RoPE, a context length, a chat template,
# head_dim...), so that a test or a fuzzer editing one reaches the check behind it.

# A byte-level vocabulary: the 256 single bytes, then tokens merged from two earlier ones.
TINY_MERGES = [(b" ", b"t"), (b"h", b"e"), (b" t", b"he"), (b"i", b"n"), (b" ", b"a"), (b" ", b" ")]
TINY_RANKS = [bytes([b]) for b in range(256)] + [a + b for a, b in TINY_MERGES]
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # GGUF's and HF's, after the ranks
# What npllama.load is given: the directory ("") or this file in it.
TINY_ENTRY = {"meta": "", "gguf": "model.gguf", "hf": "", "hf-sharded": ""}
TINY_FORMATS = {"meta": "meta", "gguf": "gguf", "hf": "hf", "hf-sharded": "hf"}


def tiny_model_args(vocab_size: int) -> ModelArgs:
    """Two layers with 2:1 GQA, small enough that headers are a fair share of every file."""
    return ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                     norm_eps=1e-5, rope_theta=500000.0, multiple_of=16)


def _tiny_weights(args: ModelArgs) -> dict[str, np.ndarray]:
    """Meta-named float32 weights: norms near 1, matrices N(0, 1/fan_in)."""
    rng = np.random.default_rng(0)
    return {name: (1 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
                   else rng.standard_normal(shape) / shape[1] ** 0.5).astype(np.float32)
            for name, shape in args.weight_shapes().items()}


def _stored_name(meta: str, fmt: str) -> str:
    """A weight's name in format `fmt` ("gguf", "hf"), from npllama's table."""
    i, tensor = split_layer_name(meta)
    return getattr(tensor, fmt) if i is None else layer_name(getattr(tensor, fmt), i, fmt)


def _byte_level(token: bytes) -> str:
    table = gpt2_bytes_to_unicode()
    return "".join(table[b] for b in token)


def tiny_model_files(name: str) -> dict[str, bytes]:
    """File name -> bytes of a tiny valid model: "meta", "gguf", "hf" or "hf-sharded"."""
    return {"meta": _tiny_meta, "gguf": _tiny_gguf, "hf": _tiny_hf, "hf-sharded": _tiny_hf_sharded}[name]()


def write_model_files(directory: Path, files: dict[str, bytes]) -> Path:
    """The files into `directory`; returns what npllama.load takes (the directory or the .gguf)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory / "model.gguf" if "model.gguf" in files else directory


def _tiny_meta() -> dict[str, bytes]:
    # Llama 3's tokenizer.model holds BPE ranks only; npllama adds 256 special tokens after them.
    args = replace(tiny_model_args(len(TINY_RANKS) + 256), rope_scaling=RopeScaling(factor=16.0))
    params = {**params_json(args), "max_seq_len": 64}
    pth = io.BytesIO()
    torch.save({n: torch.from_numpy(w).to(torch.bfloat16) for n, w in _tiny_weights(args).items()}, pth)
    ranks = b"".join(base64.b64encode(t) + b" %d\n" % rank for rank, t in enumerate(TINY_RANKS))
    return {"params.json": json.dumps(params).encode(), "consolidated.00.pth": pth.getvalue(),
            "tokenizer.model": ranks}


def tiny_gguf_metadata(args: ModelArgs) -> dict:
    """The GGUF keys of the tiny model (gguf-py's writer adds general.architecture)."""
    n = len(TINY_RANKS)
    return {"llama.block_count": args.n_layers, "llama.context_length": 64,
            "llama.embedding_length": args.dim, "llama.feed_forward_length": args.hidden_dim,
            "llama.attention.head_count": args.n_heads, "llama.attention.head_count_kv": args.n_kv_heads,
            "llama.rope.freq_base": float(args.rope_theta),
            "llama.attention.layer_norm_rms_epsilon": float(args.norm_eps),
            "llama.rope.dimension_count": args.head_dim, "llama.vocab_size": args.vocab_size,
            "llama.rope.scaling.original_context_length": TINY_GGUF_SCALING.original_max_seq_len,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": [_byte_level(t) for t in TINY_RANKS] + TINY_SPECIALS,
            "tokenizer.ggml.token_type": [1] * n + [3] * len(TINY_SPECIALS),  # normal, then control
            "tokenizer.ggml.merges": [f"{_byte_level(a)} {_byte_level(b)}" for a, b in TINY_MERGES],
            "tokenizer.ggml.bos_token_id": n + 1, "tokenizer.ggml.eos_token_id": n + 2,
            "tokenizer.ggml.eot_token_id": n + 2, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{{ messages }}"}


TINY_GGUF_SCALING = RopeScaling(factor=8.0, original_max_seq_len=512)


def write_gguf_file(path: Path, metadata: dict, tensors: dict[str, np.ndarray], qtype=None) -> Path:
    """A GGUF file of these metadata (typed by their Python type: bool, int as uint32, float as
    float32, str, list) and float32 tensors named as llama.cpp names them; matrices whose rows
    are whole blocks of `qtype` (a gguf.GGMLQuantizationType) are stored quantized."""
    from gguf import GGML_QUANT_SIZES, GGUFWriter
    from gguf.quants import quantize
    writer = GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        add = {bool: writer.add_bool, int: writer.add_uint32, float: writer.add_float32,
               str: writer.add_string}.get(type(value), writer.add_array)
        add(key, value)
    block = GGML_QUANT_SIZES[qtype][0] if qtype is not None else None
    for name, w in tensors.items():
        if block and w.ndim == 2 and w.shape[1] % block == 0:
            writer.add_tensor(name, quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(path: Path, args: ModelArgs | None = None, qtype=None) -> Path:
    """The tiny GGUF model (tiny_model_files("gguf")), of other sizes or with quantized matrices."""
    args = args or tiny_model_args(len(TINY_RANKS) + len(TINY_SPECIALS))
    tensors = {_stored_name(n, "gguf"): w for n, w in _tiny_weights(args).items()}
    return write_gguf_file(path, tiny_gguf_metadata(args), tensors, qtype)


def _tiny_gguf() -> dict[str, bytes]:
    from npllama.formats.gguf import ROPE_FREQS
    from npllama.layers import rope_frequencies
    args = tiny_model_args(len(TINY_RANKS) + len(TINY_SPECIALS))
    tensors = {_stored_name(n, "gguf"): w for n, w in _tiny_weights(args).items()}
    # Llama 3.1's RoPE scaling, as llama.cpp writes it: the divisor of each frequency.
    tensors[ROPE_FREQS] = (rope_frequencies(args.head_dim, args.rope_theta)
                           / rope_frequencies(args.head_dim, args.rope_theta, TINY_GGUF_SCALING))
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gguf_file(Path(tmp) / "model.gguf", tiny_gguf_metadata(args), tensors)
        return {"model.gguf": path.read_bytes()}


def _tiny_hf_common(args: ModelArgs) -> dict[str, bytes]:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
              "intermediate_size": args.hidden_dim, "rms_norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "vocab_size": args.vocab_size, "max_position_embeddings": 64,
              "tie_word_embeddings": False, "torch_dtype": "float16", "head_dim": args.head_dim,
              "attention_bias": False, "mlp_bias": False,
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    n = len(TINY_RANKS)
    tokenizer = {
        "version": "1.0", "normalizer": None, "post_processor": None, "decoder": {"type": "ByteLevel"},
        "added_tokens": [{"id": n + i, "content": s, "special": True} for i, s in enumerate(TINY_SPECIALS)],
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        "model": {"type": "BPE", "byte_fallback": False,
                  "vocab": {_byte_level(t): i for i, t in enumerate(TINY_RANKS)},
                  "merges": [f"{_byte_level(a)} {_byte_level(b)}" for a, b in TINY_MERGES]}}
    files = {"config.json": config, "tokenizer.json": tokenizer,
             "tokenizer_config.json": {"bos_token": TINY_SPECIALS[1], "eos_token": TINY_SPECIALS[2],
                                       "add_bos_token": False, "chat_template": "{{ messages }}"},
             "generation_config.json": {"eos_token_id": [n, n + 2]}}
    return {name: json.dumps(doc).encode() for name, doc in files.items()}


def _tiny_hf_tensors(args: ModelArgs) -> dict[str, np.ndarray]:
    return {_stored_name(n, "hf"): w.astype(np.float16) for n, w in _tiny_weights(args).items()}


def _tiny_hf() -> dict[str, bytes]:
    from safetensors.numpy import save
    args = tiny_model_args(len(TINY_RANKS) + len(TINY_SPECIALS))
    return {**_tiny_hf_common(args), "model.safetensors": save(_tiny_hf_tensors(args))}


def _tiny_hf_sharded() -> dict[str, bytes]:
    from safetensors.numpy import save
    args = tiny_model_args(len(TINY_RANKS) + len(TINY_SPECIALS))
    tensors = _tiny_hf_tensors(args)
    names = sorted(tensors)
    shards = {f"model-{i + 1:05d}-of-00002.safetensors": names[i::2] for i in range(2)}
    index = {"metadata": {}, "weight_map": {n: file for file, part in shards.items() for n in part}}
    return {**_tiny_hf_common(args), "model.safetensors.index.json": json.dumps(index).encode(),
            **{file: save({n: tensors[n] for n in part}) for file, part in shards.items()}}

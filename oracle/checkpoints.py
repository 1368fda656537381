"""Checkpoints written for tests, fuzzing and benchmarks: random Llama 3 weights in Meta's exact
on-disk format, and tiny valid models of every format npllama reads.

`write_random_checkpoint(dir, args)` writes what Meta ships in a model directory:
params.json, consolidated.00.pth (a torch.save'd dict of bf16 tensors with Meta's
names) and tokenizer.model (the real Llama 3 one, from the `llama-models` wheel).
Any shape works, from a 2-layer toy up to the full Meta-Llama-3-8B, and `write_q4_k_m(path,
args)` writes the same shape as a GGUF of Q4_K_M's block types; neither holds the model in RAM.
`write_shards` splits a state dict the way Meta saves a model-parallel checkpoint
(consolidated.00.pth, .01, ...).
`tiny_model_files(format)` gives the files of a tiny valid Meta, GGUF or Hugging Face model (a
256-byte vocabulary, dim 16): the seeds that tests/fuzz.py mutates and tests/test_hostile.py edits.
"""

from __future__ import annotations

import base64
import io
import json
import math
import shutil
import tempfile
import zipfile
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch

from npllama.config import OUTPUT, ModelArgs, RopeScaling, layer_name, split_layer_name
from npllama.formats.meta import params_json, read_bpe_ranks
from npllama.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, gpt2_bytes_to_unicode, llama3_special_tokens

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
                            dtype=torch.bfloat16, chunk: int = 1 << 24) -> Path:
    """Write params.json, consolidated.00.pth and tokenizer.model into `directory`, the weights
    random_state_dict's (drawn `chunk` values at a time beyond that size) without holding the model
    in RAM (the 8B's is 16 GB): each tensor drawn into a file of its own, then the files mapped
    (torch.from_file) for torch.save to copy into the archive. RAM peaks at one chunk."""
    directory = Path(directory)
    tmp = directory / "tensors.tmp"
    tmp.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(params_json(args), indent=2))
    gen, state = torch.Generator().manual_seed(seed), {}
    for i, (name, shape) in enumerate(args.weight_shapes().items()):
        n = math.prod(shape)
        with open(tmp / f"{i}.bin", "wb") as f:
            for start in range(0, n, chunk):
                f.write(random_values(name, min(chunk, n - start), shape, gen).to(dtype).view(torch.uint8).numpy())
        state[name] = torch.from_file(str(tmp / f"{i}.bin"), shared=True, size=n, dtype=dtype).view(shape)
    torch.save(state, directory / "consolidated.00.pth")
    shutil.rmtree(tmp)
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


# --- A Q4_K_M GGUF of random blocks -------------------------------------------------------------

def q4_k_m_type(name: str, n_layers: int) -> str:
    """The ggml type llama.cpp's Q4_K_M gives tensor `name` (llama_tensor_get_type): Q6_K for the output
    and for wv and w2 in the first and last eighth of the layers and every third between, Q4_K for
    the other matrices, F32 for norms. For Llama 3 8B: 193 Q4_K, 33 Q6_K, 65 F32, as the real file."""
    i, tensor = split_layer_name(name)
    if len(tensor.shape) == 1:
        return "F32"
    more_bits = i is not None and (i < n_layers // 8 or i >= 7 * n_layers // 8 or (i - n_layers // 8) % 3 == 2)
    return "Q6_K" if tensor is OUTPUT or (tensor.key in ("wv", "w2") and more_bits) else "Q4_K"


# Root mean square of value / d over random blocks. Q4_K: value = d*sc*q - dmin*m, dmin = 7.5 d centres
# it: sqrt(Var(sc*q) + 7.5^2 Var(m)) = sqrt(47532 + 56.25 * 341.25). Q6_K: value = d*sc*(q - 32), sc
# int8: sqrt(E[sc^2] E[(q - 32)^2]) = sqrt(5461.5 * 341.5).
RMS_OVER_D = {"Q4_K": 258.3, "Q6_K": 1365.7}


def random_k_blocks(qtype: str, shape: tuple[int, int], std: float, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a K-quant matrix, uint8 [rows, bytes per row]: random bytes, each block's
    float16 d drawn so that the values have about this standard deviation, small and finite."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block, size), dtype=np.uint8)  # [blocks, bytes]
    d = std / RMS_OVER_D[qtype] * rng.uniform(0.5, 1.5, len(blocks))  # [blocks]
    if qtype == "Q4_K":  # d, dmin, then scales and quants
        blocks[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        blocks[:, 2:4] = (7.5 * d).astype(np.float16).view(np.uint8).reshape(-1, 2)
    else:  # Q6_K: quants and scales, then d
        blocks[:, size - 2:] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1)


def llama3_gguf_vocabulary() -> dict:
    """Meta's Llama 3 vocabulary as llama.cpp's converter writes it: the BPE ranks as GPT-2 byte-level
    strings (normal), then the special tokens (control)."""
    ranks = read_bpe_ranks(llama3_tokenizer_path())
    specials = llama3_special_tokens(len(ranks))
    tokens = [_byte_level(t) for t in sorted(ranks, key=ranks.get)] + sorted(specials, key=specials.get)
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [TOKEN_NORMAL] * len(ranks) + [TOKEN_CONTROL] * len(specials),
            "tokenizer.ggml.bos_token_id": tokens.index("<|begin_of_text|>"),
            "tokenizer.ggml.eos_token_id": tokens.index("<|end_of_text|>")}


def write_q4_k_m(path: Path, args: ModelArgs) -> Path:
    """A GGUF of this shape with Q4_K_M's types: random blocks of about random_values' spread
    (embeddings N(0, 1), linear layers N(0, 1/fan_in)) and random_values' float32 norms."""
    from gguf import LlamaFileType
    gen, rng, tensors = torch.Generator().manual_seed(0), np.random.default_rng(0), {}
    for name, shape in args.weight_shapes().items():
        qtype = q4_k_m_type(name, args.n_layers)
        std = 1.0 if name == "tok_embeddings.weight" else shape[-1] ** -0.5
        tensors[_stored_name(name, "gguf")] = (random_values(name, shape, shape, gen).numpy() if qtype == "F32" else
                                               Blocks(qtype, shape, lambda q=qtype, s=shape, d=std:
                                                      random_k_blocks(q, s, d, rng)))
    metadata = {"general.file_type": int(LlamaFileType.MOSTLY_Q4_K_M), **llama_gguf_metadata(args, args.max_seq_len),
                **llama3_gguf_vocabulary()}
    return write_gguf_file(path, metadata, tensors)


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


def llama_gguf_metadata(args: ModelArgs, context_length: int) -> dict:
    """The model's shape as llama.cpp's GGUF keys (gguf-py's writer adds general.architecture)."""
    return {"llama.block_count": args.n_layers, "llama.context_length": context_length,
            "llama.embedding_length": args.dim, "llama.feed_forward_length": args.hidden_dim,
            "llama.attention.head_count": args.n_heads, "llama.attention.head_count_kv": args.n_kv_heads,
            "llama.rope.freq_base": float(args.rope_theta),
            "llama.attention.layer_norm_rms_epsilon": float(args.norm_eps),
            "llama.rope.dimension_count": args.head_dim, "llama.vocab_size": args.vocab_size}


def tiny_gguf_metadata(args: ModelArgs) -> dict:
    """The GGUF keys of the tiny model."""
    n = len(TINY_RANKS)
    return {**llama_gguf_metadata(args, 64),
            "llama.rope.scaling.original_context_length": TINY_GGUF_SCALING.original_max_seq_len,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
            "tokenizer.ggml.tokens": [_byte_level(t) for t in TINY_RANKS] + TINY_SPECIALS,
            "tokenizer.ggml.token_type": [TOKEN_NORMAL] * n + [TOKEN_CONTROL] * len(TINY_SPECIALS),
            "tokenizer.ggml.merges": [f"{_byte_level(a)} {_byte_level(b)}" for a, b in TINY_MERGES],
            "tokenizer.ggml.bos_token_id": n + 1, "tokenizer.ggml.eos_token_id": n + 2,
            "tokenizer.ggml.eot_token_id": n + 2, "tokenizer.ggml.add_bos_token": False,
            "tokenizer.chat_template": "{{ messages }}"}


TINY_GGUF_SCALING = RopeScaling(factor=8.0, original_max_seq_len=512)


class Blocks(NamedTuple):
    """A matrix of ggml type `qtype` (a name: "Q4_K") whose uint8 blocks [rows, bytes a row] draw()
    makes only when the file is written."""
    qtype: str
    shape: tuple[int, int]
    draw: Callable[[], np.ndarray]


def write_gguf_file(path: Path, metadata: dict, tensors: dict[str, np.ndarray | Blocks], qtype=None) -> Path:
    """A GGUF file of these metadata (typed by their Python type: bool, int as uint32, float as
    float32, str, list) and tensors named as llama.cpp names them: float32 arrays, those matrices
    whose rows are whole blocks of `qtype` (a gguf.GGMLQuantizationType) stored quantized, and
    Blocks. Written one tensor at a time after the header, so RAM holds one (an 8B's are 5-32 GB)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    writer = GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        add = {bool: writer.add_bool, int: writer.add_uint32, float: writer.add_float32,
               str: writer.add_string}.get(type(value), writer.add_array)
        add(key, value)
    block = GGML_QUANT_SIZES[qtype][0] if qtype is not None else None
    data = []
    for name, w in tensors.items():
        if block and isinstance(w, np.ndarray) and w.ndim == 2 and w.shape[1] % block == 0:
            w = Blocks(qtype.name, w.shape, lambda w=w: quantize(w, qtype))
        if isinstance(w, Blocks):  # the shape in bytes, as gguf-py takes it
            ggml_type = GGMLQuantizationType[w.qtype]
            n_bytes = math.prod(w.shape) // GGML_QUANT_SIZES[ggml_type][0] * GGML_QUANT_SIZES[ggml_type][1]
            writer.add_tensor_info(name, (w.shape[0], n_bytes // w.shape[0]), np.dtype(np.uint8), n_bytes,
                                   raw_dtype=ggml_type)
            data.append(w.draw)
        else:
            writer.add_tensor_info(name, w.shape, w.dtype, w.nbytes)
            data.append(lambda w=w: w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for draw in data:
        writer.write_tensor_data(draw())
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

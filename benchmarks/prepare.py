"""The models the benchmark runs, written or found once and cached.

- tiny:    oracle.checkpoints.tiny_args(), a 2-layer Meta checkpoint (for --quick).
- smollm2: the default SmolLM2-135M GGUF (npllama's ensure_default_model()). torch cannot read
           GGUF, so its baseline gets npllama's decoded weights (`model.weights`) saved once as a
           float32 torch state dict; llama.cpp (--llama-bench) gets them as an F32 GGUF with the
           original's metadata, so that all three compute in float32 from the same numbers.
- 1b:      a random Llama-3.2-1B shape (oracle.checkpoints.llama32_1b_args()), stored bf16 as
           Meta ships it, computed in float32 by both engines (5 GB: fits in RAM).
- 8b:      a random Meta-Llama-3-8B (16 GB bf16), only with --with-8b. It is written tensor by
           tensor into memory-mapped temporary files and then torch.save'd, so the writer never
           holds 16 GB (plus float32 temporaries) in RAM; it needs twice 16 GB of free disk while
           writing. npllama streams it as int16 (a 15 GB copy made at the first load, formats/int16.py),
           torch in bf16 from a torch.load(mmap=True).
- 8b-exact: the same file, npllama alone streaming the bf16 weights as stored (--weights exact):
           the path before the int16 store.
- 8b-tiered: the 8b's checkpoint, npllama alone with an 8 GB weights budget: its first layers
           get a float32 copy, the rest are streamed (tiered residency). torch bf16 has no such
           budget: its figures on the same file are the 8b model's.
- 8b-q4km: a random Meta-Llama-3-8B as a Q4_K_M GGUF (4.9 GB): each tensor of the ggml type
           llama.cpp's Q4_K_M gives it (Q4_K, Q6_K, F32), filled with random blocks, and Meta's
           vocabulary. npllama runs it as any Q4_K_M download too big for RAM as float32
           (formats/int16.py: an int16 copy made at the first load). No torch baseline:
           torch cannot read GGUF, and smollm2's route (npllama's decoded weights saved as a
           float32 state dict) would take 32 GB of RAM.

The 8b models write multi-GB files (BIG_MODELS): bench.py runs them only with --with-8b.

Checkpoints go to a cache directory (--cache-dir, default ~/.cache/npllama/bench), each written
into `<name>.partial` (a directory, or the GGUF file) and renamed when complete, so an
interrupted write is never used.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from npllama.config import OUTPUT, ModelArgs, RopeScaling, layer_name, split_layer_name
from npllama.formats.default_model import ensure_default_model
from npllama.formats.meta import params_json, read_bpe_ranks
from npllama.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, gpt2_bytes_to_unicode, llama3_special_tokens
from oracle.checkpoints import (llama3_8b_args, llama3_tokenizer_path, llama32_1b_args, random_values,
                                tiny_args, write_random_checkpoint)
from stats import progress

MODEL_NAMES = ("tiny", "smollm2", "1b", "8b", "8b-exact", "8b-tiered", "8b-q4km")
# The models that write multi-GB files, and what they write.
BIG_MODELS = {"8b": "a 16 GB bf16 checkpoint, and npllama's 15 GB int16 copy of it",
              "8b-exact": "the 8b's 16 GB checkpoint", "8b-tiered": "the 8b's 16 GB checkpoint",
              "8b-q4km": "a 4.9 GB GGUF, and npllama's 15 GB int16 copy of it"}
GB = 1 << 30


class Skip(Exception):
    """A model that cannot be benchmarked here, with the reason shown in the report."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("NPLLAMA_BENCH_CACHE", "~/.cache/npllama/bench")).expanduser()


def args_from_json(d: dict) -> ModelArgs:
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelArgs(**d)


# --- Meta checkpoints ---------------------------------------------------------------------

def random_checkpoint(cache_dir: Path, name: str, args: ModelArgs, streaming: bool) -> Path:
    """A random Meta checkpoint `cache_dir/name`, written on first use."""
    final = cache_dir / name
    if (final / "consolidated.00.pth").exists() and (final / "params.json").exists():
        return final
    partial = cache_dir / f"{name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    n_bytes = 2 * sum(math.prod(s) for s in args.weight_shapes().values())
    need = (2 if streaming else 1) * n_bytes + GB
    require_free_disk(cache_dir, name, f"{n_bytes / GB:.1f} GB bf16", final, need)
    t0 = time.perf_counter()
    if streaming:
        write_random_checkpoint_streaming(partial, args)
    else:
        write_random_checkpoint(partial, args, seed=0)
    partial.rename(final)
    progress("bench", f"wrote {name} in {time.perf_counter() - t0:.0f}s")
    return final


def require_free_disk(cache_dir: Path, name: str, what: str, final: Path, need: int) -> None:
    """Say what is about to be written; Skip if the disk cannot hold `need` bytes."""
    free = shutil.disk_usage(cache_dir).free
    progress("bench", f"writing {name} ({what}) into {final}; free disk {free / GB:.0f} GB, needs "
             f"{need / GB:.0f} GB while writing")
    if free < need:
        raise Skip(f"{name}: needs {need / GB:.0f} GB free in {cache_dir}, only {free / GB:.0f} GB: "
                   "free space or pass --cache-dir on a larger disk")


def write_random_checkpoint_streaming(directory: Path, args: ModelArgs, seed: int = 0,
                                      chunk_elements: int = 1 << 24) -> Path:
    """Same files and distribution as oracle.checkpoints.write_random_checkpoint (bf16, each
    linear ~N(0, 1/fan_in)), without ever holding the model in RAM: each tensor is generated in
    chunks of `chunk_elements` and written to its own temporary file, then the files are mapped
    read-only (torch.from_file) and torch.save copies the mapped storages into the archive (one
    record per tensor, as Meta's files have). Anonymous memory peaks at one chunk's float32
    temporaries; mapped pages are clean page cache the kernel reclaims at will."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params_json(args), indent=2))
    tmp = directory / "tensors.tmp"
    tmp.mkdir(exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, shape) in enumerate(args.weight_shapes().items()):
        n = math.prod(shape)
        path = tmp / f"{i}.bin"
        with open(path, "wb") as f:
            for start in range(0, n, chunk_elements):
                m = min(chunk_elements, n - start)
                chunk = random_values(name, m, shape, gen)
                f.write(chunk.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        state[name] = torch.from_file(str(path), shared=True, size=n, dtype=torch.bfloat16).view(shape)
    torch.save(state, directory / "consolidated.00.pth")
    del state
    shutil.rmtree(tmp)
    shutil.copyfile(llama3_tokenizer_path(), directory / "tokenizer.model")
    return directory


# --- A Q4_K_M GGUF --------------------------------------------------------------------------

def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's layers that get more bits: the first and last eighth, every third between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, n_layers: int) -> str:
    """The ggml type llama.cpp's Q4_K_M gives a Llama's tensor `name` (Meta's name), following
    llama_tensor_get_type in its src/llama-quant.cpp: Q6_K for the output matrix and for attn_v
    and ffn_down in use_more_bits' layers, Q4_K for every other matrix (the token embedding
    too), F32 for the norms. For Llama 3 8B: 193 Q4_K, 33 Q6_K, 65 F32, as in the real file."""
    i, tensor = split_layer_name(name)
    if len(tensor.shape) == 1:
        return "F32"
    if tensor is OUTPUT or (tensor.key in ("wv", "w2") and use_more_bits(i, n_layers)):
        return "Q6_K"
    return "Q4_K"


# Root mean square of value / d over random blocks (quants, sub-block scales and minimums uniform
# over their bits). Q4_K, value = d*sc*q - dmin*m, with dmin = 7.5 d, which centres it (E[sc*q] =
# 31.5 * 7.5 = 7.5 E[m]): sqrt(Var(sc*q) + 7.5^2 Var(m)) = sqrt(47532 + 56.25 * 341.25).
# Q6_K, value = d*sc*(q - 32), sc int8: sqrt(E[sc^2] E[(q - 32)^2]) = sqrt(5461.5 * 341.5).
RMS_OVER_D = {"Q4_K": 258.3, "Q6_K": 1365.7}
Q4_K_DMIN_OVER_D = 7.5


def random_k_blocks(qtype: str, shape: tuple[int, int], std: float, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of a K-quant matrix, uint8 [rows, bytes per row]: random bytes, then each
    block's float16 d drawn so the values have about this standard deviation (as the random
    checkpoints' N(0, std^2)), small and finite, so the model computes finite numbers."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    n_blocks = shape[0] * shape[1] // block
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)  # [blocks, bytes]
    d = std / RMS_OVER_D[qtype] * rng.uniform(0.5, 1.5, n_blocks)  # [blocks]
    if qtype == "Q4_K":  # d, dmin, then scales and quants
        blocks[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        blocks[:, 2:4] = (Q4_K_DMIN_OVER_D * d).astype(np.float16).view(np.uint8).reshape(-1, 2)
    else:  # Q6_K: quants and scales, then d
        blocks[:, size - 2:] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1)


def stored_bytes(shape: tuple[int, ...], qtype: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return math.prod(shape) // block * size


def gguf_name(name: str) -> str:
    """llama.cpp's name of the weight Meta calls `name`."""
    i, tensor = split_layer_name(name)
    return tensor.gguf if i is None else layer_name(tensor.gguf, i, "gguf")


def llama3_gguf_vocabulary() -> tuple[list[str], list[int]]:
    """Meta's Llama 3 vocabulary as llama.cpp's converter writes it: (tokens, token types), the
    128000 BPE ranks as GPT-2 byte-level strings (normal), then the 256 special tokens (control)."""
    ranks = read_bpe_ranks(llama3_tokenizer_path())
    table = gpt2_bytes_to_unicode()
    tokens = [""] * len(ranks)
    for token, rank in ranks.items():
        tokens[rank] = "".join(table[b] for b in token)
    specials = llama3_special_tokens(len(ranks))
    tokens += sorted(specials, key=specials.get)
    return tokens, [TOKEN_NORMAL] * len(ranks) + [TOKEN_CONTROL] * len(specials)


def random_q4_k_m_gguf(cache_dir: Path, name: str, args: ModelArgs) -> Path:
    """A random GGUF `cache_dir/name.gguf` of the shape `args` and Q4_K_M's types, written on
    first use."""
    final = cache_dir / f"{name}.gguf"
    if final.exists():
        return final
    partial = cache_dir / f"{name}.partial"
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial.unlink(missing_ok=True)
    qtypes = {n: q4_k_m_type(n, args.n_layers) for n in args.weight_shapes()}
    n_bytes = sum(stored_bytes(shape, qtypes[n]) for n, shape in args.weight_shapes().items())
    require_free_disk(cache_dir, name, f"{n_bytes / GB:.1f} GB Q4_K_M", final, n_bytes + GB)
    t0 = time.perf_counter()
    write_random_gguf(partial, args, qtypes)
    partial.rename(final)
    progress("bench", f"wrote {name} in {time.perf_counter() - t0:.0f}s")
    return final


def write_random_gguf(path: Path, args: ModelArgs, qtypes: dict[str, str], seed: int = 0) -> Path:
    """A GGUF file with the metadata npllama reads (not the BPE merges llama.cpp also wants) and
    random tensors of `qtypes` (Meta's name -> ggml type), written tensor by tensor: the header
    with every tensor's info first, then each tensor's data as it is drawn, so RAM holds one
    tensor at a time (the largest, output.weight, is 0.43 GB)."""
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter, LlamaFileType
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("random Meta-Llama-3-8B shape, Q4_K_M types")
    writer.add_file_type(LlamaFileType.MOSTLY_Q4_K_M)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    writer.add_context_length(args.max_seq_len)
    writer.add_block_count(args.n_layers)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_vocab_size(args.vocab_size)
    tokens, types = llama3_gguf_vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_bos_token_id(tokens.index("<|begin_of_text|>"))
    writer.add_eos_token_id(tokens.index("<|end_of_text|>"))  # the base model's (Instruct's: <|eot_id|>)
    shapes = args.weight_shapes()
    for name, shape in shapes.items():
        if qtypes[name] == "F32":
            writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), 4 * math.prod(shape))
        else:  # shape in bytes, as gguf-py takes it
            n_bytes = stored_bytes(shape, qtypes[name])
            writer.add_tensor_info(gguf_name(name), (shape[0], n_bytes // shape[0]), np.dtype(np.uint8),
                                   n_bytes, raw_dtype=GGMLQuantizationType[qtypes[name]])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng, gen = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    for i, (name, shape) in enumerate(shapes.items()):
        if qtypes[name] == "F32":
            data = random_values(name, math.prod(shape), shape, gen).numpy()
        else:  # as random_values: embeddings N(0, 1), linear layers N(0, 1/fan_in)
            std = 1.0 if name == "tok_embeddings.weight" else shape[1] ** -0.5
            data = random_k_blocks(qtypes[name], shape, std, rng)
        writer.write_tensor_data(data)
        if i % 32 == 0:
            progress("bench", f"{path.name}: tensor {i + 1}/{len(shapes)} "
                     f"({gguf_name(name)}, {qtypes[name]})")
    writer.close()
    return path


# --- SmolLM2 ------------------------------------------------------------------------------

def torch_weights_from_npllama(model_path: Path, cache_dir: Path) -> Path:
    """npllama's decoded weights of a model torch cannot read (GGUF), saved once as a float32
    state dict with Meta's names, plus the ModelArgs npllama derived, for the torch baseline."""
    import numpy as np

    import npllama

    st = model_path.stat()
    out = cache_dir / f"{model_path.stem}-{st.st_size}-{int(st.st_mtime)}.torch-f32.pt"
    if out.exists():
        return out
    progress("bench", f"converting npllama's weights of {model_path} into {out} for the torch baseline")
    model = npllama.load(model_path)
    state = {name: torch.from_numpy(np.array(w, dtype=np.float32)) for name, w in model.weights.items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    torch.save({"args": dataclasses.asdict(model.args), "state_dict": state}, tmp)
    tmp.rename(out)
    return out


def f32_gguf(model_path: Path, cache_dir: Path) -> Path:
    """The GGUF `model_path` with npllama's decoded float32 weights, for llama.cpp: the same
    metadata (but the file type) and tensor names, written once into `cache_dir`."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, LlamaFileType

    import npllama

    st = model_path.stat()
    out = cache_dir / f"{model_path.stem}-{st.st_size}-{int(st.st_mtime)}.f32.gguf"
    if out.exists():
        return out
    progress("bench", f"writing npllama's float32 weights of {model_path} into {out} for llama.cpp")
    reader = GGUFReader(model_path)
    weights = {gguf_name(name): w for name, w in npllama.load(model_path).weights.items()}
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    writer = GGUFWriter(str(partial), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # the writer's own, or changed below
        array = field.types[0] == GGUFValueType.ARRAY
        writer.add_key_value(key, field.contents(), field.types[0], field.types[-1] if array else None)
    writer.add_file_type(LlamaFileType.ALL_F32)
    for t in reader.tensors:  # [out, in] arrays; the writer stores ggml's reversed shape
        writer.add_tensor(t.name, np.asarray(weights[t.name], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.rename(out)
    return out


def int16_copies(spec: dict) -> list[Path]:
    """npllama's int16 copies of the model's matrices, which a load that streams them makes the
    first time (npllama/formats/int16.py), named after the model's file or directory."""
    from npllama.formats.default_model import cache_dir
    return sorted((cache_dir() / "int16").glob(f"{Path(spec['path']).name}-*.int16.safetensors"))


# --- What each model is -------------------------------------------------------------------

def prepare(name: str, cache_dir: Path, llama_cpp: bool = False) -> dict:
    """Make sure the model's files exist; return the spec the engine workers need (with
    `llama_cpp`, and for smollm2 only, an F32 GGUF for llama.cpp as spec["f32_gguf"]).
    spec["unavailable"] names the engines that cannot run the model, with the reason."""
    if name == "tiny":
        path = random_checkpoint(cache_dir, "tiny", tiny_args(), streaming=False)
        return dict(name=name, kind="meta", path=str(path), torch_dtype="float32", weights_budget=None,
                    label="tiny random Llama 3 (2 layers, dim 64), bf16 file, float32 compute")
    if name == "1b":
        path = random_checkpoint(cache_dir, "llama32-1b-random", llama32_1b_args(), streaming=False)
        return dict(name=name, kind="meta", path=str(path), torch_dtype="float32", weights_budget=None,
                    label="random Llama-3.2-1B shape, bf16 file, float32 compute")
    if name == "8b":
        path = random_checkpoint(cache_dir, "llama3-8b-random", llama3_8b_args(), streaming=True)
        return dict(name=name, kind="meta", path=str(path), torch_dtype="bfloat16", weights_budget=0,
                    label="random Meta-Llama-3-8B, bf16 file memory-mapped; "
                          "npllama float32 compute, torch bf16")
    if name == "8b-exact":
        path = random_checkpoint(cache_dir, "llama3-8b-random", llama3_8b_args(), streaming=True)
        return dict(name=name, kind="meta", path=str(path), torch_dtype="bfloat16", weights_budget=0,
                    weights="exact", unavailable={"torch": "torch's figures on this file are the 8b model's"},
                    label="random Meta-Llama-3-8B, bf16 file memory-mapped and streamed as stored (--weights exact)")
    if name == "8b-tiered":
        path = random_checkpoint(cache_dir, "llama3-8b-random", llama3_8b_args(), streaming=True)
        return dict(name=name, kind="meta", path=str(path), torch_dtype="bfloat16", weights_budget=8 * GB,
                    unavailable={"torch": "torch bf16 has no weights budget; its figures on this file "
                                          "are the 8b model's"},
                    label="random Meta-Llama-3-8B, bf16 file; npllama float32 compute with an 8 GB "
                          "weights budget (the output and the first layers float32-resident, the rest streamed)")
    if name == "8b-q4km":
        path = random_q4_k_m_gguf(cache_dir, "llama3-8b-q4km-random", llama3_8b_args())
        return dict(name=name, kind="gguf", path=str(path), weights_budget=0,
                    unavailable={"torch": "torch cannot read GGUF, and npllama's decoded weights would "
                                          "take 32 GB of RAM as a float32 state dict"},
                    label="random Meta-Llama-3-8B, Q4_K_M GGUF (Q4_K, Q6_K), float32 compute")
    if name == "smollm2":
        path = Path(ensure_default_model())
        torch_path = torch_weights_from_npllama(path, cache_dir)
        spec = dict(name=name, kind="gguf", path=str(path), torch_weights=str(torch_path),
                    torch_dtype="float32", weights_budget=None,
                    label=f"SmolLM2-135M GGUF ({path.name}), decoded to float32 by npllama")
        if llama_cpp:
            spec["f32_gguf"] = str(f32_gguf(path, cache_dir))
        return spec
    raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODEL_NAMES)}")

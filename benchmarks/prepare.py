"""The models the suites run, written or found once in a cache directory (--cache-dir, default
$NPLLAMA_BENCH_CACHE or ~/.cache/npllama/bench), each into `<name>.partial` first and renamed when
complete, so an interrupted write is never used. What each model is: MODELS' labels below.

torch cannot read GGUF, so on smollm2 its baseline gets npllama's decoded weights saved once as a
float32 state dict, and llama.cpp an F32 GGUF of them: all three compute from the same numbers.
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
from harness import progress

from npllama.config import OUTPUT, ModelArgs, RopeScaling, split_layer_name
from npllama.formats.default_model import ensure_default_model
from npllama.formats.meta import params_json, read_bpe_ranks
from npllama.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, gpt2_bytes_to_unicode, llama3_special_tokens
from oracle.checkpoints import _stored_name, write_gguf_file, llama3_8b_args, llama3_tokenizer_path, llama32_1b_args, random_values, tiny_args

GB = 1 << 30
NO_TORCH_BUDGET = "torch bf16 has no such setting; its figures on this file are the 8b model's"
# name: (files, npllama's weights_budget, what npllama and torch run, the label). Files: a Meta
# checkpoint's (directory, args), or "q4km", or "default" (SmolLM2).
MODELS = {
    "tiny": (("tiny", tiny_args), None, {"torch_dtype": "float32"},
             "tiny random Llama 3 (2 layers, dim 64), bf16 file, float32 compute"),
    "smollm2": ("default", None, {"torch_dtype": "float32"}, "SmolLM2-135M GGUF, decoded to float32 by npllama"),
    "1b": (("llama32-1b-random", llama32_1b_args), None, {"torch_dtype": "float32"},
           "random Llama-3.2-1B shape, bf16 file, float32 compute"),
    "8b": (("llama3-8b-random", llama3_8b_args), 0, {"torch_dtype": "bfloat16"},
           "random Meta-Llama-3-8B, bf16 file memory-mapped; npllama streams its int16 copy, torch bf16"),
    "8b-exact": (("llama3-8b-random", llama3_8b_args), 0, {"weights": "exact", "unavailable": {"torch": NO_TORCH_BUDGET}},
                 "random Meta-Llama-3-8B, bf16 file streamed as stored (--weights exact)"),
    "8b-tiered": (("llama3-8b-random", llama3_8b_args), 8 * GB, {"unavailable": {"torch": NO_TORCH_BUDGET}},
                  "random Meta-Llama-3-8B, bf16 file; an 8 GB weights budget: the first layers float32, the rest streamed"),
    "8b-q4km": ("q4km", 0, {"unavailable": {"torch": "torch cannot read GGUF, and npllama's decoded weights would "
                                                     "take 32 GB of RAM as a float32 state dict"}},
                "random Meta-Llama-3-8B, Q4_K_M GGUF (Q4_K, Q6_K), streamed as npllama's int16 copy"),
}
MODEL_NAMES = tuple(MODELS)
BIG_MODELS = {"8b": "a 16 GB bf16 checkpoint, and npllama's 15 GB int16 copy of it",
              "8b-exact": "the 8b's 16 GB checkpoint", "8b-tiered": "the 8b's 16 GB checkpoint",
              "8b-q4km": "a 4.9 GB GGUF, and npllama's 15 GB int16 copy of it"}


class Skip(Exception):
    """A model that cannot be benchmarked here, with the reason shown in the report."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("NPLLAMA_BENCH_CACHE", "~/.cache/npllama/bench")).expanduser()


def args_from_json(d: dict) -> ModelArgs:
    return ModelArgs(**{**d, "rope_scaling": d["rope_scaling"] and RopeScaling(**d["rope_scaling"])})


def written_once(final: Path, write, what: str, need: int) -> Path:
    """`final`, written by write(partial) unless it exists; Skip if the disk cannot hold `need` bytes."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(final.parent).free
    progress("prepare", f"writing {final} ({what}); free disk {free / GB:.0f} GB, needs {need / GB:.0f} GB meanwhile")
    if free < need:
        raise Skip(f"{final.name} needs {need / GB:.0f} GB free in {final.parent}: pass --cache-dir on a larger disk")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True) if partial.is_dir() else partial.unlink(missing_ok=True)
    t0 = time.perf_counter()
    write(partial)
    partial.rename(final)
    progress("prepare", f"wrote {final.name} in {time.perf_counter() - t0:.0f}s")
    return final


def write_checkpoint(directory: Path, args: ModelArgs, chunk: int = 1 << 24) -> None:
    """oracle.checkpoints.write_random_checkpoint's files without holding the model in RAM (the 8B's is
    16 GB): each tensor drawn in chunks into a file of its own, then the files mapped (torch.from_file)
    for torch.save to copy into the archive. RAM peaks at one chunk; the mapped pages are page cache."""
    tmp = directory / "tensors.tmp"
    tmp.mkdir(parents=True)
    (directory / "params.json").write_text(json.dumps(params_json(args), indent=2))
    gen, state = torch.Generator().manual_seed(0), {}
    for i, (name, shape) in enumerate(args.weight_shapes().items()):
        n = math.prod(shape)
        with open(tmp / f"{i}.bin", "wb") as f:
            for start in range(0, n, chunk):
                values = random_values(name, min(chunk, n - start), shape, gen)
                f.write(values.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        state[name] = torch.from_file(str(tmp / f"{i}.bin"), shared=True, size=n, dtype=torch.bfloat16).view(shape)
    torch.save(state, directory / "consolidated.00.pth")
    shutil.rmtree(tmp)
    shutil.copyfile(llama3_tokenizer_path(), directory / "tokenizer.model")


# --- A Q4_K_M GGUF of random blocks ---------------------------------------------------------

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


def llama3_gguf_vocabulary() -> tuple[list[str], list[int]]:
    """Meta's Llama 3 vocabulary as llama.cpp's converter writes it: the BPE ranks as GPT-2 byte-level
    strings (normal), then the special tokens (control)."""
    ranks, table = read_bpe_ranks(llama3_tokenizer_path()), gpt2_bytes_to_unicode()
    tokens = [t for t, _ in sorted(ranks.items(), key=lambda kv: kv[1])]
    specials = llama3_special_tokens(len(ranks))
    return ["".join(table[b] for b in t) for t in tokens] + sorted(specials, key=specials.get), \
        [TOKEN_NORMAL] * len(ranks) + [TOKEN_CONTROL] * len(specials)


def write_q4_k_m(path: Path, args: ModelArgs) -> None:
    """The metadata npllama reads and random tensors of Q4_K_M's types, written tensor by tensor
    (header first), so RAM holds one tensor at a time."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType
    w = GGUFWriter(str(path), "llama")
    tokens, types = llama3_gguf_vocabulary()
    for add, value in ((w.add_file_type, LlamaFileType.MOSTLY_Q4_K_M), (w.add_context_length, args.max_seq_len),
                       (w.add_block_count, args.n_layers), (w.add_embedding_length, args.dim),
                       (w.add_feed_forward_length, args.hidden_dim), (w.add_head_count, args.n_heads),
                       (w.add_head_count_kv, args.n_kv_heads), (w.add_rope_freq_base, args.rope_theta),
                       (w.add_layer_norm_rms_eps, args.norm_eps), (w.add_rope_dimension_count, args.head_dim),
                       (w.add_vocab_size, args.vocab_size), (w.add_tokenizer_model, "gpt2"),
                       (w.add_tokenizer_pre, "llama-bpe"), (w.add_token_list, tokens), (w.add_token_types, types),
                       (w.add_bos_token_id, tokens.index("<|begin_of_text|>")),
                       (w.add_eos_token_id, tokens.index("<|end_of_text|>"))):
        add(value)
    shapes = args.weight_shapes()
    qtypes = {n: q4_k_m_type(n, args.n_layers) for n in shapes}
    for name, shape in shapes.items():
        if qtypes[name] == "F32":
            w.add_tensor_info(_stored_name(name, "gguf"), shape, np.dtype(np.float32), 4 * math.prod(shape))
        else:  # shape in bytes, as gguf-py takes it
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtypes[name]]]
            n_bytes = math.prod(shape) // block * size
            w.add_tensor_info(_stored_name(name, "gguf"), (shape[0], n_bytes // shape[0]), np.dtype(np.uint8), n_bytes,
                              raw_dtype=GGMLQuantizationType[qtypes[name]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    for name, shape in shapes.items():  # as random_values: embeddings N(0, 1), linear layers N(0, 1/fan_in)
        std = 1.0 if name == "tok_embeddings.weight" else shape[1] ** -0.5
        w.write_tensor_data(random_values(name, math.prod(shape), shape, gen).numpy() if qtypes[name] == "F32"
                            else random_k_blocks(qtypes[name], shape, std, rng))
    w.close()


# --- SmolLM2 for torch and llama.cpp ---------------------------------------------------------

def torch_weights(model_path: Path, cache_dir: Path) -> Path:
    """npllama's decoded weights of a GGUF, as a float32 state dict with Meta's names and the ModelArgs."""
    import npllama
    st = model_path.stat()
    out = cache_dir / f"{model_path.stem}-{st.st_size}-{int(st.st_mtime)}.torch-f32.pt"

    def write(partial):
        model = npllama.load(model_path)
        torch.save({"args": dataclasses.asdict(model.args),
                    "state_dict": {k: torch.from_numpy(np.array(w, np.float32)) for k, w in model.weights.items()}},
                   partial)
    return written_once(out, write, "float32 weights for torch", GB)


def f32_gguf(model_path: Path, cache_dir: Path) -> Path:
    """The GGUF `model_path` with npllama's decoded float32 weights, for llama.cpp: the same metadata
    (but the file type) and tensor names."""
    import npllama
    from gguf import GGUFReader, LlamaFileType

    def write(partial):
        reader, weights = GGUFReader(model_path), npllama.load(model_path).weights
        metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.") and k != "general.architecture"}
        write_gguf_file(partial, dict(metadata, **{"general.file_type": int(LlamaFileType.ALL_F32)}),
                        {_stored_name(k, "gguf"): np.asarray(w, np.float32) for k, w in weights.items()})
    st = model_path.stat()
    return written_once(cache_dir / f"{model_path.stem}-{st.st_size}-{int(st.st_mtime)}.f32.gguf", write,
                        "float32 weights for llama.cpp", 2 * GB)


def int16_copies(spec: dict) -> list[Path]:
    """npllama's int16 copies of a streamed model (formats/int16.py), which its first load makes."""
    from npllama.formats.default_model import cache_dir
    return sorted((cache_dir() / "int16").glob(f"{Path(spec['path']).name}-*.int16.safetensors"))


def prepare(name: str, cache_dir: str | Path, llama_cpp: bool = False) -> dict:
    """The spec the workers need: the path, npllama's weights budget, torch's dtype and weights,
    spec["unavailable"] (engines that cannot run it, and why), and with `llama_cpp` an F32 GGUF."""
    files, budget, extra, label = MODELS[name]
    cache_dir = Path(cache_dir)
    spec = dict(name=name, kind="meta", weights_budget=budget, label=label, **extra)
    if files == "default":
        path = Path(ensure_default_model())
        spec.update(kind="gguf", torch_weights=str(torch_weights(path, cache_dir)), label=f"{label} ({path.name})")
        if llama_cpp:
            spec["f32_gguf"] = str(f32_gguf(path, cache_dir))
    elif files == "q4km":
        path = written_once(cache_dir / "llama3-8b-q4km-random.gguf", lambda p: write_q4_k_m(p, llama3_8b_args()),
                            "a 4.9 GB Q4_K_M GGUF", 6 * GB)
        spec["kind"] = "gguf"
    else:
        args = files[1]()
        n_bytes = 2 * sum(math.prod(s) for s in args.weight_shapes().values())
        path = written_once(cache_dir / files[0], lambda d: write_checkpoint(d, args), f"{n_bytes / GB:.1f} GB bf16",
                            2 * n_bytes + GB)
    return dict(spec, path=str(path))

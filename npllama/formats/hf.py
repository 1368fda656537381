"""Hugging Face Llama directories: config.json, safetensors weights, tokenizer.json.

    config.json                       LlamaForCausalLM's sizes (hidden_size, num_hidden_layers...)
    model.safetensors                 the weights, or shards model-00001-of-00004.safetensors ...
    model.safetensors.index.json      ... and which shard holds which tensor
    tokenizer.json                    byte-level BPE: vocab, merges, added (special) tokens
    tokenizer_config.json             bos/eos tokens, add_bos, the chat template
    generation_config.json            (optional) the ids that end generation

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
({name: {"dtype", "shape", "data_offsets": [begin, end]}}, offsets counted from the end of
the header), then the raw tensors. Each tensor here is a read-only view of one memory map of
the file: opening a model reads only the headers.

Hugging Face's conversion script (convert_llama_weights_to_hf.py) reorders the rows of wq and
wk, head by head, so that its RoPE can rotate the two halves of each head (x[:hd/2], x[hd/2:])
instead of Meta's adjacent pairs (x[0::2], x[1::2]):

    permute(w, n_heads) = w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(n_heads * hd, dim)

npllama computes RoPE Meta's way, so those rows are put back: `meta_rows_of_hf` gives, for
each Meta row, the HF row it was moved to. The reordering is done row by row when the tensor
is used (a `PermutedRows`), so nothing is copied at load.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..config import OUTPUT, ModelArgs, RopeScaling, meta_name
from ..errors import CheckpointError, ConfigError, ModelNotFoundError, TokenizerError
from ..tokenizer import (LLAMA3_PAT_STR, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED,
                        Tokenizer)
from .shared import LazyRows, check_weights, checked_size

# --- safetensors ---------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file as read-only NumPy views of its memory map."""
    path = Path(path)
    size = checked_size(path, ".safetensors", "safetensors", 8)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (its header claims "
                                  f"{n} bytes, the file has {size - 8} after the length)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e}); the file "
                              "is corrupt or not a safetensors file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if header else None
    tensors = {}
    for name, spec in header.items():
        try:
            dtype = np.dtype(SAFETENSORS_DTYPES[spec["dtype"]])
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(o) for o in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name} has a malformed or unknown entry {spec!r} "
                                  f"(dtypes npllama reads: {', '.join(SAFETENSORS_DTYPES)})") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if min(shape, default=0) < 0 or not 0 <= begin <= end or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {name} ({spec['dtype']} {list(shape)}) has data "
                                  f"offsets {[begin, end]}, which do not fit its size; the file is corrupt")
        if data_start + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {name} ends {data_start + end - size} "
                                  "bytes past the end of the file; download it again")
        tensors[name] = np.ndarray(shape, dtype, buffer=mm, offset=data_start + begin)
    return tensors


# --- Weights -------------------------------------------------------------------------------

INDEX_FILE = "model.safetensors.index.json"


def meta_rows_of_hf(n_rows: int, n_heads: int) -> np.ndarray:
    """perm with meta_w = hf_w[perm]: inverts HF's permute(). Within each head, HF stores the
    first elements of the rotating pairs (Meta rows 0, 2, 4...) then the second ones (1, 3, 5...)."""
    head_dim = n_rows // n_heads
    hf_rows = np.arange(n_rows).reshape(n_heads, 2, head_dim // 2)  # [H, pair half, pair]
    return hf_rows.transpose(0, 2, 1).reshape(n_rows)  # [H, pair, pair half] -> Meta order


class PermutedRows(LazyRows):
    """A stored matrix whose rows are read in another order: rows(i) = stored[perm[i]]."""

    def __init__(self, stored: np.ndarray, perm: np.ndarray, name: str = ""):
        super().__init__(stored.shape, stored.dtype, name)
        self.stored, self.perm = stored, perm

    def rows(self, index) -> np.ndarray:
        return self.stored[self.perm[index]]

    def __repr__(self) -> str:
        return f"PermutedRows({self.name!r}, {self.dtype}, shape={self.shape})"


class HFWeights(Mapping):
    """Meta name -> tensor of a Hugging Face checkpoint: read-only memory-mapped views, with wq
    and wk as PermutedRows that undo HF's RoPE row order when they are used."""

    def __init__(self, tensors: dict[str, np.ndarray], hf_names: dict[str, str], args: ModelArgs):
        self._tensors = tensors  # Meta name -> stored array
        self._hf_names = hf_names  # Meta name -> HF name, for messages
        self._heads = {"wq": args.n_heads, "wk": args.n_kv_heads}

    def __getitem__(self, name: str):
        stored = self._tensors[name]
        module = name.split(".")[-2]
        n_heads = self._heads.get(module)
        if n_heads and stored.ndim == 2 and stored.shape[0] % (2 * n_heads) == 0:
            return PermutedRows(stored, meta_rows_of_hf(stored.shape[0], n_heads), self._hf_names[name])
        return stored

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def read_hf_tensors(directory: Path) -> dict[str, np.ndarray]:
    """Every tensor of model.safetensors, or of the shards model.safetensors.index.json names."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path, CheckpointError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map: it should map each tensor name "
                                  "to the shard file holding it")
        shards = {}
        for name, file in weight_map.items():
            if file not in shards:
                if not (directory / file).is_file():
                    raise ModelNotFoundError(f"{directory / file} not found, but {INDEX_FILE} puts "
                                             f"{name} in it: download the missing shard")
                shards[file] = read_safetensors(directory / file)
            if name not in shards[file]:
                raise CheckpointError(f"{directory / file} has no tensor {name}, which {INDEX_FILE} "
                                      "says it holds; the shards and the index do not match")
        return {name: shards[file][name] for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.is_file():
        return read_safetensors(single)
    other = sorted(p.name for p in directory.glob("*.safetensors"))
    if other:
        raise ModelNotFoundError(f"{directory} has {', '.join(other[:3])} but no {INDEX_FILE} saying "
                                 "which tensors each holds; download it too")
    bins = sorted(p.name for p in directory.glob("*.bin"))
    hint = (f" (it has {bins[0]}: npllama does not read PyTorch pickles from Hugging Face repos; "
            "download the .safetensors files instead)") if bins else ""
    raise ModelNotFoundError(f"{directory} has config.json but no model.safetensors or {INDEX_FILE}{hint}")


def hf_weights(directory: Path, args: ModelArgs) -> HFWeights:
    tensors, names = {}, {}
    for hf_name, array in read_hf_tensors(directory).items():
        if hf_name.endswith("rotary_emb.inv_freq"):  # a buffer older transformers saved; recomputed
            continue
        if hf_name == OUTPUT.hf and args.tie_embeddings:
            continue  # some tied checkpoints save the shared matrix twice
        meta = meta_name(hf_name, "hf")
        if meta is None:
            raise CheckpointError(f"{directory} holds tensor {hf_name}, which a Llama model does not have "
                                  "(npllama runs plain LlamaForCausalLM: no biases, no adapters)")
        tensors[meta], names[meta] = array, hf_name
    if not args.tie_embeddings and OUTPUT.meta not in tensors:
        raise CheckpointError(f"{directory} has no {OUTPUT.hf} and config.json does not set "
                              "tie_word_embeddings: the checkpoint is incomplete")
    return HFWeights(tensors, names, args)


# --- config.json ---------------------------------------------------------------------------

def _read_json(path: Path, error: type[Exception] = ConfigError) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None


def hf_model_args(path: str | Path) -> ModelArgs:
    """ModelArgs from a LlamaForCausalLM config.json (max_seq_len: the caller's choice)."""
    path = Path(path)
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    kind = config.get("model_type")
    architectures = config.get("architectures") or []
    if kind != "llama" or any(a != "LlamaForCausalLM" for a in architectures):
        raise ConfigError(f"{path} describes a {', '.join(architectures) or kind or 'model of unknown type'}; "
                          "npllama runs LlamaForCausalLM models (model_type 'llama') only")

    def get(key: str, kind: type | tuple = int, default: Any = ...) -> Any:
        value = config.get(key, default)
        if value is ...:
            raise ConfigError(f"{path} has no {key}, which a Llama config needs")
        if value is not default and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            raise ConfigError(f"{path}: {key} is {value!r}, expected a {getattr(kind, '__name__', 'number')}")
        return value

    if get("hidden_act", str, "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act is {config['hidden_act']!r}; Llama's SwiGLU uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if get(key, bool, False):
            raise ConfigError(f"{path}: {key} is true; npllama's Llama has no biases")
    rope = config.get("rope_parameters") or {}  # transformers >= 5 groups theta and scaling here
    scaling_config = config.get("rope_scaling") or rope
    theta = rope.get("rope_theta", get("rope_theta", (int, float), 10000.0))  # HF LlamaConfig's default
    try:
        args = ModelArgs(
            dim=get("hidden_size"),
            n_layers=get("num_hidden_layers"),
            n_heads=get("num_attention_heads"),
            n_kv_heads=get("num_key_value_heads", int, None) or config["num_attention_heads"],
            vocab_size=get("vocab_size"),
            norm_eps=float(get("rms_norm_eps", (int, float))),
            rope_theta=float(theta),
            ffn_hidden_dim=get("intermediate_size"),
            rope_scaling=_rope_scaling(scaling_config, path),
            tie_embeddings=get("tie_word_embeddings", bool, False),
        )
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    head_dim = get("head_dim", int, args.head_dim)
    if head_dim != args.head_dim:
        raise ConfigError(f"{path}: head_dim is {head_dim} but hidden_size / num_attention_heads is "
                          f"{args.head_dim}; npllama needs them equal")
    return args


def _rope_scaling(config: dict, path: Path) -> RopeScaling | None:
    """Llama 3.1's rope_scaling {"rope_type": "llama3", "factor", ...} as Meta's RopeScaling."""
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: rope_scaling is {config!r}, expected an object or null")
    kind = config.get("rope_type", config.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"{path}: rope_scaling type {kind!r} is not supported; npllama implements "
                          "Llama 3.1's ('llama3') only")
    try:
        return RopeScaling(factor=float(config["factor"]), low_freq_factor=float(config["low_freq_factor"]),
                           high_freq_factor=float(config["high_freq_factor"]),
                           original_max_seq_len=int(config["original_max_position_embeddings"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: rope_scaling {config!r} lacks or misstates {e}; Llama 3.1 gives "
                          "factor, low_freq_factor, high_freq_factor, original_max_position_embeddings") from None


# --- tokenizer.json ------------------------------------------------------------------------

def _byte_level(step: dict, use_regex: bool) -> bool:
    return (step.get("type") == "ByteLevel" and not step.get("add_prefix_space", False)
            and step.get("use_regex", True) == use_regex)


def pre_tokenizer_name(pre: Any) -> str | None:
    """llama.cpp's name (tokenizer.PRE_TOKENIZERS) for a tokenizer.json pre_tokenizer; None if
    it is none npllama knows."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    steps = [s for s in steps if isinstance(s, dict)]
    if len(steps) == 1 and _byte_level(steps[0], use_regex=True):
        return "gpt2"
    if len(steps) == 2 and _byte_level(steps[1], use_regex=True) and steps[0].get("type") == "Digits" \
            and steps[0].get("individual_digits"):
        return "smollm"
    if len(steps) == 2 and _byte_level(steps[1], use_regex=False) and steps[0].get("type") == "Split" \
            and steps[0].get("pattern") == {"Regex": LLAMA3_PAT_STR} \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        return "llama-bpe"
    return None


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes a token as "<s>" or as {"content": "<s>", ...}."""
    return value.get("content") if isinstance(value, dict) else value


def hf_tokenizer(directory: Path) -> Tokenizer:
    """The byte-level BPE tokenizer of tokenizer.json, with tokenizer_config.json's settings."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        hint = " (it has tokenizer.model: a SentencePiece tokenizer, which npllama does not read)" \
            if (directory / "tokenizer.model").is_file() else ""
        raise ModelNotFoundError(f"{path} not found{hint}: npllama needs the byte-level BPE tokenizer.json")
    data = _read_json(path, TokenizerError)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError(f"{path}: the tokenizer model is {model.get('type')!r}"
                             f"{' with byte_fallback' if model.get('byte_fallback') else ''}; npllama "
                             "reads byte-level BPE tokenizers (Llama 3, SmolLM2)")
    if data.get("normalizer"):
        raise TokenizerError(f"{path} has a normalizer ({data['normalizer'].get('type')}); npllama's "
                             "byte-level BPE tokenizers apply none")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    if pre is None:
        raise TokenizerError(f"{path}: the pre_tokenizer is none npllama knows (Llama 3's split regex, "
                             "SmolLM2's digits + ByteLevel, GPT-2's ByteLevel); its text would be split "
                             "differently from how the model was trained")
    vocab: dict[str, int] = model.get("vocab") or {}
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    n_words = max([*vocab.values(), *added]) + 1
    tokens: list[str | None] = [None] * n_words
    types = [TOKEN_NORMAL] * n_words
    for token, i in vocab.items():
        tokens[i] = token
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED
    if None in tokens:
        raise TokenizerError(f"{path}: no token has id {tokens.index(None)}; ids must be 0..{n_words - 1}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    config_path = directory / "tokenizer_config.json"
    config = _read_json(config_path, TokenizerError) if config_path.is_file() else {}
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        name = _token_content(config.get(key))
        if name is None:
            return None
        if name not in ids:
            raise TokenizerError(f"{config_path}: {key} {name!r} is not a token of {path}")
        return ids[name]

    bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
    if eos_id is None:
        raise TokenizerError(f"{config_path if config else path}: no eos_token; npllama would not know "
                             "where generation ends")
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # Llama 3 says it in the post-processor: "<|begin_of_text|>" then $A
        single = (data.get("post_processor") or {}).get("single") or []
        first = single[0].get("SpecialToken", {}).get("id") if single and isinstance(single[0], dict) else None
        add_bos = bos_id is not None and first == tokens[bos_id]
    stop_ids = {eos_id}
    generation_path = directory / "generation_config.json"
    if generation_path.is_file():
        eos = _read_json(generation_path).get("eos_token_id")
        stop_ids |= set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return Tokenizer.from_byte_level_bpe(str(path), tokens, types, pre, bos_id=bos_id, eos_id=eos_id,
                                         stop_ids=stop_ids, add_bos=bool(add_bos), merges=merges,
                                         chat_template=template)


def read_hf(directory: str | Path) -> tuple[ModelArgs, HFWeights, Tokenizer]:
    """Configuration, weights (Meta's names and q/k layout) and tokenizer of a HF Llama directory."""
    directory = Path(directory)
    args = hf_model_args(directory / "config.json")
    weights = hf_weights(directory, args)
    args = check_weights(weights, args, str(directory), config="config.json")
    return args, weights, hf_tokenizer(directory)

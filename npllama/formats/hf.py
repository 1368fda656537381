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
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from ..config import LIMITS, OUTPUT, ModelArgs, RopeScaling, meta_name
from ..errors import (CheckpointError, ConfigError, ConfigValueError, ModelNotFoundError, TokenizerError, clipped,
                      shown)
from ..tokenizer import (LLAMA3_PAT_STR, TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED,
                        Tokenizer)
from .shared import (LazyRows, check_weights, checked_size, describe_exception, open_regular, parse_json_int,
                     read_json)

# --- safetensors ---------------------------------------------------------------------------

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit


MAX_ELEMENTS = 1 << 48


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are unique: json.loads would keep the last of two silently."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("a key appears twice")
    return out


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a .safetensors file as read-only NumPy views of its memory map. Every entry of
    the header is checked before it sizes anything: its shape is a list of ints, its bytes are
    where its offsets say, within the file, and no two tensors share bytes."""
    path = Path(path)
    size = checked_size(path, ".safetensors", "safetensors", 8)
    with open_regular(path, "a .safetensors file") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path} is truncated or not a safetensors file (its header claims "
                                  f"{n} bytes, the file has {size - 8} after the length)")
        raw = f.read(n)
        try:
            header = json.loads(raw, object_pairs_hook=_unique_keys, parse_int=parse_json_int)
        except (ValueError, RecursionError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON "
                                  f"({describe_exception(e)}); the file is corrupt or not a safetensors file") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
        header.pop("__metadata__", None)
        data_start = 8 + n
        mm = np.memmap(f, dtype=np.uint8, mode="r") if header else None
    tensors, spans = {}, []
    for name, spec in header.items():
        dtype, shape, (begin, end) = _tensor_entry(path, clipped(name), spec)
        nbytes = math.prod(shape) * dtype.itemsize
        if not 0 <= begin <= end or end - begin != nbytes:
            raise CheckpointError(f"{path}: tensor {clipped(name)} ({spec['dtype']} {list(shape)}) has data "
                                  f"offsets {[begin, end]}, which do not fit its size; the file is corrupt")
        if data_start + end > size:
            raise CheckpointError(f"{path} is truncated: tensor {clipped(name)} ends {data_start + end - size} "
                                  "bytes past the end of the file; download it again")
        spans.append((begin, end, clipped(name)))
        tensors[name] = np.ndarray(shape, dtype, buffer=mm, offset=data_start + begin)
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first} and {second} overlap; the file is corrupt")
    return tensors


def _tensor_entry(path: Path, name: str, spec) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    """dtype, shape and data offsets of one header entry, each of the type and range it must be."""
    def ints(value, length=None) -> bool:
        return (isinstance(value, list) and (length is None or len(value) == length) and len(value) <= 8
                and all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in value))

    if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and spec["dtype"] in SAFETENSORS_DTYPES
            and ints(spec.get("shape"))
            and ints(spec.get("data_offsets"), 2) and math.prod(spec["shape"]) <= MAX_ELEMENTS):
        raise CheckpointError(f"{path}: tensor {name} has a malformed or unknown entry (dtype one of "
                              f"{', '.join(SAFETENSORS_DTYPES)}, shape and data_offsets lists of integers "
                              "expected); the file is corrupt")
    return np.dtype(SAFETENSORS_DTYPES[spec["dtype"]]), tuple(spec["shape"]), tuple(spec["data_offsets"])


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
    if index_path.exists():
        index = read_json(index_path, f"the {INDEX_FILE} of {directory}", CheckpointError)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no weight_map: it should map each tensor name "
                                  "to the shard file holding it")
        shards = {}
        for name, file in weight_map.items():
            if not isinstance(file, str) or file not in shards:
                shards[file] = read_safetensors(_shard_path(directory, index_path, name, file))
            if name not in shards[file]:
                raise CheckpointError(f"{directory / file} has no tensor {clipped(name)}, which {INDEX_FILE} "
                                      "says it holds; the shards and the index do not match")
        return {name: shards[file][name] for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if single.exists():
        return read_safetensors(single)
    other = sorted(p.name for p in directory.glob("*.safetensors"))
    if other:
        raise ModelNotFoundError(f"{directory} has {', '.join(other[:3])} but no {INDEX_FILE} saying "
                                 "which tensors each holds; download it too")
    bins = sorted(p.name for p in directory.glob("*.bin"))
    hint = (f" (it has {bins[0]}: npllama does not read PyTorch pickles from Hugging Face repos; "
            "download the .safetensors files instead)") if bins else ""
    raise ModelNotFoundError(f"{directory} has config.json but no model.safetensors or {INDEX_FILE}{hint}")


def _shard_path(directory: Path, index_path: Path, name: str, file) -> Path:
    """A shard the index names: a plain file name in the model directory, never a path that
    leads out of it (absolute, or through ..), which a hostile index could use to read any file."""
    if not isinstance(file, str) or len(file) > 255 or Path(file).name != file or file in (".", ".."):
        raise CheckpointError(f"{index_path} puts {clipped(name)} in {shown(file)}, which is not a file "
                              "name in the model directory; the index is corrupt or hostile")
    if not (directory / file).exists():
        raise ModelNotFoundError(f"{directory / file} not found, but {INDEX_FILE} puts {clipped(name)} "
                                 "in it: download the missing shard")
    return directory / file


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

# ModelArgs' fields as config.json names them, for messages in the file's own words.
CONFIG_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
               "n_kv_heads": "num_key_value_heads", "vocab_size": "vocab_size", "norm_eps": "rms_norm_eps",
               "rope_theta": "rope_theta", "ffn_hidden_dim": "intermediate_size",
               "tie_embeddings": "tie_word_embeddings", "rope_scaling.factor": "rope_scaling.factor",
               "rope_scaling.low_freq_factor": "rope_scaling.low_freq_factor",
               "rope_scaling.high_freq_factor": "rope_scaling.high_freq_factor",
               "rope_scaling.original_max_seq_len": "rope_scaling.original_max_position_embeddings"}


def hf_model_args(path: str | Path) -> ModelArgs:
    """ModelArgs from a LlamaForCausalLM config.json (max_seq_len: the caller's choice)."""
    path = Path(path)
    config = read_json(path, "a Hugging Face config.json", max_bytes=1 << 20)
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object")

    def get(key: str, kind: type | tuple = int, default: Any = ...) -> Any:
        value = config.get(key, default)
        if value is ...:
            raise ConfigError(f"{path} has no {key}, which a Llama config needs")
        if value is not default and (not isinstance(value, kind) or isinstance(value, bool) and kind is not bool):
            expected = "a number" if kind == (int, float) else f"a {getattr(kind, '__name__', kind)}"
            raise ConfigError(f"{path}: {key} is {shown(value)}; expected {expected}")
        return value

    kind, architectures = get("model_type", str, None), get("architectures", list, [])
    if kind != "llama":
        raise ConfigError(f"{path}: model_type is {shown(kind)}; npllama runs Llama models (model_type "
                          "'llama', architecture LlamaForCausalLM) only")
    if any(a != "LlamaForCausalLM" for a in architectures):
        other = next(a for a in architectures if a != "LlamaForCausalLM")
        raise ConfigError(f"{path}: architectures holds {shown(other)}; npllama runs LlamaForCausalLM only")
    if get("hidden_act", str, "silu") != "silu":
        raise ConfigError(f"{path}: hidden_act is {shown(config['hidden_act'])}; Llama's SwiGLU uses silu")
    for key in ("attention_bias", "mlp_bias"):
        if get(key, bool, False):
            raise ConfigError(f"{path}: {key} is true; npllama's Llama has no biases")
    rope = get("rope_parameters", dict, {})  # transformers >= 5 groups theta and scaling here
    scaling = get("rope_scaling", dict, None) or rope
    try:
        args = ModelArgs(
            dim=get("hidden_size"),
            n_layers=get("num_hidden_layers"),
            n_heads=get("num_attention_heads"),
            n_kv_heads=get("num_key_value_heads", int, None) or get("num_attention_heads"),
            vocab_size=get("vocab_size"),
            norm_eps=get("rms_norm_eps", (int, float)),
            # HF LlamaConfig's default, where neither place states it.
            rope_theta=rope.get("rope_theta", get("rope_theta", (int, float), 10000.0)),
            ffn_hidden_dim=get("intermediate_size"),
            rope_scaling=_rope_scaling(scaling, path),
            tie_embeddings=get("tie_word_embeddings", bool, False),
        )
    except ConfigValueError as e:
        raise ConfigError(f"{path}: {e.named(CONFIG_KEYS)}") from None
    head_dim = get("head_dim", int, args.head_dim)
    if head_dim != args.head_dim:
        raise ConfigError(f"{path}: head_dim is {head_dim} but hidden_size / num_attention_heads is "
                          f"{args.head_dim}; npllama needs them equal")
    return args


def _rope_scaling(config: dict, path: Path) -> RopeScaling | None:
    """Llama 3.1's rope_scaling {"rope_type": "llama3", "factor", ...} as Meta's RopeScaling."""
    kind = config.get("rope_type", config.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"{path}: rope_scaling type {shown(kind)} is not supported; npllama implements "
                          "Llama 3.1's ('llama3') only")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
               if k not in config]
    if missing:
        raise ConfigError(f"{path}: rope_scaling has no {', '.join(missing)}; Llama 3.1 gives factor, "
                          "low_freq_factor, high_freq_factor and original_max_position_embeddings")
    return RopeScaling(factor=config["factor"], low_freq_factor=config["low_freq_factor"],
                       high_freq_factor=config["high_freq_factor"],
                       original_max_seq_len=config["original_max_position_embeddings"])


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


def _checked(value, kind, what: str, path: Path, optional: bool = False):
    """A tokenizer file's value of the type it must have (a bool is not an int), else TokenizerError."""
    if optional and value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise TokenizerError(f"{path}: {what} is {shown(value)}; expected {name}")
    return value


def _token_ids(vocab: dict, added: list, path: Path) -> tuple[list[str], list[int]]:
    """Token strings and types by id. Ids must be 0..n-1 without gaps: the list is sized by how
    many tokens there are, never by an id, which a hostile file could set to 2^63."""
    tokens: dict[int, str] = {}
    types: dict[int, int] = {}
    for token, i in vocab.items():
        if type(i) is not int or i < 0:
            raise TokenizerError(f"{path}: token {shown(token)} has id {shown(i)}; ids are integers from 0")
        if i in tokens:
            raise TokenizerError(f"{path}: tokens {shown(tokens[i])} and {shown(token)} share id {i}")
        tokens[i], types[i] = token, TOKEN_NORMAL
    for t in added:  # added tokens may repeat a vocabulary entry (SmolLM2's do); they win
        if not (isinstance(t, dict) and type(t.get("id")) is int and t["id"] >= 0
                and isinstance(t.get("content"), str)):
            raise TokenizerError(f"{path}: added_tokens holds {shown(t)}; each must be an object with an "
                                 "integer id and a string content")
        tokens[t["id"]] = t["content"]
        types[t["id"]] = TOKEN_CONTROL if t.get("special") else TOKEN_USER_DEFINED
    n_words = len(tokens)
    if n_words > LIMITS["vocab_size"]:
        raise TokenizerError(f"{path} holds {n_words} tokens, more than any model's {LIMITS['vocab_size']}")
    if max(tokens, default=-1) >= n_words:
        gap = next(i for i in range(n_words) if i not in tokens)
        raise TokenizerError(f"{path}: no token has id {gap}, but ids go up to {max(tokens)}; ids must be "
                             f"0..{n_words - 1} without gaps")
    return [tokens[i] for i in range(n_words)], [types[i] for i in range(n_words)]


def hf_tokenizer(directory: Path) -> Tokenizer:
    """The byte-level BPE tokenizer of tokenizer.json, with tokenizer_config.json's settings."""
    path = directory / "tokenizer.json"
    if not path.exists():
        hint = " (it has tokenizer.model: a SentencePiece tokenizer, which npllama does not read)" \
            if (directory / "tokenizer.model").exists() else ""
        raise ModelNotFoundError(f"{path} not found{hint}: npllama needs the byte-level BPE tokenizer.json")
    data = _checked(read_json(path, "a Hugging Face tokenizer.json", TokenizerError), dict, "the file", path)
    model = _checked(data.get("model") or {}, dict, "model", path)
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise TokenizerError(f"{path}: the tokenizer model is {shown(model.get('type'))}"
                             f"{' with byte_fallback' if model.get('byte_fallback') else ''}; npllama "
                             "reads byte-level BPE tokenizers (Llama 3, SmolLM2)")
    if data.get("normalizer"):
        normalizer = data["normalizer"]
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise TokenizerError(f"{path} has a normalizer ({shown(kind)}); npllama's byte-level BPE tokenizers "
                             "apply none")
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    if pre is None:
        raise TokenizerError(f"{path}: the pre_tokenizer is none npllama knows (Llama 3's split regex, "
                             "SmolLM2's digits + ByteLevel, GPT-2's ByteLevel); its text would be split "
                             "differently from how the model was trained")
    tokens, types = _token_ids(_checked(model.get("vocab") or {}, dict, "model.vocab", path),
                               _checked(data.get("added_tokens", []), list, "added_tokens", path), path)
    merges = []
    for m in _checked(model.get("merges", []), list, "model.merges", path):
        if not (isinstance(m, str) or isinstance(m, list) and len(m) == 2 and all(isinstance(x, str) for x in m)):
            raise TokenizerError(f"{path}: model.merges holds {shown(m)}; each must be \"a b\" or [\"a\", \"b\"]")
        merges.append(m if isinstance(m, str) else " ".join(m))

    config_path = directory / "tokenizer_config.json"
    config = _checked(read_json(config_path, "a tokenizer_config.json", TokenizerError), dict, "the file",
                      config_path) if config_path.exists() else {}
    ids = {t: i for i, t in enumerate(tokens)}

    def special_id(key: str) -> int | None:
        value = config.get(key)
        name = value.get("content") if isinstance(value, dict) else value  # "<s>" or {"content": "<s>"}
        if name is None:
            return None
        if not isinstance(name, str) or name not in ids:
            raise TokenizerError(f"{config_path}: {key} {shown(name)} is not a token of {path}")
        return ids[name]

    bos_id, eos_id = special_id("bos_token"), special_id("eos_token")
    if eos_id is None:
        raise TokenizerError(f"{config_path if config else path}: no eos_token; npllama would not know "
                             "where generation ends")
    add_bos = _checked(config.get("add_bos_token"), bool, "add_bos_token", config_path, optional=True)
    if add_bos is None:  # Llama 3 says it in the post-processor: "<|begin_of_text|>" then $A
        post = data.get("post_processor")
        single = post.get("single") if isinstance(post, dict) else None
        first = single[0] if isinstance(single, list) and single and isinstance(single[0], dict) else {}
        special = first.get("SpecialToken")
        add_bos = bos_id is not None and isinstance(special, dict) and special.get("id") == tokens[bos_id]
    stop_ids = {eos_id}
    generation_path = directory / "generation_config.json"
    if generation_path.exists():
        generation = _checked(read_json(generation_path, "a generation_config.json", TokenizerError), dict,
                              "the file", generation_path)
        eos = generation.get("eos_token_id")
        for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            if type(i) is not int or not 0 <= i < len(tokens):
                raise TokenizerError(f"{generation_path}: eos_token_id holds {shown(i)}; expected ids of "
                                     f"the {len(tokens)}-token vocabulary")
            stop_ids.add(i)
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = next((t.get("template") for t in template if isinstance(t, dict)
                         and t.get("name") == "default"), None)
    template = _checked(template, str, "chat_template", config_path, optional=True)
    return Tokenizer.from_byte_level_bpe(str(path), tokens, types, pre, bos_id=bos_id, eos_id=eos_id,
                                         stop_ids=stop_ids, add_bos=add_bos, merges=merges,
                                         chat_template=template)


def read_hf(directory: str | Path) -> tuple[ModelArgs, HFWeights, Tokenizer]:
    """Configuration, weights (Meta's names and q/k layout) and tokenizer of a HF Llama directory."""
    directory = Path(directory)
    args = hf_model_args(directory / "config.json")
    weights = hf_weights(directory, args)
    args = check_weights(weights, args, str(directory), config="config.json")
    return args, weights, hf_tokenizer(directory)

"""Hugging Face directories: a random Meta checkpoint written out the way Hugging Face's
conversion script writes it (q/k rows permuted, HF names, safetensors, tokenizer.json built
from Meta's tokenizer.model) loads to the same logits and token ids as the Meta original."""

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import npllama
from npllama.config import RopeScaling, meta_name
from npllama.errors import CheckpointError, ConfigError, ModelNotFoundError, TokenizerError
from npllama.formats.hf import hf_model_args, meta_rows_of_hf, pre_tokenizer_name, read_hf, read_safetensors
from npllama.formats.meta import read_bpe_ranks, read_tokenizer_model
from npllama.tokenizer import LLAMA3_PAT_STR, gpt2_bytes_to_unicode
from oracle.checkpoints import llama3_tokenizer_path, tiny_args, write_random_checkpoint

TEXTS = ["Hello, world!\n\n  indented\tcode = f(x) ** 2  # 1234567", "Ünïcödé 漢字 🦙 مرحبا",
         "<|eot_id|> is plain text", "don't YOU'LL 3.14159 1,000,000\r\n"]


# ---- writing the Hugging Face layout --------------------------------------------------------

def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """convert_llama_weights_to_hf.py's permute, verbatim in effect."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


HF_NAMES = {"attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
            "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
            "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
            "feed_forward.w3": "mlp.up_proj"}


def hf_state_dict(meta: dict, args) -> dict:
    out = {}
    for name, t in meta.items():
        if name == "tok_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif name == "output.weight":
            out["lm_head.weight"] = t
        else:
            _, i, *rest = name.split(".")
            module = ".".join(rest[:-1])
            if module == "attention.wq":
                t = hf_permute(t, args.n_heads)
            elif module == "attention.wk":
                t = hf_permute(t, args.n_kv_heads)
            out[f"model.layers.{i}.{HF_NAMES[module]}.weight"] = t.contiguous()
    return out


def hf_config(args, **overrides) -> dict:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
              "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
              "intermediate_size": args.hidden_dim, "rms_norm_eps": args.norm_eps,
              "rope_theta": args.rope_theta, "vocab_size": args.vocab_size,
              "max_position_embeddings": 8192, "tie_word_embeddings": args.tie_embeddings,
              "rope_scaling": None, "torch_dtype": "bfloat16"}
    config.update(overrides)
    return config


def llama3_tokenizer_json() -> dict:
    """tokenizer.json for Meta's Llama 3 tokenizer.model, built the way transformers'
    TikTokenConverter does: GPT-2 strings for the ranks' bytes, every split of a token into
    two tokens as a merge (ordered by the token's rank), ignore_merges as in Meta's release."""
    ranks = read_bpe_ranks(llama3_tokenizer_path())
    table = gpt2_bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    merges = []
    for token, rank in ranks.items():  # in rank order
        splits = [(token[:i], token[i:]) for i in range(1, len(token))
                  if token[:i] in ranks and token[i:] in ranks]
        merges += [f"{text(a)} {text(b)}" for a, b in sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]]))]
    specials = read_tokenizer_model(llama3_tokenizer_path()).special_tokens
    return {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in specials.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PAT_STR}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [], "special_tokens": {"<|begin_of_text|>": {
                               "id": "<|begin_of_text|>", "ids": [128000], "tokens": ["<|begin_of_text|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True, "vocab": {text(b): r for b, r in ranks.items()}, "merges": merges},
    }


TEMPLATE = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}...{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf-tokenizer")
    (directory / "tokenizer.json").write_text(json.dumps(llama3_tokenizer_json()))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": TEMPLATE}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    return directory


def write_hf(directory, meta_dir, args, tokenizer_files, n_shards=1, **config):
    """The Meta checkpoint in meta_dir, written as Hugging Face's conversion script would."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    state = hf_state_dict(meta, args)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    (directory / "config.json").write_text(json.dumps(hf_config(args, **config)))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(tokenizer_files / name, directory / name)
    if n_shards == 1:
        save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = list(state)
    weight_map = {}
    for s in range(n_shards):
        file = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: state[n] for n in names[s::n_shards]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


ARGS = {"gqa": tiny_args(), "tied-scaled": tiny_args(tie_embeddings=True, rope_scaling=RopeScaling(factor=32.0)),
        "odd": tiny_args(dim=72, n_heads=6, n_kv_heads=3, ffn_dim_multiplier=None, multiple_of=7)}


@pytest.fixture(scope="module", params=list(ARGS))
def meta_checkpoint(request, random_checkpoint):
    args = ARGS[request.param]
    return args, random_checkpoint(args, seed=3)


def rope_config(args) -> dict:
    s = args.rope_scaling
    if s is None:
        return {}
    return {"rope_scaling": {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                             "high_freq_factor": s.high_freq_factor,
                             "original_max_position_embeddings": s.original_max_seq_len}}


def effective(args) -> dict:
    """What the forward pass uses (Meta states the FFN width as a formula, HF as a number)."""
    fields = dict(args.__dict__, hidden_dim=args.hidden_dim)
    for name in ("multiple_of", "ffn_dim_multiplier", "ffn_hidden_dim"):
        fields.pop(name)
    return fields


# ---- logits and weights -------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("n_shards", [1, 3])
def test_same_logits_as_meta_checkpoint(meta_checkpoint, tokenizer_files, tmp_path, n_shards, seed_prompt):
    args, meta_dir = meta_checkpoint
    hf_dir = write_hf(tmp_path / "hf", meta_dir, args, tokenizer_files, n_shards, **rope_config(args))
    # Bit-equal only at one thread count: by default each load follows the machine's load.
    meta, hf = npllama.load(meta_dir, threads=2), npllama.load(hf_dir, threads=2)
    assert effective(hf.args) == effective(meta.args)
    tokens = meta.tokenizer.encode(seed_prompt)
    assert hf.tokenizer.encode(seed_prompt) == tokens
    np.testing.assert_array_equal(hf.forward(tokens), meta.forward(tokens))
    # Streamed from the memory map (PermutedRows read tile by tile) gives the same logits too.
    streamed = npllama.load(hf_dir, weights_budget=0, weights="exact")
    assert not streamed.resident
    expected = meta.forward(tokens)
    # Tiles change BLAS's summation order: equal to float32 rounding (as in test_model.py).
    np.testing.assert_allclose(streamed.forward(tokens), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


@pytest.mark.slow
def test_weights_are_zero_copy_and_qk_rows_restored(meta_checkpoint, tokenizer_files, tmp_path):
    args, meta_dir = meta_checkpoint
    hf_dir = write_hf(tmp_path / "hf", meta_dir, args, tokenizer_files, **rope_config(args))
    _, weights, _ = read_hf(hf_dir)
    meta = torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    assert set(weights) == set(meta)
    for name, t in meta.items():
        w = weights[name]
        expected = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        if name.endswith(("wq.weight", "wk.weight")):
            assert type(w).__name__ == "PermutedRows"
            np.testing.assert_array_equal(np.asarray(w), expected)
            np.testing.assert_array_equal(w[3:7], expected[3:7])
        else:
            assert isinstance(w, np.ndarray) and w.dtype == ml_dtypes.bfloat16
            assert not w.flags.writeable and not w.flags.owndata  # a view of the memory map
            np.testing.assert_array_equal(w, expected)


def test_meta_names():
    args = tiny_args()
    hf = hf_state_dict({name: torch.zeros(shape) for name, shape in args.weight_shapes().items()}, args)
    assert sorted(meta_name(name, "hf") for name in hf) == sorted(args.weight_shapes())
    for other in ("model.layers.0.self_attn.q_proj.bias", "model.layers.x.mlp.up_proj.weight", "lm_head"):
        assert meta_name(other, "hf") is None


def test_meta_rows_of_hf_inverts_hf_permute():
    for n_heads, head_dim in [(1, 2), (4, 8), (3, 64)]:
        w = torch.arange(n_heads * head_dim * 5, dtype=torch.float32).reshape(n_heads * head_dim, 5)
        permuted = hf_permute(w, n_heads).numpy()
        np.testing.assert_array_equal(permuted[meta_rows_of_hf(len(w), n_heads)], w.numpy())


def test_config_mapping(tmp_path):
    args = tiny_args(rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                              original_max_seq_len=8192), tie_embeddings=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf_config(args, **rope_config(args))))
    got = hf_model_args(path)
    assert effective(got) == effective(args) and got.ffn_hidden_dim == args.hidden_dim
    # transformers >= 5 keeps theta and scaling in rope_parameters
    config = hf_config(args, rope_theta=None)
    del config["rope_theta"], config["rope_scaling"]
    config["rope_parameters"] = {**rope_config(args)["rope_scaling"], "rope_theta": 500000.0}
    path.write_text(json.dumps(config))
    got = hf_model_args(path)
    assert got.rope_theta == 500000.0 and got.rope_scaling == args.rope_scaling


@pytest.mark.slow
@pytest.mark.parametrize("change, error, message", [
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, ConfigError,
     "model_type is 'mistral'; npllama runs Llama models"),
    ({"architectures": ["LlamaForSequenceClassification"]}, ConfigError,
     "architectures holds 'LlamaForSequenceClassification'; npllama runs LlamaForCausalLM only"),
    ({"hidden_size": None}, ConfigError, "hidden_size is None"),
    ({"rms_norm_eps": "1e-5"}, ConfigError, "rms_norm_eps is '1e-5'"),
    ({"hidden_act": "gelu"}, ConfigError, "hidden_act is 'gelu'"),
    ({"attention_bias": True}, ConfigError, "attention_bias is true"),
    ({"head_dim": 16}, ConfigError, "head_dim is 16 but hidden_size / num_attention_heads is 8"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ConfigError, "rope_scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ConfigError, "rope_scaling has no low_freq_factor, high_freq_factor"),
    ({"intermediate_size": 100}, CheckpointError,
     r"feed_forward.w1.weight has shape \(224, 64\) but config.json implies \(100, 64\)"),
    ({"num_hidden_layers": 3}, CheckpointError, "has no layers.1.attention.wq.weight"),
])
def test_config_errors(tmp_path, tokenizer_files, change, error, message):
    args = tiny_args(n_layers=1)
    meta_dir = write_random_checkpoint(tmp_path / "meta", args)
    hf_dir = write_hf(tmp_path / "hf", meta_dir, args, tokenizer_files)
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(change)
    (hf_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        npllama.load(hf_dir)


def test_file_errors(tmp_path, tokenizer_files):
    args = tiny_args(n_layers=1)
    meta_dir = write_random_checkpoint(tmp_path / "meta", args)
    hf_dir = write_hf(tmp_path / "hf", meta_dir, args, tokenizer_files, n_shards=2)
    shard = hf_dir / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(CheckpointError,
                       match=r"model-00002-of-00002.safetensors is truncated: tensor .* ends 100 bytes past"):
        npllama.load(hf_dir)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        npllama.load(hf_dir)
    shard.unlink()
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002.safetensors not found, but "
                                                 "model.safetensors.index.json puts"):
        npllama.load(hf_dir)
    (hf_dir / "model.safetensors.index.json").unlink()
    with pytest.raises(ModelNotFoundError, match="no model.safetensors.index.json saying which"):
        npllama.load(hf_dir)
    (hf_dir / "model-00001-of-00002.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="does not read PyTorch pickles"):
        npllama.load(hf_dir)


def test_extra_tensor_refused(tmp_path, tokenizer_files):
    args = tiny_args(n_layers=1)
    hf_dir = write_hf(tmp_path / "hf", write_random_checkpoint(tmp_path / "meta", args), args, tokenizer_files)
    state = dict(read_safetensors(hf_dir / "model.safetensors"))
    state = {k: torch.from_numpy(np.array(v).view(np.int16)).view(torch.bfloat16) for k, v in state.items()}
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64, dtype=torch.bfloat16)
    save_file(state, hf_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="holds tensor model.layers.0.self_attn.q_proj.bias, which a Llama"):
        npllama.load(hf_dir)


def test_safetensors_reader_matches_the_library(tmp_path):
    from safetensors.numpy import load_file, save_file as save_numpy
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 0), np.float16),
               "c": np.array([1, -2], np.int64), "d": np.array(3.5)}
    save_numpy(tensors, tmp_path / "x.safetensors")
    ours, theirs = read_safetensors(tmp_path / "x.safetensors"), load_file(tmp_path / "x.safetensors")
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape
        np.testing.assert_array_equal(ours[name], theirs[name])


# ---- tokenizer.json -----------------------------------------------------------------------

@pytest.mark.slow
def test_tokenizer_json_gives_meta_ids(tokenizer_files, seed_prompt):
    from npllama.formats.hf import hf_tokenizer
    hf = hf_tokenizer(tokenizer_files)
    meta = read_tokenizer_model(llama3_tokenizer_path())
    assert hf.n_words == meta.n_words and hf.special_tokens == meta.special_tokens
    assert (hf.bos_id, hf.eos_id, hf.add_bos) == (128000, 128009, True)
    assert hf.stop_ids == {128001, 128008, 128009}
    assert hf.chat_template == TEMPLATE
    for text in [seed_prompt, *TEXTS]:
        assert hf.encode(text) == meta.encode(text)
    # ...and the same as Hugging Face's own library reading the same file, where it is installed.
    tokenizers = pytest.importorskip("tokenizers")
    library = tokenizers.Tokenizer.from_file(str(tokenizer_files / "tokenizer.json"))
    for text in [seed_prompt, *TEXTS]:
        if "<|" not in text:  # the library matches special-token text; npllama keeps it plain
            assert library.encode(text).ids == hf.encode(text)


@pytest.mark.slow
@pytest.mark.parametrize("post_processor, adds_bos", [
    ("Llama 3's template", True), (None, False),
    ({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}, False)])
def test_add_bos_defaults_to_the_post_processor(tmp_path, tokenizer_files, post_processor, adds_bos):
    """tokenizer_config.json without add_bos_token: the post-processor decides. Llama 3's puts
    <|begin_of_text|> before $A; a plain ByteLevel one (SmolLM2's) adds nothing, even though
    bos_token names a token."""
    from npllama.formats.hf import hf_tokenizer
    data = json.loads((tokenizer_files / "tokenizer.json").read_text())
    if post_processor != "Llama 3's template":
        data["post_processor"] = post_processor
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((tokenizer_files / "tokenizer_config.json").read_text())
    assert "add_bos_token" not in config and config["bos_token"] == "<|begin_of_text|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = hf_tokenizer(tmp_path)
    assert tok.add_bos is adds_bos
    assert (tok.encode("hi")[0] == 128000) is adds_bos


@pytest.mark.parametrize("pre, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]},
     "smollm"),
    ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, None),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": r"\p{N}{1,3}"},
                                             "behavior": "Isolated", "invert": False},
                                            {"type": "ByteLevel", "use_regex": False}]}, None),
    ({"type": "Metaspace", "replacement": "▁"}, None),
    (None, None),
])
def test_pre_tokenizer_names(pre, name):
    assert pre_tokenizer_name(pre) == name


@pytest.mark.slow
def test_tokenizer_json_errors(tmp_path, tokenizer_files):
    from npllama.formats.hf import hf_tokenizer
    data = json.loads((tokenizer_files / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Metaspace"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="the pre_tokenizer is none npllama knows"):
        hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(TokenizerError, match="the tokenizer model is 'Unigram'"):
        hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="SentencePiece tokenizer, which npllama does not read"):
        hf_tokenizer(tmp_path)

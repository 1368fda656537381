"""Random Llama 3 checkpoints in Meta's exact on-disk format, for tests and benchmarks.

`write_random_checkpoint(dir, args)` writes what Meta ships in a model directory:
params.json, consolidated.00.pth (a torch.save'd dict of bf16 tensors with Meta's
names) and tokenizer.model (the real Llama 3 one, from the `llama-models` wheel).
Any shape works, from a 2-layer toy up to the full Meta-Llama-3-8B. `write_shards` splits a
state dict the way Meta saves a model-parallel checkpoint (consolidated.00.pth, .01, ...).
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

import torch

from npllama.config import ModelArgs
from npllama.formats.meta import params_json

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

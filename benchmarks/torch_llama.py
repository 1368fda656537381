"""The torch baseline: Llama 3 with a KV cache as Meta's reference writes it, without fairscale. Not
oracle.reference.Oracle, built to be checked, not timed (every position's logits, each key/value head
copied for its query heads every step): a baseline slow enough to flatter npllama. This one multiplies by
the checkpoint's [out, in] weights in place (a mapped bf16 state dict stays mapped), keeps a heads-first
cache [KV, max_seq_len, hd] as npllama does, attends with SDPA's enable_gqa, and gives the last logits only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from npllama.config import EMBEDDING, LAYER_TENSORS, NORM, OUTPUT, ModelArgs, layer_name
from oracle.reference import apply_rope, rms_norm, rope_frequencies, rope_tables


class TorchLlama:
    """Weights (Meta's names, used in place), RoPE table and KV cache; `forward` as Meta's."""

    def __init__(self, args: ModelArgs, state_dict: dict[str, torch.Tensor], dtype=torch.float32,
                 max_seq_len: int | None = None):
        self.args, self.dtype = args, dtype
        # .to() is a no-op (no copy) when the stored dtype already matches: bf16 stays mapped.
        w = {name: t.to(dtype) for name, t in state_dict.items()}
        self.tok_embeddings = w[EMBEDDING.meta]  # [V, D]
        self.output = w.get(OUTPUT.meta, self.tok_embeddings)  # [V, D] (tied in Llama 3.2)
        self.norm = w[NORM.meta]  # [D]
        self.layers = [{t.key: w[layer_name(t.meta, i)] for t in LAYER_TENSORS} for i in range(args.n_layers)]
        self.max_seq_len = max_seq_len or args.max_seq_len
        # The oracle's RoPE table (Meta's precompute_freqs_cis): the baseline differs only in speed.
        self.freqs_cis = rope_tables(rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling),
                                     self.max_seq_len)  # [P, hd/2] complex64
        self.cache_k = self.cache_v = None

    def new_cache(self):
        """Preallocate the KV cache (a separate step, as npllama's new_cache)."""
        shape = (self.args.n_kv_heads, self.max_seq_len, self.args.head_dim)
        self.cache_k = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.args.n_layers)]
        self.cache_v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.args.n_layers)]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int, last_only: bool = True) -> torch.Tensor:
        """float32 logits [T or 1, V] for tokens at positions start_pos.. (cache holds the rest)."""
        args = self.args
        n_new = tokens.shape[0]
        end = start_pos + n_new
        freqs_cis = self.freqs_cis[start_pos:end]  # [T, hd/2]
        mask = None
        if n_new > 1:  # the new block is causal; every cached position is visible
            mask = torch.ones(n_new, end, dtype=torch.bool).tril(diagonal=start_pos)  # [T, S]
        h = F.embedding(tokens, self.tok_embeddings)  # [T, D]
        for w, ck, cv in zip(self.layers, self.cache_k, self.cache_v):
            x = rms_norm(h, w["attention_norm"], args.norm_eps)  # [T, D]
            q = F.linear(x, w["wq"]).view(n_new, args.n_heads, args.head_dim)  # [T, H, hd]
            k = F.linear(x, w["wk"]).view(n_new, args.n_kv_heads, args.head_dim)  # [T, KV, hd]
            v = F.linear(x, w["wv"]).view(n_new, args.n_kv_heads, args.head_dim).transpose(0, 1)  # [KV, T, hd]
            q = apply_rope(q, freqs_cis).type_as(x).transpose(0, 1)  # [H, T, hd]
            k = apply_rope(k, freqs_cis).type_as(x).transpose(0, 1)  # [KV, T, hd]
            ck[:, start_pos:end] = k
            cv[:, start_pos:end] = v
            keys, values = ck[:, :end], cv[:, :end]  # [KV, S, hd]
            # With a batch axis SDPA takes its fused CPU kernel (3-D inputs fall back to the
            # unfused math path).
            attn = F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask,
                                                  enable_gqa=True)[0]  # [H, T, hd]
            h = h + F.linear(attn.transpose(0, 1).reshape(n_new, -1), w["wo"])  # [T, D]
            x = rms_norm(h, w["ffn_norm"], args.norm_eps)  # [T, D]
            h = h + F.linear(F.silu(F.linear(x, w["w1"])) * F.linear(x, w["w3"]), w["w2"])  # [T, D]
        if last_only:
            h = h[-1:]  # [1, D]
        return F.linear(rms_norm(h, self.norm, args.norm_eps), self.output).float()  # [T, V]

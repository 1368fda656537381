"""The torch oracle: the same Llama 3 math, formulated the way the notebook and Meta write it.

It mirrors npllama/layers.py and npllama/model.py function by function (same names, so the two
can be read side by side) but is an independent formulation: RoPE by complex multiplication
(torch.polar / view_as_complex) instead of cos/sin of interleaved pairs, GQA by repeating key
heads (Meta's repeat_kv) instead of grouping query heads, torch's own softmax and silu, the
token-major [T, H, hd] layout. Trace arrays are returned in npllama's layouts for comparison.

dtype=torch.bfloat16 follows the notebook's dtype flow: bf16 weights, activations and matmul
outputs; norms computed in float32 and cast back; q and k rotated in float32 and left there, so
scores, mask and softmax are float32; probabilities cast to bf16 before they weight the values.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from npllama.config import ModelArgs, RopeScaling


def embed(tokens: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return F.embedding(tokens, table)  # [T] -> [T, D]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).type_as(x)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)  # [T, in] -> [T, out]


def scale_rope_frequencies(freqs: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Meta's apply_scaling (llama_models/llama3/model.py), with the factors as parameters."""
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * torch.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / s.factor, freqs)
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    return torch.where((wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen),
                       (1 - smooth) * new_freqs / s.factor + smooth * new_freqs, new_freqs)


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return freqs if scaling is None else scale_rope_frequencies(freqs, scaling)  # [hd/2]


def rope_tables(freqs: torch.Tensor, n_positions: int) -> torch.Tensor:
    """The notebook's freqs_cis: e^(i * pos * freq) as complex64."""
    angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), freqs)  # [P, hd/2]
    return torch.polar(torch.ones_like(angles), angles)  # [P, hd/2] complex


def apply_rope(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Adjacent dims as (real, imag) of a complex number, multiplied by e^(i*angle)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # [(B,) T, H, hd/2] complex
    # Stays float32, as in the notebook: scores and their softmax are computed in float32.
    return torch.view_as_real(pairs * freqs_cis[:, None, :]).flatten(-2)  # [(B,) T, H, hd]


def causal_mask(n_new: int, start_pos: int) -> torch.Tensor:
    """Meta's mask: -inf above the diagonal of the new block, zeros for the cached prefix."""
    mask = torch.triu(torch.full((n_new, n_new), float("-inf")), diagonal=1)
    return torch.hstack([torch.zeros((n_new, start_pos)), mask])  # [T, S]


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return torch.repeat_interleave(x, n_rep, dim=-2)  # [(B,) S, KV, hd] -> [(B,) S, H, hd]


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    n_rep = q.shape[-2] // k.shape[-2]
    keys = repeat_kv(k, n_rep)  # [(B,) S, H, hd]
    return torch.matmul(q.transpose(-3, -2), keys.movedim(-3, -1)) / math.sqrt(q.shape[-1])  # [(B,) H, T, S]


def softmax(x: torch.Tensor, dtype) -> torch.Tensor:
    return F.softmax(x.float(), dim=-1).to(dtype)


def attention_output(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    values = repeat_kv(v, probs.shape[-3] // v.shape[-2]).transpose(-3, -2)  # [(B,) H, S, hd]
    out = torch.matmul(probs, values)  # [(B,) H, T, hd]
    return out.transpose(-3, -2).flatten(-2)  # [(B,) T, H*hd]


def attention(q, k, v, mask, record):
    scores = record("scores", attention_scores(q, k))
    masked = record("masked_scores", scores + mask)
    probs = record("probs", softmax(masked, v.dtype))
    return attention_output(probs, v)


def silu(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)


def feed_forward(x, w1, w2, w3, record):
    gate = record("gate", linear(x, w1))
    up = record("up", linear(x, w3))
    hidden = record("hidden", record("silu_gate", silu(gate)) * up)
    return linear(hidden, w2)


def transformer_block(x, w: dict, args: ModelArgs, freqs_cis, mask, cache_k, cache_v, start_pos, record):
    """x [T, D], or [B, T, D] with caches [B, P, KV, hd] for a batch of rows of equal length."""
    rows, end = x.shape[:-1], start_pos + x.shape[-2]
    xn = record("attention_norm", rms_norm(x, w["attention_norm.weight"], args.norm_eps))
    q = record("q", linear(xn, w["attention.wq.weight"]).view(*rows, args.n_heads, args.head_dim))
    k = record("k", linear(xn, w["attention.wk.weight"]).view(*rows, args.n_kv_heads, args.head_dim))
    v = record("v", linear(xn, w["attention.wv.weight"]).view(*rows, args.n_kv_heads, args.head_dim))
    q = record("q_rot", apply_rope(q, freqs_cis))
    k = record("k_rot", apply_rope(k, freqs_cis))
    cache_k[..., start_pos:end, :, :] = k
    cache_v[..., start_pos:end, :, :] = v
    attn = record("attention", attention(q, cache_k[..., :end, :, :], cache_v[..., :end, :, :], mask, record))
    h = record("residual", x + record("attention_out", linear(attn, w["attention.wo.weight"])))
    hn = record("ffn_norm", rms_norm(h, w["ffn_norm.weight"], args.norm_eps))
    ffn = feed_forward(hn, w["feed_forward.w1.weight"], w["feed_forward.w2.weight"],
                       w["feed_forward.w3.weight"], record)
    return record("out", h + record("ffn_out", ffn))


# Names whose torch layout is token-major [T, H, hd]; npllama keeps them heads-first.
HEAD_MAJOR = ("q", "k", "v", "q_rot", "k_rot")


class Oracle:
    """Meta-named torch weights plus the cache and rope table a forward pass needs."""

    def __init__(self, args: ModelArgs, state_dict: dict[str, torch.Tensor], dtype=torch.float32,
                 max_seq_len: int | None = None):
        self.args, self.dtype = args, dtype
        self.weights = {name: t.to(dtype) for name, t in state_dict.items()}
        if "output.weight" not in self.weights:  # tied embeddings (Llama 3.2)
            self.weights["output.weight"] = self.weights["tok_embeddings.weight"]
        self.layers = [{name[len(f"layers.{i}."):]: t for name, t in self.weights.items()
                        if name.startswith(f"layers.{i}.")} for i in range(args.n_layers)]
        self.max_seq_len = max_seq_len or args.max_seq_len
        self.freqs_cis = rope_tables(rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling),
                                     self.max_seq_len)
        self.reset()

    @classmethod
    def of(cls, model, dtype=torch.float32, max_seq_len: int | None = None) -> Oracle:
        """The oracle on an npllama model's own weights (as float32 tensors with Meta's names), so
        that any checkpoint npllama loads can be checked."""
        with warnings.catch_warnings():
            # Read-only memory maps (GGUF) stay shared rather than copied: the oracle never writes them.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            state = {name: torch.from_numpy(np.asarray(w, dtype=np.float32)) for name, w in model.weights.items()}
        return cls(model.args, state, dtype=dtype, max_seq_len=max_seq_len)

    def reset(self, batch: int | None = None):
        """Empty caches, for one sequence or for `batch` rows."""
        shape = (*([batch] if batch else []), self.max_seq_len, self.args.n_kv_heads, self.args.head_dim)
        # Keys are cached after RoPE, which the notebook's flow leaves in float32.
        self.cache_k = [torch.zeros(shape) for _ in range(self.args.n_layers)]
        self.cache_v = [torch.zeros(shape, dtype=self.dtype) for _ in range(self.args.n_layers)]

    @torch.inference_mode()
    def forward(self, tokens, start_pos: int = 0, trace: dict | None = None,
                inputs: dict | None = None) -> np.ndarray:
        """float32 logits [T, V] of tokens [T], or [B, T, V] of a batch [B, T] after reset(B);
        `trace` receives every intermediate as a float32 NumPy array in npllama's layout and names.

        `inputs`, an npllama trace of the same tokens, makes every layer (and the final norm and
        the output layer) start from npllama's own input to it instead of the oracle's: end to
        end, a difference of one rounding step anywhere is carried into every later layer and
        grows (in the bf16 flow a 30-layer model drifts past the bound by layer 3 or 4 although
        each layer, given the same input, agrees within it). Feeding both the same input tests
        each layer alone."""
        args, w = self.args, self.weights
        tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        n_new = tokens.shape[-1]
        freqs_cis = self.freqs_cis[start_pos:start_pos + n_new]
        mask = causal_mask(n_new, start_pos)

        def recorder(prefix):
            def record(name, x):
                if trace is not None:
                    a = x.float()
                    trace[prefix + name] = (a.transpose(-3, -2) if name in HEAD_MAJOR else a).numpy().copy()
                return x
            return record

        def given(name, x):  # the step's own input, or npllama's (exact: bf16 flow values are bf16)
            return x if inputs is None else torch.from_numpy(np.ascontiguousarray(inputs[name])).to(self.dtype)

        h = recorder("")("embedding", embed(tokens, w["tok_embeddings.weight"]))
        for i, layer in enumerate(self.layers):
            h = given("embedding" if i == 0 else f"layers.{i - 1}.out", h)
            h = transformer_block(h, layer, args, freqs_cis, mask, self.cache_k[i], self.cache_v[i],
                                  start_pos, recorder(f"layers.{i}."))
        h = given(f"layers.{args.n_layers - 1}.out", h)
        h = given("norm", recorder("")("norm", rms_norm(h, w["norm.weight"], args.norm_eps)))
        return recorder("")("logits", linear(h, w["output.weight"])).float().numpy()

    def greedy(self, prompt: list[int], n_new: int) -> list[int]:
        """Greedy decoding with the KV cache: prefill the prompt, then one token per step."""
        self.reset()
        logits = self.forward(prompt)
        out = []
        for _ in range(n_new):
            out.append(int(np.argmax(logits[-1])))
            logits = self.forward([out[-1]], start_pos=len(prompt) + len(out) - 1)
        return out

    def greedy_batch(self, prompts: list[list[int]], n_new: int) -> list[list[int]]:
        """Greedy continuations of a batch, the way Meta's generate does it (llama_models/llama3/
        generation.py): rows padded on the right, every row advanced one position per step from
        the shortest prompt's end, and a row still inside its prompt fed its own next prompt
        token instead of the one predicted. No pad is ever fed. The first n_new new tokens of each row."""
        lengths = [len(p) for p in prompts]
        total = max(lengths) + n_new
        tokens = torch.full((len(prompts), total), -1, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p)
        in_prompt = tokens != -1
        self.reset(batch=len(prompts))
        prev = 0
        for cur in range(min(lengths), total):
            logits = self.forward(tokens[:, prev:cur], start_pos=prev)  # [B, cur-prev, V]
            predicted = torch.from_numpy(logits[:, -1].argmax(-1))
            tokens[:, cur] = torch.where(in_prompt[:, cur], tokens[:, cur], predicted)
            prev = cur
        return [tokens[i, n:n + n_new].tolist() for i, n in enumerate(lengths)]

"""Properties the math must have whatever the sizes: RoPE is a rotation that sees only relative
positions, the mask is causal, GQA is multi-head attention with shared keys, the KV cache changes
nothing, RMSNorm normalises with the configured eps, softmax and silu never overflow, and no size
is hard-coded.

Each test's docstring names the bug it exists to catch. Tolerances are derived from float32
rounding (U = 2^-24, the unit roundoff) where a bound is easy to state, and say so.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from npllama.config import RopeScaling
from npllama.layers import (apply_rope, attention, attention_output, attention_scores, causal_mask,
                            rms_norm, rope_frequencies, rope_tables, silu, softmax)
from npllama.model import Llama
from oracle.checkpoints import random_state_dict, tiny_args
from oracle.reference import Oracle

U = 2.0 ** -24  # float32 unit roundoff: |fl(x) - x| <= U |x|

# database=None: properties are re-drawn each run, nothing is written next to the code.
FAST = settings(deadline=None, max_examples=150, database=None)
MODEL = settings(deadline=None, max_examples=30, database=None)

head_dims = st.integers(1, 128).map(lambda n: 2 * n)  # every even head_dim in 2..256
thetas = st.floats(2.0, 1e7)  # >= 2 keeps every frequency <= 1 (used by the angle bound below)
seeds = st.integers(0, 2**32 - 1)


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|: the error relative to the array's scale."""
    expected = np.asarray(expected, np.float64)
    scale = float(np.max(np.abs(expected)))
    return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))) / (scale or 1.0)


def rope_at(x: np.ndarray, positions, freqs: np.ndarray) -> np.ndarray:
    """apply_rope on x [H, T, hd] with the tables' rows for the given absolute positions."""
    positions = np.asarray(positions)
    cos, sin = rope_tables(freqs, np.arange(int(positions.max()) + 1))  # [P, hd/2] each
    return apply_rope(x, cos[positions], sin[positions])  # [H, T, hd]


def meta_apply_scaling(freqs, s: RopeScaling) -> list[float]:
    """Meta's `apply_scaling` (llama_models/llama3/model.py, Llama 3.1) transcribed line for line,
    in float64, with its constants (8192, 1, 4, 8) taken from `s`."""
    low_freq_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_freq_wavelen = s.original_max_seq_len / s.high_freq_factor
    new_freqs = []
    for freq in map(float, freqs):
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / s.factor)
        else:
            smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor)
            new_freqs.append((1 - smooth) * freq / s.factor + smooth * freq)
    return new_freqs


# ---------------------------------------------------------------------------------------------
# 1. RoPE
# ---------------------------------------------------------------------------------------------

@FAST
@given(hd=head_dims, theta=thetas, positions=st.lists(st.integers(0, 4095), min_size=1, max_size=6),
       n_heads=st.integers(1, 3), seed=seeds)
def test_rope_preserves_every_vector_norm(hd, theta, positions, n_heads, seed):
    """A rotation keeps |x|. Catches a sign error in only one of the two rotated components
    (even*sin - odd*cos), cos used twice, or sin/cos from different angles."""
    x = np.random.default_rng(seed).standard_normal((n_heads, len(positions), hd)).astype(np.float32)
    y = rope_at(x, positions, rope_frequencies(hd, theta))
    before = np.linalg.norm(x.astype(np.float64), axis=-1)
    after = np.linalg.norm(y.astype(np.float64), axis=-1)
    # Each rotated component carries ~3 roundings (two products, one sum) plus cos/sin's own.
    np.testing.assert_allclose(after, before, rtol=1e-5)


@st.composite
def position_pairs(draw, limit=2048):
    """m, n and a shift s (possibly negative) with m, n, m+s, n+s all in [0, limit)."""
    m, n = draw(st.integers(0, limit - 1)), draw(st.integers(0, limit - 1))
    s = draw(st.integers(-min(m, n), limit - 1 - max(m, n)))
    return m, n, s


@FAST
@given(hd=head_dims, theta=thetas, mns=position_pairs(), seed=seeds)
@example(hd=128, theta=500000.0, mns=(2047, 0, 0), seed=0).via("largest angles")
@example(hd=128, theta=500000.0, mns=(0, 7, 2040), seed=1).via("largest shift")
def test_rope_scores_depend_only_on_relative_position(hd, theta, mns, seed):
    """q.k after RoPE is a function of m - n only. Catches angles that are not linear in the
    position (e.g. tables indexed off by a scaled or squared position) and non-rotations.

    Tolerance: the angle p*f_i is rounded to float32 once, an error <= U*p*f_i <= U*p (f_i <= 1
    for theta >= 1). The rotated dot is sum_i |q_i||k_i| cos(a_i(m) - a_i(n) + phi_i), so each
    side is off by at most |q||k| U (m + n) (Cauchy-Schwarz over the pairs); the two sides
    together by |q||k| U (2m + 2n + 2s). 2e-6 |q||k| more covers cos/sin (~1 ulp) and the
    rotation's own roundings on both vectors. At positions < 2048 that is <= 4.9e-4 |q||k|."""
    m, n, s = mns
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 1, 1, hd)).astype(np.float32)  # [1, 1, hd] each
    freqs = rope_frequencies(hd, theta)
    dot = lambda a, b: float(a.astype(np.float64).ravel() @ b.astype(np.float64).ravel())
    near = dot(rope_at(q, [m], freqs), rope_at(k, [n], freqs))
    far = dot(rope_at(q, [m + s], freqs), rope_at(k, [n + s], freqs))
    qk = float(np.linalg.norm(q.astype(np.float64)) * np.linalg.norm(k.astype(np.float64)))
    bound = qk * (U * (2 * m + 2 * n + 2 * s) + 2e-6)
    assert abs(near - far) <= bound, (near, far, bound)


@FAST
@given(hd=head_dims, theta=thetas, n_heads=st.integers(1, 4), seed=seeds)
def test_rope_position_zero_is_the_identity(hd, theta, n_heads, seed):
    """Angle 0 at position 0, exactly. Catches tables that start at position 1
    (np.arange(1, P + 1)) or a model that reads the table one row late."""
    freqs = rope_frequencies(hd, theta)
    cos, sin = rope_tables(freqs, np.arange(3))
    assert np.array_equal(cos[0], np.ones(hd // 2)) and np.array_equal(sin[0], np.zeros(hd // 2))
    x = np.random.default_rng(seed).standard_normal((n_heads, 1, hd)).astype(np.float32)
    assert np.array_equal(apply_rope(x, cos[:1], sin[:1]), x)


@FAST
@given(hd=head_dims, theta=st.floats(2.0, 1e7) | st.sampled_from([10000.0, 500000.0]))
@example(hd=128, theta=500000.0)
def test_rope_frequencies_follow_theta(hd, theta):
    """freqs[i] = theta^(-2i/hd) for the theta given. Catches an ignored theta (Llama 2's 10000
    silently used), a missing factor 2 (i/hd), or the exponent's sign.

    Tolerance: float32 rounding of theta, of the exponent 2i/hd and of pow and 1/x gives a
    relative error <= U (ln(theta) + ~4); 8 U of slack is ample."""
    freqs = rope_frequencies(hd, theta)
    assert freqs.shape == (hd // 2,) and freqs.dtype == np.float32
    expected = float(theta) ** (-2.0 * np.arange(hd // 2) / hd)  # float64
    np.testing.assert_allclose(freqs, expected, rtol=U * (math.log(theta) + 8))
    if hd >= 4:  # the first frequency that depends on theta at all
        assert math.isclose(float(freqs[1]), theta ** (-2 / hd), rel_tol=U * (math.log(theta) + 8))


@FAST
@given(hd=head_dims, theta=thetas, n_pos=st.integers(1, 8), seed=seeds)
def test_rope_rotates_interleaved_pairs_like_complex_multiplication(hd, theta, n_pos, seed):
    """Pair i is (x[2i], x[2i+1]) = x[2i] + j x[2i+1], multiplied by e^(j pos f_i), as Meta's
    view_as_complex does. Catches the HF "halves" pairing (x[i], x[i + hd/2]) and a rotation by
    -angle (sin's sign flipped in both components), which keep norms and relative positions.

    The reference is complex128 on the same float32 tables; the float32 rotation is within a few
    roundings of |x| (3e-7 |x|), 1e-6 |x| is the bound used."""
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, 2048, size=n_pos)
    x = rng.standard_normal((2, n_pos, hd)).astype(np.float32)  # [H, T, hd]
    cos, sin = rope_tables(rope_frequencies(hd, theta), np.arange(2048))
    y = apply_rope(x, cos[positions], sin[positions])

    z = x[..., 0::2].astype(np.complex128) + 1j * x[..., 1::2]  # [H, T, hd/2]
    w = z * (cos[positions].astype(np.float64) + 1j * sin[positions])  # [H, T, hd/2]
    expected = np.empty(x.shape, np.float64)
    expected[..., 0::2], expected[..., 1::2] = w.real, w.imag
    assert np.max(np.abs(y - expected)) <= 1e-6 * np.max(np.abs(x))


scalings = st.builds(
    lambda factor, low, gap, original: RopeScaling(factor=factor, low_freq_factor=low,
                                                   high_freq_factor=low + gap,
                                                   original_max_seq_len=original),
    factor=st.floats(1.5, 64.0), low=st.floats(0.5, 4.0), gap=st.floats(0.5, 8.0),
    original=st.integers(64, 65536))


@FAST
@given(hd=st.integers(4, 128).map(lambda n: 2 * n), theta=st.floats(100.0, 1e7), s=scalings)
@example(hd=128, theta=500000.0, s=RopeScaling())  # Llama 3.1 / 3.2 as shipped
@example(hd=64, theta=500000.0, s=RopeScaling(factor=32.0))  # Llama 3.2 1B
def test_scaled_rope_matches_meta_apply_scaling(hd, theta, s):
    """High frequencies (wavelength < original/high_freq_factor) kept, low ones (wavelength >
    original/low_freq_factor) divided by factor, the band between blended as Meta does.
    Catches scaling every frequency, swapping the two thresholds, or blending from the already
    divided frequency.

    Meta's piecewise function is continuous at both thresholds, so npllama's float32 wavelength
    may classify a frequency at a threshold differently without changing its value: the regime
    checks skip a 1e-4 margin around the thresholds, the comparison with Meta does not.

    In the band, Meta (in float32, as npllama) computes smooth = (L/wavelen - low) / (high - low):
    rounding the wavelength, the quotient and the difference moves smooth by <= 4 U (L/wavelen
    + low) / (high - low), and the result by f (1 - 1/factor) times that. A narrow band
    (high - low = 0.5) with a large factor amplifies float32 rounding to ~1e-5 relative, so the
    comparison with the float64 transcription allows exactly that bound, plus 1e-6 relative."""
    base = rope_frequencies(hd, theta).astype(np.float64)
    scaled = rope_frequencies(hd, theta, s).astype(np.float64)
    wavelen = 2 * np.pi / base
    high = wavelen < s.original_max_seq_len / s.high_freq_factor * (1 - 1e-4)
    low = wavelen > s.original_max_seq_len / s.low_freq_factor * (1 + 1e-4)
    np.testing.assert_allclose(scaled[high], base[high], rtol=1e-6)
    np.testing.assert_allclose(scaled[low], base[low] / s.factor, rtol=1e-6)
    meta = np.array(meta_apply_scaling(base, s))
    smooth_err = 4 * U * (s.original_max_seq_len / wavelen + s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    bound = 1e-6 * meta + base * (1 - 1 / s.factor) * smooth_err
    assert np.all(np.abs(scaled - meta) <= bound), np.max(np.abs(scaled - meta) / bound)
    if s == RopeScaling() and hd == 128:  # the shipped configuration has all three regimes
        assert high.any() and low.any() and (~high & ~low).any()


# ---------------------------------------------------------------------------------------------
# 2. Causal mask and attention probabilities
# ---------------------------------------------------------------------------------------------

@FAST
@given(n_new=st.integers(1, 16), start_pos=st.integers(0, 32), n_kv=st.integers(1, 3),
       n_rep=st.integers(1, 3), hd=st.integers(1, 32).map(lambda n: 2 * n),
       scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]), seed=seeds)
def test_causal_mask_and_softmax_rows(n_new, start_pos, n_kv, n_rep, hd, scale, seed):
    """The mask is [T, start_pos + T], zero over the cached prefix, -inf exactly where the key
    comes after the query; the probabilities are >= 0, exactly 0 on future keys, and each row
    sums to 1. Catches a mask without the cache columns, one that forgets start_pos (masks
    cached keys), `>=` instead of `>` (a token blind to itself: NaN rows at T=1), or a mask
    the attention forgets to add.

    Rows sum to 1 within 1e-6: p_i = e_i / fl(sum e), so sum p_i is off by the relative error of
    the float32 sum (numpy's 8-lane pairwise loop: <= ~9 U for S <= 48) plus one rounding per
    p_i, < 6e-7 in all."""
    mask = causal_mask(n_new, start_pos)
    n_keys = start_pos + n_new
    assert mask.shape == (n_new, n_keys) and mask.dtype == np.float32
    assert np.all(mask[:, :start_pos] == 0)
    future = np.arange(n_keys)[None, :] > start_pos + np.arange(n_new)[:, None]  # [T, S]
    assert np.all(mask[future] == -np.inf) and np.all(mask[~future] == 0)

    rng = np.random.default_rng(seed)
    q = (scale * rng.standard_normal((n_kv * n_rep, n_new, hd))).astype(np.float32)
    k, v = (scale * rng.standard_normal((2, n_kv, n_keys, hd))).astype(np.float32)
    seen = {}
    attention(q, k, v, mask, step=lambda name, x: seen.setdefault(name, x))
    probs = seen["probs"].astype(np.float64)  # [H, T, S]
    assert np.all(probs >= 0)
    assert np.all(probs[:, future] == 0)
    assert np.max(np.abs(probs.sum(-1) - 1)) <= 1e-6


# ---------------------------------------------------------------------------------------------
# Tiny random models, built once per module
# ---------------------------------------------------------------------------------------------

MODEL_CONFIGS = {
    # tiny_args as shipped: real 128256 vocabulary, 8 query heads on 2 kv heads, head_dim 8.
    "gqa": tiny_args(),
    # Plain multi-head attention (n_kv_heads == n_heads), head_dim 16, a small vocabulary.
    "mha": tiny_args(n_heads=4, n_kv_heads=4, vocab_size=1000),
}


def numpy_weights(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: t.float().numpy() for name, t in state.items()}


@pytest.fixture(scope="module", params=list(MODEL_CONFIGS))
def model(request):
    args = MODEL_CONFIGS[request.param]
    return Llama(args, numpy_weights(random_state_dict(args, seed=3)))


token_lists = lambda vocab, lo, hi: st.lists(st.integers(0, vocab - 1), min_size=lo, max_size=hi)


@pytest.mark.parametrize("scaling", [None, RopeScaling(factor=8.0, original_max_seq_len=64)],
                         ids=["unscaled", "scaled"])
def test_model_rotates_with_args_rope_theta_and_scaling(model, scaling):
    """The model's q_rot and k_rot (from the trace) are q and k rotated by pos * f_i with
    f_i = args.rope_theta^(-2i/hd), scaled by Meta's apply_scaling when args.rope_scaling is set.
    Catches a model that builds its tables with a defaulted theta (Llama 2's 10000, e.g. by not
    passing args.rope_theta) or drops args.rope_scaling. original_max_seq_len=64 makes the
    scaling matter at these short positions; theta 500000 vs 10000 moves f_1 from 0.038 to 0.1.

    Tolerance: float32 frequencies and angles are off by ~1e-6 relative, i.e. < 1e-4 rad at
    positions < 24, so the rotated vectors agree within 1e-4 of their size."""
    args = replace(model.args, rope_scaling=scaling)
    assert args.rope_theta == 500000.0
    subject = model if scaling is None else Llama(args, model.weights)
    tokens = np.arange(24) * 7919 % args.vocab_size
    trace = {}
    subject.forward(tokens, trace=trace)
    hd = args.head_dim
    freqs = args.rope_theta ** (-2.0 * np.arange(hd // 2) / hd)  # float64
    if scaling is not None:
        freqs = np.array(meta_apply_scaling(freqs, scaling))
        assert not np.allclose(freqs, args.rope_theta ** (-2.0 * np.arange(hd // 2) / hd))
    turn = np.exp(1j * np.arange(len(tokens))[:, None] * freqs)  # [T, hd/2]
    for name in ("q", "k"):
        x = trace[f"layers.0.{name}"].astype(np.float64)  # [H|KV, T, hd]
        w = (x[..., 0::2] + 1j * x[..., 1::2]) * turn
        expected = np.stack([w.real, w.imag], axis=-1).reshape(x.shape)
        assert rel_err(trace[f"layers.0.{name}_rot"], expected) <= 1e-4, name


# ---------------------------------------------------------------------------------------------
# 3. Causality of the whole model
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@MODEL
@given(data=st.data())
def test_model_is_causal(model, data):
    """Changing token j leaves the logits at every position < j unchanged (and does change
    position j, so the test is not vacuous). Catches a missing or misplaced causal mask
    anywhere in the stack, e.g. a mask that ignores the diagonal offset or is never added.

    Rows of a float32 matmul do not depend on the other rows, so the logits are in practice
    bit-identical; 1e-6 relative is allowed for a BLAS that blocks differently."""
    vocab = model.args.vocab_size
    tokens = data.draw(token_lists(vocab, 2, 24), "tokens")
    j = data.draw(st.integers(1, len(tokens) - 1), "j")
    changed = list(tokens)
    changed[j] = data.draw(st.integers(0, vocab - 1).filter(lambda t: t != tokens[j]), "new token")
    before, after = model.forward(tokens), model.forward(changed)
    assert rel_err(after[:j], before[:j]) <= 1e-6
    assert not np.allclose(after[j], before[j])


# ---------------------------------------------------------------------------------------------
# 4. Grouped-query attention is multi-head attention with repeated kv heads
# ---------------------------------------------------------------------------------------------

@st.composite
def gqa_inputs(draw):
    n_kv, n_rep = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    n_new, n_cached = draw(st.integers(1, 8)), draw(st.integers(0, 12))
    hd = 2 * draw(st.integers(1, 32))
    rng = np.random.default_rng(draw(seeds))
    n_heads, n_keys = n_kv * n_rep, n_cached + n_new
    q = rng.standard_normal((n_heads, n_new, hd)).astype(np.float32)  # [H, T, hd]
    k = rng.standard_normal((n_kv, n_keys, hd)).astype(np.float32)  # [KV, S, hd]
    v = rng.standard_normal((n_kv, n_keys, hd)).astype(np.float32)  # [KV, S, hd]
    return q, k, v, n_rep, n_cached


def softmax64(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@FAST
@given(inputs=gqa_inputs())
def test_gqa_equals_multi_head_attention_with_repeated_kv_heads(inputs):
    """attention_scores, attention_output and attention with n_kv_heads < n_heads equal plain
    multi-head attention on np.repeat(k, n_rep, axis=0) (Meta's repeat_kv, heads-first).
    Catches a wrong grouping (np.tile order, i.e. head h on kv head h % n_kv), a wrong reshape of
    the grouped result, or a scale other than 1/sqrt(head_dim).

    Tolerances are the float32 dot-product bound gamma_n = n U / (1 - n U) times sum |x_i y_i|
    (+2 U for the 1/sqrt(hd) scaling), elementwise, against a float64 reference."""
    q, k, v, n_rep, n_cached = inputs
    n_heads, n_new, hd = q.shape
    n_keys = k.shape[1]
    k_rep = np.repeat(k.astype(np.float64), n_rep, axis=0)  # [H, S, hd]
    v_rep = np.repeat(v.astype(np.float64), n_rep, axis=0)  # [H, S, hd]
    gamma = lambda n: n * U / (1 - n * U)

    scores = attention_scores(q, k)
    expected = q.astype(np.float64) @ k_rep.transpose(0, 2, 1) / math.sqrt(hd)  # [H, T, S]
    bound = (gamma(hd) + 2 * U) * (np.abs(q.astype(np.float64)) @ np.abs(k_rep).transpose(0, 2, 1)) / math.sqrt(hd)
    assert scores.shape == (n_heads, n_new, n_keys)
    assert np.all(np.abs(scores - expected) <= bound + 1e-30)

    probs = softmax(scores + causal_mask(n_new, n_cached))  # [H, T, S]
    out = attention_output(probs, v)
    expected_out = (probs.astype(np.float64) @ v_rep).transpose(1, 0, 2).reshape(n_new, n_heads * hd)
    bound_out = gamma(n_keys) * (probs.astype(np.float64) @ np.abs(v_rep)).transpose(1, 0, 2).reshape(
        n_new, n_heads * hd)
    assert out.shape == (n_new, n_heads * hd)
    assert np.all(np.abs(out - expected_out) <= bound_out + 1e-30)

    full = attention(q, k, v, causal_mask(n_new, n_cached))
    reference = (softmax64(expected + causal_mask(n_new, n_cached)) @ v_rep).transpose(1, 0, 2).reshape(
        n_new, n_heads * hd)
    assert rel_err(full, reference) <= 1e-5


@FAST
@given(n_kv=st.integers(2, 4), n_rep=st.integers(2, 4), n_new=st.integers(1, 4),
       hd=st.integers(1, 16).map(lambda n: 2 * n), seed=seeds)
def test_gqa_query_head_h_uses_kv_head_h_div_n_rep(n_kv, n_rep, n_new, hd, seed):
    """Meta's repeat_kv puts query heads g*n_rep .. g*n_rep + n_rep - 1 on kv head g, i.e. head h
    reads kv head h // n_rep. Catches the `head % n_kv_heads` mapping (which agrees with it only
    when n_kv_heads or n_rep is 1, hence both >= 2 here) and the notebook's hard-coded `head // 4`.

    Each kv head's keys are a distinct constant, so every score identifies the kv head used."""
    rng = np.random.default_rng(seed)
    n_heads = n_kv * n_rep
    q = rng.standard_normal((n_heads, n_new, hd)).astype(np.float32)  # [H, T, hd]
    k = np.broadcast_to(np.arange(1, n_kv + 1, dtype=np.float32)[:, None, None], (n_kv, 3, hd)).copy()
    v = np.broadcast_to(np.arange(1, n_kv + 1, dtype=np.float32)[:, None, None], (n_kv, 3, hd)).copy()
    scores = attention_scores(q, k)  # [H, T, 3]
    probs = np.full((n_heads, n_new, 3), 1 / 3, np.float32)
    out = attention_output(probs, v).reshape(n_new, n_heads, hd)  # [T, H, hd]
    for h in range(n_heads):
        g = h // n_rep
        expected = q[h].astype(np.float64).sum(-1, keepdims=True) * (g + 1) / math.sqrt(hd)  # [T, 1]
        np.testing.assert_allclose(scores[h], np.broadcast_to(expected, (n_new, 3)), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(out[:, h], g + 1, rtol=1e-6)  # averages kv head g's value g + 1


# ---------------------------------------------------------------------------------------------
# 5. The KV cache changes nothing
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
@MODEL
@given(data=st.data())
@example(data=None).via("one token at a time after a one-token prefill")  # see the body
def test_chunked_decoding_with_cache_equals_full_recomputation(model, data):
    """Prefill a prefix, then feed chunks of 1..6 tokens at start_pos > 0 through one cache (with
    spare capacity): every position's logits equal model.forward(all tokens) within 1e-5 relative.
    Catches reading the cache as cache[start_pos:start_pos + T] instead of [:start_pos + T], a mask
    or RoPE rows taken from position 0 instead of start_pos, and reading the cache's unused tail."""
    vocab = model.args.vocab_size
    if data is None:  # the explicit example: decoding token by token, as generation does
        tokens, bounds, spare = [int(t) for t in np.arange(12) * 37 % vocab], list(range(13)), 0
    else:
        tokens = data.draw(token_lists(vocab, 2, 40), "tokens")
        bounds = [0, data.draw(st.integers(1, len(tokens) - 1), "prefix")]
        while bounds[-1] < len(tokens):
            bounds.append(min(len(tokens), bounds[-1] + data.draw(st.integers(1, 6), "chunk")))
        spare = data.draw(st.integers(0, 8), "spare cache positions")
    full = model.forward(tokens)  # [N, V]
    cache = model.new_cache(len(tokens) + spare)
    chunks = [model.forward(tokens[a:b], start_pos=a, cache=cache) for a, b in zip(bounds, bounds[1:])]
    chunked = np.concatenate(chunks)
    assert chunked.shape == full.shape
    for pos in range(len(tokens)):
        assert rel_err(chunked[pos], full[pos]) <= 1e-5, f"position {pos}, chunks {bounds}"


# ---------------------------------------------------------------------------------------------
# 6. RMSNorm
# ---------------------------------------------------------------------------------------------

@st.composite
def norm_inputs(draw, min_dim=1):
    """x [T, D] at a scale from tiny (eps dominates) to large, and a weight in [0.5, 2]."""
    shape = (draw(st.integers(1, 4)), draw(st.integers(min_dim, 64)))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-1.0, 1.0, width=32)))
    scale = draw(st.sampled_from([1e-4, 1e-3, 1e-2, 1.0, 1e2, 1e3]))
    w = draw(hnp.arrays(np.float32, shape[1:], elements=st.floats(0.5, 2.0, width=32)))
    return (x * np.float32(scale)).astype(np.float32), w


@FAST
@given(inputs=norm_inputs(), eps=st.sampled_from([1e-5, 1e-6]) | st.floats(1e-8, 1e-2))
def test_rms_norm_gives_unit_rms_up_to_eps(inputs, eps):
    """(y / weight) has mean square ms / (ms + eps), ms = mean(x^2): 1 when eps is negligible.
    Catches sum instead of mean, eps outside the square root, a missing sqrt, the weight not
    applied (or applied twice). Computed in float32, the mean square is off by a few U."""
    x, w = inputs
    y = rms_norm(x, w, eps)
    x64 = x.astype(np.float64)
    ms = np.mean(x64 * x64, axis=-1)
    got = np.mean((y.astype(np.float64) / w) ** 2, axis=-1)
    np.testing.assert_allclose(got, ms / (ms + eps), rtol=1e-5, atol=1e-12)


@FAST
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 64)),
                    elements=st.floats(-100.0, 100.0, width=32)),
       c=st.floats(1e-2, 1e3))
def test_rms_norm_is_scale_invariant(x, c):
    """rms_norm(c x) == rms_norm(x) for c > 0 where eps is negligible. Catches a norm that does
    not divide by a quantity of the same degree as x, e.g. by mean(x^2) without the square root.

    Rows whose mean square, before or after scaling, is under 1 are left out: there eps = 1e-5
    changes y by up to eps / (2 ms) <= 5e-6 relative, inside the 1e-5 tolerance."""
    eps = 1e-5
    w = np.ones(x.shape[1], np.float32)
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1)
    rows = ms * min(1.0, c * c) >= 1.0
    scaled = (x * np.float32(c)).astype(np.float32)
    a, b = rms_norm(x, w, eps)[rows], rms_norm(scaled, w, eps)[rows]
    if rows.any():
        assert rel_err(b, a) <= 1e-5


@FAST
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 64)), eps=st.sampled_from([1e-5, 1e-6]))
def test_rms_norm_of_zero_is_zero(shape, eps):
    """eps keeps 0 / sqrt(0) from being NaN. Catches eps dropped from the formula."""
    with np.errstate(all="raise"):
        y = rms_norm(np.zeros(shape, np.float32), np.ones(shape[1], np.float32), eps)
    assert np.array_equal(y, np.zeros(shape))


@FAST
@given(inputs=norm_inputs(min_dim=2))
def test_rms_norm_uses_the_eps_it_is_given(inputs):
    """For tiny x the result depends on eps: 1e-5 and 1e-6 give clearly different outputs, each
    equal to the formula with its own eps. Catches an eps hard-coded inside rms_norm."""
    x, w = inputs
    peak = float(np.max(np.abs(x)))
    assume(peak > 1e-20)
    x = (x * np.float32(1e-3 / peak)).astype(np.float32)  # max |x| = 1e-3: ms <= 1e-6, near eps
    x64 = x.astype(np.float64)
    ms = np.mean(x64 * x64, axis=-1, keepdims=True)
    for eps in (1e-5, 1e-6):
        np.testing.assert_allclose(rms_norm(x, w, eps), x64 / np.sqrt(ms + eps) * w, rtol=1e-5, atol=1e-12)


def manual_rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


@pytest.fixture(scope="module")
def small_embedding_models():
    """The same weights under norm_eps 1e-5 and 1e-6, with the embeddings and every residual
    branch's last matrix (wo, w2) scaled by 1e-3: the residual stream then stays ~1e-3 in size,
    so every norm's input has a mean square (~1e-6) comparable to eps, not only the first one."""
    args = tiny_args(n_heads=4, n_kv_heads=4, vocab_size=1000, norm_eps=1e-5)
    weights = numpy_weights(random_state_dict(args, seed=5))
    for name in weights:
        if name == "tok_embeddings.weight" or name.endswith(("attention.wo.weight", "w2.weight")):
            weights[name] = (weights[name] * 1e-3).astype(np.float32)
    return {eps: Llama(replace(args, norm_eps=eps), weights) for eps in (1e-5, 1e-6)}


@MODEL
@given(tokens=token_lists(1000, 1, 12))
def test_model_norms_use_args_norm_eps(small_embedding_models, tokens):
    """Every norm in the model (attention_norm, ffn_norm of each layer, the final norm, read from
    the trace) equals the formula with that model's args.norm_eps, and the two eps give outputs
    that differ far beyond the tolerance. Catches an eps hard-coded anywhere in the model (1e-6,
    or 1e-5 which is right for Llama 3 and wrong for a model that says otherwise)."""
    results = {}
    for eps, model in small_embedding_models.items():
        trace = {}
        model.forward(tokens, trace=trace)
        weight = lambda name: np.asarray(model.weights[name], np.float32)  # Meta names, as given
        expected = manual_rms_norm(trace["embedding"], weight("layers.0.attention_norm.weight"), eps)
        assert rel_err(trace["layers.0.attention_norm"], expected) <= 1e-5, f"norm_eps={eps}"
        for i in range(model.args.n_layers):
            ffn_expected = manual_rms_norm(trace[f"layers.{i}.residual"], weight(f"layers.{i}.ffn_norm.weight"), eps)
            assert rel_err(trace[f"layers.{i}.ffn_norm"], ffn_expected) <= 1e-5, f"layer {i} ffn_norm"
        last = trace[f"layers.{model.args.n_layers - 1}.out"]
        assert rel_err(trace["norm"], manual_rms_norm(last, weight("norm.weight"), eps)) <= 1e-5
        results[eps] = trace
    for name in ("layers.0.attention_norm", "layers.1.ffn_norm", "norm"):  # the property has power
        assert rel_err(results[1e-6][name], results[1e-5][name]) > 1e-2, name


# ---------------------------------------------------------------------------------------------
# 7. softmax and silu never overflow
# ---------------------------------------------------------------------------------------------

@FAST
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.integers(1, 32)),
                    elements=st.floats(-1e4, 1e4, width=32)),
       n_masked=st.integers(0, 31))
@example(x=np.array([[1e4, 1e4 - 1, -1e4]], np.float32), n_masked=0)
@example(x=np.array([[-1e4, -1e4 + 2]], np.float32), n_masked=0)
def test_softmax_is_stable_for_huge_inputs(x, n_masked):
    """Inputs up to 1e4 in magnitude (and -inf where masked) give finite probabilities, >= 0,
    rows summing to 1, equal to a float64 softmax of the same inputs. Catches a softmax without
    the max subtraction (exp(89) already overflows float32).

    1e-6 absolute: x - max rounds by <= U |x - max| = U d, which moves p = e^-d / Z by at most
    U d e^-d <= U / e; the sum and division add < 6e-7 (see the mask test)."""
    x = x.copy()
    x[:, x.shape[1] - min(n_masked, x.shape[1] - 1):] = -np.inf  # keep one finite key per row
    with np.errstate(over="raise", invalid="raise"):
        p = softmax(x)
    assert p.dtype == np.float32 and np.all(np.isfinite(p)) and np.all(p >= 0)
    assert np.max(np.abs(p.astype(np.float64).sum(-1) - 1)) <= 1e-6
    np.testing.assert_allclose(p, softmax64(x.astype(np.float64)), rtol=0, atol=1e-6)


@FAST
@given(x=hnp.arrays(np.float32, st.integers(1, 64), elements=st.floats(-1e4, 1e4, width=32)))
@example(x=np.array([-1e4, -100.0, -88.8, 0.0, 88.8, 100.0, 1e4], np.float32))
def test_silu_matches_x_sigmoid_x_without_overflow(x):
    """silu(x) = x * sigmoid(x), finite and with no overflow warning for |x| up to 1e4. Catches
    a naive x / (1 + exp(-x)) that lets exp's overflow for x < -88 warn, or an inf / nan reach
    the result (x * (1 / (1 + inf)) is fine, inf * x / inf is nan), and a wrong sign for x < 0.

    Reference in float64 (its exp(-x) overflows only for x < -709, where x * sigmoid(x) is far
    below float32's range anyway, so inf there still gives the right -0); float32 silu is a few
    roundings off: rtol 1e-6. atol 3e-37: below x = -88.72, float32 exp(-x) is inf and silu
    gives -0, as torch's F.silu does, where the exact value is at most 88.72 e^-88.72 = 2.6e-37."""
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = silu(x)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        expected = x64 / (1 + np.exp(-x64))
    np.testing.assert_allclose(y, expected, rtol=1e-6, atol=3e-37)


# ---------------------------------------------------------------------------------------------
# 8. No hard-coded sizes
# ---------------------------------------------------------------------------------------------

ODD_CONFIGS = {
    # head_dim 16 on 3 heads sharing 1 kv head, SwiGLU width 166, vocabulary 257.
    "dim48-3h-1kv": tiny_args(dim=48, n_heads=3, n_kv_heads=1, vocab_size=257, multiple_of=1,
                              max_seq_len=64),
    # head_dim 8 on 12 heads, 3:1 GQA, 3 layers, SwiGLU width 332, vocabulary 1001.
    "dim96-12h-4kv": tiny_args(dim=96, n_heads=12, n_kv_heads=4, n_layers=3, vocab_size=1001,
                               multiple_of=1, max_seq_len=64),
}


@pytest.fixture(scope="module", params=list(ODD_CONFIGS))
def odd_pair(request):
    args = ODD_CONFIGS[request.param]
    state = random_state_dict(args, seed=11)
    return Llama(args, numpy_weights(state)), Oracle(args, state, max_seq_len=64)


@pytest.mark.parametrize("length", [1, 5, 17, 33])
def test_odd_sizes_match_the_oracle(odd_pair, length):
    """Odd dims, head counts, SwiGLU widths, vocabularies and prompt lengths run and match the
    torch oracle within 1e-5 relative at every position. Catches any size hard-coded from the
    notebook (17 tokens, head // 4, / 128 ** 0.5, range(64) / 64, 8 layers of 4096...)."""
    model, oracle = odd_pair
    tokens = np.random.default_rng(length).integers(0, model.args.vocab_size, size=length)
    logits = model.forward(tokens)
    expected = oracle.forward(tokens)
    assert logits.shape == (length, model.args.vocab_size) and logits.dtype == np.float32
    for pos in range(length):
        assert rel_err(logits[pos], expected[pos]) <= 1e-5, f"position {pos}"

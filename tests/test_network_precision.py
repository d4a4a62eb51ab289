"""Numerics of EDM's networks: attention through SDPA, and the half-precision U-Net.

Two kinds of random weights are used. ``generate.random_network`` keeps EDM's
initialisation, where every residual branch ends in a layer scaled by 1e-5, so the U-Net is
nearly its skip connections. ``lively`` redraws those layers at a fan-in scale, as training
leaves them, so that every branch (attention included) shapes the output and its rounding
errors add up: the harder, more realistic case for half precision.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from bdia import generate
from bdia.models.checkpoints import build_network
from bdia.models.networks import Conv2d, EDMPrecond, Linear, UNetBlock

# ---------------------------------------------------------------------------------------------
# Helpers


def lively(net: EDMPrecond, seed: int = 0) -> EDMPrecond:
    """Redraw the near-zero (1e-5-scaled) layers as N(0, 1/fan_in); in place, returns ``net``."""
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (Conv2d, Linear)) and m.weight is not None:
                if m.weight.abs().max() < 1e-3:
                    std = 1.0 / math.sqrt(m.weight[0].numel())
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
    return net


def reference_attend(block: UNetBlock, x: torch.Tensor) -> torch.Tensor:
    """``softmax(q^T k / sqrt(E)) v`` per head, written out; ``x`` and result ``(N, C, H, W)``.

    qkv's output channels are ordered (head, channel, q/k/v), as in EDM's released weights.
    """
    n, c, h, w = x.shape
    heads = block.num_heads
    e = c // heads
    qkv = block.qkv(block.norm2(x)).reshape(n, heads, e, 3, h * w)
    q, k, v = qkv.unbind(3)  # each (N, heads, E, L)
    scores = torch.einsum("nhei,nhej->nhij", q, k) / math.sqrt(e)
    return torch.einsum("nhij,nhej->nhei", scores.softmax(dim=-1), v).reshape(n, c, h, w)


# One noise level per row of the batch, from EDM's sigma_min to sigma_max.
SIGMAS = (0.002, 0.02, 0.5, 5.0, 80.0)


def noisy_inputs(net: EDMPrecond, seed: int, per_sigma: int):
    """``(x, sigma, labels)``: image-like data in [-1, 1] plus noise of each level of SIGMAS.

    ``x`` of shape ``(per_sigma * len(SIGMAS), C, R, R)``, float32; ``sigma`` ``(batch,)``.
    """
    g = torch.Generator().manual_seed(100 + seed)
    batch = per_sigma * len(SIGMAS)
    shape = (batch, net.img_channels, net.img_resolution, net.img_resolution)
    sigma = torch.tensor(SIGMAS).repeat_interleave(per_sigma)
    y = 2 * torch.rand(shape, generator=g) - 1
    x = y + sigma.view(-1, 1, 1, 1) * torch.randn(shape, generator=g)
    return x, sigma, torch.randint(net.label_dim, (batch,), generator=g)


def half_errors(net: EDMPrecond, dtype: torch.dtype, seed: int, per_sigma: int = 2):
    """Per noise level of SIGMAS, ``(err_D, err_F)``, and the half-precision output.

    ``err_D = |D_half - D_32| / |D_32|`` over that level's rows; ``err_F`` divides the same
    difference by the network's part ``|D_32 - c_skip x|`` (``c_skip x`` is float32 in both).
    """
    x, sigma, labels = noisy_inputs(net, seed, per_sigma)
    skip = net.coefficients(sigma.view(-1, 1, 1, 1))[0] * x
    with torch.no_grad():
        net.compute_dtype = None
        d32 = net(x, sigma, class_labels=labels)
        net.compute_dtype = dtype
        d_half = net(x, sigma, class_labels=labels)
        net.compute_dtype = None
    errors = {}
    for i, s in enumerate(SIGMAS):
        rows = slice(i * per_sigma, (i + 1) * per_sigma)
        diff = (d_half[rows] - d32[rows]).norm()
        err_d = float(diff / d32[rows].norm())
        err_f = float(diff / (d32[rows] - skip[rows]).norm())
        errors[s] = (err_d, err_f)
    return errors, d_half


# ---------------------------------------------------------------------------------------------
# Attention through scaled_dot_product_attention


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_attention_equals_the_reference_formula_in_float64(heads):
    torch.manual_seed(20 + heads)
    block = UNetBlock(32, 32, 16, attention=True, num_heads=heads).double()
    x = torch.randn(2, 32, 4, 6, dtype=torch.float64)  # H != W: a swapped axis would show
    with torch.no_grad():
        got, want = block.attend(x), reference_attend(block, x)
        e = 32 // heads
        q, k, _ = block.qkv(block.norm2(x)).reshape(2, heads, e, 3, 24).unbind(3)
        scores = torch.einsum("nhei,nhej->nhij", q, k) / math.sqrt(e)
    # Far from uniform weights, so a mixed-up head, channel or q/k/v would change the result.
    assert float(scores.std()) > 0.5
    assert got.shape == x.shape and got.dtype == torch.float64
    # float64 rounding through two products of length <= 32 and a softmax stays near 1e-15
    # (measured 4e-16); a layout error is of order 1.
    assert float((got - want).norm() / want.norm()) < 1e-12


def test_attention_hands_sdpa_contiguous_heads(monkeypatch):
    """Every fused SDPA kernel (CUDA's flash and memory-efficient ones, the CPU's flash)
    needs each head's channels contiguous; strided views of qkv make SDPA fall back to its
    unfused kernel, silently."""
    import bdia.models.networks as networks

    seen = []
    real = networks.F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(networks.F, "scaled_dot_product_attention", recording)
    block = UNetBlock(32, 32, 16, attention=True, num_heads=2)
    with torch.no_grad():
        block.attend(torch.randn(2, 32, 4, 6))
    assert len(seen) == 1
    for t in seen[0]:
        assert t.shape == (2, 2, 24, 16) and t.is_contiguous(), t.stride()


def test_network_output_with_sdpa_equals_the_reference_formula(monkeypatch):
    net = lively(generate.random_network("tiny-cond", seed=0))
    x, sigma, labels = noisy_inputs(net, 0, per_sigma=1)
    skip = net.coefficients(sigma.view(-1, 1, 1, 1))[0] * x
    unet64 = copy.deepcopy(net.model).double()
    args64 = (x.double(), sigma.double().log() / 4)
    onehot64 = nn.functional.one_hot(labels, 10).double()
    with torch.no_grad():
        d = net(x, sigma, class_labels=labels)
        f64 = unet64(*args64, class_labels=onehot64)
        monkeypatch.setattr(UNetBlock, "attend", reference_attend)
        d_ref = net(x, sigma, class_labels=labels)
        f64_ref = unet64(*args64, class_labels=onehot64)
        monkeypatch.setattr(UNetBlock, "attend", lambda self, x: torch.zeros_like(x))
        d_without = net(x, sigma, class_labels=labels)
    scale = (d_ref - skip).norm()
    # The attention shapes this network's output (without it D moves by 20 to 25%), so the
    # bounds below see it.
    assert float((d_without - d_ref).norm() / scale) > 0.1
    # float32: SDPA's blocked online softmax sums in another order than the einsums; measured
    # 7.9e-7 to 8.8e-7 of the network's part over six seeds (7 float32 epsilons, after
    # the ~20 layers that follow the first attention). 5e-6 leaves a factor of 5.
    assert float((d - d_ref).norm() / scale) < 5e-6
    # float64, the whole U-Net: measured 1.3e-15 to 1.5e-15.
    assert float((f64 - f64_ref).norm() / f64_ref.norm()) < 1e-12


def test_sdpa_in_half_precision_is_no_worse_than_a_float32_softmax():
    """The CPU flash kernel keeps the softmax in float32 and rounds only its numerators to
    the half dtype, as the former code (float32 softmax, weights cast back) did."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 1, 256, 64, dtype=torch.float64, generator=g) for _ in range(3))
    q = 2 * q  # scores of std 2: a peaked softmax, as trained attention has
    exact = torch.softmax(q @ k.transpose(-1, -2) / 8.0, dim=-1) @ v
    for dtype in (torch.bfloat16, torch.float16):
        qh, kh, vh = (t.to(dtype) for t in (q, k, v))
        sdpa = nn.functional.scaled_dot_product_attention(qh, kh, vh)
        scores = qh.float() @ kh.float().transpose(-1, -2) / 8.0
        former = scores.softmax(dim=-1).to(dtype) @ vh
        all_half = torch.softmax(qh @ kh.transpose(-1, -2) / 8.0, dim=-1) @ vh

        def err(t):
            return float((t.double() - exact).norm() / exact.norm())

        # 1.1 allows for rounding-order noise between kernels (measured on three seeds: SDPA's
        # error is 0.95 to 0.98 times the former code's). A softmax in the half dtype errs
        # 1.65 to 1.86 times more than the former code: the check tells the two apart.
        assert err(sdpa) < 1.1 * err(former), dtype
        assert err(all_half) > 1.3 * err(former), dtype


# ---------------------------------------------------------------------------------------------
# Half precision against float32
#
# The figure is err_F, the relative RMS error of the network's part c_out F of the output,
# per noise level (c_skip x is float32 in both). Unit roundoff u is 2^-8 = 3.9e-3 for bfloat16
# (8 significand bits) and 2^-11 = 4.9e-4 for float16 (11 bits); rounding the exact output
# once would give about 0.6 u. Measured on the CPU (torch 2.13), ranges over the five sigmas
# (docs/edm_cifar10.md has them per sigma):
#
#   network                                   bfloat16            float16
#   random_network tiny-cond, seeds 0-5       1.2e-3 .. 2.5e-3    2.0e-4 .. 1.1e-3
#   lively tiny-cond, seeds 0-5               1.3e-2 .. 2.2e-2    1.7e-3 .. 2.6e-3
#   lively DDPM++ layout, width 32, 0-2       1.7e-2 .. 2.2e-2    2.1e-3 .. 2.8e-3
#   lively NCSN++ layout, width 32, 0-2       1.4e-2 .. 1.8e-2    1.7e-3 .. 2.3e-3
#   random_network ddpmpp-cond (full), 0      1.1e-3 .. 1.2e-3    2.9e-4 .. 6.1e-4
#   lively ddpmpp-cond (full), seeds 0-1      1.7e-2 .. 2.2e-2    2.1e-3 .. 2.7e-3
#
# With trained-scale branches the error is about 5 u: each of the residual blocks adds its own
# rounding. The error is an RMS over >= 1536 outputs, so it varies little between seeds; the
# bounds are 2.3 to 4 times the largest figure measured, a margin for other CPUs' and GPUs'
# kernels (other summation orders, other fused kernels), not for chance. They still catch two
# bits lost throughout (errors x4) and bfloat16 running where float16 was asked for (x8).
HALF_TOLERANCE = {
    ("random", torch.bfloat16): 1e-2,  # ~2.6 u; measured at most 2.5e-3
    ("random", torch.float16): 3e-3,  # ~6 u; measured at most 1.1e-3 (sigma 0.002)
    ("lively", torch.bfloat16): 5e-2,  # ~13 u; measured at most 2.2e-2
    ("lively", torch.float16): 6.5e-3,  # ~13 u; measured at most 2.8e-3
}
HALF = [torch.bfloat16, torch.float16]


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["random", "lively"])
def test_half_precision_agrees_with_float32_at_every_sigma(kind, dtype):
    net = generate.random_network("tiny-cond", seed=4)
    if kind == "lively":
        lively(net, seed=4)
    errors, d_half = half_errors(net, dtype, seed=4)
    assert d_half.dtype == torch.float32 and torch.isfinite(d_half).all()
    u = 2.0 ** -{torch.bfloat16: 8, torch.float16: 11}[dtype]
    for sigma, (_, err_f) in errors.items():
        # Above u / 100: the half-precision path really ran (float32 would give 0 or ~1e-7).
        assert u / 100 < err_f < HALF_TOLERANCE[kind, dtype], (sigma, err_f)
    # D's own error is c_out ~ sigma times smaller at low noise, as c_skip x is float32: at
    # sigma 0.002, c_out = 0.002, and D's error measured at most 2.1e-7 (random) and 3.7e-5
    # (lively) in bfloat16, 4.1e-8 and 4.6e-6 in float16, over all networks above. A
    # half-precision skip path would put ~u there (4e-3 or 5e-4).
    assert errors[0.002][0] < 0.002 * HALF_TOLERANCE[kind, dtype]


def test_bfloat16_errs_about_eight_times_more_than_float16():
    """bfloat16 has 3 significand bits fewer than float16: a factor 8 in error, so each dtype
    really ran at its own precision (measured 7.3 to 8.8 on lively networks, all sigmas;
    on near-identity random networks the float32 parts blur it, down to 1.8)."""
    net = lively(generate.random_network("tiny-cond", seed=2), seed=2)
    bf16, _ = half_errors(net, torch.bfloat16, seed=2)
    fp16, _ = half_errors(net, torch.float16, seed=2)
    for sigma in SIGMAS:
        assert 4 < bf16[sigma][1] / fp16[sigma][1] < 16, sigma


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_is_finite_at_the_ends_of_the_noise_range(dtype):
    # Large inputs at sigma 80 are scaled by c_in before the U-Net; at sigma 0.002 the noise
    # label ln(sigma)/4 is at its most negative. Neither may overflow float16's range.
    net = lively(generate.random_network("tiny-cond", seed=1), seed=1)
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.002, 0.002, 80.0, 80.0])
    x = 2 * torch.rand(4, 3, 16, 16, generator=g) - 1
    x = x + sigma.view(-1, 1, 1, 1) * torch.randn(4, 3, 16, 16, generator=g)
    net.compute_dtype = dtype
    hidden = []
    for m in net.model.modules():
        if isinstance(m, UNetBlock):
            m.register_forward_hook(lambda mod, args, out: hidden.append(out))
    with torch.no_grad():
        d = net(x, sigma, class_labels=torch.tensor([0, 5, 3, 9]))
    assert torch.isfinite(d).all()
    assert hidden and all(h.dtype == dtype and torch.isfinite(h).all() for h in hidden)


# DDPM++ / NCSN++ as EDM configures them for CIFAR-10, at a quarter of the width (32 channels
# instead of 128, 3.5M parameters): the same depth, resolutions and attention, in ~1.5 s.
LARGER = dict(
    img_resolution=32,
    img_channels=3,
    label_dim=10,
    augment_dim=9,
    model_channels=32,
    channel_mult=[2, 2, 2],
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
)
NCSNPP = dict(
    embedding_type="fourier",
    encoder_type="residual",
    channel_mult_noise=2,
    resample_filter=[1, 3, 3, 1],
)


@pytest.mark.slow  # about 10 s each on an idle 2-core machine, 20 s busy
@pytest.mark.parametrize("layout", ["ddpmpp", "ncsnpp"])
def test_half_precision_on_a_larger_network(layout):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        kwargs = dict(LARGER, **(NCSNPP if layout == "ncsnpp" else {}))
        net = lively(build_network("EDMPrecond", kwargs).eval().requires_grad_(False))
    for dtype in HALF:
        errors, d_half = half_errors(net, dtype, seed=0, per_sigma=1)
        assert torch.isfinite(d_half).all()
        for sigma, (_, err_f) in errors.items():
            assert err_f < HALF_TOLERANCE["lively", dtype], (dtype, sigma, err_f)

"""EDM's CIFAR-10 networks: state-dict layout, parameter counts, preconditioning, forward passes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import dtypes_made
from torch import nn

import bdia
from bdia.models import networks
from bdia.models.networks import (
    EDMPrecond,
    FourierEmbedding,
    PositionalEmbedding,
    SongUNet,
    VEPrecond,
    VPPrecond,
)

# Key lists of EDM's class-conditional CIFAR-10 networks (key, shape, p or b), enumerated from
# the published network structure; tests/data/README.md says where they come from.
REFERENCE = Path(__file__).resolve().parent / "data"

# The released CIFAR-10 configurations (EDM, Karras et al. 2022).
COMMON = dict(
    model_channels=128,
    channel_mult=[2, 2, 2],
    channel_mult_emb=4,
    num_blocks=4,
    attn_resolutions=[16],
    dropout=0.13,
    augment_dim=9,
)
CONFIGS = {
    "ddpmpp": dict(
        COMMON,
        embedding_type="positional",
        channel_mult_noise=1,
        encoder_type="standard",
        decoder_type="standard",
        resample_filter=[1, 1],
    ),
    "ncsnpp": dict(
        COMMON,
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        decoder_type="standard",
        resample_filter=[1, 3, 3, 1],
    ),
}


def read_keys(kind: str) -> list[tuple[str, tuple[int, ...], str]]:
    path = REFERENCE / f"edm_cifar10_{kind}_cond_keys.tsv"
    # The lists ship with the tests: a missing one fails rather than skips.
    assert path.exists(), f"reference key list not found: {path}"
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        key, shape, kind_ = line.split("\t")
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        rows.append((key, dims, kind_))
    return rows


@pytest.fixture(scope="module")
def cond_nets() -> dict[str, EDMPrecond]:
    torch.manual_seed(0)
    return {kind: EDMPrecond(32, 3, label_dim=10, **cfg) for kind, cfg in CONFIGS.items()}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", ["ddpmpp", "ncsnpp"])
def test_state_dict_matches_reference(cond_nets, kind):
    net = cond_nets[kind]
    rows = read_keys(kind)
    assert len(rows) == {"ddpmpp": 427, "ncsnpp": 434}[kind]
    mine = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert mine == [(k, s) for k, s, _ in rows]
    params = dict(net.named_parameters())
    buffers = dict(net.named_buffers())
    for key, _, kind_ in rows:
        assert kind_ in ("p", "b")
        assert key in (params if kind_ == "p" else buffers), key


@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "kind, cond, uncond", [("ddpmpp", 55_735_299, 55_733_891), ("ncsnpp", 56_400_643, 56_397_827)]
)
def test_parameter_counts(cond_nets, kind, cond, uncond):
    assert sum(p.numel() for p in cond_nets[kind].parameters()) == cond
    net = EDMPrecond(32, 3, label_dim=0, **CONFIGS[kind])
    assert net.model.map_label is None
    assert sum(p.numel() for p in net.parameters()) == uncond


def test_resample_filters(cond_nets):
    f2 = cond_nets["ddpmpp"].model.enc["16x16_down"].conv0.resample_filter
    torch.testing.assert_close(f2, torch.full((1, 1, 2, 2), 0.25))
    f4 = cond_nets["ncsnpp"].model.enc["16x16_down"].conv0.resample_filter
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    torch.testing.assert_close(f4[0, 0], torch.outer(taps, taps))
    assert cond_nets["ncsnpp"].model.map_noise.freqs.shape == (128,)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", ["ddpmpp", "ncsnpp"])
def test_full_size_forward(cond_nets, kind):
    net = cond_nets[kind].eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        d = net(
            x, torch.tensor([1.0]), class_labels=torch.tensor([3]), augment_labels=torch.zeros(1, 9)
        )
    assert d.shape == x.shape and torch.isfinite(d).all()
    # Fresh weights: the output layers start near zero, so D is close to c_skip x = x / 5.
    torch.testing.assert_close(d, x / 5, rtol=0, atol=1e-2)


class Stand_in(nn.Module):
    """Inner model that records its inputs and returns a known tensor."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim, **kwargs):
        super().__init__()
        self.label_dim = label_dim
        self.seen: dict[str, torch.Tensor | None] = {}
        g = torch.Generator().manual_seed(1)
        self.output = torch.randn(4, out_channels, img_resolution, img_resolution, generator=g)

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = dict(x=x, noise=noise_labels, labels=class_labels)
        return self.output.clone()


def reference_coefficients(name: str, s: torch.Tensor):
    s = s.double()
    if name == "edm":
        sd = 0.5
        root = (s**2 + sd**2).sqrt()
        return sd**2 / (s**2 + sd**2), s * sd / root, 1 / root, s.log() / 4
    if name == "vp":
        beta_d, beta_min, m = 19.9, 0.1, 1000
        t = ((beta_min**2 + 2 * beta_d * torch.log1p(s**2)).sqrt() - beta_min) / beta_d
        # t inverts sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)
        torch.testing.assert_close(((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt(), s)
        return torch.ones_like(s), -s, 1 / (s**2 + 1).sqrt(), (m - 1) * t
    return torch.ones_like(s), s, torch.ones_like(s), (0.5 * s).log()


@pytest.mark.parametrize("name, cls", [("edm", EDMPrecond), ("vp", VPPrecond), ("ve", VEPrecond)])
def test_preconditioner_coefficients(name, cls):
    net = cls(8, 3, label_dim=10, model_type=Stand_in)
    sigma = torch.tensor([0.002, 0.3, 2.5, 80.0])
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 3, 9, 1])
    d = net(x, sigma, class_labels=labels)
    c_skip, c_out, c_in, c_noise = (c.float() for c in reference_coefficients(name, sigma))
    b = (-1, 1, 1, 1)
    expected = c_skip.view(b) * x + c_out.view(b) * net.model.output
    assert d.shape == x.shape and d.dtype == torch.float32
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.model.seen["x"], c_in.view(b) * x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(net.model.seen["noise"], c_noise, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net.model.seen["labels"], nn.functional.one_hot(labels, 10).float())


def stand_in_call(cls=EDMPrecond, label_dim=10):
    """A preconditioner around Stand_in (batch 4, 3 x 8 x 8) and inputs that it accepts."""
    net = cls(8, 3, label_dim=label_dim, model_type=Stand_in)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    return net, x


@pytest.mark.parametrize(
    "labels, problem",
    [
        # 2 x 5 = 10 entries: a reshape to (-1, label_dim) made this one label for every image.
        (torch.eye(5)[[0, 1, 2, 3]][:2], r"must have shape \(4, 10\).*got shape \(2, 5\)"),
        (torch.eye(10)[[0, 1, 2]], r"must have shape \(4, 10\).*got shape \(3, 10\)"),
        (torch.zeros(10), r"must have shape \(4, 10\).*got shape \(10,\)"),
        (
            torch.tensor([[1], [2], [3], [4]]),
            r"must have shape \(4, 10\).*got shape \(4, 1\); class indices .* \(4,\)",
        ),
        (torch.tensor([0, 3, 10, 1]), r"class index 10 .*0\.\.9"),
        (torch.tensor([0, -1, 2, 1]), r"class index -1 .*0\.\.9"),
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), r"must have shape \(4, 10\).*got shape \(4,\)"),
        (torch.tensor([0, 3, 9]), r"class indices must have shape \(4,\).*got shape \(3,\)"),
    ],
)
def test_class_labels_of_the_wrong_shape_or_range_are_refused(labels, problem):
    net, x = stand_in_call()
    with pytest.raises(ValueError, match=problem):
        net(x, 1.0, class_labels=labels)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_integer_class_labels_of_any_integer_dtype_are_indices(dtype):
    net, x = stand_in_call()
    net(x, 1.0, class_labels=torch.tensor([0, 3, 9, 1], dtype=dtype))
    expected = torch.eye(10)[[0, 3, 9, 1]]
    assert torch.equal(net.model.seen["labels"], expected)
    net(x, 1.0, class_labels=[0, 3, 9, 1])  # a list of indices, as a tensor of them
    assert torch.equal(net.model.seen["labels"], expected)


def test_one_label_for_the_whole_batch_is_broadcast():
    # EDM adds the label embedding to the noise embedding, so one row serves every image.
    net, x = stand_in_call()
    net(x, 1.0, class_labels=torch.eye(10)[[3]])
    assert torch.equal(net.model.seen["labels"], torch.eye(10)[[3]])
    net(x, 1.0, class_labels=torch.tensor([3]))
    assert torch.equal(net.model.seen["labels"], torch.eye(10)[[3]])


def test_class_labels_for_an_unconditional_network_are_refused():
    net, x = stand_in_call(label_dim=0)
    with pytest.raises(ValueError, match="unconditional.*label_dim=0.*class_labels=None"):
        net(x, 1.0, class_labels=torch.tensor([1, 2, 3, 4]))
    net(x, 1.0)
    assert net.model.seen["labels"] is None


@pytest.mark.parametrize("cls", [EDMPrecond, VPPrecond, VEPrecond])
@pytest.mark.parametrize(
    "sigma", [0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 0.0, 2.0, 3.0])]
)
def test_sigma_must_be_positive_and_finite(cls, sigma):
    # EDMPrecond and VEPrecond took ln(0) = -inf into the noise embedding and returned NaN;
    # VPPrecond returned x. No sigma <= 0 has a noise level the network was trained on.
    net, x = stand_in_call(cls)
    with pytest.raises(ValueError, match="sigma must be positive and finite"):
        net(x, sigma)


@pytest.mark.parametrize(
    "shape, problem",
    [
        ((4, 3, 8), r"x must have shape \(batch, 3, 8, 8\)"),
        ((4, 1, 8, 8), r"\(batch, 3, 8, 8\)"),
        ((4, 3, 16, 16), r"\(batch, 3, 8, 8\)"),
        ((4, 3, 8, 6), r"\(batch, 3, 8, 8\)"),
    ],
)
def test_x_of_the_wrong_shape_is_refused(shape, problem):
    net, _ = stand_in_call()
    with pytest.raises(ValueError, match=problem + r".*got \(" + str(shape[0])):
        net(torch.zeros(shape), 1.0)


@pytest.mark.parametrize("size", [15, 32])
def test_images_of_another_size_than_the_networks_are_refused(size):
    # A 16x16 network given 15x15 images failed inside torch.cat (a RuntimeError about
    # tensor sizes); given 32x32 ones it ran, attending at 16x16 where it was built to at 8x8.
    net = tiny_net()
    with pytest.raises(ValueError, match=rf"\(batch, 3, 16, 16\) \(img_resolution 16\).*{size}\)"):
        net(torch.zeros(1, 3, size, size), 1.0, class_labels=[3])


@pytest.mark.parametrize("sigma", [torch.ones(3), torch.ones(4, 2)])
def test_sigma_of_the_wrong_size_is_refused(sigma):
    net, x = stand_in_call()
    with pytest.raises(ValueError, match=r"sigma must be a scalar or hold one value per image"):
        net(x, sigma)


@pytest.mark.parametrize(
    "sigma", [2.0, torch.tensor(2.0), torch.full((4,), 2.0), torch.full((4, 1, 1, 1), 2.0)]
)
def test_sigma_as_a_number_or_per_image_gives_the_same_output(sigma):
    net, x = stand_in_call()
    expected = net(x, torch.tensor([2.0, 2.0, 2.0, 2.0]))
    assert torch.equal(net(x, sigma), expected)


def test_a_network_on_the_meta_device_runs_without_reading_values():
    # FLOP counting (benchmarks/gpu_check.py) runs the network on the meta device, where a
    # check that reads sigma or the class indices back would fail.
    net = tiny_net().to("meta")
    x = torch.zeros(2, 3, 16, 16, device="meta")
    for sigma, labels in [
        (torch.ones(2, device="meta"), torch.eye(10, device="meta")[:2]),
        (1.0, torch.tensor([1, 2], device="meta")),
    ]:
        with torch.no_grad():
            d = net(x, sigma, class_labels=labels)
        assert d.device.type == "meta" and d.shape == x.shape and d.dtype == torch.float32
    with pytest.raises(ValueError, match="sigma must be positive"):
        net(x, 0.0, class_labels=torch.tensor([1, 2], device="meta"))  # a number is read


def test_vp_sigma_range():
    net = VPPrecond(8, 3, model_type=Stand_in)
    assert net.sigma_max == pytest.approx(math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1))
    assert net.sigma_min == pytest.approx(math.sqrt(math.exp(0.5 * 19.9e-10 + 1e-6) - 1), rel=1e-6)


@pytest.mark.parametrize("sigma", [80, torch.tensor([2, 80])])
def test_vp_sigma_inv_of_integer_noise_levels(sigma):
    net = VPPrecond(8, 3, model_type=Stand_in)
    t = net.sigma_inv(sigma)
    # t(80) = 0.9335 (an integer result would be 0). Rounding t to float32 (6e-8 relative)
    # moves sigma(t) by at most 5e-7 relative at 80, where d ln(sigma) / d ln(t) is 8.7;
    # 1e-5 allows that and nothing near a wrong t.
    assert t.dtype == torch.float32
    torch.testing.assert_close(
        net.sigma(t), torch.as_tensor(sigma, dtype=torch.float64), rtol=1e-5, atol=0
    )


# ------------------------------------------------------------- devices without float64


@pytest.mark.parametrize(
    "device, wide",
    [
        (torch.device("mps"), torch.float32),  # the object needs no MPS hardware
        ("mps:0", torch.float32),
        ("cpu", torch.float64),
        (torch.device("cuda", 1), torch.float64),
        ("meta", torch.float64),
    ],
)
def test_wide_dtype_is_float32_only_on_a_device_without_float64(device, wide):
    from bdia.ode import wide_dtype

    assert wide_dtype(device) == wide


def _watch_and_noise_level():
    """BDIA's parasitic-mode watch, the adjoint's check of its recomputation and
    VPPrecond's t(sigma) on float32 CPU tensors: the computations, and the float64 formulas
    as written before the device was asked."""
    from bdia.adjoint import _relative_rms as adjoint_rms
    from bdia.solvers.bidirectional import _relative_rms

    g = torch.Generator().manual_seed(2)
    state = torch.randn(2, 3, 8, 8, generator=g)
    part = 1e-3 * torch.randn(2, 3, 8, 8, generator=g)
    sigma = torch.tensor([0.002, 0.5, 80.0])
    net = VPPrecond(8, 3, model_type=Stand_in)  # its sigma range is float64 on the host
    num, den = part.double().square().mean().sqrt(), state.double().square().mean().sqrt()
    root = (net.beta_min**2 + 2 * net.beta_d * torch.log1p(sigma.double() ** 2)).sqrt()
    t = ((root - net.beta_min) / net.beta_d).float()
    before = ((num / den).float(), float(num) / float(den), t)

    def compute():
        return _relative_rms(part, state), adjoint_rms(part, state), net.sigma_inv(sigma)

    return compute, before


def test_on_the_cpu_the_watch_and_the_noise_level_are_float64_computations_as_before():
    compute, before = _watch_and_noise_level()
    (rms, adjoint_rms, t), made = dtypes_made(compute)
    assert torch.float64 in made
    assert torch.equal(rms, before[0]) and torch.equal(t, before[2])  # bit for bit
    assert adjoint_rms == before[1]


def test_on_a_device_without_float64_no_float64_tensor_is_made(monkeypatch):
    """MPS has no float64: .double() there raises. With the CPU taken for such a device,
    none of the computations makes a float64 tensor, and each stays within float32 rounding."""
    import bdia.twoword

    compute, before = _watch_and_noise_level()
    monkeypatch.setattr(bdia.twoword, "_NO_FLOAT64", frozenset({"mps", "cpu"}))
    (rms, adjoint_rms, t), made = dtypes_made(compute)
    assert torch.float64 not in made and rms.dtype == t.dtype == torch.float32
    # The norms are float32 sums of 384 squares: a few units of 2^-24 (6e-8); 1e-6 relative
    # allows them and nothing near a wrong formula.
    torch.testing.assert_close(rms, before[0], rtol=1e-6, atol=0)
    assert adjoint_rms == pytest.approx(before[1], rel=1e-6)
    # t = (root - beta_min) / beta_d cancels at small sigma: the float32 rounding of root
    # (0.1008 at sigma 0.002) is magnified by root / (root - beta_min), 127 there, to about
    # 1e-5 relative (measured 2.4e-6); 3e-5 allows that. EDM computes it so in float32 too.
    torch.testing.assert_close(t, before[2], rtol=3e-5, atol=0)


def test_positional_embedding_numbers():
    emb = PositionalEmbedding(8, endpoint=True)(torch.tensor([2.0]))
    freqs = torch.tensor([1.0, 10000 ** (-1 / 3), 10000 ** (-2 / 3), 1e-4])
    expected = torch.cat([(2 * freqs).cos(), (2 * freqs).sin()])[None]
    torch.testing.assert_close(emb, expected)
    fourier = FourierEmbedding(8)
    assert fourier.freqs.shape == (4,)
    angles = 2 * math.pi * 0.5 * fourier.freqs
    torch.testing.assert_close(
        fourier(torch.tensor([0.5])), torch.cat([angles.cos(), angles.sin()])[None]
    )


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_embeddings_of_integer_noise_labels_are_those_of_the_same_floats(dtype):
    # DDPM-style integer timesteps. Frequencies cast to the labels' integer dtype would be
    # truncated: the positional ones below 1 to 0, leaving cos 1 and sin 0 in those channels.
    steps = torch.tensor([0, 7, 500, 999])
    for embedding in (PositionalEmbedding(16, endpoint=True), FourierEmbedding(16)):
        got = embedding(steps.to(dtype))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, embedding(steps.to(torch.float32)), rtol=0, atol=0)


SMALL = dict(
    model_channels=16,
    channel_mult=[1, 2],
    channel_mult_emb=4,
    num_blocks=1,
    attn_resolutions=[8],
    dropout=0.1,
    augment_dim=9,
)


@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
@pytest.mark.parametrize("encoder_type", ["standard", "residual", "skip"])
def test_small_forward(embedding_type, encoder_type):
    torch.manual_seed(3)
    net = EDMPrecond(
        16,
        3,
        label_dim=10,
        embedding_type=embedding_type,
        channel_mult_noise=2 if embedding_type == "fourier" else 1,
        encoder_type=encoder_type,
        resample_filter=[1, 3, 3, 1] if encoder_type == "residual" else [1, 1],
        **SMALL,
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 10.0])
    with torch.no_grad():
        d = net(x, sigma, class_labels=torch.tensor([1, 7]))
        d_onehot = net(x, sigma, class_labels=nn.functional.one_hot(torch.tensor([1, 7]), 10))
        f = net.model(x, torch.tensor([0.1, -0.3]), class_labels=torch.eye(10)[:2])
    assert d.shape == x.shape
    assert torch.isfinite(d).all()
    torch.testing.assert_close(d, d_onehot)
    assert f.shape == x.shape and torch.isfinite(f).all() and f.abs().sum() > 0


def test_embedding_swap_and_label_scale():
    torch.manual_seed(4)
    model = SongUNet(16, 3, 3, label_dim=10, **SMALL).eval()
    noise = torch.tensor([0.25])
    label = torch.eye(10)[[2]]
    raw = model.map_noise(noise)
    swapped = torch.cat([raw[:, 8:], raw[:, :8]], dim=1)
    emb = swapped + model.map_label(label * math.sqrt(10))
    emb = nn.functional.silu(model.map_layer1(nn.functional.silu(model.map_layer0(emb))))
    torch.testing.assert_close(model._embed(noise, label, None), emb)


def test_plugs_into_diffusion_ode():
    torch.manual_seed(5)
    net = EDMPrecond(16, 3, label_dim=10, **SMALL).eval()
    labels = torch.tensor([4, 2])
    ode = bdia.DiffusionODE(net, bdia.EDM(), cond={"class_labels": labels})
    x = 80.0 * torch.randn(2, 3, 16, 16, dtype=torch.float64)
    ts = [80.0, 40.0]
    with torch.no_grad():
        out = bdia.sample(ode, bdia.get_solver("euler"), x, ts, progress=False)
        d = net(x, torch.full((2,), 80.0), class_labels=labels).double()
    assert out.shape == x.shape and out.dtype == torch.float64
    assert torch.isfinite(out).all()
    expected = x + (40.0 - 80.0) * (x - d) / 80.0
    # The network sees the same float32 input either way, and the Euler step is the same
    # float64 formula: measured 3e-14 apart (a few ulps of |x| ~ 100). Fresh weights leave D
    # small (c_skip x, ~1e-2), so only a tight bound sees it: a noise level 1% off moves the
    # result by 1e-4, the labels of the two images swapped by 2e-10.
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Compute dtype of the inner U-Net (EDM's use_fp16, generalised to bfloat16)


def tiny_net(seed: int = 0) -> EDMPrecond:
    from bdia import generate

    return generate.random_network("tiny-cond", seed=seed)


def tiny_inputs():
    g = torch.Generator().manual_seed(11)
    x = 2.0 * torch.randn(4, 3, 16, 16, generator=g)
    return x, torch.tensor([0.02, 0.5, 5.0, 80.0]), torch.tensor([1, 2, 3, 4])


def record_calls(monkeypatch) -> dict[str, list[tuple[torch.dtype, torch.dtype | None]]]:
    """Patch the functional ops the layers call; record (input dtype, weight dtype) per call."""
    calls: dict[str, list[tuple[torch.dtype, torch.dtype | None]]] = {}
    functional = nn.functional
    for name in ("conv2d", "conv_transpose2d", "group_norm", "linear"):
        original = getattr(functional, name)

        def recorder(x, *args, _name=name, _original=original, **kwargs):
            weight = kwargs.get("weight", args[0] if args else None)
            if _name == "group_norm":
                weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
            calls.setdefault(_name, []).append((x.dtype, getattr(weight, "dtype", None)))
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(functional, name, recorder)
    for name in ("_upsample", "_downsample"):  # (x, filter, padding)
        original = getattr(networks, name)

        def resampler(x, f, pad, _name=name, _original=original):
            calls.setdefault(_name, []).append((x.dtype, f.dtype))
            return _original(x, f, pad)

        monkeypatch.setattr(networks, name, resampler)
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compute_dtype_runs_the_unet_in_half_precision(monkeypatch, dtype):
    # torch 2.13's CPU kernels cover conv2d, conv_transpose2d and group_norm in float16 as
    # well as bfloat16, so both dtypes run here for real.
    net = tiny_net()
    x, sigma, labels = tiny_inputs()
    convs = [m for m in net.model.modules() if type(m).__name__ == "Conv2d"]
    weight_conv = sum(1 for m in convs if m.weight is not None)
    net.compute_dtype = dtype
    block_out: list[torch.dtype] = []
    for m in net.model.modules():
        if type(m).__name__ == "UNetBlock":
            m.register_forward_hook(lambda mod, args, out: block_out.append(out.dtype))
    calls = record_calls(monkeypatch)
    with torch.no_grad():
        d = net(x, sigma, class_labels=labels)
    assert d.dtype == torch.float32 and d.shape == x.shape
    # Every convolution, every FIR resampling (blockwise for the tiny network's 2x2 filter)
    # and every normalisation sees the compute dtype, in its input and in its weights or
    # filter: nothing upcasts the activations.
    assert len(calls["conv2d"]) >= weight_conv > 0
    assert len(calls["_upsample"]) > 0 and len(calls["_downsample"]) > 0
    assert "conv_transpose2d" not in calls and len(calls["group_norm"]) > 0
    for name in ("conv2d", "_upsample", "_downsample", "group_norm"):
        assert set(calls[name]) == {(dtype, dtype)}, name
    assert block_out and set(block_out) == {dtype}
    # The embedding path (mapping layers and each block's affine layer) stays float32.
    assert set(calls["linear"]) == {(torch.float32, torch.float32)}
    # The weights are cast per call, not converted.
    assert {p.dtype for p in net.parameters()} == {torch.float32}


def test_default_and_force_fp32_run_in_float32(monkeypatch):
    net = tiny_net()
    x, sigma, labels = tiny_inputs()
    calls = record_calls(monkeypatch)
    with torch.no_grad():
        d = net(x, sigma, class_labels=labels)
        assert d.dtype == torch.float32
        assert {dt for c in calls.values() for pair in c for dt in pair} == {torch.float32}
        calls.clear()
        net.compute_dtype = torch.bfloat16
        net(x, sigma, class_labels=labels, force_fp32=True)
        assert {dt for c in calls.values() for pair in c for dt in pair} == {torch.float32}
    assert len(calls["conv2d"]) > 0


def test_inner_dtype_rule():
    net = tiny_net()
    assert net.compute_dtype is None and net.use_fp16 is False
    for device in ("cpu", "cuda"):  # a torch.device needs no CUDA to exist
        assert net.inner_dtype(device) == torch.float32
    net.use_fp16 = True  # EDM's rule: float16 on CUDA only
    assert net.inner_dtype("cpu") == torch.float32
    assert net.inner_dtype(torch.device("cuda", 0)) == torch.float16
    assert net.inner_dtype("cuda", force_fp32=True) == torch.float32
    net.compute_dtype = torch.float32  # an explicit dtype applies on every device
    assert net.inner_dtype("cuda") == torch.float32
    net.compute_dtype = torch.bfloat16
    assert net.inner_dtype("cpu") == net.inner_dtype("cuda") == torch.bfloat16
    assert net.inner_dtype("cpu", force_fp32=True) == torch.float32
    net.compute_dtype = None
    assert net.inner_dtype("cuda") == torch.float16


@pytest.mark.parametrize(
    "value", ["bf16", "bfloat16", torch.float64, torch.int8, torch.complex64, 16, float]
)
def test_invalid_compute_dtype_raises(value):
    net = tiny_net()
    net.compute_dtype = torch.float16
    with pytest.raises(ValueError, match=r"compute_dtype must be None, torch\.float32.*bfloat16"):
        net.compute_dtype = value
    assert net.compute_dtype == torch.float16


def test_use_fp16_must_be_a_bool():
    from bdia.models.checkpoints import build_network

    with pytest.raises(TypeError, match="use_fp16 must be True or False"):
        EDMPrecond(8, 3, use_fp16="yes", model_type=Stand_in)
    with pytest.raises(ValueError, match="use_fp16 must be True or False"):
        build_network("EDMPrecond", dict(img_resolution=8, img_channels=3, use_fp16=1))
    assert VPPrecond(8, 3, use_fp16=True, model_type=Stand_in).use_fp16 is True


def test_compute_dtype_is_not_saved(tmp_path):
    import json

    from bdia.models.checkpoints import load_network, read_metadata, save_network

    net = tiny_net()
    config = json.loads(json.dumps(net.config))
    keys = list(net.state_dict())
    net.compute_dtype = torch.bfloat16
    assert net.config == config and list(net.state_dict()) == keys
    save_network(net, tmp_path / "tiny.safetensors")
    assert json.loads(read_metadata(tmp_path / "tiny.safetensors")["config"]) == config
    loaded = load_network(tmp_path / "tiny.safetensors")
    assert loaded.config == config and loaded.compute_dtype is None
    for k, v in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v) and v.dtype == torch.float32, k


def test_compute_dtype_inside_diffusion_ode(monkeypatch):
    # The ODE infers model_dtype float32 from the float32 weights, so the state reaches the
    # preconditioner in float32 and only the U-Net runs in bfloat16.
    net = tiny_net()
    net.compute_dtype = torch.bfloat16
    ode = bdia.DiffusionODE(net, bdia.EDM(), cond={"class_labels": torch.tensor([1, 2])})
    assert ode.model_dtype == torch.float32
    calls = record_calls(monkeypatch)
    x = 80.0 * torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        out = bdia.sample(ode, bdia.get_solver("euler"), x, [80.0, 40.0, 20.0], progress=False)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert set(calls["conv2d"]) == {(torch.bfloat16, torch.bfloat16)}


# ---------------------------------------------------------------------------------------------
# compile_network: opt-in torch.compile of the U-Net
#
# Most tests here use backends that need no C++ compiler: "aot_eager" runs the captured graph
# through AOTAutograd on the eager ATen kernels, and a recording backend returns the graph
# dynamo captured as it is. They check the wiring in seconds. Inductor, the default backend,
# generates C++ on a CPU (Triton on a GPU) and takes tens of seconds to compile even the tiny
# network, so its one test is marked slow.


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches cleared before and after the test.

    All SongUNets share one ``forward`` code object, so graphs an earlier test captured would
    be reused here instead of captured (and counted) again.
    """
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording(backend: str | None):
    """A backend that records each graph and its example inputs, then compiles it with
    ``backend`` (None: runs the captured graph as it is); returns (backend, records)."""
    import torch._dynamo

    records: list[tuple[torch.fx.GraphModule, list]] = []
    inner = None if backend is None else torch._dynamo.lookup_backend(backend)

    def record(gm, example_inputs):
        records.append((gm, list(example_inputs)))
        return gm.forward if inner is None else inner(gm, example_inputs)

    return record, records


@pytest.mark.slow  # compiles (Dynamo and AOT autograd take seconds)
def test_compile_network_matches_eager_and_keeps_the_network(fresh_dynamo, tmp_path):
    import json

    from bdia.models import compile_network
    from bdia.models.checkpoints import load_network, save_network

    eager, net = tiny_net(seed=1), tiny_net(seed=1)
    keys, config = list(net.state_dict()), json.loads(json.dumps(net.config))
    backend, graphs = recording("aot_eager")
    assert compile_network(net, backend=backend) is net
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        got = net(x, sigma, class_labels=labels)
        want = eager(x, sigma, class_labels=labels)
        net(x, sigma, class_labels=labels)
    # Compiled once, at the first call, and reused at the second.
    assert len(graphs) == 1
    # aot_eager runs the same ATen kernels, unfused and in the same order: bit for bit the
    # eager output (measured identical in float32, bfloat16 and float16).
    assert torch.equal(got, want)
    # The call is wrapped, the module is not: same class, keys, recorded arguments and file.
    assert type(net.model) is SongUNet and isinstance(net, EDMPrecond)
    assert list(net.state_dict()) == keys and net.config == config
    save_network(net, tmp_path / "compiled.safetensors")
    loaded = load_network(tmp_path / "compiled.safetensors")
    assert loaded.config == config
    for k, v in eager.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.slow  # compiles (Dynamo and AOT autograd take seconds)
def test_compiled_network_follows_compute_dtype(fresh_dynamo):
    from bdia.models import compile_network

    eager, net = tiny_net(seed=2), tiny_net(seed=2)
    backend, graphs = recording(None)
    compile_network(net, backend=backend)
    net.compute_dtype = eager.compute_dtype = torch.bfloat16  # set after compiling
    x, sigma, labels = tiny_inputs()
    with torch.no_grad():
        got = net(x, sigma, class_labels=labels)
        want = eager(x, sigma, class_labels=labels)
        d32 = eager(x, sigma, class_labels=labels, force_fp32=True)
    # The graph took the U-Net's image input in bfloat16 (a later float32 call would
    # recompile: the dtype is part of the graph's guards).
    (gm, inputs) = graphs[0]
    assert len(graphs) == 1
    assert [t.dtype for t in inputs if t.shape == x.shape] == [torch.bfloat16]
    assert got.dtype == torch.float32 and torch.equal(got, want) and not torch.equal(got, d32)


@pytest.mark.slow  # compiles (Dynamo and AOT autograd take seconds)
def test_compiled_network_samples_and_inverts_like_eager(fresh_dynamo):
    """BDIA's round trip through a compiled network: the same bits as eager, one graph, and
    nothing of the sampler (its two-word arithmetic above all) inside it."""
    from bdia.models import compile_network

    backend, graphs = recording(None)
    labels = torch.tensor([1, 2])
    x = 80.0 * torch.randn(
        2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    ts = bdia.karras_grid(8, final_zero=False)  # 5 steps: BDIA's parasitic part would dominate
    solver = bdia.bdia("heun", 0.96)
    results = {}
    for mode in ("eager", "compiled"):
        net = tiny_net(seed=1)
        if mode == "compiled":
            compile_network(net, backend=backend)
        ode = bdia.DiffusionODE(net, bdia.EDM(), cond={"class_labels": labels})
        pair = bdia.sample(ode, solver, x, ts, return_pair=True, progress=False)
        back = bdia.invert(ode, solver, pair, ts, progress=False)
        results[mode] = (pair.earlier, pair.later, back.earlier, back.later)
    assert all(torch.equal(c, e) for c, e in zip(results["compiled"], results["eager"]))
    # float64 state, two-word BDIA: the start comes back exactly (measured: bit for bit).
    back = results["compiled"][2]
    assert float((back - x).norm() / x.norm()) < 1e-12
    # One graph for every call of both runs (same batch, same dtype), and every operation in
    # it comes from the network's own code.
    assert len(graphs) == 1
    gm = graphs[0][0]
    ops = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert len(ops) > 100
    for node in ops:
        trace = node.meta.get("stack_trace") or ""
        assert "bdia/models/networks.py" in trace and "twoword" not in trace, node


@pytest.mark.slow
def test_inductor_compiled_network_round_trip_is_exact(fresh_dynamo):
    """With inductor's generated kernels (fused, so not bitwise eager), a BDIA run samples like
    eager to float32 rounding and still inverts exactly: exactness needs only that the same
    inputs give the same outputs, not that they give eager's."""
    from bdia.models import compile_network

    labels = torch.tensor([1, 2])
    x = 80.0 * torch.randn(
        2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    ts = bdia.karras_grid(8, final_zero=False)
    solver = bdia.bdia("heun", 0.96)
    eager, net = tiny_net(seed=1), tiny_net(seed=1)
    backend, graphs = recording("inductor")
    compile_network(net, backend=backend)
    runs = {}
    for name, model in (("eager", eager), ("compiled", net)):
        ode = bdia.DiffusionODE(model, bdia.EDM(), cond={"class_labels": labels})
        pair = bdia.sample(ode, solver, x, ts, return_pair=True, progress=False)
        runs[name] = (pair, bdia.invert(ode, solver, pair, ts, progress=False))
    (pair, back), (eager_pair, _) = runs["compiled"], runs["eager"]
    # One graph for the whole run: a new sigma each step is a new value, not a new guard.
    assert len(graphs) == 1
    # Reordered float32 sums in the network, carried through 5 steps of the sampler: measured
    # 1.4e-8 relative (not 0: the kernels are fused); 1e-5 still tells a wrong kernel (order 1)
    # from rounding, with room for another CPU's vector width.
    assert float((pair.later - eager_pair.later).norm() / eager_pair.later.norm()) < 1e-5
    # Float64 two-word state: the noise comes back to rounding (measured bit for bit).
    assert float((back.earlier - x).norm() / x.norm()) < 1e-12


@pytest.mark.parametrize(
    "thing", [nn.Linear(2, 2), "EDMPrecond", None], ids=["module", "string", "None"]
)
def test_compile_network_refuses_what_it_cannot_compile(thing):
    from bdia.models import compile_network

    with pytest.raises(TypeError, match=r"EDMPrecond, VPPrecond or VEPrecond .* or a SongUNet"):
        compile_network(thing)


def test_compile_network_compiles_the_inner_network_only():
    from bdia.models import compile_network

    # Compiling is lazy: nothing is traced before the first call, so this needs no reset.
    for cls in (EDMPrecond, VPPrecond, VEPrecond):
        net = compile_network(cls(8, 3, model_type=Stand_in), backend="eager")
        assert net.model._compiled_call_impl is not None
        assert net._compiled_call_impl is None
    model = SongUNet(16, 3, 3, **SMALL)
    assert compile_network(model, backend="eager") is model
    assert model._compiled_call_impl is not None


# ---------------------------------------------------------------------------------------------
# Resampling: DDPM++'s 2x2 filter blockwise, equal to EDM's grouped convolutions


def _grouped_up(x, f, pad):
    c = x.shape[1]
    return nn.functional.conv_transpose2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)


def _grouped_down(x, f, pad):
    c = x.shape[1]
    return nn.functional.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)


def _fir(taps, dtype):
    t = torch.tensor(taps, dtype=torch.float64)
    return (torch.outer(t, t) / t.sum() ** 2)[None, None].to(dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("taps", [[1, 1], [1, 3]])
def test_blockwise_upsampling_equals_the_grouped_transposed_convolution_bit_for_bit(dtype, taps):
    # One product per output pixel, x[i, j] f[a, b] at (2i + a, 2j + b): no sum to reorder.
    # An asymmetric filter checks that neither form flips it.
    x = torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    f = 4 * _fir(taps, dtype)
    up = networks._upsample(x, f, 0)
    assert up.shape == (3, 5, 12, 14) and up.dtype == dtype
    assert torch.equal(up, _grouped_up(x, f, 0))


@pytest.mark.parametrize(
    ("dtype", "tol"),
    # float64 and DDPM++'s [1, 1] in any dtype: four products by 1/4 (exact) summed, where
    # the convolution sums the same four in another order: 0 in float64, and the rounding of
    # a four-term sum elsewhere (half an ulp per addition, so 2 ulps of the output at most:
    # 2.4e-7 for float32, 1.6e-2 for bfloat16, 2e-3 for float16, relative to |x| <= 4).
    [
        (torch.float64, 0.0),
        (torch.float32, 2.4e-7),
        (torch.bfloat16, 1.6e-2),
        (torch.float16, 2e-3),
    ],
)
@pytest.mark.parametrize("taps", [[1, 1], [1, 3]])
def test_blockwise_downsampling_agrees_with_the_grouped_convolution(dtype, tol, taps):
    x = torch.randn(3, 5, 8, 6, generator=torch.Generator().manual_seed(1)).clamp(-4, 4)
    x = x.to(dtype)
    f = _fir(taps, dtype)
    down = networks._downsample(x, f, 0)
    assert down.shape == (3, 5, 4, 3) and down.dtype == dtype
    grouped = _grouped_down(x, f, 0)
    error = (down.double() - grouped.double()).abs().max().item()
    assert error <= 4 * tol
    if dtype == torch.float64 and taps == [1, 1]:
        assert torch.equal(down, grouped)


def test_resampling_falls_back_to_the_grouped_convolution():
    # NCSN++'s 4-tap filter (padding 1) and an odd-sized image take the convolution itself.
    x = torch.randn(2, 3, 9, 8, generator=torch.Generator().manual_seed(2))
    f4 = _fir([1, 3, 3, 1], torch.float32)
    assert torch.equal(networks._downsample(x, f4, 1), _grouped_down(x, f4, 1))
    assert torch.equal(networks._upsample(x, 4 * f4, 1), _grouped_up(x, 4 * f4, 1))
    f2 = _fir([1, 1], torch.float32)
    assert torch.equal(networks._downsample(x, f2, 0), _grouped_down(x, f2, 0))  # 9 rows: odd


def test_ddpmpp_network_with_blockwise_resampling_matches_the_grouped_form(monkeypatch):
    # The whole DDPM++ network in float64: the blockwise form is EDM's arithmetic to float64
    # rounding (the downsampling sums in another order). Measured 3.8e-12 relative, the
    # rounding grown through the network's normalisations; 1e-10 allows for other CPUs'
    # kernels, while a resampling with a wrong weight or position would move D by O(1).
    net = tiny_net().double()
    x, sigma, labels = tiny_inputs()
    x, sigma = x.double(), sigma.double()
    with torch.no_grad():
        blockwise = net(x, sigma, class_labels=labels)
        monkeypatch.setattr(networks, "_upsample", _grouped_up)
        monkeypatch.setattr(networks, "_downsample", _grouped_down)
        grouped = net(x, sigma, class_labels=labels)
    assert (blockwise - grouped).norm() <= 1e-10 * grouped.norm()

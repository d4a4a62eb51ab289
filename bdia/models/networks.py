"""EDM's CIFAR-10 network family: ``SongUNet`` (DDPM++ / NCSN++) and its preconditioners.

Written from the published description of EDM (Karras et al. 2022) so that module names,
parameter names and tensor shapes match the released ``EDMPrecond(SongUNet)`` state dicts
(reference key lists in ``shared/reference``). Layout details that a checkpoint fixes are kept:
Linear weights are ``(out, in)``; attention's ``qkv`` output channels are ordered
(head, channel, q/k/v); the noise embedding is ``[cos, sin]`` with its halves swapped before the
mapping layers; FIR resampling filters are buffers named ``resample_filter``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ode import wide_dtype
from .registry import register_network

__all__ = [
    "Linear",
    "Conv2d",
    "GroupNorm",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
    "SongUNet",
    "EDMPrecond",
    "VPPrecond",
    "VEPrecond",
    "COMPUTE_DTYPES",
    "compile_network",
]


# ---------------------------------------------------------------------------------------------
# Initialisation


def _init_weight(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """A freshly drawn weight tensor under one of EDM's initialisation modes."""
    if mode == "xavier_uniform":
        return math.sqrt(6.0 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2.0 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == "kaiming_uniform":
        return math.sqrt(3.0 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1.0 / fan_in) * torch.randn(*shape)
    raise ValueError(f"unknown init_mode {mode!r}")


# ---------------------------------------------------------------------------------------------
# Layers


class Linear(nn.Module):
    """Fully connected layer: ``x @ weight.T + bias`` with ``weight`` of shape ``(out, in)``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        w = _init_weight((out_features, in_features), init_mode, in_features, out_features)
        self.weight = nn.Parameter(w * init_weight)
        if bias:
            b = _init_weight((out_features,), init_mode, in_features, out_features)
            self.bias: nn.Parameter | None = nn.Parameter(b * init_bias)
        else:
            self.bias = None

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def _upsample(x: Tensor, f: Tensor, pad: int) -> Tensor:
    """``(N, C, H, W)`` to ``(N, C, 2H, 2W)``: the transposed convolution of each channel at
    stride 2 with the ``(1, 1, k, k)`` filter ``f``, in ``x``'s dtype.

    A 2x2 filter (DDPM++'s ``[1, 1]``) tiles each pixel into a 2x2 block, ``x[i, j] f[a, b]``
    at ``(2i + a, 2j + b)``: one product per output, so the blockwise form below equals the
    grouped convolution bit for bit, and is an elementwise kernel that a compiled network fuses
    with its neighbours instead of a depthwise convolution kernel of its own.
    """
    if f.shape[-1] == 2 and pad == 0:
        n, c, h, w = x.shape
        blocks = x[:, :, :, None, :, None] * f.reshape(2, 1, 2)
        return blocks.reshape(n, c, 2 * h, 2 * w)
    return F.conv_transpose2d(
        x, f.tile(x.shape[1], 1, 1, 1), groups=x.shape[1], stride=2, padding=pad
    )


def _downsample(x: Tensor, f: Tensor, pad: int) -> Tensor:
    """``(N, C, H, W)`` to ``(N, C, H // 2, W // 2)``: the convolution of each channel at
    stride 2 with the ``(1, 1, k, k)`` filter ``f``, in ``x``'s dtype.

    A 2x2 filter on an even-sized image is a weighted sum over disjoint 2x2 blocks, computed
    as one (an elementwise product and a sum a compiled network fuses with its neighbours):
    the same four products as the grouped convolution, summed in another order, so the two
    agree to the rounding of that sum.
    """
    n, c, h, w = x.shape
    if f.shape[-1] == 2 and pad == 0 and h % 2 == 0 and w % 2 == 0:
        blocks = x.reshape(n, c, h // 2, 2, w // 2, 2) * f.reshape(2, 1, 2)
        return blocks.sum(dim=(3, 5))
    return F.conv2d(x, f.tile(c, 1, 1, 1), groups=c, stride=2, padding=pad)


class Conv2d(nn.Module):
    """2-D convolution with optional 2x up- or downsampling by a separable FIR filter.

    ``kernel=0`` gives a weightless layer that only resamples. With ``fused_resample`` the
    convolution and the resampling share one padding (used by NCSN++'s residual encoder path).
    The normalised filter is stored as the buffer ``resample_filter`` when resampling is on.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fan_in = in_channels * kernel * kernel
        fan_out = out_channels * kernel * kernel
        if kernel:
            shape = (out_channels, in_channels, kernel, kernel)
            w = _init_weight(shape, init_mode, fan_in, fan_out)
            self.weight: nn.Parameter | None = nn.Parameter(w * init_weight)
        else:
            self.weight = None
        if kernel and bias:
            b = _init_weight((out_channels,), init_mode, fan_in, fan_out)
            self.bias: nn.Parameter | None = nn.Parameter(b * init_bias)
        else:
            self.bias = None
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        fir = torch.outer(taps, taps)[None, None] / taps.sum() ** 2
        # The buffer's type, for type checkers. Declared here: TorchScript reads class
        # annotations, and cannot resolve this one.
        self.resample_filter: Tensor | None
        self.register_buffer("resample_filter", fir if (up or down) else None)

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        c_in, c_out = self.in_channels, self.out_channels

        # __init__ keeps the filter whenever the layer resamples, so f is set below wherever
        # self.up or self.down holds.
        if self.fused_resample and self.up and w is not None:
            assert f is not None
            up_filter = (4 * f).tile(c_in, 1, 1, 1)
            pad = max(f_pad - w_pad, 0)
            x = F.conv_transpose2d(x, up_filter, groups=c_in, stride=2, padding=pad)
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            assert f is not None
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(c_out, 1, 1, 1), groups=c_out, stride=2)
        else:
            if self.up:
                assert f is not None
                x = _upsample(x, 4 * f, f_pad)
            if self.down:
                assert f is not None
                x = _downsample(x, f, f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(
            x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), eps=self.eps
        )


class UNetBlock(nn.Module):
    """Residual block with embedding injection, optional resampling and self-attention.

    Submodules, in state-dict order: ``norm0``, ``conv0``, ``affine``, ``norm1``, ``conv1``,
    ``skip`` (when the shape changes), and ``norm2``, ``qkv``, ``proj`` (when attending).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int | None = None,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
        resample_filter: Sequence[float] = (1, 1),
        resample_proj: bool = False,
        adaptive_scale: bool = True,
        init: dict[str, Any] | None = None,
        init_zero: dict[str, Any] | None = None,
        init_attn: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0.0)
        init_attn = dict(init_attn) if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        elif num_heads is not None:
            self.num_heads = num_heads
        else:
            self.num_heads = out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(
                in_channels,
                out_channels,
                kernel,
                up=up,
                down=down,
                resample_filter=resample_filter,
                **init,
            )

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        residual = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(shift + self.norm1(x) * (scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(residual) if self.skip is not None else residual)
        x = x * self.skip_scale

        if self.num_heads:
            x = self.proj(self.attend(x)) + x
            x = x * self.skip_scale
        return x

    def attend(self, x: Tensor) -> Tensor:
        """Multi-head self-attention over the pixels of ``x``, before the output projection.

        ``x`` of shape ``(N, C, H, W)``; returns the attended values, ``(N, C, H, W)`` in
        ``x``'s dtype. Each of the ``num_heads`` heads attends with ``E = C / num_heads``
        channels over ``L = H W`` positions: ``softmax(q^T k / sqrt(E)) v``.

        Runs through ``F.scaled_dot_product_attention`` (SDPA), which picks a fused kernel
        for the device and dtype. In float16/bfloat16 these kernels (CUDA's flash and
        memory-efficient ones, and the CPU flash kernel torch 2.13 takes here) keep the
        scores, the softmax and both products' accumulators in float32 and round only the
        softmax's numerators to the compute dtype before multiplying by ``v``: the rounding
        the former explicit code (softmax in float32, weights cast back) had, so no upcast
        is added, which would forgo the fused kernel. Against a float64 reference on
        ``(4, 1, 256, 256)`` inputs (CIFAR-10's 16x16 attention) the CPU kernel's relative
        error measured 3.6e-3 in bfloat16 and 4.5e-4 in float16, the former code's
        3.7e-3 and 4.6e-4, about twice the error of rounding the exact result once.
        """
        n, c, h, w = x.shape
        heads = self.num_heads
        # qkv's output channels are laid out (head, channel, q/k/v), as the released weights
        # expect; SDPA wants (N, heads, L, E).
        qkv = self.qkv(self.norm2(x)).reshape(n, heads, c // heads, 3, h * w)
        # One copy into (3, N, heads, L, E): every fused kernel needs E contiguous, and views
        # of qkv would have stride 3 L there, leaving SDPA its slow unfused path.
        q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(E) by default
        return attended.transpose(-1, -2).reshape(n, c, h, w)


def _check_size(name: str, value: Any, least: int) -> None:
    """Refuse a size or count that is no integer >= ``least``: a damaged config's -16 or 1.5
    would fail deep in torch ("negative dimension") or build a network of other layers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def _float_labels(x: Tensor) -> Tensor:
    """Noise labels as floats: the embeddings cast their frequencies to the labels' dtype, which
    for integer labels (timestep indices) would truncate them."""
    return x if x.is_floating_point() else x.to(torch.float32)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding ``[cos(x f), sin(x f)]``, ``f = max_positions^(-i / (n/2 - e))``.

    ``x`` of shape ``(N,)``; returns ``(N, num_channels)`` in ``x``'s dtype, or float32 for
    integer ``x`` (timestep indices).
    """

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        x = _float_labels(x)
        half = self.num_channels // 2
        steps = torch.arange(half, dtype=torch.float32, device=x.device)
        steps = steps / (half - (1 if self.endpoint else 0))
        freqs = (1.0 / self.max_positions) ** steps
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features ``[cos(2 pi x f), sin(2 pi x f)]``, ``f ~ N(0, scale^2)``.

    The frequencies are the buffer ``freqs`` (saved with the model). ``x`` of shape ``(N,)``;
    returns ``(N, num_channels)`` in ``x``'s dtype, or float32 for integer ``x``.
    """

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        self.freqs: Tensor  # the buffer's type (see Conv2d)
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = _float_labels(x)
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


# ---------------------------------------------------------------------------------------------
# SongUNet


class SongUNet(nn.Module):
    """The DDPM++ / NCSN++ U-Net of Song et al. 2021 as configured in EDM.

    Called as ``model(x, noise_labels, class_labels, augment_labels=None)`` with ``x`` of shape
    ``(N, in_channels, R, R)``, ``noise_labels`` of shape ``(N,)`` (floats, or integer timestep
    indices, embedded as the same floats) and ``class_labels`` one-hot of shape
    ``(N, label_dim)`` (or None); returns ``(N, out_channels, R, R)``.

    DDPM++: ``embedding_type="positional"``, ``channel_mult_noise=1``,
    ``encoder_type="standard"``, ``resample_filter=[1, 1]``.
    NCSN++: ``embedding_type="fourier"``, ``channel_mult_noise=2``,
    ``encoder_type="residual"``, ``resample_filter=[1, 3, 3, 1]``.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        if embedding_type not in ("fourier", "positional"):
            raise ValueError(
                f"embedding_type must be 'fourier' or 'positional', got {embedding_type!r}"
            )
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(
                f"encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}"
            )
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        for name, value, least in (
            ("img_resolution", img_resolution, 1),
            ("in_channels", in_channels, 1),
            ("out_channels", out_channels, 1),
            ("label_dim", label_dim, 0),
            ("augment_dim", augment_dim, 0),
            ("model_channels", model_channels, 1),
            ("channel_mult_emb", channel_mult_emb, 1),
            ("num_blocks", num_blocks, 0),
            ("channel_mult_noise", channel_mult_noise, 1),
        ):
            _check_size(name, value, least)
        mults = list(channel_mult) if isinstance(channel_mult, (list, tuple)) else []
        if not mults or any(
            isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1 for m in mults
        ):
            raise ValueError(
                "channel_mult must be a non-empty list of integers >= 1 (one per level), got "
                f"{channel_mult!r}"
            )
        # Each level after the first halves the resolution; the decoder doubles it back and
        # joins the encoder's features, which only fit when no halving rounded.
        halvings = len(mults) - 1
        if img_resolution % (1 << halvings):
            times = "once" if halvings == 1 else f"{halvings} times"
            raise ValueError(
                f"img_resolution {img_resolution} is not divisible by {1 << halvings} "
                f"(channel_mult's {len(mults)} levels halve it {times})"
            )
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init: dict[str, Any] = dict(init_mode="xavier_uniform")
        init_zero: dict[str, Any] = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn: dict[str, Any] = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs: dict[str, Any] = dict(
            emb_channels=emb_channels,
            num_heads=1,
            dropout=dropout,
            skip_scale=math.sqrt(0.5),
            eps=1e-6,
            resample_filter=resample_filter,
            resample_proj=True,
            adaptive_scale=False,
            init=init,
            init_zero=init_zero,
            init_attn=init_attn,
        )

        # Mapping network.
        self.map_noise: PositionalEmbedding | FourierEmbedding
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = (
            Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        )
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{tag}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{tag}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{tag}_aux_down"] = Conv2d(
                        caux, caux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{tag}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{tag}_aux_residual"] = Conv2d(
                        caux,
                        cout,
                        3,
                        down=True,
                        resample_filter=resample_filter,
                        fused_resample=True,
                        **init,
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{tag}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        # The modules not tagged aux are Conv2d and UNetBlock, whose out_channels is an int.
        skips = [
            cast(int, block.out_channels) for name, block in self.enc.items() if "aux" not in name
        ]

        # Decoder.
        self.dec = nn.ModuleDict()
        last = len(channel_mult) - 1
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            tag = f"{res}x{res}"
            if level == last:
                self.dec[f"{tag}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{tag}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{tag}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{tag}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < last:
                    self.dec[f"{tag}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{tag}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{tag}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)

    def _embed(
        self, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None
    ) -> Tensor:
        emb = self.map_noise(noise_labels)
        # Swap the [cos, sin] halves to [sin, cos], as the released weights expect.
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)
        if self.map_label is not None:
            if class_labels is None:
                raise ValueError("this SongUNet is class-conditional: pass class_labels")
            labels = class_labels.to(emb.dtype)
            if self.training and self.label_dropout:
                keep = torch.rand(labels.shape[0], 1, device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels.to(emb.dtype))
        emb = F.silu(self.map_layer0(emb))
        return F.silu(self.map_layer1(emb))

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        emb = self._embed(noise_labels, class_labels, augment_labels)

        skips: list[Tensor] = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        out: Tensor | None = None
        hidden: Tensor | None = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                out = block(out)
            elif "aux_norm" in name:
                hidden = block(x)
            elif "aux_conv" in name:
                assert hidden is not None  # each level's aux_norm comes before its aux_conv
                hidden = block(F.silu(hidden))
                out = hidden if out is None else hidden + out
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        assert out is not None
        return out


# ---------------------------------------------------------------------------------------------
# Preconditioners

_MODEL_TYPES: dict[str, Callable[..., nn.Module]] = {"SongUNet": SongUNet}


#: The dtypes the inner network of a preconditioner may run in (``compute_dtype``).
COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class _Precond(nn.Module):
    """Shared plumbing: build ``self.model``, prepare labels, apply c_skip/c_out/c_in/c_noise.

    Precision (EDM's ``use_fp16``, generalised to bfloat16). The preconditioner itself, the
    noise and label inputs, and the skip path ``c_skip x + c_out F(...)`` always run in
    float32, and ``forward`` returns float32. Only the inner network's image input
    ``c_in x`` is cast to the compute dtype; each ``Linear``/``Conv2d``/``GroupNorm`` casts
    its weights to its input's dtype, so the U-Net's activations stay in that dtype from the
    first convolution to the output layer. The embedding path (noise and label embedding,
    mapping layers) stays float32, as its input is float32, and each block casts its affine
    output to the activations' dtype. Attention runs through
    ``F.scaled_dot_product_attention``, whose kernels compute scores and softmax in float32
    (see ``UNetBlock.attend``).

    The compute dtype is

    * ``compute_dtype`` when it is set (``torch.float32``, ``torch.float16`` or
      ``torch.bfloat16``), on every device;
    * otherwise (``compute_dtype = None``, the default) float16 when the network was built
      with ``use_fp16=True`` and the input lies on a CUDA device, else float32 (EDM's rule);
    * float32 whenever ``forward`` gets ``force_fp32=True``.

    Weights stay float32, as in EDM. The cost: a half-precision forward casts every weight,
    bias and filter of the convolutions and normalisations on every call (354 tensors holding
    51M of the 56M parameters of CIFAR-10 DDPM++: 354 extra kernels reading 4 and writing 2
    bytes per parameter), which weighs most at small batches. In exchange one network serves
    every compute dtype and saves and loads in float32. ``net.to(dtype)`` does not change the
    compute dtype: it only rounds the weights, which are cast back to the input's dtype.
    ``compute_dtype`` is a run-time setting: it is neither part of the state dict nor of the
    recorded constructor arguments (``.config``).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool,
        model_type: str | Callable[..., nn.Module],
        model_kwargs: dict[str, Any],
    ) -> None:
        if not isinstance(use_fp16, bool):
            raise TypeError(f"use_fp16 must be True or False, got {use_fp16!r}")
        # Checked here as well as by the inner network, which knows img_channels by another name.
        _check_size("img_resolution", img_resolution, 1)
        _check_size("img_channels", img_channels, 1)
        _check_size("label_dim", label_dim, 0)
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self._compute_dtype: torch.dtype | None = None
        if isinstance(model_type, str):
            if model_type not in _MODEL_TYPES:
                known = ", ".join(sorted(_MODEL_TYPES))
                raise ValueError(
                    f"unknown architecture model_type={model_type!r}; supported: {known}"
                )
            model_type = _MODEL_TYPES[model_type]
        self.model = model_type(
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            **model_kwargs,
        )

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype the inner network runs in, or None to follow ``use_fp16`` (the default).

        Settable to None, ``torch.float32``, ``torch.float16`` or ``torch.bfloat16``; any
        other value raises a ValueError. An explicit dtype applies on every device; None means
        float16 on CUDA for a network built with ``use_fp16=True`` and float32 otherwise.
        ``forward(..., force_fp32=True)`` overrides it. Only the U-Net's image input is cast:
        the preconditioner, the skip path, the noise and label embedding and the output stay
        float32, and the weights stay float32 (each layer casts them per call).
        """
        return getattr(self, "_compute_dtype", None)

    @compute_dtype.setter
    def compute_dtype(self, value: torch.dtype | None) -> None:
        # Names such as "bf16" are refused: mapping names to dtypes is the command line's job.
        if value is not None and not (isinstance(value, torch.dtype) and value in COMPUTE_DTYPES):
            allowed = ", ".join(str(d) for d in COMPUTE_DTYPES)
            raise ValueError(f"compute_dtype must be None, {allowed}; got {value!r}")
        self._compute_dtype = value

    def inner_dtype(self, device: torch.device | str, force_fp32: bool = False) -> torch.dtype:
        """The dtype the inner network runs in for an input on ``device`` (see the class)."""
        if force_fp32:
            return torch.float32
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.use_fp16 and torch.device(device).type == "cuda":
            return torch.float16
        return torch.float32

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at ``sigma`` (elementwise)."""
        raise NotImplementedError

    def _labels(
        self, class_labels: Tensor | Sequence[int] | None, batch: int, device: torch.device
    ) -> Tensor | None:
        """Class labels as float32 one-hot rows ``(batch or 1, label_dim)``, checked."""
        if not self.label_dim:
            if class_labels is not None:
                raise ValueError(
                    "this network is unconditional (label_dim=0): pass class_labels=None"
                )
            return None
        if class_labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        labels = torch.as_tensor(class_labels)
        shape = tuple(labels.shape)
        # One row may serve the whole batch: EDM adds the label embedding to the noise
        # embedding, which broadcasts it.
        rows = (batch, 1)
        if labels.ndim == 1 and labels.dtype != torch.bool and not labels.is_floating_point():
            if shape[0] not in rows:
                raise ValueError(
                    f"class indices must have shape ({batch},) (one per image), got shape {shape}"
                )
            if labels.device.type == "cpu":  # read on the host only, as sigma is (forward)
                outside = labels[(labels < 0) | (labels >= self.label_dim)]
                if outside.numel():
                    raise ValueError(
                        f"class index {int(outside[0])} is not a class of this network, which "
                        f"has {self.label_dim} (0..{self.label_dim - 1})"
                    )
            return F.one_hot(labels.to(device, torch.long), self.label_dim).to(torch.float32)
        if labels.ndim != 2 or shape[0] not in rows or shape[1] != self.label_dim:
            raise ValueError(
                f"one-hot class_labels must have shape ({batch}, {self.label_dim}) (or "
                f"(1, {self.label_dim}) for the whole batch), got shape {shape}; class "
                f"indices are integers of shape ({batch},)"
            )
        return labels.to(device, torch.float32)

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | Sequence[int] | None = None,
        force_fp32: bool = False,
        **model_kwargs: Any,
    ) -> Tensor:
        """``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)``, float32, of ``x``'s shape.

        ``x`` of shape ``(batch, img_channels, R, R)`` with ``R = img_resolution``, any dtype
        (computed in float32); ``sigma`` > 0 and finite, a number or a tensor of one value or
        one per image (``()``, ``(batch,)``, ``(batch, 1, 1, 1)``, any dtype);
        ``class_labels`` for a conditional network (``label_dim`` > 0) are one-hot rows
        ``(batch, label_dim)``, class indices ``(batch,)`` of any integer dtype, or one row
        ``(1, label_dim)`` or index ``(1,)`` for the whole batch; None gives all-zero labels,
        as EDM does. An unconditional network takes None only. The inner network ``F`` runs in
        ``inner_dtype(x.device, force_fp32)``; everything else, the output included, is
        float32. ``x`` is not modified.

        Raises:
            ValueError: ``x``, ``sigma`` or ``class_labels`` of the wrong shape, a sigma
                that is not positive and finite (sigma = 0 has no noise level: ``c_noise``
                is ``ln 0`` for EDM's and VE's), or a class index outside
                ``0..label_dim-1``. The values of sigma and of class indices are checked
                where they lie on the CPU (numbers included), not read back from an
                accelerator.
        """
        res = self.img_resolution
        # The U-Net halves and doubles the size level by level and attends at the levels it was
        # built for: another size either fails deep inside or runs as another network.
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.img_channels, res, res):
            raise ValueError(
                f"x must have shape (batch, {self.img_channels}, {res}, {res}) (img_resolution "
                f"{res}), got {tuple(x.shape)}; images are not resized"
            )
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma)
        if sigma.numel() not in (1, x.shape[0]):
            raise ValueError(
                f"sigma must be a scalar or hold one value per image ({x.shape[0]}), got "
                f"shape {tuple(sigma.shape)}"
            )
        # Values are read where they already lie on the host (a number, a CPU tensor). On an
        # accelerator reading them back would stall it on every call and break graph capture;
        # meta tensors have none. The samplers never evaluate sigma = 0 (DiffusionODE refuses).
        if sigma.device.type == "cpu" and not bool(torch.isfinite(sigma).all() & (sigma > 0).all()):
            raise ValueError(
                f"sigma must be positive and finite, got {sigma.flatten().tolist()[:8]}; the "
                "network has no noise level at sigma = 0 (a sampler's grid may end there, but "
                "no step evaluates it)"
            )
        sigma = sigma.to(x.device, torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        labels = self._labels(class_labels, x.shape[0], x.device)
        dtype = self.inner_dtype(x.device, force_fp32)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f_x = self.model(
            (c_in * x).to(dtype),
            c_noise.flatten().expand(x.shape[0]),
            class_labels=labels,
            **model_kwargs,
        )
        if f_x.dtype != dtype:
            raise TypeError(f"the inner model returned {f_x.dtype}, expected {dtype}")
        return c_skip * x + c_out * f_x.to(torch.float32)

    def round_sigma(self, sigma: Tensor | float) -> Tensor:
        return torch.as_tensor(sigma)


@register_network
class EDMPrecond(_Precond):
    """EDM preconditioning (``sigma_data`` 0.5 by default).

    ``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(sd^2+s^2)``,
    ``c_noise = ln(s)/4``. ``model_type`` names the inner network (or is a callable taking
    ``img_resolution, in_channels, out_channels, label_dim`` and ``model_kwargs``).
    ``use_fp16`` and ``compute_dtype`` choose the inner network's dtype; the preconditioner and
    its output stay float32 (see ``compute_dtype``).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str | Callable[..., nn.Module] = "SongUNet",
        **model_kwargs: Any,
    ) -> None:
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs
        )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


@register_network
class VPPrecond(_Precond):
    """Variance-preserving preconditioning (DDPM++ as trained by Song et al.).

    ``c_skip = 1``, ``c_out = -s``, ``c_in = 1/sqrt(s^2+1)``, ``c_noise = (M-1) t(s)`` where
    ``t(s)`` inverts ``s(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1)``.
    ``use_fp16`` and ``compute_dtype`` choose the inner network's dtype; the preconditioner and
    its output stay float32 (see ``compute_dtype``).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,
        beta_min: float = 0.1,
        M: int = 1000,
        epsilon_t: float = 1e-5,
        model_type: str | Callable[..., nn.Module] = "SongUNet",
        **model_kwargs: Any,
    ) -> None:
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs
        )
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # On the host whatever the default device: a network is also built on the meta
        # device, to check a file's config against its tensors before anything is allocated.
        with torch.device("cpu"):
            self.sigma_min = float(self.sigma(epsilon_t))
            self.sigma_max = float(self.sigma(1))

    def sigma(self, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor | float) -> Tensor:
        """``t(sigma)``, computed in float64 with ``log1p`` (exact at small sigma); in float32
        on a device without float64 (``mps``).

        Returns a tensor of ``sigma``'s shape, in its dtype when that is floating point and
        in float32 for integers (``sigma_inv(80)`` is 0.9335).
        """
        sigma = torch.as_tensor(sigma)
        dtype = sigma.dtype if sigma.is_floating_point() else torch.float32
        s = sigma.to(wide_dtype(sigma.device))
        root = (self.beta_min**2 + 2 * self.beta_d * torch.log1p(s**2)).sqrt()
        return ((root - self.beta_min) / self.beta_d).to(dtype)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


@register_network
class VEPrecond(_Precond):
    """Variance-exploding preconditioning (NCSN++ as trained by Song et al.).

    ``c_skip = 1``, ``c_out = s``, ``c_in = 1``, ``c_noise = ln(s/2)``.
    ``use_fp16`` and ``compute_dtype`` choose the inner network's dtype; the preconditioner and
    its output stay float32 (see ``compute_dtype``).
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100.0,
        model_type: str | Callable[..., nn.Module] = "SongUNet",
        **model_kwargs: Any,
    ) -> None:
        super().__init__(
            img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs
        )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


# ---------------------------------------------------------------------------------------------
# Compiling


def compile_network(net: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile the U-Net of an EDM network with ``torch.compile``, in place; returns ``net``.

    ``net`` is a preconditioner (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``), whose inner
    network ``net.model`` is compiled, or a bare ``SongUNet``, which is compiled itself.
    ``compile_kwargs`` go to ``nn.Module.compile`` (that is, ``torch.compile``: ``backend``,
    ``mode``, ``dynamic``, ``fullgraph``, ...). Compiling again replaces the earlier setting.

    Opt-in: nothing in the library compiles on its own. Only the network is compiled. The
    preconditioner's float32 arithmetic (``c_skip``, ``c_out``, ``c_in``, the casts to and from
    ``compute_dtype``) stays eager, and so does the sampler that calls the network: its
    two-word arithmetic (``bdia.twoword``) must not be reassociated or fused, and never
    enters a graph (those functions also run under ``torch.compiler.disable``).

    ``nn.Module.compile`` wraps the module's call without changing the module, so the state
    dict's keys, the recorded constructor arguments (``net.config``), saving and loading, and
    ``compute_dtype`` (read on every call by the eager preconditioner) work as before;
    ``compute_dtype`` stays a run-time setting. A loaded network is not compiled.

    Cost: compilation is paid on the first call for each input shape and dtype, not here. A
    changed batch size or compute dtype recompiles (torch's automatic dynamic shapes then
    usually make the batch dimension symbolic, so one more batch size does not recompile
    again; ``dynamic=False`` keeps one static graph per shape), and torch gives up and runs
    eagerly past its recompile limit (``torch._dynamo.config.recompile_limit``). Call it once
    per network, before sampling, and keep the batch size fixed for the best speed.

    Raises:
        TypeError: ``net`` is neither a preconditioner nor a ``SongUNet``.
    """
    if isinstance(net, _Precond):
        net.model.compile(**compile_kwargs)
    elif isinstance(net, SongUNet):
        net.compile(**compile_kwargs)
    else:
        raise TypeError(
            "compile_network takes an EDMPrecond, VPPrecond or VEPrecond (its inner network "
            f"is compiled) or a SongUNet; got {type(net).__module__}.{type(net).__qualname__}"
        )
    return net

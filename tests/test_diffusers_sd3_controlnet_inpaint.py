"""bdia.integrations.diffusers with SD3's inpainting ControlNet: from_diffusers(controlnet=,
controlnet_cond=) against StableDiffusion3ControlNetInpaintingPipeline's run, BDIAScheduler
in that pipeline, edit_image with a control image and a mask, and the refusals.

The controlnet is a tiny random ``SD3ControlNetModel`` with ``extra_conditioning_channels =
1`` (``tiny_sd3_controlnet(..., mask_channel=True)``, Alimama's kind) of a tiny SD3
transformer's config with two joint blocks. The pipeline does not blend: it calls the
controlnet before the transformer at every step, under guidance on the batch
``[unconditional, conditional]``, with one control input fixed over the run (the image set to
-1 under the mask, encoded, then ``1 - mask`` as the last channel: its
``prepare_image_with_mask``), so the run is an ODE in the latents. It draws the encoding from
torch's global generator, once for the batch, before guidance doubles it; the comparisons seed
that generator and make the control input with the pipeline's own ``prepare_image_with_mask``
under the same seed, so both halves and both runs have the same draw. Parity is checked in
float32, bit for bit; exactness of the inversion in float64.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import Counter, flow_round_trip_error, untouched
from test_diffusers_flow import BATCH, N_STEPS, _cond, _noise, _one_line_error
from test_diffusers_flux_control import PROMPT, _control_image
from test_diffusers_sd3_controlnet import (
    _pipeline_latents,
    assert_edit_conditions_as_the_pipeline,
    assert_scheduler_run_is_bdia_sample_and_inverts,
)

import bdia
from bdia.integrations.diffusers import BDIAScheduler, diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import (
    tiny_sd3_controlnet,
    tiny_sd3_controlnet_inpaint_pipeline,
    tiny_sd3_controlnet_pipeline,
    tiny_sd3_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SEED = 7  # torch's global seed, whose first draw encodes the masked image


def _mask_image(top=4, left=2):
    """A 16 x 16 grayscale PIL mask, white (repainted) on an 8 x 8 square at (top, left)."""
    from PIL import Image

    pixels = torch.zeros(16, 16, dtype=torch.uint8)
    pixels[top : top + 8, left : left + 8] = 255
    return Image.fromarray(pixels.numpy())


def _control_input(pipe, control_image, mask_image):
    """The control input StableDiffusion3ControlNetInpaintingPipeline gives its controlnet for
    BATCH images after torch.manual_seed(SEED): its own prepare_image_with_mask, whose VAE
    draw is the global generator's first, undoubled; (BATCH, 5, 8, 8)."""
    torch.manual_seed(SEED)
    with torch.no_grad():
        made = pipe.prepare_image_with_mask(
            control_image, mask_image, 16, 16, BATCH, 1, "cpu", torch.float32
        )
    return made


def _run(pipe, cond, noise, control_image, mask_image, **options):
    torch.manual_seed(SEED)
    return _pipeline_latents(pipe, cond, noise, control_image, control_mask=mask_image, **options)


def _stand_in(dtype=torch.float32):
    """A control input (1, 5, 8, 8): latents, then a 0/1 mask channel."""
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    kept = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    return torch.cat([latents, kept], dim=1).to(dtype)


_SETTINGS = {
    "plain": {},
    "scaled-and-switched": dict(
        conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7
    ),
    # The pipeline gives the controlnet zeros for the pooled prompt whatever its config says.
    "pooled-not-forced": {},
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(_SETTINGS))
def test_inpainting_controlnet_pipeline_gives_bdia_samples_latents(tmp_path, kind):
    """StableDiffusion3ControlNetInpaintingPipeline itself (tiny parts, embeddings given,
    guidance 5, a PIL image and mask it prepares and encodes itself; a scale of 0.6 and the
    controlnet on from 20% to 70% of the steps; a controlnet whose config does not force
    zeros for the pooled prompt) returns the latents of bdia.sample with euler on
    from_diffusers(controlnet=pipe.controlnet, controlnet_cond=<its control input>) over
    diffusers_grid, bit for bit. The controlnet runs once per step where the pipeline keeps
    it (5 of 10 switched), and another mask gives another run."""
    settings = _SETTINGS[kind]
    pipe = tiny_sd3_controlnet_inpaint_pipeline(tmp_path)
    if kind == "pooled-not-forced":
        pipe.controlnet.register_to_config(force_zeros_for_pooled_projection=False)
    cond = _cond(torch.float32, True)
    noise = _noise(torch.float32)
    image, mask = _control_image(), _mask_image()
    options = dict(
        controlnet_conditioning_scale=settings.get("conditioning_scale", 1.0),
        control_guidance_start=settings.get("control_guidance_start", 0.0),
        control_guidance_end=settings.get("control_guidance_end", 1.0),
    )
    latents = _run(pipe, cond, noise, image, mask, **options)
    if settings:
        settings = dict(settings, num_inference_steps=N_STEPS)
    control = _control_input(pipe, image, mask)
    assert control.shape == (BATCH, 5, 8, 8)
    assert set(control[:, -1].unique().tolist()) == {0.0, 1.0}
    ode = from_diffusers(
        pipe.transformer,
        pipe.scheduler,
        controlnet=pipe.controlnet,
        controlnet_cond=control,
        **settings,
        **cond,
    )
    calls = Counter(pipe.controlnet)
    with torch.no_grad():
        ours = bdia.sample(
            ode, bdia.get_solver("euler"), noise, diffusers_grid(pipe.scheduler, N_STEPS)
        )
    assert torch.equal(ours, latents)
    assert calls.calls == (5 if settings else N_STEPS)
    moved = _run(pipe, cond, noise, image, _mask_image(top=0, left=8), **options)
    assert float((moved - latents).abs().max() / latents.abs().max()) > 1e-3


def test_bdia_euler_inverts_the_inpainting_controlnet_ode_to_float64_rounding():
    """bdia(euler, 0.96) on the inpainting ControlNet ODE (float64 transformer, controlnet
    and state, SD3's shifted grid, guidance 5, the controlnet on from 20% to 70% of the
    steps), from the noise at t = 1 to 0 and back, returns the noise to 1e-12 relative
    (measured: 0)."""
    transformer = tiny_sd3_transformer(num_layers=2, dtype=torch.float64)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ode = from_diffusers(
        transformer,
        scheduler,
        controlnet=tiny_sd3_controlnet(transformer, mask_channel=True),
        controlnet_cond=_stand_in(torch.float64),
        control_guidance_start=0.2,
        control_guidance_end=0.7,
        num_inference_steps=N_STEPS,
        **_cond(torch.float64, True),
    )
    ts = diffusers_grid(scheduler, N_STEPS)
    assert flow_round_trip_error(ode, _noise(torch.float64), ts) < 1e-12


def test_bdia_scheduler_in_inpainting_controlnet_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """StableDiffusion3ControlNetInpaintingPipeline with BDIAScheduler.from_config(its
    config, gamma=0.9) and the controlnet on from 20% to 70% of the steps gives the latents
    and the final pair (low words included) of bdia.sample with bdia(euler, 0.9) on the
    ODE, bit for bit; bdia.invert from the pair returns the starting noise bit for bit."""
    pipe = tiny_sd3_controlnet_inpaint_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    cond = _cond(torch.float32, True)
    noise = _noise(torch.float32)
    image, mask = _control_image(), _mask_image()
    bounds = dict(control_guidance_start=0.2, control_guidance_end=0.7)
    latents = _run(pipe, cond, noise, image, mask, **bounds)
    control = _control_input(pipe, image, mask)
    assert_scheduler_run_is_bdia_sample_and_inverts(pipe, latents, noise, cond, control, bounds)


# -------------------------------------------------------------------------- refusals


def test_inpainting_controlnets_and_inputs_not_mapped_are_refused_before_any_call():
    """One line each, before any call, the caller's tensors untouched: a controlnet of two
    extra channels (no pipeline makes its input), one with the mask's channel but no
    joint_attention_dim (the inpainting pipeline gives it the prompt); control latents
    without the mask's channel, or with a last channel outside [0, 1] (the mask put first);
    a mask beside the controlnet."""
    transformer = tiny_sd3_transformer()
    net = tiny_sd3_controlnet(transformer, mask_channel=True)
    control = _stand_in()
    flow = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    base = dict(_cond(torch.float32, False), controlnet=net, controlnet_cond=control)
    counters = [Counter(transformer), Counter(net)]
    fields = {k: v for k, v in net.config.items() if not k.startswith("_")}
    two = diffusers.SD3ControlNetModel(**{**fields, "extra_conditioning_channels": 2})
    no_text = diffusers.SD3ControlNetModel(**{**fields, "joint_attention_dim": None})
    mask_first = torch.cat([control[:, -1:], control[:, :-1]], dim=1)
    cases = [
        (dict(controlnet=two), "extra_conditioning_channels = 2"),
        (dict(controlnet=no_text), "joint_attention_dim"),
        (dict(controlnet_cond=control[:, :4]), "(batch or 1, 5, h, w)"),
        (dict(controlnet_cond=control[:, :4]), "prepare_image_with_mask"),
        (dict(controlnet_cond=mask_first), "mask channel"),
        (dict(mask=control[:, -1:]), "controlnet_cond's last channel"),
    ]
    with untouched(control):
        for kwargs, field in cases:
            with pytest.raises(ValueError) as exc_info:
                from_diffusers(transformer, flow, **{**base, **kwargs})
            _one_line_error(exc_info, field)
    assert [c.calls for c in counters] == [0, 0]


# ----------------------------------------------------------------------- edit_image


def _edit(pipe, image, control_image, mask_image, **kwargs):
    kwargs.update(num_inference_steps=N_STEPS, progress=False)
    return edit_image(
        pipe,
        image,
        PROMPT,
        "a painting of a cat",
        control_image=control_image,
        mask_image=mask_image,
        **kwargs,
    )


def test_edit_image_inverts_exactly_under_the_control_image_and_mask(tmp_path):
    """edit_image on StableDiffusion3ControlNetInpaintingPipeline (guidance 7.5) inverts and
    regenerates two images under one control image (the images themselves) and one mask:
    latent_error 0 with a float64 state, a float32 one and the controlnet switched on from 20%
    to 70% of the steps (measured 0 each), the control input of both images, mask channel
    last, in both ODEs, the caller's tensors left as they were; another mask gives another edit
    (relative difference above 1e-3; measured 0.18)."""
    pipe = tiny_sd3_controlnet_inpaint_pipeline(tmp_path)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    image = torch.cat([image, image.flip(-1)]) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    with untouched(image, mask):
        result = _edit(pipe, image, image, mask)
    assert result.latent_error == 0.0
    for ode in (result.inversion.ode, result.target):
        control = ode.cond["controlnet_cond"]
        assert control.shape == (2, 5, 8, 8)
        assert torch.equal(control[:, -1:], 1 - mask[..., ::2, ::2].expand(2, -1, -1, -1))
    assert _edit(pipe, image, image, mask, state_dtype=torch.float32).latent_error == 0.0
    switched = _edit(pipe, image, image, mask, control_guidance_start=0.2, control_guidance_end=0.7)
    assert switched.latent_error == 0.0
    other = _edit(pipe, image, image, mask.flip(-1).flip(-2))
    assert other.latent_error == 0.0
    moved = (other.edited_latents - result.edited_latents).abs().max()
    assert float(moved / result.edited_latents.abs().max()) > 1e-3


def test_edit_image_conditions_as_the_pipeline_prepares_image_and_mask(tmp_path, monkeypatch):
    """For a PIL image and mask, the control input of edit_image's ODEs is bit for bit the
    one StableDiffusion3ControlNetInpaintingPipeline gives its controlnet (its
    prepare_image_with_mask: the image at -1 under the binarised mask, the VAE's encoding less
    the shift, scaled, then 1 - mask at the latents' size), with the VAE's mean where the
    pipeline draws a sample (patched in for the comparison: edit_image takes the mean, so that
    its edit is deterministic)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    pipe = tiny_sd3_controlnet_inpaint_pipeline(tmp_path)
    pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(5)) * 255).byte()
    image, mask = Image.fromarray(pixels.numpy()), _mask_image()
    result = _edit(pipe, image, image, mask)
    assert_edit_conditions_as_the_pipeline(pipe, result, control_image=image, control_mask=mask)


def test_edit_image_refuses_a_missing_mask_or_control_image_and_a_stray_mask(tmp_path):
    """One line each, before any network runs: the inpainting ControlNet pipeline without
    mask_image, or without control_image; a mask for StableDiffusion3ControlNetPipeline,
    whose controlnet takes none (the line names the inpainting pipeline)."""
    pipe = tiny_sd3_controlnet_inpaint_pipeline(tmp_path)
    plain = tiny_sd3_controlnet_pipeline(tmp_path)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mask = torch.ones(1, 1, 16, 16)
    calls = [Counter(p.vae) for p in (pipe, plain)]
    for target, control, given, field in (
        (pipe, image, None, "give mask_image"),
        (pipe, None, mask, "give control_image"),
        (plain, image, mask, "StableDiffusion3ControlNetInpaintingPipeline"),
    ):
        with pytest.raises(ValueError) as exc_info:
            _edit(target, image, control, given)
        _one_line_error(exc_info, field)
    assert [c.calls for c in calls] == [0, 0]

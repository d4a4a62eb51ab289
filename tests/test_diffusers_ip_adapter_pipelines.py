"""Flux's and SD3's IP-Adapters in the other pipelines that load them (FluxKontextPipeline,
FluxControlNetPipeline, StableDiffusion3ControlNetPipeline and its inpainting one, the
img2img and blending inpainting pipelines): from_diffusers against the pipeline's own run
with an image prompt, and edit_image with ``ip_adapter_image`` (SD3's ControlNet inpainting
pipeline: edit_image alone).

Tiny random pipelines of tiny.py with ``add_tiny_flux_ip_adapter`` or
``add_tiny_sd3_ip_adapter``. The image embeddings are fixed over the run, and a controlnet
reads none (FluxControlNetPipeline and StableDiffusion3ControlNetPipeline give their
controlnet the transformer's ``joint_attention_kwargs``, image embeddings and all, which it
passes to none of its blocks), so each run is an ODE: parity is bit for bit in
float32 and the round trip exact in float64, as for FluxPipeline and
StableDiffusion3Pipeline.
"""

from __future__ import annotations

import inspect

import diffusers
import numpy as np
import pytest
import torch
from test_diffusers_flow import _noise as _sd3_noise
from test_diffusers_flux import EMBEDDED, N_STEPS, TRUE_CFG, _encoded, _noise, _pipeline_latents
from test_diffusers_flux_control import SEED, _control_image, _pipeline_control_latents
from test_diffusers_flux_controlnet import _grid as _flux_grid

# Its marks too: diffusers' numpy warning filtered, skipped without Flux's IP-Adapter.
from test_diffusers_flux_ip_adapter import (  # noqa: F401
    EULER,
    NEGATIVE,
    PROMPT,
    _embeds,
    _with_images,
    pytestmark,
)
from test_diffusers_flux_kontext import _pipeline_reference, needs_kontext
from test_diffusers_ip_adapter import _edit_image, _image_prompt, _rel
from test_diffusers_sd3_controlnet import _control_latents, mean_draws  # noqa: F401
from test_diffusers_sd3_controlnet import _pipeline_latents as _sd3_controlnet_latents
from test_diffusers_sd3_ip_adapter import _image_cond, _stacked

import bdia
from bdia.integrations.diffusers import diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import (
    add_tiny_flux_ip_adapter,
    add_tiny_sd3_ip_adapter,
    tiny_flux_controlnet_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_controlnet_inpaint_pipeline,
    tiny_sd3_controlnet_pipeline,
    tiny_sd3_pipeline,
)


def _flux_cond(pipe, img_ids, embeds, negative=None):
    """from_diffusers' Flux conditioning of PROMPT with the image prompt ``embeds``; with
    ``negative`` (the negative call's image embeddings), true CFG with NEGATIVE."""
    cond = dict(_with_images(_encoded(pipe, PROMPT), embeds), img_ids=img_ids, guidance=EMBEDDED)
    if negative is not None:
        cond["guidance_scale"] = TRUE_CFG
        cond["negative_cond"] = _with_images(_encoded(pipe, NEGATIVE), negative)
    return cond


def _true_cfg(negative):
    """FluxPipeline's options of true CFG with NEGATIVE and ``negative`` image embeddings."""
    if negative is None:
        return {}
    return dict(
        negative_prompt=NEGATIVE, true_cfg_scale=TRUE_CFG, negative_ip_adapter_image_embeds=negative
    )


def _sample(ode, grid):
    with torch.no_grad():
        return bdia.sample(ode, EULER, _noise(torch.float32), grid, progress=False)


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@needs_kontext
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_kontext_pipeline_with_an_ip_adapter_gives_bdia_samples_latents(tmp_path, true_cfg):
    """FluxKontextPipeline with an IP-Adapter (a 16 x 32 reference image it encodes itself,
    guidance embedding 3.5; with true CFG 4, negative image embeddings of their own) returns
    the latents of bdia.sample with euler on from_diffusers with the reference's latents and
    ids and the image embeddings in joint_attention_kwargs, bit for bit; another image prompt
    gives another run (above 1e-2 relative; measured 0.60, and 1.43 with true CFG)."""
    pipe = add_tiny_flux_ip_adapter(tiny_flux_kontext_pipeline(tmp_path))
    image = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(4))
    embeds, negative = _embeds(1), (_embeds(1, seed=4) if true_cfg else None)
    options = dict(image=image, max_area=16 * 16, _auto_resize=False, **_true_cfg(negative))
    with torch.no_grad():
        theirs = _pipeline_latents(
            pipe, _noise(torch.float32), PROMPT, ip_adapter_image_embeds=embeds, **options
        )
        other = _pipeline_latents(
            pipe,
            _noise(torch.float32),
            PROMPT,
            ip_adapter_image_embeds=_embeds(1, seed=9),
            **options,
        )
    image_latents, img_ids = _pipeline_reference(pipe, image)
    cond = _flux_cond(pipe, img_ids, embeds, negative)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, image_latents=image_latents, **cond)
    assert torch.equal(_sample(ode, _flux_grid(pipe.scheduler)), theirs)
    assert _rel(other, theirs) > 1e-2


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_flux_controlnet_pipeline_with_an_ip_adapter_gives_bdia_samples_latents(tmp_path, true_cfg):
    """FluxControlNetPipeline with an IP-Adapter (a PIL control image it prepares and encodes
    itself, guidance embedding 3.5; with true CFG 4, negative image embeddings of their own)
    returns the latents of bdia.sample with euler on from_diffusers(controlnet=...,
    controlnet_cond=<its control latents>) with the image embeddings in
    joint_attention_kwargs, bit for bit: the controlnet is given the transformer's
    joint_attention_kwargs, image embeddings and all, as the pipeline gives them."""
    pipe = add_tiny_flux_ip_adapter(tiny_flux_controlnet_pipeline(tmp_path))
    control_image = _control_image()
    embeds, negative = _embeds(1), (_embeds(1, seed=4) if true_cfg else None)
    with torch.no_grad():
        theirs = _pipeline_latents(
            pipe,
            _noise(torch.float32),
            PROMPT,
            control_image=control_image,
            generator=torch.Generator().manual_seed(SEED),
            ip_adapter_image_embeds=embeds,
            **_true_cfg(negative),
        )
    ode = from_diffusers(
        pipe.transformer,
        pipe.scheduler,
        controlnet=pipe.controlnet,
        controlnet_cond=_pipeline_control_latents(pipe, control_image),
        **_flux_cond(pipe, _pipeline_img_ids(pipe), embeds, negative),
    )
    assert torch.equal(_sample(ode, _flux_grid(pipe.scheduler)), theirs)


def _pipeline_img_ids(pipe):
    """The img_ids of 16 x 16 images' 4 x 4 packed latents, as FluxPipeline makes them."""
    return pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)


@pytest.mark.usefixtures("mean_draws")  # the VAE's mean for its draws, as edit_image encodes
def test_sd3_controlnet_pipeline_with_an_ip_adapter_gives_bdia_samples_latents(tmp_path):
    """StableDiffusion3ControlNetPipeline with an IP-Adapter (guidance 5, a PIL control image
    it prepares and encodes itself, image embeddings whose negative half is not zeros)
    returns the latents of bdia.sample with euler on from_diffusers(controlnet=...,
    controlnet_cond=<its control latents>), each branch its half of the embeddings, bit for
    bit; another image prompt (the halves swapped) gives another run (above 1e-2 relative;
    measured 0.079)."""
    pipe = add_tiny_sd3_ip_adapter(tiny_sd3_controlnet_pipeline(tmp_path))
    cond, stacked, control_image = _image_cond(_stacked()), _stacked(), _control_image()
    plain = {k: v for k, v in cond.items() if k != "joint_attention_kwargs"}
    plain["negative_cond"] = {
        k: v for k, v in cond["negative_cond"].items() if k != "joint_attention_kwargs"
    }
    noise = _sd3_noise(torch.float32)
    with torch.no_grad():
        theirs = _sd3_controlnet_latents(
            pipe, plain, noise, control_image, ip_adapter_image_embeds=stacked
        )
        other = _sd3_controlnet_latents(
            pipe, plain, noise, control_image, ip_adapter_image_embeds=stacked.flip(0)
        )
    ode = from_diffusers(
        pipe.transformer,
        pipe.scheduler,
        controlnet=pipe.controlnet,
        controlnet_cond=_control_latents(pipe, control_image),
        **cond,
    )
    with torch.no_grad():
        ours = bdia.sample(ode, EULER, noise, diffusers_grid(pipe.scheduler, N_STEPS))
    assert torch.equal(ours, theirs)
    assert _rel(other, theirs) > 1e-2


# --------------------------------------------------------------------------- editing

TARGET = "a photo of a dog"
CONTROL = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1


def _edit(pipe, **kwargs):
    kwargs.setdefault("ip_adapter_image", _image_prompt(0))
    return edit_image(pipe, _edit_image(), PROMPT, TARGET, num_inference_steps=8, **kwargs)


def _flux_kontext(folder):
    return add_tiny_flux_ip_adapter(tiny_flux_kontext_pipeline(folder))


def _flux_controlnet(folder):
    return add_tiny_flux_ip_adapter(tiny_flux_controlnet_pipeline(folder))


def _sd3_controlnet(folder):
    return add_tiny_sd3_ip_adapter(tiny_sd3_controlnet_pipeline(folder))


def _sd3_controlnet_inpaint(folder):
    return add_tiny_sd3_ip_adapter(tiny_sd3_controlnet_inpaint_pipeline(folder))


# StableDiffusion3ControlNetInpaintingPipeline's mask: 1 (repainted) on an 8 x 8 square.
MASK = torch.zeros(1, 1, 16, 16)
MASK[..., 4:12, 2:10] = 1.0


# The pipelines with an IP-Adapter loaded whose edit has no plain pipeline to equal, and
# what edit_image needs besides the image prompt.
_ALONE = {
    "flux-kontext": (_flux_kontext, {}),
    "flux-controlnet": (_flux_controlnet, {"control_image": CONTROL}),
    "flux-controlnet-true-cfg": (
        _flux_controlnet,
        {"control_image": CONTROL, "guidance_scale": TRUE_CFG, "negative_prompt": NEGATIVE},
    ),
    "sd3-controlnet": (_sd3_controlnet, {"control_image": CONTROL}),
    # Its control image is the image kept outside the mask: the photo itself.
    "sd3-controlnet-inpaint": (
        _sd3_controlnet_inpaint,
        {"control_image": _edit_image(), "mask_image": MASK},
    ),
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(_ALONE))
def test_edit_image_inverts_exactly_under_the_image_prompt(tmp_path, kind):
    """edit_image with ip_adapter_image on FluxKontextPipeline, FluxControlNetPipeline (with
    and without true CFG 4), StableDiffusion3ControlNetPipeline and
    StableDiffusion3ControlNetInpaintingPipeline (with its mask) with an IP-Adapter: the
    round trip is exact (latent_error 0 with a float64 state, measured 0), both ODEs given
    the pipeline's own embeddings of the image prompt (for Flux under true CFG the negative
    call an all-zero image's; for SD3 the unconditional half zeros) besides the reference
    image's latents or the control latents; another image prompt gives another edit (above
    1e-2 relative; measured 0.84 for Kontext, 0.42 for the ControlNet pipeline and 0.98 with
    true CFG, 0.086 for SD3's ControlNet pipeline, 0.11 for its inpainting one)."""
    if kind == "flux-kontext" and not hasattr(diffusers, "FluxKontextPipeline"):
        pytest.skip("FluxKontextPipeline is in diffusers 0.35 and newer")
    make, settings = _ALONE[kind]
    pipe = make(tmp_path)
    result = _edit(pipe, **settings)
    assert result.latent_error == 0.0
    flux, guided = kind.startswith("flux"), "guidance_scale" in settings
    with torch.no_grad():
        if flux:
            (embeds,) = pipe.prepare_ip_adapter_image_embeds(_image_prompt(0), None, "cpu", 1)
            blank = [np.zeros((16, 16, 3), dtype=np.uint8)]
            (zeros,) = pipe.prepare_ip_adapter_image_embeds(blank, None, "cpu", 1)
        else:
            zeros, embeds = pipe.prepare_ip_adapter_image_embeds(
                _image_prompt(0), None, "cpu", 1, True
            ).chunk(2)
    extra = "image_latents" if kind == "flux-kontext" else "controlnet_cond"
    for ode in (result.inversion.ode, result.target):
        images = ode.cond["joint_attention_kwargs"]["ip_adapter_image_embeds"]
        assert torch.equal(images[0] if flux else images, embeds)
        if guided or not flux:
            negative = ode.cond["negative_cond"]["joint_attention_kwargs"]
            negative = negative["ip_adapter_image_embeds"]
            assert torch.equal(negative[0] if flux else negative, zeros)
        assert extra in ode.cond
    other = _edit(pipe, ip_adapter_image=_image_prompt(1), **settings)
    assert other.latent_error == 0.0
    assert _rel(other.edited_latents, result.edited_latents) > 1e-2


def _of(cls, base):
    """A ``cls`` pipeline of ``base``'s parts (those its __init__ takes), adapter and all."""
    fields = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in base.components.items() if k in fields})
    pipe.set_progress_bar_config(disable=True)
    return pipe


# A pipeline with an IP-Adapter loaded whose edit is the plain one's of the same parts: the
# plain pipeline, the other's class name, and whether it is SD3's.
_PLAIN = {
    "FluxImg2ImgPipeline": (tiny_flux_pipeline, False),
    "FluxInpaintPipeline": (tiny_flux_pipeline, False),
    "FluxKontextInpaintPipeline": (tiny_flux_kontext_pipeline, False),
    "StableDiffusion3Img2ImgPipeline": (tiny_sd3_pipeline, True),
    "StableDiffusion3InpaintPipeline": (tiny_sd3_pipeline, True),
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", list(_PLAIN))
def test_edit_image_on_the_img2img_and_inpainting_pipelines_is_the_plain_pipelines(tmp_path, name):
    """edit_image with ip_adapter_image on FluxImg2ImgPipeline, FluxInpaintPipeline and
    FluxKontextInpaintPipeline (without a mask: they blend), and SD3's img2img and inpainting
    pipelines, of the parts of a FluxPipeline, FluxKontextPipeline or
    StableDiffusion3Pipeline with an IP-Adapter loaded: the round trip is exact (latent_error
    0, float64 state) and the edit is the plain pipeline's bit for bit, its strength playing
    no part (the whole image is inverted over the whole grid)."""
    cls = getattr(diffusers, name, None)
    if cls is None:  # FluxKontextInpaintPipeline is newer than FluxKontextPipeline
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    make, sd3 = _PLAIN[name]
    base = make(tmp_path)
    base = add_tiny_sd3_ip_adapter(base) if sd3 else add_tiny_flux_ip_adapter(base)
    pipe = _of(cls, base)
    ours, theirs = _edit(pipe), _edit(base)
    assert ours.latent_error == 0.0
    assert torch.equal(ours.edited_latents, theirs.edited_latents)

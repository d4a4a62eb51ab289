"""edit_image with Z-Image's ControlNet pipelines: ZImageControlNetPipeline and
ZImageControlNetInpaintPipeline.

The pipelines are the tiny random ``tiny_z_image_controlnet_pipeline`` (a tiny Z-Image
transformer with a ``ZImageControlNetModel`` given its shared modules; ``control_in_dim`` 4,
or 9 for the inpainting kind: the control image's latents, the mask's channel and the masked
image's latents). Neither pipeline blends, so the edit is an ODE in the latents under a
control input fixed over the run: both of edit_image's ODEs take it as the pipeline makes it
(the VAE's mode, shifted and scaled, one frame; the inpainting pipeline's with ``1 - mask``
and the latents of its ``image``, here the image being edited, set to 0 under the mask).
Parity with the pipelines is checked bit for bit in float32, where both sides make the same
float operations on the same inputs; exactness of the round trip in float64 and float32. The
pipelines are in diffusers 0.37 and newer; with older ones the module is skipped.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_runs import assert_edit_is_the_pipelines_run, refused_edit
from conftest import Counter, untouched

if not hasattr(diffusers, "ZImageControlNetPipeline"):
    pytest.skip(
        f"diffusers {diffusers.__version__} has no ZImageControlNetPipeline (0.37 and newer "
        "have it and ZImageControlNetInpaintPipeline)",
        allow_module_level=True,
    )

from PIL import Image  # noqa: E402
from test_diffusers_z_image_edit import BATCH, CFG, N_STEPS, _image, _prompts  # noqa: E402

from bdia.integrations.diffusers import edit_image  # noqa: E402
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_z_image_controlnet_pipeline,
    tiny_z_image_pipeline,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning"),
]

# The edits are test_diffusers_z_image_edit's: 8 steps, 2 images, CFG 3, its embeddings.
KINDS = ["controlnet", "inpaint"]


def _control(seed=8):
    """One control image for both, (1, 3, 16, 16) in [-1, 1], as prepare_image takes tensors."""
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask():
    """The region to repaint, one per image (the pipeline does not repeat one to the batch):
    1 on an 8 x 8 square, 0 elsewhere."""
    mask = torch.zeros(BATCH, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    return mask


def _edit(pipe, kind, dtype=torch.float64, **options):
    """edit_image on ``pipe`` from the source embeddings to the target's under CFG 3 with
    negative embeddings, guided by _control() (and for the inpainting pipeline _mask())."""
    options.setdefault("control_image", _control())
    if kind == "inpaint":
        options.setdefault("mask_image", _mask())
    return edit_image(
        pipe,
        _image(),
        _prompts(1, (5, 3)),
        _prompts(3, (6, 4)),
        num_inference_steps=N_STEPS,
        guidance_scale=CFG,
        negative_prompt=_prompts(2, (7, 2)),
        state_dtype=dtype,
        **options,
    )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", KINDS)
def test_edit_image_inverts_exactly_under_the_control_image(kind):
    """edit_image on ZImageControlNetPipeline and its inpainting sibling inverts and
    regenerates two images under one control image: latent_error 0 with a float64 state and
    with a float32 one (measured 0 and 0: the round trip is exact), the control input of
    both images in both ODEs ((2, 4, 1, 8, 8), or (2, 9, 1, 8, 8) with the mask's channel
    holding 1 - mask), at the pipelines' default scale 0.75, the caller's tensors left as
    they were; another control image gives another edit (relative difference above 1e-3)."""
    pipe = tiny_z_image_controlnet_pipeline(inpaint=kind == "inpaint")
    image, control, mask = _image(), _control(), _mask()
    with untouched(image, control, mask):
        options = dict(control_image=control, mask_image=mask) if kind == "inpaint" else {}
        result = _edit(pipe, kind, **options)
    assert result.latent_error == 0.0
    channels = 9 if kind == "inpaint" else 4
    for ode in (result.inversion.ode, result.target):
        assert ode.cond["controlnet_cond"].shape == (BATCH, channels, 1, 8, 8)
        assert ode.cond["conditioning_scale"] == 0.75
    if kind == "inpaint":  # 1 - mask at the latents' 8 x 8, nearest
        kept = 1 - torch.nn.functional.interpolate(_mask(), size=(8, 8), mode="nearest")
        assert torch.equal(result.target.cond["controlnet_cond"][:, 4:5, 0], kept)
    assert _edit(pipe, kind, torch.float32).latent_error == 0.0
    other = _edit(pipe, kind, control_image=_control(9))
    assert other.latent_error == 0.0
    moved = (other.edited_latents - result.edited_latents).abs().max()
    assert float(moved / result.edited_latents.abs().max()) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", KINDS)
def test_the_edit_is_the_pipelines_run_from_the_inverted_noise(kind):
    """With a float32 state, edit_image's edited latents are bit for bit what the pipeline
    returns from the inverted noise under the target embeddings (CFG 3, the negative
    embeddings, the control image, a scale of 0.6; the inpainting pipeline given the edited
    images as its image and the mask), and the control input the pipeline gives its
    controlnet is both ODEs', bit for bit: the VAE's mode is what edit_image takes, so no
    draw stands between them."""
    pipe = tiny_z_image_controlnet_pipeline(inpaint=kind == "inpaint")
    out = _edit(pipe, kind, torch.float32, controlnet_conditioning_scale=0.6)
    seen = []
    hook = pipe.controlnet.register_forward_pre_hook(lambda m, a: seen.append(a[3]))
    call = dict(image=_image(), mask_image=_mask()) if kind == "inpaint" else {}
    try:
        assert_edit_is_the_pipelines_run(
            pipe,
            out,
            N_STEPS,
            prompt_embeds=_prompts(3, (6, 4)),
            negative_prompt_embeds=_prompts(2, (7, 2)),
            guidance_scale=CFG,
            control_image=_control(),
            controlnet_conditioning_scale=0.6,
            height=16,
            width=16,
            **call,
        )
    finally:
        hook.remove()
    for ode in (out.inversion.ode, out.target):  # CFG's batch: the prompts', then the negatives'
        assert torch.equal(ode.cond["controlnet_cond"], seen[0][:BATCH])
        assert ode.cond["conditioning_scale"] == 0.6


def test_a_pil_control_image_is_prepared_as_the_pipeline_prepares_it():
    """A PIL control image goes through the pipeline's prepare_image (its image_processor:
    [0, 255] to [-1, 1]): the edit equals the one given that image as the tensor the
    processor makes of it, bit for bit."""
    pipe = tiny_z_image_controlnet_pipeline()
    pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(4)) * 255).byte()
    picture = Image.fromarray(pixels.numpy())
    as_tensor = torch.from_numpy(np.asarray(picture).astype(np.float32) / 255.0)
    as_tensor = as_tensor.permute(2, 0, 1).unsqueeze(0) * 2 - 1
    from_picture = _edit(pipe, "controlnet", torch.float32, control_image=picture)
    from_tensor = _edit(pipe, "controlnet", torch.float32, control_image=as_tensor)
    assert torch.equal(from_picture.edited_latents, from_tensor.edited_latents)


@pytest.mark.parametrize(
    "case, fragment",
    [
        ("no control", "give control_image, the image that guides it"),
        ("guess mode", "guess_mode is Stable Diffusion's ControlNet pipelines'"),
        ("switched", "control_guidance_start and control_guidance_end: ZImageControlNetPipeline"),
        ("size", "control_image as a tensor goes to the vae as it is"),
        ("mask", "or Z-Image's (ZImageControlNetInpaintPipeline's controlnet"),
        ("inpaint no mask", "whose controlnet takes the image under a mask; give mask_image"),
        ("inpaint plain controlnet", "but the controlnet has control_in_dim = 4"),
        ("scale", "controlnet_conditioning_scale is a ControlNet setting, but the pipeline has"),
    ],
)
def test_edit_image_refuses_what_the_z_image_controlnet_pipelines_do_not_take(case, fragment):
    """One line each, before the transformer, the controlnet or the VAE runs: no control
    image, guess mode and a switched controlnet (neither pipeline has them), a control image
    of another size than the image's, a mask for ZImageControlNetPipeline (its controlnet
    takes none), the inpainting pipeline without a mask or with a controlnet that does not
    take one, and a controlnet scale for ZImagePipeline, which has no controlnet."""
    pipe = tiny_z_image_controlnet_pipeline(inpaint=case.startswith("inpaint"))
    options = dict(control_image=_control(), guidance_scale=0.0)
    if case == "no control":
        del options["control_image"]
    elif case == "guess mode":
        options["guess_mode"] = True
    elif case == "switched":
        options["control_guidance_start"] = 0.2
    elif case == "size":
        options["control_image"] = _control()[..., :8]
    elif case == "mask":
        options["mask_image"] = _mask()
    elif case == "inpaint plain controlnet":
        # Set after the pipeline is made, whose constructor refuses it too.
        pipe.controlnet = tiny_z_image_controlnet_pipeline().controlnet
        options["mask_image"] = _mask()
    elif case == "scale":
        pipe, options = tiny_z_image_pipeline(), dict(controlnet_conditioning_scale=0.5)
        options["guidance_scale"] = 0.0
    controlnet = getattr(pipe, "controlnet", None)
    counter = Counter(controlnet) if controlnet is not None else None
    message = refused_edit(pipe, _image(), _prompts(1, (5, 3)), _prompts(3, (6, 4)), **options)
    assert fragment in message, message
    assert counter is None or counter.calls == 0

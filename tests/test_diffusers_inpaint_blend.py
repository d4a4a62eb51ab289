"""The inpainting pipelines that blend: StableDiffusion3InpaintPipeline,
FluxInpaintPipeline, FluxControlInpaintPipeline, FluxControlNetInpaintPipeline,
FluxKontextInpaintPipeline, ChromaInpaintPipeline, and Stable Diffusion's and SDXL's
inpainting pipelines over a 4-channel unet. Their network takes no mask; the pipeline
re-noises the image's known region into the latents after every step, which is not an ODE,
so their masked run has no exact inversion.

edit_image refuses a mask for them in one line that says so, names the pipeline and what to
use instead; without a mask it edits through their parts as through the plain pipeline of
the same parts, bit for bit. BDIAScheduler dropped into one restarts at every blended step,
with one BDIARestartWarning that names the blend and the inpainting models. Tiny random
pipelines, each built from the tiny plain pipeline's parts (those its __init__ takes).
"""

from __future__ import annotations

import functools
import inspect
import warnings

import diffusers
import pytest
import torch
from conftest import Counter, untouched

from bdia.integrations.diffusers import BDIARestartWarning, BDIAScheduler, edit_image
from bdia.integrations.diffusers.tiny import (
    tiny_chroma_pipeline,
    tiny_controlnet_pipeline,
    tiny_flux_control_pipeline,
    tiny_flux_controlnet_pipeline,
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
    tiny_text_to_image_pipeline,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning"),
    # diffusers' Chroma transformer and Flux ControlNet build the deprecated FluxPosEmbed.
    pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning"),
]

STEPS = 4
PROMPT = "a photo of a cat"
TARGET = "a painting of a cat"

# The blending pipeline, the plain pipeline of the same model, and the control image it
# needs (a tensor in [-1, 1] for Flux's, in [0, 1] for Stable Diffusion's ControlNet).
BLENDING = {
    "sd": ("StableDiffusionInpaintPipeline", tiny_text_to_image_pipeline, None),
    "sdxl": ("StableDiffusionXLInpaintPipeline", tiny_sdxl_pipeline, None),
    "sd-controlnet": ("StableDiffusionControlNetInpaintPipeline", tiny_controlnet_pipeline, "sd"),
    "sdxl-controlnet": (
        "StableDiffusionXLControlNetInpaintPipeline",
        functools.partial(tiny_controlnet_pipeline, xl=True),
        "sd",
    ),
    "sd3": ("StableDiffusion3InpaintPipeline", tiny_sd3_pipeline, None),
    "flux": ("FluxInpaintPipeline", tiny_flux_pipeline, None),
    "flux-control": ("FluxControlInpaintPipeline", tiny_flux_control_pipeline, "flux"),
    "flux-controlnet": ("FluxControlNetInpaintPipeline", tiny_flux_controlnet_pipeline, "flux"),
    "flux-kontext": ("FluxKontextInpaintPipeline", tiny_flux_kontext_pipeline, None),
    "chroma": ("ChromaInpaintPipeline", lambda folder: tiny_chroma_pipeline(), None),
}


def _pipelines(tmp_path, kind):
    """The plain pipeline of ``kind`` and the blending one of its parts."""
    name, make, _ = BLENDING[kind]
    if not hasattr(diffusers, name):
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    plain = make(tmp_path)
    cls = getattr(diffusers, name)
    fields = inspect.signature(cls.__init__).parameters
    blending = cls(**{k: v for k, v in plain.components.items() if k in fields})
    blending.set_progress_bar_config(disable=True)
    return plain, blending


def _inputs(kind):
    """Two images (2, 3, 16, 16) in [-1, 1], a mask (1, 1, 16, 16) of 1 in a rectangle, and
    edit_image's control arguments for ``kind``."""
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    kwargs = {}
    if BLENDING[kind][2] is not None:
        kwargs["control_image"] = control * 2 - 1 if BLENDING[kind][2] == "flux" else control
    return image, mask, kwargs


def _edit(pipe, image, **kwargs):
    return edit_image(pipe, image, PROMPT, TARGET, num_inference_steps=STEPS, **kwargs)


@pytest.mark.parametrize("kind", list(BLENDING))
def test_a_mask_for_a_blending_pipeline_is_refused_in_one_line_naming_it(tmp_path, kind):
    """A mask for a pipeline that blends (its network takes none) is refused in one line,
    before any network runs, the caller's mask left as it was: the line names the pipeline's
    class and its network's in_channels, says that it blends the image back into the
    latents at every step, which is not an ODE and has no exact inversion, and names what to
    use instead (a 9-channel inpainting unet, FluxFillPipeline) or to leave the mask out.
    FluxControlInpaintPipeline's mask is refused beside its control image, not ignored."""
    _, pipe = _pipelines(tmp_path, kind)
    image, mask, kwargs = _inputs(kind)
    network = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    calls = [Counter(network), Counter(pipe.vae)]
    with untouched(mask), pytest.raises(ValueError) as exc_info:
        _edit(pipe, image, mask_image=mask, **kwargs)
    message = str(exc_info.value)
    assert "\n" not in message
    for field in (
        f"is a {type(pipe).__name__} whose",
        f"in_channels = {network.config.in_channels}",
        "blends the noised image back into the latents",
        "not an ODE",
        "no exact inversion",
        "9-channel inpainting unet",
        "FluxFillPipeline",
        "leave mask_image out",
    ):
        assert field in message, message
    assert all(c.calls == 0 for c in calls)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(BLENDING))
def test_without_a_mask_the_edit_is_the_plain_pipelines_bit_for_bit(tmp_path, kind):
    """Without a mask, edit_image through a blending pipeline's parts is the edit of the same
    model: the plain pipeline's edit of the same parts (FluxKontextInpaintPipeline's:
    FluxKontextPipeline's, the image as its own reference, as the inpainting pipeline takes it
    without image_reference), bit for bit, its round trip exact (latent_error 0 in float64)."""
    plain, pipe = _pipelines(tmp_path, kind)
    image, _, kwargs = _inputs(kind)
    ours, theirs = (_edit(p, image, **kwargs) for p in (pipe, plain))
    assert ours.latent_error == 0.0
    assert torch.equal(ours.latents, theirs.latents)
    assert torch.equal(ours.edited_latents, theirs.edited_latents)


def test_an_inpainting_sd3_transformer_is_refused_as_one(tmp_path):
    """StableDiffusion3InpaintPipeline's other mode, a transformer of 2 x c + 1 channels (the
    latents, the masked image's and the mask), is not mapped: refused before any network
    runs, with or without a mask, in one line that says it is an inpainting transformer
    (before: "not a depth transformer", which it is not)."""
    plain, _ = _pipelines(tmp_path, "sd3")
    config = dict(plain.transformer.config)
    channels = config["in_channels"]
    config.update(in_channels=2 * channels + 1, out_channels=channels)
    transformer = type(plain.transformer).from_config(config)
    pipe = diffusers.StableDiffusion3InpaintPipeline(
        **{**plain.components, "transformer": transformer}
    )
    image, mask, _ = _inputs("sd3")
    calls = [Counter(transformer), Counter(pipe.vae)]
    for kwargs in ({}, {"mask_image": mask}):
        with pytest.raises(ValueError) as exc_info:
            _edit(pipe, image, **kwargs)
        message = str(exc_info.value)
        assert "\n" not in message
        assert f"in_channels = {2 * channels + 1}" in message, message
        assert "not an inpainting one" in message and "depth" not in message, message
    assert all(c.calls == 0 for c in calls)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", ["flux", "chroma"])
def test_bdia_scheduler_in_flux_inpaint_pipeline_restarts_at_every_blended_step(tmp_path, kind):
    """BDIAScheduler dropped into FluxInpaintPipeline (ChromaInpaintPipeline, under its true
    CFG 5): the pipeline blends the re-noised image into the latents after every step but
    the last, so the scheduler restarts its recursion at every step but the first (3 of 4),
    with one BDIARestartWarning that names the blend, the pipeline and the inpainting models
    to use (a 9-channel inpainting unet, FluxFillPipeline): the run is plain Euler's, in the
    flow-matching scheduler's own arithmetic, so its latents are the pipeline's own
    scheduler's bit for bit, and it cannot be inverted."""
    _, pipe = _pipelines(tmp_path, kind)
    if kind == "chroma":
        # ChromaInpaintPipeline (diffusers 0.42) reads its transformer's guidance_embeds, a
        # field ChromaTransformer2DModel's config lacks: given, as False, so that it runs.
        pipe.transformer.register_to_config(guidance_embeds=False)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    _, mask, _ = _inputs(kind)

    def run():
        with torch.no_grad():
            return pipe(
                prompt=PROMPT,
                image=image,
                mask_image=mask,
                height=16,
                width=16,
                num_inference_steps=STEPS,
                strength=1.0,
                max_sequence_length=16,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
            ).images

    euler = run()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = run()
    restarts = [w for w in caught if issubclass(w.category, BDIARestartWarning)]
    assert len(restarts) == 1
    message = str(restarts[0].message)
    name = BLENDING[kind][0]
    for field in ("blends the image back", name, "9-channel", "FluxFillPipeline"):
        assert field in message, message
    assert pipe.scheduler.restarts == pipe.scheduler.timesteps[1:].tolist()
    assert torch.equal(ours, euler)

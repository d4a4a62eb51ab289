"""bdia.integrations.diffusers with Qwen-Image's inpainting ControlNet: from_diffusers(
controlnet=, controlnet_cond=) against QwenImageControlNetInpaintPipeline's run,
BDIAScheduler in that pipeline, edit_image with a control image and a mask, and the
refusals.

The controlnet is a tiny random ``QwenImageControlNetModel`` with ``extra_condition_channels
= 4`` (``tiny_qwen_image_controlnet(..., mask_channel=True)``, InstantX's inpainting kind) of
the tiny Qwen-Image transformer's config. The pipeline does not blend: it calls the
controlnet before the transformer at every step, as QwenImageControlNetPipeline does (under
true CFG the negative call takes the conditional call's residuals), with one control input
fixed over the run (the image set to -1 under the mask, encoded as one frame and normalised,
then ``1 - mask`` as the last channel, packed: its ``prepare_image_with_mask``), so the run is
an ODE in the latents. It draws the encoding from torch's global generator; the comparisons
seed that generator before each run, and record the control input the pipeline gives its
controlnet. Parity is checked in float32, bit for bit; exactness of the inversion in float64.
QwenImageControlNetInpaintPipeline is in diffusers 0.36 and newer; with older ones the module
is skipped.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from _pipeline_runs import assert_bdia_run_inverts, controlnet_euler_sample, pipeline_controlnet_ode
from conftest import Counter, flow_round_trip_error, untouched

if not hasattr(diffusers, "QwenImageControlNetInpaintPipeline"):
    pytest.skip(
        "QwenImageControlNetInpaintPipeline is in diffusers 0.36 and newer",
        allow_module_level=True,
    )

from test_diffusers_qwen_image import (  # noqa: E402
    BATCH,
    N_STEPS,
    TOKENS,
    _cond,
    _grid,
    _noise,
    _one_line_error,
    _pipeline_latents,
    _scheduler,
)
from test_diffusers_qwen_image import _edit as _qwen_edit  # noqa: E402
from test_diffusers_qwen_image_controlnet import (  # noqa: E402
    _control_image,
    _invert,
    _options,
    _target_cond,
)
from test_diffusers_sd3_controlnet_inpaint import _mask_image  # noqa: E402

from bdia.integrations.diffusers import from_diffusers  # noqa: E402
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_qwen_image_controlnet,
    tiny_qwen_image_controlnet_inpaint_pipeline,
    tiny_qwen_image_controlnet_pipeline,
    tiny_qwen_image_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SEED = 7  # torch's global seed, whose first draw encodes the masked image
CHANNELS = 20  # 4 latent channels and the mask's one, in patches of 2 x 2


def _run(pipe, noise, cond, control_image, mask_image, **options):
    """QwenImageControlNetInpaintPipeline's latents from ``noise`` (test_diffusers_qwen_image's
    run: BATCH images of 16 x 16, true CFG where ``cond`` has a negative branch) under
    ``control_image`` and ``mask_image``, after torch.manual_seed(SEED), and the control input
    it gave its controlnet, recorded at its first call."""
    seen = []
    hook = pipe.controlnet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["controlnet_cond"]), with_kwargs=True
    )
    torch.manual_seed(SEED)
    try:
        latents = _pipeline_latents(
            pipe, noise, cond, control_image=control_image, control_mask=mask_image, **options
        )
    finally:
        hook.remove()
    return latents, seen[0]


def _stand_in(dtype=torch.float32):
    """A control input (1, TOKENS, 20): packed latents, then a packed 0/1 mask."""
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    kept = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    both = torch.cat([latents, kept], dim=1)
    return diffusers.QwenImagePipeline._pack_latents(both, 1, 5, 8, 8).to(dtype)


_SETTINGS = {
    "plain": ({}, False),
    "true-cfg": ({}, True),
    "scaled-and-switched": (
        dict(conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7),
        True,
    ),
}


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(_SETTINGS))
def test_inpainting_controlnet_pipeline_gives_bdia_samples_latents(kind):
    """QwenImageControlNetInpaintPipeline itself (tiny parts, prompt embeddings with a padded
    prompt, a PIL image and mask it prepares and encodes itself; true CFG 4 with negative
    prompts; a scale of 0.6 and the controlnet on from 20% to 70% of the 8 steps) returns the
    latents of bdia.sample with euler on from_diffusers(controlnet=pipe.controlnet,
    controlnet_cond=<its control input>) over the pipeline's grid, bit for bit. The control
    input holds the mask's 0/1 in its last 4 channels; the controlnet runs once per step
    where the pipeline keeps it (3 of 8 switched), and another mask gives another run."""
    settings, true_cfg = _SETTINGS[kind]
    pipe = tiny_qwen_image_controlnet_inpaint_pipeline()
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, true_cfg=true_cfg)
    image, mask = _control_image(), _mask_image()
    latents, control = _run(pipe, noise, cond, image, mask, **_options(settings))
    assert control.shape == (BATCH, TOKENS, CHANNELS)
    assert set(control[..., -4:].unique().tolist()) == {0.0, 1.0}
    switched = "control_guidance_start" in settings
    if switched:
        settings = dict(settings, num_inference_steps=N_STEPS)
    ts = _grid(pipe.scheduler)
    ours, calls = controlnet_euler_sample(pipe, control, noise, ts, **settings, **cond)
    assert torch.equal(ours, latents)
    assert calls == [3 if switched else N_STEPS, N_STEPS * (1 + true_cfg)]
    moved, _ = _run(pipe, noise, cond, image, _mask_image(top=0, left=8), **_options(settings))
    assert float((moved - latents).abs().max() / latents.abs().max()) > 1e-3


def test_bdia_euler_inverts_the_inpainting_controlnet_ode_to_float64_rounding():
    """bdia(euler, 0.96) on the inpainting ControlNet ODE (float64 transformer, controlnet and
    state, Qwen-Image's shifted grid, true CFG 4, a scale of 0.6, the controlnet on from 20%
    to 70% of the steps), from the noise at t = 1 to 0 and back, returns the noise to 1e-12
    relative (measured: 0)."""
    transformer = tiny_qwen_image_transformer(dtype=torch.float64)
    ode = from_diffusers(
        transformer,
        _scheduler(),
        controlnet=tiny_qwen_image_controlnet(transformer, mask_channel=True),
        controlnet_cond=_stand_in(torch.float64),
        conditioning_scale=0.6,
        control_guidance_start=0.2,
        control_guidance_end=0.7,
        num_inference_steps=N_STEPS,
        **_cond(torch.float64, true_cfg=True),
    )
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_scheduler())) == 0.0


def test_bdia_scheduler_in_inpainting_controlnet_pipeline_is_bdia_sample_and_inverts():
    """QwenImageControlNetInpaintPipeline (true CFG 4, a scale of 0.6) with
    BDIAScheduler.from_config(its config, gamma=0.9) gives the latents and the final pair
    (low words included) of bdia.sample with bdia(euler, 0.9) on the ODE, bit for bit;
    bdia.invert from the pair, and the inverse scheduler's loop with the pipeline's
    controlnet and transformer calls, return the pipeline's noise bit for bit."""
    from bdia.integrations.diffusers import BDIAScheduler

    pipe = tiny_qwen_image_controlnet_inpaint_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, true_cfg=True)
    latents, control = _run(
        pipe, noise, cond, _control_image(), _mask_image(), controlnet_conditioning_scale=0.6
    )
    ode = pipeline_controlnet_ode(pipe, control, conditioning_scale=0.6, **cond)
    ts = _grid(pipe.scheduler)
    pair = assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.9)
    inverse = _invert(pipe, pair, cond, control, 0.6)
    assert torch.equal(inverse.pair.earlier, noise)


# -------------------------------------------------------------------------- refusals


def test_inpainting_controlnets_and_inputs_not_mapped_are_refused_before_any_call():
    """One line each, before any call, the caller's tensors untouched: a controlnet of
    another count of extra channels (no pipeline makes its input), the union wrapper of an
    inpainting controlnet (the inpainting pipeline calls the controlnet itself); control
    latents without the packed mask, or whose last 4 channels lie outside [0, 1] (the mask
    put first); a reference image beside the controlnet."""
    transformer = tiny_qwen_image_transformer()
    net = tiny_qwen_image_controlnet(transformer, mask_channel=True)
    control = _stand_in()
    base = dict(_cond(torch.float32), controlnet=net, controlnet_cond=control)
    counters = [Counter(transformer), Counter(net)]
    fields = {k: v for k, v in net.config.items() if not k.startswith("_")}
    eight = diffusers.QwenImageControlNetModel(**{**fields, "extra_condition_channels": 8})
    multi = diffusers.QwenImageMultiControlNetModel([net])
    mask_first = torch.cat([control[..., -4:], control[..., :-4]], dim=-1)
    cases = [
        (dict(controlnet=eight), "extra_condition_channels = 8"),
        (dict(controlnet=multi, controlnet_cond=[control]), "holds an inpainting controlnet"),
        (dict(controlnet_cond=control[..., :16]), "(batch or 1, tokens, 20)"),
        (dict(controlnet_cond=control[..., :16]), "prepare_image_with_mask"),
        (dict(controlnet_cond=mask_first), "last 4 channels are the inpainting"),
        (
            dict(image_latents=torch.zeros(1, TOKENS, 16), img_shapes=[[(1, 4, 4), (1, 4, 4)]]),
            "QwenImageControlNetInpaintPipeline calls a text-to-image transformer",
        ),
    ]
    with untouched(control):
        for kwargs, field in cases:
            with pytest.raises(ValueError) as exc_info:
                from_diffusers(transformer, _scheduler(), **{**base, **kwargs})
            _one_line_error(exc_info, field)
    assert [c.calls for c in counters] == [0, 0]


# ----------------------------------------------------------------------- edit_image


def _edit(pipe, control, mask, dtype=torch.float64, **options):
    """edit_image on ``pipe`` from source prompts of 5 tokens to targets of 6 (true CFG 4,
    negative prompts of 7 tokens) of test_diffusers_qwen_image's images, under ``control``
    and ``mask``."""
    return _qwen_edit(pipe, True, dtype, control_image=control, mask_image=mask, **options)


def test_edit_image_inverts_exactly_under_the_control_image_and_mask():
    """edit_image on QwenImageControlNetInpaintPipeline inverts and regenerates two images
    under one control image and one mask: latent_error 0 with a float64 state, a float32 one
    and the controlnet switched on from 20% to 70% of the steps (measured 0 each), the
    control input of both images in both ODEs (its last 4 channels the packed 1 - mask), the
    caller's tensors left as they were; another mask gives another edit (relative difference
    above 1e-3)."""
    pipe = tiny_qwen_image_controlnet_inpaint_pipeline()
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 2:10] = 1.0
    with untouched(control, mask):
        result = _edit(pipe, control, mask)
    assert result.latent_error == 0.0
    kept = 1 - mask[..., ::2, ::2].expand(BATCH, -1, -1, -1)
    packed = diffusers.QwenImagePipeline._pack_latents(kept, BATCH, 1, 8, 8)
    for ode in (result.inversion.ode, result.target):
        given = ode.cond["controlnet_cond"]
        assert given.shape == (BATCH, TOKENS, CHANNELS)
        assert torch.equal(given[..., -4:], packed)
    assert _edit(pipe, control, mask, torch.float32).latent_error == 0.0
    switched = _edit(pipe, control, mask, control_guidance_start=0.2, control_guidance_end=0.7)
    assert switched.latent_error == 0.0
    other = _edit(pipe, control, mask.flip(-1).flip(-2))
    assert other.latent_error == 0.0
    moved = (other.edited_latents - result.edited_latents).abs().max()
    assert float(moved / result.edited_latents.abs().max()) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("switched", [False, True], ids=["on", "switched"])
def test_the_edit_is_the_pipelines_run_from_the_inverted_noise(switched, monkeypatch):
    """With a float32 state, edit_image's edited latents are bit for bit what
    QwenImageControlNetInpaintPipeline returns from the inverted noise under the target
    prompt (true CFG 4 with the negative embeddings, a scale of 0.6, and the controlnet on
    from 20% to 70% of the steps where switched), given the same PIL control image and mask,
    its VAE's sample replaced by the mean (which edit_image takes, so that its edit is
    deterministic): the control input the pipeline gives its controlnet is the edit's ODEs',
    bit for bit."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pipe = tiny_qwen_image_controlnet_inpaint_pipeline()
    image, mask = _control_image(), _mask_image()
    bounds = dict(control_guidance_start=0.2, control_guidance_end=0.7) if switched else {}
    settings = dict(controlnet_conditioning_scale=0.6, **bounds)
    out = _edit(pipe, image, mask, torch.float32, **settings)
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    cond = _target_cond()
    theirs, seen = _run(pipe, out.inversion.noise.clone(), cond, image, mask, **settings)
    for ode in (out.inversion.ode, out.target):
        assert torch.equal(ode.cond["controlnet_cond"], seen)
    assert torch.equal(out.edited_latents, theirs)


def test_edit_image_refuses_a_missing_mask_or_control_image_and_a_stray_mask():
    """One line each, before any network runs: the inpainting ControlNet pipeline without
    mask_image, or without control_image; a mask for QwenImageControlNetPipeline, whose
    controlnet takes none (the line names the inpainting pipeline)."""
    pipe = tiny_qwen_image_controlnet_inpaint_pipeline()
    plain = tiny_qwen_image_controlnet_pipeline()
    control = torch.zeros(1, 3, 16, 16)
    mask = torch.ones(1, 1, 16, 16)
    counters = [Counter(m) for p in (pipe, plain) for m in (p.transformer, p.controlnet, p.vae)]
    for given, options, field in (
        (pipe, dict(control_image=control), "give mask_image"),
        (pipe, dict(mask_image=mask), "give control_image"),
        (plain, dict(control_image=control, mask_image=mask), "QwenImageControlNetInpaintPipe"),
    ):
        with pytest.raises(ValueError) as exc_info:
            _qwen_edit(given, True, **options)
        _one_line_error(exc_info, field)
    assert all(c.calls == 0 for c in counters)

"""bdia.integrations.diffusers with Z-Image's ControlNet: from_diffusers(controlnet=,
controlnet_cond=) against ZImageControlNetPipeline's and ZImageControlNetInpaintPipeline's
runs, BDIAScheduler in the pipeline, and the refusals.

The controlnet is a tiny random ``ZImageControlNetModel`` of the tiny Z-Image transformer
(``tiny_z_image_controlnet``), given the transformer's shared modules as the pipelines give
them: it takes the control image's latents as one frame, ``(batch, 4, 1, h, w)``, or (the
inpainting kind, ``control_in_dim = 9``) those, the mask's channel and the masked image's
latents. The pipelines call it before the transformer on the transformer's list of latents,
its timestep and its prompts (twice the batch under CFG, the control input twice too), with
a control input fixed over the run, and neither blends: the run is an ODE in the latents. As
for ZImagePipeline, parity is checked in float32, where both sides make the same float
operations on the same inputs and agree bit for bit; exactness of the inversion in float64.
The pipelines are in diffusers 0.37 and newer; with older ones the module is skipped.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from _pipeline_runs import (
    assert_bdia_run_inverts,
    assert_refused_at_first_evaluation,
    pipeline_controlnet_ode,
)
from conftest import Counter, flow_round_trip_error, untouched

if not hasattr(diffusers, "ZImageControlNetPipeline"):
    pytest.skip(
        f"diffusers {diffusers.__version__} has no ZImageControlNetPipeline (0.37 and newer "
        "have it and ZImageControlNetInpaintPipeline)",
        allow_module_level=True,
    )

from test_diffusers_z_image import (  # noqa: E402
    BATCH,
    CFG,
    N_STEPS,
    OLD_PIPELINES,
    OPTIONS,
    PIPELINE_SIGMAS,
    _cond,
    _grid,
    _noise,
    _pipeline_latents,
    _scheduler,
    _sigmas,
)

import bdia  # noqa: E402
from bdia.integrations.diffusers import (  # noqa: E402
    BDIAInverseScheduler,
    BDIAScheduler,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_qwen_image_controlnet,
    tiny_qwen_image_transformer,
    tiny_z_image_controlnet,
    tiny_z_image_controlnet_pipeline,
    tiny_z_image_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SCALE = 0.6  # the controlnet's conditioning scale (the pipelines' default is 0.75)


def _image(seed):
    """A 16 x 16 RGB image in [-1, 1], (1, 3, 16, 16), as the pipelines take tensors."""
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _mask(left=4):
    """The inpainting pipeline's masks, one per sample (it does not repeat one mask to the
    batch): 1 on the 8 x 8 square from column ``left``, to be repainted."""
    mask = torch.zeros(BATCH, 1, 16, 16)
    mask[..., 4:12, left : left + 8] = 1.0
    return mask


def _stand_in(dtype=torch.float32, channels=4, seed=5):
    """Control latents (1, channels, 1, 8, 8), as the pipeline makes them for one 16 x 16
    control image (an inpainting controlnet's mask channel, channel 4, in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    control = torch.randn(1, channels, 1, 8, 8, generator=g)
    if channels == 9:
        control[:, 4] = (control[:, 4] > 0).to(control.dtype)
    return control.to(dtype)


def _run(pipe, noise, cond, control_image, inpaint=False, mask_left=4):
    """The pipeline's latents from ``noise`` (test_diffusers_z_image's run: BATCH images of
    16 x 16, ``cond``'s CFG settings) under ``control_image`` at the scale SCALE (the
    inpainting pipeline's with _image(6) and _mask(mask_left)), and the control input it
    gave its controlnet at its first call (the first BATCH samples: both halves of CFG's
    batch hold the same)."""
    seen = []
    hook = pipe.controlnet.register_forward_pre_hook(lambda m, a: seen.append(a[3]))
    options = dict(image=_image(6), mask_image=_mask(mask_left)) if inpaint else {}
    try:
        latents = _pipeline_latents(
            pipe,
            noise,
            cond,
            control_image=control_image,
            controlnet_conditioning_scale=SCALE,
            **options,
        )
    finally:
        hook.remove()
    return latents, seen[0][:BATCH]


def _ode(pipe, control, cond):
    """from_diffusers on the pipeline's transformer, scheduler and controlnet, with its
    control input ``control`` at the scale SCALE and ``cond``'s prompts and CFG settings."""
    return pipeline_controlnet_ode(pipe, control, conditioning_scale=SCALE, **cond)


def _one_line(info, fragment):
    message = str(info.value)
    assert "\n" not in message and fragment in message, message


# --------------------------------------------------------------------------- parity

_RUNS = {
    "plain": (False, "no-cfg"),
    "cfg": (False, "cfg"),
    "truncated-cfg": (False, "truncated"),
    "inpaint": (True, "no-cfg"),
    "inpaint-cfg": (True, "cfg"),
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", list(_RUNS))
def test_controlnet_pipelines_give_bdia_samples_latents(name):
    """ZImageControlNetPipeline (and, the inpainting kind, ZImageControlNetInpaintPipeline
    with an image and a mask) itself, tiny parts, prompts of two lengths, a control image it
    encodes itself, a scale of 0.6, with or without CFG 3 (truncated after the first 5
    steps), returns the latents of bdia.sample with euler on from_diffusers(controlnet=
    pipe.controlnet, controlnet_cond=<the pipeline's control input>) over ZImagePipeline's
    grid, bit for bit. The controlnet runs once per step on the transformer's batch (twice
    the batch where CFG is on), as the pipeline calls it; another control image (another
    mask) gives another run."""
    inpaint, options = _RUNS[name]
    pipe = tiny_z_image_controlnet_pipeline(inpaint=inpaint)
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, OPTIONS[options])
    sizes = []
    pipe.controlnet.register_forward_pre_hook(lambda m, a: sizes.append(len(a[0])))
    latents, control = _run(pipe, noise, cond, _image(4), inpaint)
    assert control.shape == (BATCH, 9 if inpaint else 4, 1, 8, 8)
    ode = _ode(pipe, control, cond)
    transformer = Counter(pipe.transformer)
    with torch.no_grad():
        ts = _grid(pipe.scheduler)
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, ts)
    assert torch.equal(ours, latents)
    # One step fewer than the pipeline's calls where its last step is from 0 to 0 (0.36-0.38).
    steps = len(ts) - 1
    assert transformer.calls == steps and sizes[N_STEPS:] == sizes[:steps]
    # Steps with CFG's batch (the older grid passes the truncation's bound a step sooner).
    cfg = {"no-cfg": 0, "truncated": 5 if PIPELINE_SIGMAS else 4}.get(options, N_STEPS)
    assert sizes[:N_STEPS] == [2 * BATCH] * cfg + [BATCH] * (N_STEPS - cfg)
    moved, _ = _run(pipe, noise, cond, _image(9), inpaint)
    assert float((moved - latents).abs().max() / latents.abs().max()) > 1e-3
    if inpaint:
        other, _ = _run(pipe, noise, cond, _image(4), inpaint, mask_left=0)
        assert float((other - latents).abs().max() / latents.abs().max()) > 1e-3


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("inpaint", [False, True], ids=["control", "inpaint"])
def test_bdia_euler_inverts_the_controlnet_ode_to_float64_rounding(inpaint):
    """bdia(euler, 0.96) on the ControlNet ODE (float64 transformer, controlnet, control
    latents and state, Z-Image's shifted grid, CFG 3, a scale of 0.6), from the noise at
    t = 1 to 0 and back, returns the noise to 1e-12 relative (measured: 0, exactly: the
    pair's low words carry what the state's rounding drops)."""
    transformer = tiny_z_image_transformer(dtype=torch.float64)
    ode = from_diffusers(
        transformer,
        _scheduler(),
        controlnet=tiny_z_image_controlnet(transformer, inpaint=inpaint),
        controlnet_cond=_stand_in(torch.float64, 9 if inpaint else 4),
        conditioning_scale=SCALE,
        **_cond(torch.float64, OPTIONS["cfg"]),
    )
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_scheduler())) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


@torch.no_grad()
def _invert(pipe, pair, cond, control):
    """BDIAInverseScheduler's loop from ``pair``, calling the controlnet and then the
    transformer as ZImageControlNetPipeline does under CFG (both on the batch twice over,
    the control input repeated, c + g (c - u), negated); returns the inverse scheduler."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(sigmas=_sigmas())
    prompts = cond["cap_feats"] + cond["negative_cond"]["cap_feats"]
    x = inverse.begin(pair)
    for t in inverse.timesteps:
        tau = ((1000 - t.expand(BATCH)) / 1000).repeat(2)
        inputs = list(x.repeat(2, 1, 1, 1).unsqueeze(2).unbind(0))
        residuals = pipe.controlnet(
            inputs, tau, prompts, control.repeat(2, 1, 1, 1, 1), conditioning_scale=SCALE
        )
        out = pipe.transformer(
            inputs, tau, prompts, controlnet_block_samples=residuals, return_dict=False
        )[0]
        v = torch.stack([o + CFG * (o - n) for o, n in zip(out[:BATCH], out[BATCH:])])
        x = inverse.step(-v.squeeze(2), t, x).prev_sample
    return inverse


@pytest.mark.skipif(not PIPELINE_SIGMAS, reason=OLD_PIPELINES)
def test_bdia_scheduler_in_controlnet_pipeline_is_bdia_sample_and_inverts():
    """ZImageControlNetPipeline (CFG 3, a scale of 0.6) with BDIAScheduler.from_config(its
    config, gamma=0.9) gives the latents and the final pair (low words included) of
    bdia.sample with bdia(euler, 0.9) on the ControlNet ODE, bit for bit; bdia.invert from
    the pair, and the inverse scheduler's loop with the pipeline's controlnet and transformer
    calls, return the pipeline's noise bit for bit. So for the inpainting pipeline's run."""
    for inpaint in (False, True):
        pipe = tiny_z_image_controlnet_pipeline(inpaint=inpaint)
        pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
        noise = _noise(torch.float32)
        cond = _cond(torch.float32, OPTIONS["cfg"])
        latents, control = _run(pipe, noise, cond, _image(4), inpaint)
        ode = _ode(pipe, control, cond)
        ts = _grid(pipe.scheduler)
        pair = assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.9)
        inverse = _invert(pipe, pair, cond, control)
        assert len(inverse.timesteps) == N_STEPS - 1
        assert torch.equal(inverse.pair.earlier, noise)


# -------------------------------------------------------------------------- refusals


def test_controlnets_and_settings_not_mapped_are_refused_before_any_call():
    """One line each, before any call, the caller's tensors untouched: Qwen-Image's
    controlnet; a Z-Image controlnet without the transformer's shared modules (not made by
    a pipeline or from_transformer), with another transformer's, of another width or dtype;
    no control latents, a list, a non-tensor, latents that are not one frame of
    control_in_dim channels, an inpainting controlnet's mask channel outside [0, 1]; a
    scale per controlnet of another count; a guidance window, num_inference_steps, a
    strength and guess mode (the pipelines have none); the residuals in cond; the inpainting
    unet's mask; control latents without a controlnet."""
    transformer = tiny_z_image_transformer()
    net = tiny_z_image_controlnet(transformer)
    inpaint_net = tiny_z_image_controlnet(transformer, inpaint=True)
    control = _stand_in()
    bare = diffusers.ZImageControlNetModel(**net.config)
    other = tiny_z_image_controlnet(tiny_z_image_transformer(seed=1))
    wide = diffusers.ZImageControlNetModel.from_transformer(
        tiny_z_image_controlnet(tiny_z_image_transformer(dim=64, n_heads=4, n_kv_heads=4)),
        transformer,
    )
    doubled = diffusers.ZImageControlNetModel.from_transformer(
        tiny_z_image_controlnet(tiny_z_image_transformer(dtype=torch.float64)), transformer
    )
    qwen = tiny_qwen_image_controlnet(tiny_qwen_image_transformer())
    masked = _stand_in(channels=9)
    masked[:, 4] = 2.0
    base = dict(_cond(torch.float32, OPTIONS["no-cfg"]), controlnet=net, controlnet_cond=control)
    counters = [Counter(transformer), Counter(net), Counter(inpaint_net)]
    cases = [
        (dict(controlnet=qwen), "QwenImageControlNetModel"),
        (dict(controlnet=[net]), "several controlnets"),
        (dict(controlnet=bare), "t_embedder is none of the transformer's"),
        (dict(controlnet=other), "t_embedder is another transformer's"),
        (dict(controlnet=wide), "dim = 64"),
        (dict(controlnet=doubled), "torch.float64"),
        (dict(controlnet_cond=None), "needs controlnet_cond"),
        (dict(controlnet_cond=[control]), "one tensor"),
        (dict(controlnet_cond=control.numpy()), "must be a tensor"),
        (dict(controlnet_cond=control[:, :, 0]), "(batch or 1, 4, 1, h, w)"),
        (dict(controlnet_cond=control[:, :3]), "(batch or 1, 4, 1, h, w)"),
        (dict(controlnet_cond=control.repeat(1, 1, 2, 1, 1)), "(batch or 1, 4, 1, h, w)"),
        (dict(controlnet=inpaint_net, controlnet_cond=control), "(batch or 1, 9, 1, h, w)"),
        (dict(controlnet=inpaint_net, controlnet_cond=masked), "channel 4"),
        (dict(conditioning_scale=[1.0, 1.0]), "conditioning_scale has 2 values"),
        (
            dict(control_guidance_start=0.2, num_inference_steps=N_STEPS),
            "ZImageControlNetPipeline and ZImageControlNetInpaintPipeline have none",
        ),
        (dict(num_inference_steps=N_STEPS), "num_inference_steps"),
        (dict(strength=0.5), "no Z-Image ControlNet pipeline takes a strength"),
        (dict(guess_mode=True), "guess_mode"),
        (dict(controlnet_block_samples={}), "set by the adapter"),
        (dict(mask=torch.zeros(1, 1, 8, 8)), "mask is not mapped"),
        (dict(controlnet=None), "controlnet_cond"),
    ]
    with untouched(control, masked):
        for kwargs, fragment in cases:
            with pytest.raises((ValueError, TypeError)) as info:
                from_diffusers(transformer, _scheduler(), **{**base, **kwargs})
            _one_line(info, fragment)
    assert [c.calls for c in counters] == [0, 0, 0]


def test_control_latents_of_another_size_are_refused_before_the_call():
    """At the first evaluation, before the controlnet or the transformer is called: control
    latents of another size than the latents', or of a batch neither 1 nor the state's."""
    transformer = tiny_z_image_transformer()
    net = tiny_z_image_controlnet(transformer)
    cases = [
        (dict(controlnet_cond=_stand_in()[..., :4]), "at the latents' size"),
        (dict(controlnet_cond=_stand_in().repeat(3, 1, 1, 1, 1)), "batch 3"),
    ]
    noise, cond = _noise(torch.float32), _cond(torch.float32, OPTIONS["cfg"])
    assert_refused_at_first_evaluation(transformer, net, _scheduler(), noise, cond, cases)

"""bdia.integrations.diffusers with Qwen-Image's ControlNet: from_diffusers(controlnet=,
controlnet_cond=) against QwenImageControlNetPipeline's run, BDIAScheduler in that pipeline,
and the refusals.

The controlnet is a tiny random ``QwenImageControlNetModel`` of the tiny Qwen-Image
transformer's config (``tiny_qwen_image_controlnet``): it takes the control image's packed
latents. The pipeline calls it before the transformer on the same latents, timestep, prompt
(with its mask) and image shapes, with the control latents, which are fixed over the run, so
the run is an ODE in the latents; under true CFG the negative call takes the conditional
call's residuals, the controlnet called once a step. As for QwenImagePipeline, parity is
checked in float32, where both sides make the same float operations on the same inputs and
agree bit for bit; exactness of the inversion in float64. QwenImageControlNetPipeline is in
diffusers 0.36 and newer; with older ones the module is skipped.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_runs import (
    assert_bdia_run_inverts,
    assert_refused_at_first_evaluation,
    controlnet_euler_sample,
    pipeline_controlnet_ode,
)
from conftest import Counter, assert_flow_run_is_bdia_sample, flow_round_trip_error, untouched

if not hasattr(diffusers, "QwenImageControlNetPipeline"):
    pytest.skip(
        "QwenImageControlNetPipeline is in diffusers 0.36 and newer", allow_module_level=True
    )

from test_diffusers_qwen_image import (  # noqa: E402
    BATCH,
    N_STEPS,
    TOKENS,
    TRUE_CFG,
    _cond,
    _grid,
    _mu,
    _noise,
    _one_line_error,
    _pipeline_latents,
    _prompt,
    _scheduler,
    _target,
)
from test_diffusers_qwen_image import _edit as _qwen_edit  # noqa: E402

import bdia  # noqa: E402
from bdia.integrations.diffusers import (  # noqa: E402
    BDIAInverseScheduler,
    BDIAScheduler,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    tiny_flux_controlnet,
    tiny_flux_transformer,
    tiny_qwen_image_controlnet,
    tiny_qwen_image_controlnet_pipeline,
    tiny_qwen_image_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SEED = 0  # the generator's, with which the pipeline draws its control image's latents


def _control_image(seed=4):
    """A 16 x 16 RGB PIL control image (a stand-in for an edge map or a depth map)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy())


def _stand_in(dtype=torch.float32, seed=5):
    """Packed control latents (1, TOKENS, 16), as the pipeline makes them for one 16 x 16
    control image."""
    return torch.randn(1, TOKENS, 16, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _run(pipe, noise, cond, control_image, **options):
    """QwenImageControlNetPipeline's latents from ``noise`` (test_diffusers_qwen_image's run:
    BATCH images of 16 x 16, true CFG where ``cond`` has a negative branch) guided by
    ``control_image`` (a list for the union wrapper), and the control latents it gave its
    controlnet (drawn from the VAE with the generator of SEED), recorded at its first call."""
    seen = []
    hook = pipe.controlnet.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["controlnet_cond"]), with_kwargs=True
    )
    generator = torch.Generator().manual_seed(SEED)
    try:
        latents = _pipeline_latents(
            pipe, noise, cond, control_image=control_image, generator=generator, **options
        )
    finally:
        hook.remove()
    return latents, seen[0]


_SETTINGS = {
    "plain": ({}, False),
    "true-cfg": ({}, True),
    "scaled-and-switched": (
        dict(conditioning_scale=0.6, control_guidance_start=0.2, control_guidance_end=0.7),
        False,
    ),
    "switched-true-cfg": (dict(control_guidance_start=0.2, control_guidance_end=0.7), True),
}


def _options(settings):
    """The pipeline's names of from_diffusers' ControlNet settings."""
    names = dict(
        conditioning_scale="controlnet_conditioning_scale",
        control_guidance_start="control_guidance_start",
        control_guidance_end="control_guidance_end",
    )
    return {names[k]: v for k, v in settings.items() if k in names}


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(_SETTINGS))
def test_controlnet_pipeline_gives_bdia_samples_latents(kind):
    """QwenImageControlNetPipeline itself (tiny parts, prompt embeddings with a padded
    prompt, a PIL control image it prepares and encodes itself; true CFG 4 with negative
    prompts; a scale of 0.6 and the controlnet on from 20% to 70% of the 8 steps) returns the
    latents of bdia.sample with euler on from_diffusers(controlnet=pipe.controlnet,
    controlnet_cond=<the pipeline's control latents>) over the pipeline's grid, bit for bit.
    The controlnet runs once per step where the pipeline keeps it (under true CFG too: the
    negative call takes the conditional call's residuals), 3 of 8 steps when switched (the
    pipeline calls it at every step with a scale of 0 elsewhere, which adds nothing); another
    control image gives another run."""
    settings, true_cfg = _SETTINGS[kind]
    pipe = tiny_qwen_image_controlnet_pipeline()
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, true_cfg=true_cfg)
    latents, control = _run(pipe, noise, cond, _control_image(), **_options(settings))
    assert control.shape == (BATCH, TOKENS, 16)
    switched = "control_guidance_start" in settings
    if switched:
        settings = dict(settings, num_inference_steps=N_STEPS)
    ts = _grid(pipe.scheduler)
    ours, calls = controlnet_euler_sample(pipe, control, noise, ts, **settings, **cond)
    assert torch.equal(ours, latents)
    assert calls == [3 if switched else N_STEPS, N_STEPS * (1 + true_cfg)]
    moved, _ = _run(pipe, noise, cond, _control_image(seed=9), **_options(settings))
    assert float((moved - latents).abs().max() / latents.abs().max()) > 1e-3


def test_bdia_euler_inverts_the_controlnet_ode_to_float64_rounding():
    """bdia(euler, 0.96) on the ControlNet ODE (float64 transformer, controlnet and state,
    Qwen-Image's shifted grid, true CFG 4, a scale of 0.6, the controlnet on from 20% to 70%
    of the steps), from the noise at t = 1 to 0 and back, returns the noise to 1e-12
    relative (measured: 0; the pair's low words carry what the state's rounding drops)."""
    transformer = tiny_qwen_image_transformer(dtype=torch.float64)
    ode = from_diffusers(
        transformer,
        _scheduler(),
        controlnet=tiny_qwen_image_controlnet(transformer),
        controlnet_cond=_stand_in(torch.float64),
        conditioning_scale=0.6,
        control_guidance_start=0.2,
        control_guidance_end=0.7,
        num_inference_steps=N_STEPS,
        **_cond(torch.float64, true_cfg=True),
    )
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_scheduler())) == 0.0


@torch.no_grad()
def _invert(pipe, pair, cond, control, scale):
    """BDIAInverseScheduler's loop from ``pair``, calling the controlnet and then the
    transformer as QwenImageControlNetPipeline does under true CFG (the controlnet on the
    conditional prompt, its residuals in both calls, combined and rescaled); returns the
    inverse scheduler."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(sigmas=np.linspace(1.0, 1 / N_STEPS, N_STEPS), mu=_mu())
    shapes = [(1, 4, 4)] * BATCH  # the ControlNet pipeline's img_shapes

    def lengths(branch):
        # The text lengths, where this diffusers' pipeline passes them (0.35, 0.36).
        return {k: branch[k] for k in ("txt_seq_lens",) if k in branch}

    def call(x, timestep, branch, residuals):
        return pipe.transformer(
            hidden_states=x,
            timestep=timestep,
            encoder_hidden_states=branch["encoder_hidden_states"],
            encoder_hidden_states_mask=branch["encoder_hidden_states_mask"],
            img_shapes=shapes,
            **lengths(branch),
            controlnet_block_samples=residuals,
            attention_kwargs={},
            return_dict=False,
        )[0]

    x = inverse.begin(pair)
    for t in inverse.timesteps:
        timestep = t.expand(BATCH).to(x.dtype) / 1000
        residuals = pipe.controlnet(
            hidden_states=x,
            controlnet_cond=control,
            conditioning_scale=scale,
            timestep=timestep,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=cond["encoder_hidden_states_mask"],
            img_shapes=shapes,
            **lengths(cond),
            return_dict=False,
        )
        c = call(x, timestep, cond, residuals)
        u = call(x, timestep, cond["negative_cond"], residuals)
        guided = u + TRUE_CFG * (c - u)
        v = guided * (
            torch.norm(c, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True)
        )
        x = inverse.step(v, t, x).prev_sample
    return inverse


def test_bdia_scheduler_in_controlnet_pipeline_is_bdia_sample_and_inverts():
    """QwenImageControlNetPipeline (true CFG 4, a scale of 0.6) with
    BDIAScheduler.from_config(its config, gamma=0.9) gives the latents and the final pair (low
    words included) of bdia.sample with bdia(euler, 0.9) on the ControlNet ODE, bit for bit;
    bdia.invert from the pair, and the inverse scheduler's loop with the pipeline's
    controlnet and transformer calls, return the pipeline's noise bit for bit. With the
    controlnet switched on from 20% to 70% of the steps, the run is bdia.sample's too."""
    pipe = tiny_qwen_image_controlnet_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, true_cfg=True)
    latents, control = _run(pipe, noise, cond, _control_image(), controlnet_conditioning_scale=0.6)
    ode = pipeline_controlnet_ode(pipe, control, conditioning_scale=0.6, **cond)
    ts = _grid(pipe.scheduler)
    pair = assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.9)
    inverse = _invert(pipe, pair, cond, control, 0.6)
    assert len(inverse.timesteps) == N_STEPS - 1
    assert torch.equal(inverse.pair.earlier, noise)

    bounds = dict(control_guidance_start=0.2, control_guidance_end=0.7)
    latents, _ = _run(pipe, noise, cond, _control_image(), **bounds)
    ode = pipeline_controlnet_ode(pipe, control, num_inference_steps=N_STEPS, **bounds, **cond)
    assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)


def test_the_union_wrapper_is_its_controlnet_once_per_control_image():
    """QwenImageControlNetPipeline with a QwenImageMultiControlNetModel of the controlnet
    (the union wrapper) and two control images, scales 0.6 and 1, the second on from 20% to
    70% of the steps (true CFG 4): its latents are bdia.sample's with euler on
    from_diffusers(controlnet=the wrapper, controlnet_cond=[both control latents], with the
    scales and bounds per image), bit for bit, the controlnet called twice a step (once per
    image, the pipeline's count); with the second image's scale 0 the run is the single
    controlnet's run on the first image alone, bit for bit."""
    pipe = tiny_qwen_image_controlnet_pipeline(multi=True)
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, true_cfg=True)
    images = [_control_image(), _control_image(seed=9)]
    settings = dict(
        conditioning_scale=[0.6, 1.0],
        control_guidance_start=[0.0, 0.2],
        control_guidance_end=[1.0, 0.7],
    )
    latents, controls = _run(pipe, noise, cond, images, **_options(settings))
    assert len(controls) == 2 and controls[0].shape == (BATCH, TOKENS, 16)
    ode = pipeline_controlnet_ode(pipe, controls, num_inference_steps=N_STEPS, **settings, **cond)
    net = Counter(pipe.controlnet.nets[0])
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, _grid(pipe.scheduler))
    assert torch.equal(ours, latents)
    assert net.calls == 2 * N_STEPS

    off, _ = _run(pipe, noise, cond, images, controlnet_conditioning_scale=[0.6, 0.0])
    single = tiny_qwen_image_controlnet_pipeline()
    alone, _ = _run(single, noise, cond, images[0], controlnet_conditioning_scale=0.6)
    assert torch.equal(off, alone)


# -------------------------------------------------------------------------- refusals


def test_controlnets_and_settings_not_mapped_are_refused_before_any_call():
    """One line each, before any call, the caller's tensors untouched: Flux's controlnet, a
    union wrapper of two controlnets (diffusers calls one), one of another transformer
    (joint_attention_dim, residual width) or dtype; no control latents, a list for one
    controlnet, a tensor for the union wrapper, a non-tensor, latents not packed or of
    other channels; scales or bounds of another count than the control images;
    guess mode; a strength (no Qwen-Image ControlNet pipeline takes one); a reference
    image (QwenImageEditPipeline's) beside the controlnet; a residual key in cond."""
    transformer = tiny_qwen_image_transformer()
    net = tiny_qwen_image_controlnet(transformer)
    multi = diffusers.QwenImageMultiControlNetModel([net])
    control = _stand_in()
    flow = _scheduler()
    base = dict(_cond(torch.float32), controlnet=net, controlnet_cond=control)
    counters = [Counter(transformer), Counter(net)]
    cases = [
        (dict(controlnet=tiny_flux_controlnet(tiny_flux_transformer())), "FluxControlNetModel"),
        (
            dict(controlnet=diffusers.QwenImageMultiControlNetModel([net, net])),
            "holds 2 controlnets",
        ),
        (
            dict(
                controlnet=tiny_qwen_image_controlnet(
                    tiny_qwen_image_transformer(joint_attention_dim=8)
                )
            ),
            "joint_attention_dim",
        ),
        (
            dict(
                controlnet=tiny_qwen_image_controlnet(
                    tiny_qwen_image_transformer(attention_head_dim=4)
                )
            ),
            "residuals are 8 wide",
        ),
        (
            dict(
                controlnet=tiny_qwen_image_controlnet(
                    tiny_qwen_image_transformer(dtype=torch.float64)
                )
            ),
            "torch.float64",
        ),
        (dict(controlnet_cond=None), "needs controlnet_cond"),
        (dict(controlnet_cond=[control]), "one tensor"),
        (dict(controlnet=multi), "a list of tensors, one per control image"),
        (dict(controlnet=multi, controlnet_cond=[control, control.numpy()]), "controlnet_cond[1]"),
        (dict(controlnet_cond=control[None]), "(batch or 1, tokens, 16)"),
        (dict(controlnet_cond=control[..., :8]), "(batch or 1, tokens, 16)"),
        (
            dict(controlnet=multi, controlnet_cond=[control] * 2, conditioning_scale=[1.0] * 3),
            "conditioning_scale has 3 values",
        ),
        (dict(guess_mode=True), "guess_mode"),
        (
            dict(strength=0.5, control_guidance_start=0.2, num_inference_steps=4),
            "no Qwen-Image ControlNet pipeline",
        ),
        (
            dict(image_latents=torch.zeros(1, TOKENS, 16), img_shapes=[[(1, 4, 4), (1, 4, 4)]]),
            "beside mask",
        ),
        (dict(controlnet_block_samples=[control]), "controlnet_block_samples"),
    ]
    with untouched(control):
        for kwargs, field in cases:
            with pytest.raises((ValueError, TypeError)) as exc_info:
                from_diffusers(transformer, flow, **{**base, **kwargs})
            _one_line_error(exc_info, field)
    assert [c.calls for c in counters] == [0, 0]


def test_control_latents_of_another_size_are_refused_before_the_call():
    """At the first evaluation, before the controlnet or the transformer is called: control
    latents of another token count than the state's, or of a batch neither 1 nor the
    state's (for the union wrapper, named by their index)."""
    transformer = tiny_qwen_image_transformer()
    net = tiny_qwen_image_controlnet(transformer)
    multi = diffusers.QwenImageMultiControlNetModel([net])
    cases = [
        (dict(controlnet_cond=_stand_in()[:, :4]), "as QwenImageControlNetPipeline makes them"),
        (dict(controlnet_cond=_stand_in().repeat(3, 1, 1)), "batch 3"),
        (
            dict(controlnet=multi, controlnet_cond=[_stand_in(), _stand_in()[:, :4]]),
            "controlnet_cond[1] has shape",
        ),
    ]
    noise, cond = _noise(torch.float32), _cond(torch.float32)
    assert_refused_at_first_evaluation(transformer, net, _scheduler(), noise, cond, cases)


# ----------------------------------------------------------------------- edit_image


def _edit(pipe, control, dtype=torch.float64, **options):
    """edit_image on ``pipe`` from source prompts of 5 tokens to targets of 6 (true CFG 4,
    negative prompts of 7 tokens) of test_diffusers_qwen_image's images, under ``control``."""
    return _qwen_edit(pipe, True, dtype, control_image=control, **options)


def test_edit_image_inverts_exactly_under_the_control_image():
    """edit_image on QwenImageControlNetPipeline inverts and regenerates two images under
    one control image: latent_error 0 with a float64 state (measured 0), with a float32 one
    (measured 0) and with the controlnet switched on from 20% to 70% of the steps (measured
    0), the packed control latents of both images in both ODEs, the caller's tensors left as
    they were; another control image gives another edit (relative difference above 1e-3;
    measured 0.06)."""
    pipe = tiny_qwen_image_controlnet_pipeline()
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with untouched(control):
        result = _edit(pipe, control)
    assert result.latent_error == 0.0
    for ode in (result.inversion.ode, result.target):
        assert ode.cond["controlnet_cond"].shape == (BATCH, TOKENS, 16)
    assert _edit(pipe, control, torch.float32).latent_error == 0.0
    switched = _edit(pipe, control, control_guidance_start=0.2, control_guidance_end=0.7)
    assert switched.latent_error == 0.0 and len(switched.target.cond["control_range"]) == 1
    other = _edit(pipe, control.flip(-2))
    assert other.latent_error == 0.0
    moved = (other.edited_latents - result.edited_latents).abs().max()
    assert float(moved / result.edited_latents.abs().max()) > 1e-3


def _target_cond():
    """The pipeline's conditioning of the edit's target: the target prompt under true CFG 4
    with the negative embeddings of 7 tokens, as from_diffusers' cond."""
    target, target_mask = _target()
    negative, negative_mask = _prompt(torch.float32, 2, 7)
    return dict(
        encoder_hidden_states=target,
        encoder_hidden_states_mask=target_mask,
        guidance_scale=TRUE_CFG,
        negative_cond=dict(
            encoder_hidden_states=negative, encoder_hidden_states_mask=negative_mask
        ),
    )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("switched", [False, True], ids=["on", "switched"])
def test_the_edit_is_the_pipelines_run_from_the_inverted_noise(switched, monkeypatch):
    """With a float32 state, edit_image's edited latents are bit for bit what
    QwenImageControlNetPipeline returns from the inverted noise under the target prompt
    (true CFG 4 with the negative embeddings, a scale of 0.6, and the controlnet on from 20%
    to 70% of the steps where switched), given the same control image, its VAE's sample
    replaced by the mean (which edit_image takes, so that its edit is deterministic): the
    control latents the pipeline gives its controlnet are the edit's ODEs', bit for bit."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    pipe = tiny_qwen_image_controlnet_pipeline()
    control = _control_image()
    bounds = dict(control_guidance_start=0.2, control_guidance_end=0.7) if switched else {}
    settings = dict(controlnet_conditioning_scale=0.6, **bounds)
    out = _edit(pipe, control, torch.float32, **settings)
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    cond = _target_cond()
    theirs, seen = _run(pipe, out.inversion.noise.clone(), cond, control, **settings)
    for ode in (out.inversion.ode, out.target):
        assert torch.equal(ode.cond["controlnet_cond"], seen)
    assert torch.equal(out.edited_latents, theirs)


def test_edit_image_refuses_what_it_does_not_map_on_the_controlnet_pipelines():
    """One line, before the transformer, the controlnet or the VAE runs:
    QwenImageControlNetPipeline without control_image, with guess_mode (which the pipeline
    has not) or a tensor control image not at the image's size (named as that pipeline's
    prepare_image); the union wrapper (edit_image maps one controlnet)."""
    pipe = tiny_qwen_image_controlnet_pipeline()
    counters = [Counter(m) for m in (pipe.transformer, pipe.controlnet, pipe.vae)]
    control = torch.zeros(1, 3, 16, 16)
    cases = [
        (pipe, {}, "give control_image"),
        (pipe, dict(control_image=control, guess_mode=True), "guess_mode"),
        (pipe, dict(control_image=control[..., :8]), "(QwenImageControlNetPipeline's prepare"),
        (
            tiny_qwen_image_controlnet_pipeline(multi=True),
            dict(control_image=[control]),
            "QwenImageMultiControlNetModel",
        ),
    ]
    for given, options, field in cases:
        with pytest.raises(ValueError) as exc_info:
            _qwen_edit(given, True, **options)
        _one_line_error(exc_info, field)
    assert all(c.calls == 0 for c in counters)

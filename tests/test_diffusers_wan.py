"""Wan: a text-to-video ``WanTransformer3DModel`` under a flow-matching scheduler, called as
``WanPipeline`` calls it (SD3's call by keyword on video latents ``(batch, C, frames, h,
w)``, guidance in two calls, the conditional one first), Wan 2.2's two experts switched at
the pipeline's boundary, and Wan's own UniPC config of flow sigmas refused with the scheduler
to give instead. WanPipeline takes a second transformer in diffusers 0.35 and newer; the
tests of its two-expert runs are skipped before."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import Counter, assert_flow_run_is_bdia_sample

import bdia

diffusers = pytest.importorskip("diffusers")

from bdia.integrations.diffusers import (  # noqa: E402
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    WAN_SCHEDULER,
    tiny_wan_pipeline,
    tiny_wan_transformer,
)

# UniPCMultistepScheduler builds its sigmas with np.array(tensor, copy=False) on numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

STEPS = 6
GUIDANCE = 5.0  # WanPipeline's default
GUIDANCE_2 = 3.0  # the low-noise expert's, another, so that a swap of the two shows
BOUNDARY = 0.6  # between the tiny grid's timesteps, so that both experts run

needs_experts = pytest.mark.skipif(
    "transformer_2" not in inspect.signature(diffusers.WanPipeline.__init__).parameters,
    reason=f"diffusers {diffusers.__version__}'s WanPipeline takes no transformer_2 or "
    "expand_timesteps (0.35 and newer do)",
)
SHIFT = WAN_SCHEDULER["flow_shift"]


def _flow_scheduler() -> object:
    """The flow-matching scheduler of Wan's shift, which bdia maps in its UniPC's place."""
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)


def _embeds(seed: int) -> torch.Tensor:
    return torch.randn(1, 5, 16, generator=torch.Generator().manual_seed(seed))


def _noise(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Video latents of 2 frames of 8 x 8 (the tiny VAE's latents of 5 frames of 16 x 16)."""
    return torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)


def _cond(guidance: float) -> dict:
    cond: dict = {"encoder_hidden_states": _embeds(0)}
    if guidance > 1:
        cond["guidance_scale"] = guidance
        cond["negative_cond"] = {"encoder_hidden_states": _embeds(1)}
    return cond


def _run(pipe, noise: torch.Tensor, guidance: float, **options) -> torch.Tensor:
    """WanPipeline's latents from ``noise`` for ``_cond(guidance)``'s prompt."""
    cond = _cond(guidance)
    with torch.no_grad():
        return pipe(
            prompt_embeds=cond["encoder_hidden_states"],
            negative_prompt_embeds=cond.get("negative_cond", {}).get("encoder_hidden_states"),
            height=16,
            width=16,
            num_frames=5,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            latents=noise,
            output_type="latent",
            **options,
        ).frames


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("guidance", [GUIDANCE, 1.0], ids=["guided", "unguided"])
def test_wan_pipeline_with_flow_match_euler_is_bdia_sample_euler(guidance):
    """WanPipeline with FlowMatchEulerDiscreteScheduler(shift=3) gives the latents of
    bdia.sample with euler on from_diffusers/diffusers_grid of that scheduler, bit for bit
    (tolerance 0: the same float32 operations in the same order), under guidance (two calls
    a step, the conditional one first, as the pipeline makes them) and without (one)."""
    pipe = tiny_wan_pipeline(_flow_scheduler())
    noise = _noise()
    latents = _run(pipe, noise, guidance)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_cond(guidance))
    ts = diffusers_grid(pipe.scheduler, STEPS)
    calls = Counter(pipe.transformer)
    with torch.no_grad():
        out = bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)
    assert torch.equal(out, latents)
    assert calls.calls == STEPS * (2 if guidance > 1 else 1)


def test_the_conditional_call_comes_first():
    """The order of the two calls is the pipeline's: a transformer that answers its first
    call of each evaluation with the conditional prompt's embeddings would see them first."""
    net = tiny_wan_transformer()
    seen: list[torch.Tensor] = []
    hook = net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]),
        with_kwargs=True,
    )
    cond = _cond(GUIDANCE)
    ode = from_diffusers(net, _flow_scheduler(), **cond)
    with torch.no_grad():
        ode.f(_noise(), torch.tensor([0.5]), **ode.cond)
    hook.remove()
    assert len(seen) == 2
    assert torch.equal(seen[0], cond["encoder_hidden_states"])
    assert torch.equal(seen[1], cond["negative_cond"]["encoder_hidden_states"])


def test_bdia_scheduler_in_wan_pipeline_is_bdia_sample_and_inverts():
    """WanPipeline with BDIAScheduler.from_config(the flow-matching config of Wan's shift,
    gamma=0.9) gives the latents and the final pair (low words included) of bdia.sample with
    bdia(euler, 0.9), bit for bit; the inverse scheduler's loop, with the pipeline's two
    guided calls, returns the starting noise bit for bit, and so does bdia.invert."""
    pipe = tiny_wan_pipeline(_flow_scheduler())
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise()
    latents = _run(pipe, noise, GUIDANCE)
    cond = _cond(GUIDANCE)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = diffusers_grid(pipe.scheduler, STEPS)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)

    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(STEPS)
    embeds = cond["encoder_hidden_states"]
    negative = cond["negative_cond"]["encoder_hidden_states"]
    with torch.no_grad():
        x = inverse.begin(pair)
        for t in inverse.timesteps:
            c, u = (
                pipe.transformer(
                    hidden_states=x,
                    timestep=t.expand(1),
                    encoder_hidden_states=e,
                    return_dict=False,
                )[0]
                for e in (embeds, negative)
            )
            x = inverse.step(u + GUIDANCE * (c - u), t, x).prev_sample
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert torch.equal(inverse.pair.earlier, noise)
    assert torch.equal(back.earlier, noise)


def _experts_ode(pipe, **extra):
    return from_diffusers(
        pipe.transformer,
        pipe.scheduler,
        transformer_2=pipe.transformer_2,
        boundary_ratio=BOUNDARY,
        guidance_scale_2=GUIDANCE_2,
        **_cond(GUIDANCE),
        **extra,
    )


@needs_experts
def test_wan22_pipeline_with_two_experts_is_bdia_sample_euler():
    """WanPipeline with a second transformer and boundary_ratio 0.6 (Wan 2.2's experts) and
    FlowMatchEulerDiscreteScheduler(shift=3) gives the latents of bdia.sample with euler on
    from_diffusers(transformer, ..., transformer_2=, boundary_ratio=, guidance_scale_2=),
    bit for bit: the first transformer at the steps whose float32 timestep is at least
    600 under guidance 5, the second below it under guidance 3, two calls each."""
    pipe = tiny_wan_pipeline(_flow_scheduler(), boundary_ratio=BOUNDARY)
    noise = _noise()
    latents = _run(pipe, noise, GUIDANCE, guidance_scale_2=GUIDANCE_2)
    high = int((pipe.scheduler.timesteps >= BOUNDARY * 1000).sum())
    assert 0 < high < STEPS
    ode = _experts_ode(pipe)
    ts = diffusers_grid(pipe.scheduler, STEPS)
    first, second = Counter(pipe.transformer), Counter(pipe.transformer_2)
    with torch.no_grad():
        out = bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)
    assert torch.equal(out, latents)
    assert (first.calls, second.calls) == (2 * high, 2 * (STEPS - high))


@needs_experts
def test_bdia_scheduler_in_wan22_pipeline_is_bdia_sample_and_inverts():
    """With the two experts, BDIAScheduler in WanPipeline gives bdia(euler, 0.9)'s latents
    and final pair bit for bit, and bdia.invert returns the noise bit for bit; the second
    expert's weights are part of the ODE's fingerprint, which a pair is checked against."""
    pipe = tiny_wan_pipeline(_flow_scheduler(), boundary_ratio=BOUNDARY)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise()
    latents = _run(pipe, noise, GUIDANCE, guidance_scale_2=GUIDANCE_2)
    ode = _experts_ode(pipe)
    ts = diffusers_grid(pipe.scheduler, STEPS)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert torch.equal(back.earlier, noise)
    before = ode.fingerprint()
    with torch.no_grad():
        next(pipe.transformer_2.parameters()).add_(1.0)
    assert _experts_ode(pipe).fingerprint() != before


@needs_experts
def test_wan22_ti2v_pipeline_with_expanded_timesteps_is_bdia_sample_euler():
    """WanPipeline(expand_timesteps=True) (Wan 2.2 TI2V-5B's text-to-video) gives every
    latent token of 2 x 2 patches its own copy of the timestep; from_diffusers with
    expand_timesteps=True gives the transformer the same, and bdia.sample with euler is the
    pipeline's run bit for bit. One timestep per sample moves the transformer's output in
    its last bits, so without the flag the runs differ (a check that the flag is needed)."""
    pipe = tiny_wan_pipeline(_flow_scheduler(), expand_timesteps=True)
    assert pipe.config.expand_timesteps
    noise = _noise()
    latents = _run(pipe, noise, GUIDANCE)
    ts = diffusers_grid(pipe.scheduler, STEPS)
    outs = []
    for expand in (True, False):
        ode = from_diffusers(
            pipe.transformer, pipe.scheduler, expand_timesteps=expand, **_cond(GUIDANCE)
        )
        with torch.no_grad():
            outs.append(bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False))
    assert torch.equal(outs[0], latents)
    assert not torch.equal(outs[1], latents)


def test_expanded_timesteps_are_wans_alone():
    from bdia.integrations.diffusers.tiny import tiny_sd3_transformer

    with pytest.raises(ValueError, match="expand_timesteps gives a Wan transformer"):
        from_diffusers(
            tiny_sd3_transformer(),
            _flow_scheduler(),
            expand_timesteps=True,
            encoder_hidden_states=torch.zeros(1, 5, 16),
            pooled_projections=torch.zeros(1, 8),
        )
    with pytest.raises(TypeError, match="expand_timesteps must be a bool"):
        from_diffusers(
            tiny_wan_transformer(),
            _flow_scheduler(),
            expand_timesteps="yes",
            encoder_hidden_states=_embeds(0),
        )


def test_the_experts_switch_at_the_float32_boundary():
    """The first transformer runs where the float32 timestep sigma N is at least the float32
    boundary_ratio N, the second below: at sigma 0.6 (timestep 600 in float32, the boundary)
    the first, at the next float32 sigma below it the second."""
    high, low = tiny_wan_transformer(), tiny_wan_transformer(seed=1)
    ode = from_diffusers(
        high, _flow_scheduler(), transformer_2=low, boundary_ratio=BOUNDARY, **_cond(1.0)
    )
    first, second = Counter(high), Counter(low)
    below = torch.nextafter(torch.tensor(0.6), torch.tensor(0.0))
    with torch.no_grad():
        ode.f(_noise(), torch.tensor([0.6]), **ode.cond)
        assert (first.calls, second.calls) == (1, 0)
        ode.f(_noise(), below.reshape(1), **ode.cond)
        assert (first.calls, second.calls) == (1, 1)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(transformer_2="net"), "come together"),
        (dict(boundary_ratio=0.5), "come together"),
        (dict(guidance_scale_2=2.0), "guidance_scale_2 is the guidance"),
        (
            dict(transformer_2="net", boundary_ratio=1.5),
            r"boundary_ratio must be a number in \(0, 1\)",
        ),
        (dict(transformer_2="bf16", boundary_ratio=0.5), "transformer_2 is in torch.bfloat16"),
        (dict(transformer_2="sd3", boundary_ratio=0.5), "transformer_2 is a SD3Transformer2DModel"),
    ],
    ids=["no_ratio", "no_expert", "no_expert_guidance", "ratio", "dtype", "class"],
)
def test_a_second_expert_that_does_not_fit_is_refused(options, match):
    from bdia.integrations.diffusers.tiny import tiny_sd3_transformer

    made = {
        "net": lambda: tiny_wan_transformer(seed=1),
        "bf16": lambda: tiny_wan_transformer(seed=1, dtype=torch.bfloat16),
        "sd3": tiny_sd3_transformer,
    }
    if "transformer_2" in options:
        options = dict(options, transformer_2=made[options["transformer_2"]]())
    net = tiny_wan_transformer()
    calls = Counter(net)
    with pytest.raises(ValueError, match=match) as info:
        from_diffusers(net, _flow_scheduler(), encoder_hidden_states=_embeds(0), **options)
    assert "\n" not in str(info.value)
    assert calls.calls == 0


def test_a_second_expert_beside_another_family_is_refused():
    from bdia.integrations.diffusers.tiny import tiny_sana_transformer

    with pytest.raises(ValueError, match="beside a WanTransformer3DModel"):
        from_diffusers(
            tiny_sana_transformer(),
            _flow_scheduler(),
            transformer_2=tiny_wan_transformer(),
            boundary_ratio=0.5,
            encoder_hidden_states=torch.zeros(1, 5, 16),
        )


def test_a_bfloat16_wan_transformer_runs_under_a_float64_state_and_inverts():
    """Wan's transformers ship in bfloat16: under a float64 state the ODE runs it in its own
    dtype, and bdia(euler, 0.96)'s round trip returns the video noise bit for bit."""
    net = tiny_wan_transformer(dtype=torch.bfloat16)
    ode = from_diffusers(net, _flow_scheduler(), **_cond(GUIDANCE))
    assert ode.model_dtype == torch.bfloat16
    noise = _noise(torch.float64)
    ts = diffusers_grid(_flow_scheduler(), STEPS)
    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True, progress=False)
        back = bdia.invert(ode, solver, pair, ts, progress=False)
    assert pair.later.dtype == torch.float64 and torch.isfinite(pair.later).all()
    assert torch.equal(back.earlier, noise)


def test_a_bfloat16_wan_transformer_as_loaded_runs_in_bfloat16():
    """from_pretrained(torch_dtype=torch.bfloat16) keeps the modules Wan names in
    _keep_in_fp32_modules in float32 (made so here: loading so needs accelerate), and
    scale_shift_table, a float32 parameter, comes first: the ODE takes the model's own
    dtype, bfloat16, as WanPipeline reads it (transformer.dtype), not the first parameter's,
    which would hand the bfloat16 patch embedding a float32 state."""
    net = tiny_wan_transformer(dtype=torch.bfloat16)
    kept = net._keep_in_fp32_modules
    with torch.no_grad():
        for name, param in net.named_parameters():
            if any(part in name for part in kept):
                param.data = param.data.float()
    first = next(net.parameters())
    assert first.dtype == torch.float32 and net.dtype == torch.bfloat16
    ode = from_diffusers(net, _flow_scheduler(), **_cond(GUIDANCE))
    assert ode.model_dtype == torch.bfloat16
    with torch.no_grad():
        velocity = ode.f(_noise(torch.bfloat16), torch.tensor([0.5]), **ode.cond)
    assert velocity.shape == _noise().shape and torch.isfinite(velocity).all()


# ------------------------------------------------------------------------------ refusals


def test_wans_unipc_config_is_refused_naming_the_scheduler_to_give():
    """Wan's pipelines ship UniPCMultistepScheduler with use_flow_sigmas, whose transformer
    calls are at the integer part of sigma N: from_diffusers, diffusers_grid and both BDIA
    schedulers refuse it in one line naming the flow-matching scheduler of its flow_shift."""
    net, scheduler = tiny_wan_transformer(), diffusers.UniPCMultistepScheduler(**WAN_SCHEDULER)
    calls = [
        lambda: from_diffusers(net, scheduler, encoder_hidden_states=_embeds(0)),
        lambda: diffusers_grid(scheduler, STEPS),
        lambda: BDIAScheduler.from_config(scheduler.config, gamma=0.9),
        lambda: BDIAInverseScheduler.from_config(scheduler.config),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="use_flow_sigmas = True") as info:
            call()
        message = str(info.value)
        assert "FlowMatchEulerDiscreteScheduler(shift=3.0, num_train_timesteps=1000)" in message
        assert "\n" not in message


def test_an_image_to_video_transformer_is_refused():
    net = tiny_wan_transformer(image_dim=8)
    with pytest.raises(ValueError, match=r"has image_dim = 8: it takes an image"):
        from_diffusers(net, _flow_scheduler(), encoder_hidden_states=_embeds(0))


@pytest.mark.parametrize(
    "given,match",
    [
        (
            dict(encoder_hidden_states_image=torch.zeros(1, 4, 8)),
            "cond key 'encoder_hidden_states_image'",
        ),
        (dict(encoder_attention_mask=torch.ones(1, 5)), "cond key 'encoder_attention_mask'"),
        (dict(mask=torch.ones(1, 1, 8, 8)), "mask was given for a WanTransformer3DModel"),
    ],
    ids=["image_embeds", "mask_key", "inpainting"],
)
def test_inputs_wans_pipeline_does_not_give_are_refused(given, match):
    net = tiny_wan_transformer()
    calls = Counter(net)
    with pytest.raises(ValueError, match=match) as info:
        from_diffusers(net, _flow_scheduler(), encoder_hidden_states=_embeds(0), **given)
    assert "\n" not in str(info.value)
    assert calls.calls == 0


def test_wans_transformer_needs_the_prompt():
    with pytest.raises(ValueError, match="needs the prompt: give encoder_hidden_states"):
        from_diffusers(tiny_wan_transformer(), _flow_scheduler())

"""Wan: a text-to-video ``WanTransformer3DModel`` under a flow-matching scheduler, called as
``WanPipeline`` calls it (SD3's call by keyword on video latents ``(batch, C, frames, h,
w)``, guidance in two calls, the conditional one first), and Wan's own UniPC config of flow
sigmas refused with the scheduler to give instead."""

from __future__ import annotations

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


def _run(pipe, noise: torch.Tensor, guidance: float) -> torch.Tensor:
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


def test_a_bfloat16_wan_transformer_as_loaded_runs_in_bfloat16(tmp_path):
    """from_pretrained keeps some of Wan's modules in float32 (its _keep_in_fp32_modules),
    and scale_shift_table, a float32 parameter, comes first: the ODE takes the model's own
    dtype, bfloat16, as WanPipeline reads it (transformer.dtype), not the first parameter's,
    which would hand the bfloat16 patch embedding a float32 state."""
    tiny_wan_transformer().save_pretrained(tmp_path)
    net = diffusers.WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    first = next(net.parameters())
    assert first.dtype == torch.float32 and net.dtype == torch.bfloat16
    ode = from_diffusers(net.eval(), _flow_scheduler(), **_cond(GUIDANCE))
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

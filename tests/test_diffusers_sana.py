"""Sana: ``SanaTransformer2DModel`` under a flow-matching scheduler, called as ``SanaPipeline``
calls it (SD3's call by keyword, the prompt's attention mask, the timestep times the config's
``timestep_scale``, the learned variance's half dropped), and Sana's own DPM-Solver config of
flow sigmas refused with the scheduler to give instead. SanaPipeline imports transformers'
Gemma 2 (4.42 and newer); where it cannot be imported, the tests of the pipeline's runs are
skipped and those of the transformer alone still run."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_flow_run_is_bdia_sample

import bdia

diffusers = pytest.importorskip("diffusers")

from bdia.integrations.diffusers import (  # noqa: E402
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    SANA_SCHEDULER,
    tiny_sana_pipeline,
    tiny_sana_transformer,
)


def _pipeline_unavailable() -> str | None:
    """Why SanaPipeline cannot be imported here, or None."""
    try:
        diffusers.SanaPipeline  # noqa: B018 - diffusers imports the pipeline's module here
    except (ImportError, RuntimeError) as error:
        return (
            f"diffusers {diffusers.__version__} cannot import SanaPipeline here: "
            f"{str(error).strip().splitlines()[-1]}"
        )
    return None


# DPMSolverMultistepScheduler builds its sigmas with np.array(tensor, copy=False) on numpy 2.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

_UNAVAILABLE = _pipeline_unavailable()
needs_pipeline = pytest.mark.skipif(_UNAVAILABLE is not None, reason=_UNAVAILABLE or "")

STEPS = 6
GUIDANCE = 4.5
SHIFT = SANA_SCHEDULER["flow_shift"]


def _flow_scheduler() -> object:
    """The flow-matching scheduler of Sana's shift, which bdia maps in its DPM-Solver's place."""
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=SHIFT)


def _prompt(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of shape (1, 6, 16) and their mask, the last two tokens padding: a mask
    that the transformer's cross-attention must read for the runs to agree."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    return torch.randn(1, 6, 16, generator=g), mask


def _noise(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(dtype)


def _cond(guidance: float) -> dict:
    embeds, mask = _prompt(0)
    cond: dict = {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}
    if guidance > 1:
        negative, negative_mask = _prompt(1)
        cond["guidance_scale"] = guidance
        cond["negative_cond"] = {
            "encoder_hidden_states": negative,
            "encoder_attention_mask": negative_mask,
        }
    return cond


def _run(pipe, noise: torch.Tensor, guidance: float) -> torch.Tensor:
    """SanaPipeline's latents from ``noise`` for ``_cond(guidance)``'s prompt."""
    cond = _cond(guidance)
    negative = cond.get("negative_cond", {})
    with torch.no_grad():
        return pipe(
            prompt_embeds=cond["encoder_hidden_states"],
            prompt_attention_mask=cond["encoder_attention_mask"],
            negative_prompt=None,
            negative_prompt_embeds=negative.get("encoder_hidden_states"),
            negative_prompt_attention_mask=negative.get("encoder_attention_mask"),
            height=32,
            width=32,
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            latents=noise,
            output_type="latent",
            use_resolution_binning=False,
        ).images


@needs_pipeline
@pytest.mark.first_case_by_default
@pytest.mark.parametrize(
    "guidance,overrides",
    [
        (GUIDANCE, {}),
        (1.0, {}),
        (GUIDANCE, dict(out_channels=8)),
        (GUIDANCE, dict(timestep_scale=0.7)),
    ],
    ids=["guided", "unguided", "learned_variance", "timestep_scale"],
)
def test_sana_pipeline_with_flow_match_euler_is_bdia_sample_euler(guidance, overrides):
    """SanaPipeline with FlowMatchEulerDiscreteScheduler(shift=3) gives the latents of
    bdia.sample with euler on from_diffusers/diffusers_grid of that scheduler, bit for bit
    (tolerance 0: the same float32 operations in the same order): under guidance (one call
    on the batch [negative, positive], each with its own attention mask) and without, with a
    transformer whose second half of output is a learned variance (out_channels 8, which the
    pipeline drops) and with a timestep_scale other than 1 (the pipeline multiplies the
    scheduler's timestep by it)."""
    pipe = tiny_sana_pipeline(_flow_scheduler(), **overrides)
    noise = _noise()
    latents = _run(pipe, noise, guidance)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_cond(guidance))
    ts = diffusers_grid(pipe.scheduler, STEPS)
    with torch.no_grad():
        out = bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)
    assert torch.equal(out, latents)


def test_timestep_scale_reaches_the_transformer():
    """The case above could pass with a timestep_scale the adapter ignores only if the
    transformer ignored its timestep: the same state and time give another velocity at
    another timestep_scale, and the adapter's call at scale 0.7 is the transformer's own at
    timestep sigma N times 0.7 (sigma 0.5, whose sigma N is exact in float32)."""
    x, t = _noise(), torch.tensor([0.5])
    cond = _cond(1.0)
    plain = from_diffusers(tiny_sana_transformer(), _flow_scheduler(), **cond).f
    scaled_net = tiny_sana_transformer(timestep_scale=0.7)
    scaled = from_diffusers(scaled_net, _flow_scheduler(), **cond).f
    with torch.no_grad():
        v_plain, v_scaled = plain(x, t, **cond), scaled(x, t, **cond)
        direct = scaled_net(
            hidden_states=x, timestep=torch.tensor([500.0]) * 0.7, return_dict=False, **cond
        )[0]
    assert not torch.equal(v_plain, v_scaled)
    assert torch.equal(v_scaled, direct)


@needs_pipeline
def test_bdia_scheduler_in_sana_pipeline_is_bdia_sample_and_inverts():
    """SanaPipeline with BDIAScheduler.from_config(the flow-matching config of Sana's shift,
    gamma=0.9) gives the latents and the final pair (low words included) of bdia.sample with
    bdia(euler, 0.9), bit for bit; the inverse scheduler's loop, with the pipeline's guided
    calls, returns the starting noise bit for bit, and so does bdia.invert from the pair."""
    pipe = tiny_sana_pipeline(_flow_scheduler())
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise()
    latents = _run(pipe, noise, GUIDANCE)
    cond = _cond(GUIDANCE)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = diffusers_grid(pipe.scheduler, STEPS)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)

    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(STEPS)
    negative = cond["negative_cond"]
    embeds = torch.cat([negative["encoder_hidden_states"], cond["encoder_hidden_states"]])
    mask = torch.cat([negative["encoder_attention_mask"], cond["encoder_attention_mask"]])
    with torch.no_grad():
        x = inverse.begin(pair)
        for t in inverse.timesteps:
            out = pipe.transformer(
                torch.cat([x] * 2),
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                timestep=t.expand(2) * pipe.transformer.config.timestep_scale,
                return_dict=False,
            )[0].float()
            u, c = out.chunk(2)
            x = inverse.step(u + GUIDANCE * (c - u), t, x).prev_sample
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert torch.equal(inverse.pair.earlier, noise)
    assert torch.equal(back.earlier, noise)


def test_a_bfloat16_sana_transformer_runs_under_a_float64_state_and_inverts():
    """Sana's transformers ship in bfloat16: under a float64 state the ODE runs it in its own
    dtype (the state cast down, the velocity cast back), and bdia(euler, 0.96)'s round trip
    returns the noise bit for bit, the low word carrying what bfloat16 rounds off."""
    net = tiny_sana_transformer(dtype=torch.bfloat16)
    ode = from_diffusers(net, _flow_scheduler(), **_cond(GUIDANCE))
    assert ode.model_dtype == torch.bfloat16
    assert ode.cond["encoder_hidden_states"].dtype == torch.bfloat16
    assert ode.cond["encoder_attention_mask"].dtype == torch.int64  # a mask is not cast
    noise = _noise(torch.float64)
    ts = diffusers_grid(_flow_scheduler(), STEPS)
    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True, progress=False)
        back = bdia.invert(ode, solver, pair, ts, progress=False)
    assert pair.later.dtype == torch.float64 and torch.isfinite(pair.later).all()
    assert torch.equal(back.earlier, noise)


@pytest.mark.parametrize("steps", [2, 6, 20, 50])
def test_sanas_dpm_solver_sigmas_come_from_the_flow_scheduler_given_them_unshifted(steps):
    """docs/diffusers.md: the flow-matching scheduler of Sana's shift, given the unshifted
    sigmas (1 - 1/N)(1 - k/n), makes the sigmas of Sana's DPM-Solver within 1.2e-7: each side
    rounds the shifted values to float32 (6e-8 an ulp below 1), computed in another order."""
    dpm = diffusers.DPMSolverMultistepScheduler(**SANA_SCHEDULER)
    dpm.set_timesteps(steps)
    n = dpm.config.num_train_timesteps
    unshifted = [(1 - 1 / n) * (1 - k / steps) for k in range(steps)]
    grid = diffusers_grid(_flow_scheduler(), steps, sigmas=unshifted)
    assert grid.shape == dpm.sigmas.shape and float(grid[-1]) == 0.0
    assert float((grid - dpm.sigmas.double()).abs().max()) <= 1.2e-7


# ------------------------------------------------------------------------------ refusals


def test_sanas_dpm_solver_config_is_refused_naming_the_scheduler_to_give():
    """Sana's pipelines ship DPMSolverMultistepScheduler with use_flow_sigmas, which calls the
    transformer at the integer part of sigma N: no bdia run is that scheduler's. from_diffusers,
    diffusers_grid and both BDIA schedulers refuse it in one line that names the
    flow-matching scheduler of its flow_shift."""
    net, scheduler = (
        tiny_sana_transformer(),
        diffusers.DPMSolverMultistepScheduler(**SANA_SCHEDULER),
    )
    embeds, _ = _prompt(0)
    calls = [
        lambda: from_diffusers(net, scheduler, encoder_hidden_states=embeds),
        # As scheduler_config.json holds it, its class named.
        lambda: from_diffusers(
            net,
            {**scheduler.config, "_class_name": "DPMSolverMultistepScheduler"},
            encoder_hidden_states=embeds,
        ),
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


def test_a_noise_table_scheduler_is_refused_for_sanas_transformer():
    embeds, _ = _prompt(0)
    with pytest.raises(ValueError, match="flow-matching model .* DDIMScheduler"):
        from_diffusers(
            tiny_sana_transformer(), diffusers.DDIMScheduler(), encoder_hidden_states=embeds
        )


def test_sana_sprints_guidance_embedding_is_refused():
    embeds, _ = _prompt(0)
    net = tiny_sana_transformer(guidance_embeds=True)
    with pytest.raises(
        ValueError,
        match=r"has guidance_embeds = True: it embeds a guidance scale \(as SANA-Sprint's\)",
    ):
        from_diffusers(net, _flow_scheduler(), encoder_hidden_states=embeds)


@pytest.mark.parametrize(
    "given,match",
    [
        (dict(pooled_projections=torch.zeros(1, 8)), "cond key 'pooled_projections'"),
        (dict(mask=torch.ones(1, 1, 8, 8)), "mask was given for a SanaTransformer2DModel"),
        (dict(image_latents=torch.ones(1, 4, 16)), "image_latents was given"),
        (dict(hidden_states=torch.ones(1)), "'hidden_states' is set by the adapter"),
    ],
    ids=["sd3_key", "mask", "image_latents", "reserved"],
)
def test_inputs_sanas_pipeline_does_not_give_are_refused(given, match):
    embeds, mask = _prompt(0)
    cond = dict(encoder_hidden_states=embeds, encoder_attention_mask=mask, **given)
    with pytest.raises(ValueError, match=match) as info:
        from_diffusers(tiny_sana_transformer(), _flow_scheduler(), **cond)
    assert "\n" not in str(info.value)


def test_sanas_transformer_needs_the_prompt():
    with pytest.raises(ValueError, match="needs the prompt: give encoder_hidden_states"):
        from_diffusers(tiny_sana_transformer(), _flow_scheduler())

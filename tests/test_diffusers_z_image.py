"""bdia.integrations.diffusers with Z-Image: ZImageTransformer2DModel and
FlowMatchEulerDiscreteScheduler (shift 3, Z-Image-Turbo's) as a rectified-flow ODE on
ZImagePipeline's image-shaped latents.

The transformer is a tiny random ``ZImageTransformer2DModel`` (``tiny_z_image_transformer``);
the pipeline (``tiny_z_image_pipeline``) has no Qwen3 text encoder: it takes its prompt
embeddings directly, a list of per-sample tensors of their own lengths. As for Flux and
Qwen-Image, parity with the pipeline is checked in float32, where both sides make the same
float operations on the same inputs and agree bit for bit; exactness of the inversion is
checked in float64. ZImageImg2ImgPipeline runs the same transformer ODE on the grid's tail,
from the image's latents noised to its first timestep. ZImagePipeline and
ZImageImg2ImgPipeline are in diffusers 0.36 and newer; elsewhere the module is skipped.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from _pipeline_runs import assert_bdia_run_inverts
from conftest import (
    assert_flow_img2img_is_bdia_sample,
    flow_img2img_runs,
    flow_round_trip_error,
)

if not hasattr(diffusers, "ZImagePipeline"):
    pytest.skip(
        f"diffusers {diffusers.__version__} has no ZImagePipeline (0.36 and newer have it)",
        allow_module_level=True,
    )

import bdia  # noqa: E402
from bdia.integrations.diffusers import (  # noqa: E402
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers._z_image import _z_image_grid_inputs  # noqa: E402
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    Z_IMAGE_SCHEDULER,
    tiny_z_image_pipeline,
    tiny_z_image_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N_STEPS = 8
BATCH = 2
CFG = 3.0  # the pipeline's guidance_scale: c + 3 (c - u)
# The CFG settings the parity tests run: none (Z-Image-Turbo's guidance_scale 0), plain CFG,
# CFG with the norm capped at the conditional one's, and CFG dropped after the steps whose
# (1000 - t) / 1000 passes 0.3 (the last 3 of 8 on this grid).
OPTIONS = {
    "no-cfg": dict(guidance_scale=0.0),
    "cfg": dict(guidance_scale=CFG),
    "normalized": dict(guidance_scale=CFG, cfg_normalization=1.0),
    "truncated": dict(guidance_scale=CFG, cfg_truncation=0.3),
}


def _sigmas(steps=N_STEPS):
    """ZImagePipeline's unshifted sigmas: torch.linspace(1, 1 / n, n) in float32, as a list."""
    return torch.linspace(1.0, 1 / steps, steps).tolist()


# Whether the installed ZImagePipeline passes its sigmas (diffusers 0.39 on) or sets the
# scheduler's sigma_min to 0 and runs its own spacing to 0, then a step from 0 to 0 (0.36
# to 0.38), which the grid leaves out: one step fewer than the pipeline's calls.
PIPELINE_SIGMAS = (
    _z_image_grid_inputs(diffusers.FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER), 1)[1]
    is not None
)
OLD_PIPELINES = (
    f"diffusers {diffusers.__version__}'s Z-Image pipelines set the scheduler's sigma_min to 0, "
    "which BDIAScheduler refuses (0.39 and newer pass their sigmas)"
)


def _grid(scheduler, steps=N_STEPS):
    """diffusers_grid of the installed ZImagePipeline's run: with its sigmas (its mu is
    ignored by a scheduler that does not shift dynamically, as Z-Image's does not), or in
    diffusers 0.36 to 0.38 the scheduler's own spacing to sigma_min = 0."""
    sched, sigmas = _z_image_grid_inputs(scheduler, steps)
    return diffusers_grid(sched, steps, sigmas=sigmas)


def _noise(dtype):
    """ZImagePipeline's state: image-shaped latents (BATCH, 4, 8, 8) of 16 x 16 images."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(BATCH, 4, 8, 8, generator=g).to(dtype)


def _prompts(dtype, seed, lengths):
    """Per-sample prompt embeddings of the given token counts, width 16, as
    ZImagePipeline.encode_prompt returns them (each prompt's tokens, no padding)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 16, generator=g).to(dtype) for n in lengths]


def _cond(dtype, options):
    """from_diffusers' conditioning: prompts of 5 and 3 tokens, and for CFG negative prompts
    of 7 and 2 tokens, with ``options``' guidance_scale, cfg_normalization, cfg_truncation."""
    cond = dict(cap_feats=_prompts(dtype, 1, (5, 3)), **options)
    if options["guidance_scale"] > 0:
        cond["negative_cond"] = dict(cap_feats=_prompts(dtype, 2, (7, 2)))
    return cond


def _pipeline_latents(pipe, noise, cond, **options):
    """ZImagePipeline's latents from ``noise`` for ``cond``'s prompts and CFG settings,
    16 x 16 images; ``options`` are further arguments of the call (img2img's ``image``,
    ``strength`` and ``generator``)."""
    names = ("guidance_scale", "cfg_normalization", "cfg_truncation")
    settings = {k: cond[k] for k in names if k in cond}
    if "negative_cond" in cond:
        options["negative_prompt_embeds"] = cond["negative_cond"]["cap_feats"]
    return pipe(
        prompt_embeds=cond["cap_feats"],
        latents=noise,
        num_inference_steps=N_STEPS,
        height=16,
        width=16,
        output_type="latent",
        **settings,
        **options,
    ).images


class _Batches:
    """The latents' count of each transformer call (twice the batch under CFG)."""

    def __init__(self, module):
        self.sizes = []
        module.register_forward_pre_hook(lambda m, args: self.sizes.append(len(args[0])))


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", list(OPTIONS))
def test_z_image_pipeline_gives_bdia_euler_latents(name):
    """ZImagePipeline itself (tiny parts, prompts of two lengths, with or without CFG 3,
    normalised or truncated, negative prompts of other lengths) returns the latents of
    bdia.sample with euler on from_diffusers / diffusers_grid(sigmas=), bit for bit in
    float32: the grid holds the scheduler's float32 sigmas (shift 3 of the pipeline's
    torch.linspace sigmas), the transformer gets the list of per-sample latents, the
    timestep (1000 - t) / 1000 and the prompts' list, its output is negated, and CFG makes
    the pipeline's one call on the batch twice over, c + g (c - u) sample by sample, the
    norm cap and the truncation at the steps the pipeline truncates."""
    pipe = tiny_z_image_pipeline()
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, OPTIONS[name])
    seen = _Batches(pipe.transformer)
    latents = _pipeline_latents(pipe, noise, cond)
    ts = _grid(pipe.scheduler)
    made = [float(s) for s in pipe.scheduler.sigmas]
    assert ts.tolist() == (made if PIPELINE_SIGMAS else made[:-1])
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0
    # Steps with CFG's doubled batch (the older grid passes the bound a step sooner).
    cfg = {"no-cfg": 0, "truncated": 5 if PIPELINE_SIGMAS else 4}.get(name, N_STEPS)
    assert seen.sizes == [2 * BATCH] * cfg + [BATCH] * (N_STEPS - cfg)

    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    assert isinstance(ode.schedule, bdia.RectifiedFlow) and ode.prediction == "flow"
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)
    assert seen.sizes[N_STEPS:] == seen.sizes[: len(ts) - 1]  # the pipeline's calls
    assert torch.equal(ours, latents)


def test_the_tiny_transformers_pad_tokens_are_zero():
    """tiny_z_image_transformer's pad tokens are zero on every release (diffusers 0.36 to
    0.38 leave them torch.empty, uninitialised memory that made runs differ, even NaN)."""
    net = tiny_z_image_transformer(dtype=torch.float64)
    for name in ("x_pad_token", "cap_pad_token"):
        assert torch.equal(getattr(net, name), torch.zeros(1, 32, dtype=torch.float64))


def test_the_cfg_options_change_the_run():
    """The normalisation and the truncation are not idle on the tiny pipeline: each run's
    latents differ from plain CFG's (the parity above checks something)."""
    pipe = tiny_z_image_pipeline()
    noise = _noise(torch.float32)
    runs = {
        name: _pipeline_latents(pipe, noise.clone(), _cond(torch.float32, OPTIONS[name]))
        for name in ("cfg", "normalized", "truncated")
    }
    assert not torch.equal(runs["normalized"], runs["cfg"])
    assert not torch.equal(runs["truncated"], runs["cfg"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_transformer_sees_the_pipelines_arguments(dtype):
    """At every step the transformer gets ZImagePipeline's arguments bit for bit: the
    latents in its dtype as a list of (4, 1, 8, 8), twice over under CFG; the float32
    timestep (1000 - t.expand(batch)) / 1000, repeated under CFG (a bfloat16 transformer
    too: the pipeline does not cast it); the prompts' list, then the negative prompts',
    in its dtype."""
    transformer = tiny_z_image_transformer(dtype=dtype)
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, k: seen.append(a), with_kwargs=True)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER)
    cond = _cond(torch.float32, OPTIONS["cfg"])
    ode = from_diffusers(transformer, scheduler, **cond)
    assert ode.model_dtype == dtype
    noise = _noise(torch.float32)
    with torch.no_grad():
        bdia.sample(ode, bdia.get_solver("euler"), noise, _grid(scheduler), progress=False)
    scheduler, sigmas = _z_image_grid_inputs(scheduler, N_STEPS)
    scheduler.set_timesteps(N_STEPS, sigmas=sigmas)
    assert len(seen) == len(_grid(scheduler)) - 1
    prompts = cond["cap_feats"] + cond["negative_cond"]["cap_feats"]
    first, tau, caps = seen[0]
    assert [x.shape for x in first] == [(4, 1, 8, 8)] * 2 * BATCH
    assert all(x.dtype == dtype for x in first)
    assert torch.equal(first[0], noise[0].unsqueeze(1).to(dtype))
    assert torch.equal(first[BATCH + 1], noise[1].unsqueeze(1).to(dtype))
    for k, t in enumerate(scheduler.timesteps[: len(seen)]):
        _, tau, caps = seen[k]
        assert torch.equal(tau, ((1000 - t.expand(BATCH)) / 1000).repeat(2))
        assert tau.dtype == torch.float32
        assert len(caps) == 2 * BATCH
        assert all(torch.equal(c, p.to(dtype)) for c, p in zip(caps, prompts))


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", list(OPTIONS))
def test_bdia_euler_inverts_to_float64_rounding(name):
    """bdia(euler, 0.96) on Z-Image's shifted grid, from the noise at t = 1 to 0 and back,
    returns the noise to 1e-12 relative (measured: 0, exactly, with CFG, its norm cap and
    its truncation too: the pair's low words carry what the state's rounding drops)."""
    transformer = tiny_z_image_transformer(dtype=torch.float64)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER)
    ode = from_diffusers(transformer, scheduler, **_cond(torch.float64, OPTIONS[name]))
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(scheduler)) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


@torch.no_grad()
def _invert(pipe, pair, cond):
    """BDIAInverseScheduler's loop from ``pair``, calling the transformer as ZImagePipeline
    does under CFG (one call on the batch twice over, c + g (c - u), negated); returns the
    inverse scheduler."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(sigmas=_sigmas())
    negative = cond["negative_cond"]["cap_feats"]
    x = inverse.begin(pair)
    for t in inverse.timesteps:
        tau = ((1000 - t.expand(BATCH)) / 1000).repeat(2)
        out = pipe.transformer(
            list(x.repeat(2, 1, 1, 1).unsqueeze(2).unbind(0)),
            tau,
            cond["cap_feats"] + negative,
            return_dict=False,
        )[0]
        v = torch.stack([o + CFG * (o - n) for o, n in zip(out[:BATCH], out[BATCH:])])
        x = inverse.step(-v.squeeze(2), t, x).prev_sample
    return inverse


def test_bdia_scheduler_refuses_the_sigma_min_of_older_z_image_pipelines():
    """The Z-Image pipelines of diffusers 0.36 to 0.38 set their scheduler's sigma_min to 0
    and run its own spacing to 0: BDIAScheduler refuses that in one line naming 0.39, before
    any step (there, ZImagePipeline's own call fails so); it reads the inner scheduler's."""
    pipe = tiny_z_image_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)
    assert (
        pipe.scheduler.sigma_min
        == diffusers.FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER).sigma_min
    )
    with pytest.raises(ValueError, match=r"sigma_min to 0.0.*diffusers 0.39 or newer"):
        pipe.scheduler.sigma_min = 0.0
    if not PIPELINE_SIGMAS:
        with pytest.raises(ValueError, match=r"diffusers 0.39 or newer"):
            _pipeline_latents(pipe, _noise(torch.float32), _cond(torch.float32, OPTIONS["cfg"]))


@pytest.mark.skipif(not PIPELINE_SIGMAS, reason=OLD_PIPELINES)
def test_bdia_scheduler_in_z_image_pipeline_is_bdia_sample_and_inverts():
    """ZImagePipeline (CFG 3) with BDIAScheduler.from_config(its config, gamma=0.96) gives
    the latents and the final pair (low words included) of bdia.sample with bdia(euler,
    0.96) on from_diffusers / diffusers_grid(sigmas=), bit for bit: the pipeline passes its
    sigmas (and a mu the config ignores) to set_timesteps and calls set_begin_index.
    bdia.invert from the pair, and the inverse scheduler's loop with the pipeline's
    transformer calls, return the pipeline's noise bit for bit."""
    pipe = tiny_z_image_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)
    assert pipe.scheduler.config.flow_matching
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, OPTIONS["cfg"])
    latents = _pipeline_latents(pipe, noise, cond)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = _grid(pipe.scheduler)
    pair = assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.96)
    inverse = _invert(pipe, pair, cond)
    assert len(inverse.timesteps) == N_STEPS - 1
    assert torch.equal(inverse.pair.earlier, noise)


@torch.no_grad()
def _img2img_start(pipe, image, k):
    """ZImageImg2ImgPipeline's start, made by hand: the image's VAE latents (drawn with the
    generator of seed 0, then the noise from it), (z - shift_factor) * scaling_factor,
    repeated to the batch and noised to the grid's sigma at index ``k``."""
    g = torch.Generator().manual_seed(0)
    x = pipe.image_processor.preprocess(image).to(torch.float32)
    z = pipe.vae.encode(x).latent_dist.sample(g)
    z = (z - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    noise = torch.randn(BATCH, 4, 8, 8, generator=g)
    sigma = pipe.scheduler.sigmas[k]
    return sigma * noise + (1.0 - sigma) * torch.cat([z] * BATCH)


@pytest.mark.skipif(not PIPELINE_SIGMAS, reason=OLD_PIPELINES)
def test_bdia_scheduler_in_z_image_img2img_pipeline_is_bdia_sample_and_inverts():
    """ZImageImg2ImgPipeline (CFG 3) with strength 0.6 runs the last 5 of 8 timesteps
    (set_begin_index(3)) from the image's VAE latents, shifted and scaled, noised by
    scale_noise to timesteps[3], calling the transformer as ZImagePipeline does. With
    BDIAScheduler (gamma 0.9) the noised latents are those of the pipeline with its own
    scheduler, bit for bit, and those made by hand; the latents and final pair (low words
    included, start_index 3) are bdia.sample's with bdia(euler, 0.9) from them over grid[3:]
    of from_diffusers / diffusers_grid(sigmas=), bit for bit; bdia(euler, 0) there gives the
    own scheduler's latents bit for bit; the inverse scheduler's loop and bdia.invert on
    grid[3:] return the noised latents bit for bit; and the pipeline given them as
    ``latents`` (with the same strength) runs from them to the same latents, bit for bit."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    cond = _cond(torch.float32, OPTIONS["cfg"])

    def img2img(pipe, latents=None):
        generator = torch.Generator().manual_seed(0)
        return _pipeline_latents(
            pipe, latents, cond, image=image, strength=0.6, generator=generator
        )

    parts = tiny_z_image_pipeline().components
    pipe, runs = flow_img2img_runs(diffusers.ZImageImg2ImgPipeline, parts, img2img)
    start = runs[1][1][0]
    assert start.shape == (BATCH, 4, 8, 8)
    assert torch.equal(start, _img2img_start(pipe, image, 3))
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = _grid(pipe.scheduler)
    assert_flow_img2img_is_bdia_sample(pipe, runs, ode, ts, 3, lambda p: _invert(pipe, p, cond))
    assert torch.equal(img2img(pipe, start.clone()), runs[1][0])


# -------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def transformer():
    return tiny_z_image_transformer()


def _scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(cap_feats=None), "cap_feats"),
        (dict(cap_feats=torch.zeros(2, 5, 16)), "cap_feats"),
        (dict(cap_feats=[torch.zeros(5, 8)]), "cap_feat_dim = 16"),
        (dict(cap_feats=[torch.zeros(1, 5, 16)]), "cap_feats[0]"),
        (dict(guidance_scale=CFG), "negative_cond={'cap_feats'"),
        (dict(guidance_scale=CFG, negative_cond=dict(cap_feats=[torch.zeros(2, 16)])), "one"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(cfg_normalization=-1.0), "cfg_normalization"),
        (dict(cfg_truncation="late"), "cfg_truncation"),
        (dict(siglip_feats=[[None]]), "siglip_feats"),
        (dict(controlnet_block_samples={}), "controlnet_block_samples"),
        (dict(mask=torch.zeros(1, 1, 8, 8)), "mask"),
        (dict(image_latents=torch.zeros(1, 16, 16)), "image_latents"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_conditioning_the_transformer_cannot_take_is_refused(transformer, change, fragment):
    """What ZImagePipeline does not give Z-Image's transformer is refused in one line naming
    it, before any call: prompts that are not its list of 2-D embeddings of cap_feat_dim,
    CFG without one negative prompt per prompt, CFG settings that are not numbers, the omni
    and ControlNet pipelines' inputs, other pipelines' extra inputs."""
    cond = dict(cap_feats=[torch.zeros(5, 16), torch.zeros(3, 16)])
    cond.update(change)
    if cond["cap_feats"] is None:
        del cond["cap_feats"]
    calls = []
    handle = transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError) as info:
            from_diffusers(transformer, _scheduler(), **cond)
    finally:
        handle.remove()
    message = str(info.value)
    assert "\n" not in message and fragment in message, message
    assert calls == []


def test_the_cfg_options_are_refused_for_other_transformers():
    """cfg_normalization and cfg_truncation are ZImagePipeline's: another transformer's ODE
    refuses them in one line rather than passing them to its network."""
    from bdia.integrations.diffusers.tiny import tiny_sd3_transformer

    with pytest.raises(ValueError, match="cfg_truncation is ZImagePipeline's"):
        from_diffusers(
            tiny_sd3_transformer(),
            _scheduler(),
            encoder_hidden_states=torch.zeros(1, 4, 16),
            pooled_projections=torch.zeros(1, 8),
            cfg_truncation=0.5,
        )


def test_states_that_are_not_the_pipelines_are_refused_before_the_call(transformer):
    """A state that is not image-shaped latents of the transformer's channels (Flux's packed
    tokens, say) and prompts of another count than the batch are refused at the first
    evaluation, before the transformer runs."""
    ode = from_diffusers(transformer, _scheduler(), cap_feats=[torch.zeros(5, 16)] * 3)
    calls = []
    transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=r"\(batch, 4, h, w\)"):
        ode.evaluate(1.0, torch.zeros(BATCH, 16, 16))
    with pytest.raises(ValueError, match="cap_feats has 3 entries"):
        ode.evaluate(1.0, torch.zeros(BATCH, 4, 8, 8))
    assert calls == []

"""bdia.integrations.diffusers with Flux: FluxTransformer2DModel and FlowMatchEulerDiscreteScheduler
(dynamic shifting) as a rectified-flow ODE on FluxPipeline's packed latents.

The transformer is a tiny random ``FluxTransformer2DModel`` (``tiny_flux_transformer``); the
pipeline (``tiny_flux_pipeline``) has tiny CLIP and T5 text encoders with tokenizers made in
place. As for SD3, parity with diffusers is checked in float32, where both sides make the same
float operations on the same inputs and agree bit for bit; exactness of the inversion is
checked in float64.
"""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from conftest import (
    Counter,
    assert_flow_img2img_is_bdia_sample,
    assert_flow_run_is_bdia_sample,
    flow_img2img_runs,
    flow_round_trip_error,
)
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift

import bdia
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    FLUX_DEV_SCHEDULER,
    tiny_flux_pipeline,
    tiny_flux_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N_STEPS = 10
BATCH = 2
TOKENS = 16  # 4 x 8 x 8 latents in patches of 2 x 2: 16 tokens of 16 channels
EMBEDDED = 3.5  # Flux.1-dev's guidance embedding (the pipeline's guidance_scale)
TRUE_CFG = 4.0  # the pipeline's true_cfg_scale


def _dev_scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)


def _schnell_scheduler():
    """Flux.1-schnell's scheduler config: no dynamic shifting."""
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)


def _mu(scheduler):
    """FluxPipeline's mu for TOKENS image tokens, from the scheduler's config; None without
    dynamic shifting (set_timesteps ignores it there, diffusers_grid refuses it)."""
    cfg = scheduler.config
    if not cfg.use_dynamic_shifting:
        return None
    return calculate_shift(
        TOKENS, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
    )


def _sigmas(steps=N_STEPS):
    """The unshifted sigmas FluxPipeline passes to set_timesteps."""
    return np.linspace(1.0, 1 / steps, steps)


@pytest.fixture(scope="module")
def dev():
    return tiny_flux_transformer()


@pytest.fixture(scope="module")
def schnell():
    return tiny_flux_transformer(guidance_embeds=False)


def _noise(dtype):
    """FluxPipeline's state: image-shaped noise packed into tokens, (BATCH, 16, 16)."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(BATCH, 4, 8, 8, generator=g).to(dtype)
    return FluxPipeline._pack_latents(noise, BATCH, 4, 8, 8)


def _img_ids(dtype=torch.float32):
    return FluxPipeline._prepare_latent_image_ids(BATCH, 4, 4, "cpu", dtype)


def _prompt(dtype, seed, tokens):
    """Embeddings of batch 1, pooled embeddings and text ids, as FluxPipeline.encode_prompt
    returns them."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        encoder_hidden_states=torch.randn(1, tokens, 16, dtype=dtype, generator=g),
        pooled_projections=torch.randn(1, 8, dtype=dtype, generator=g),
        txt_ids=torch.zeros(tokens, 3, dtype=dtype),
    )


def _cond(dtype, *, embedded=True, true_cfg=False):
    """from_diffusers' conditioning: a prompt of 5 tokens, the image ids, Flux-dev's guidance
    embedding, and with ``true_cfg`` a negative prompt of 7 tokens (its own txt_ids)."""
    cond = dict(_prompt(dtype, 1, 5), img_ids=_img_ids(dtype))
    if embedded:
        cond["guidance"] = EMBEDDED
    if true_cfg:
        cond.update(guidance_scale=TRUE_CFG, negative_cond=_prompt(dtype, 2, 7))
    return cond


def _hidden(latents, extra=None, image=None):
    """The transformer's input as the Flux pipelines make it: the packed latents, with
    FluxFillPipeline's ``extra`` channels (its masked image latents and mask, of the latents'
    batch) after theirs along dim 2, and FluxKontextPipeline's reference ``image`` tokens (of
    the latents' batch) after theirs along dim 1."""
    hidden = latents if extra is None else torch.cat((latents, extra), dim=2)
    return hidden if image is None else torch.cat([hidden, image], dim=1)


@torch.no_grad()
def _flux_loop(transformer, scheduler, noise, cond, steps=N_STEPS, extra=None, image=None):
    """FluxPipeline's denoising loop, written out (FluxFillPipeline's with ``extra``,
    FluxKontextPipeline's with ``image``: see ``_hidden``); every state, the start first."""
    batch = noise.shape[0]
    scheduler.set_timesteps(sigmas=_sigmas(steps), mu=_mu(scheduler))
    guidance = None
    if "guidance" in cond:
        guidance = torch.full([1], cond["guidance"], dtype=torch.float32).expand(batch)

    def call(latents, timestep, prompt):
        return transformer(
            hidden_states=_hidden(latents, extra, image),
            timestep=timestep / 1000,
            guidance=guidance,
            pooled_projections=prompt["pooled_projections"].expand(batch, -1),
            encoder_hidden_states=prompt["encoder_hidden_states"].expand(batch, -1, -1),
            txt_ids=prompt["txt_ids"],
            img_ids=cond["img_ids"],
            joint_attention_kwargs={},
            return_dict=False,
        )[0][:, : latents.size(1)]

    latents, states = noise, [noise]
    for t in scheduler.timesteps:
        timestep = t.expand(batch).to(latents.dtype)
        out = call(latents, timestep, cond)
        if "negative_cond" in cond:
            negative = call(latents, timestep, cond["negative_cond"])
            out = negative + cond["guidance_scale"] * (out - negative)
        latents = scheduler.step(out, t, latents, return_dict=False)[0]
        states.append(latents)
    return states


def _pipeline_latents(pipe, noise, prompt, **options):
    """FluxPipeline's latents from ``noise`` (BATCH images of one prompt, 16 x 16, T5 tokens
    cut at 16), guidance embedding 3.5; for img2img, ``noise`` None and ``options`` the
    image, strength and generator."""
    return pipe(
        prompt=prompt,
        guidance_scale=EMBEDDED,
        latents=noise,
        num_images_per_prompt=BATCH,
        num_inference_steps=N_STEPS,
        height=16,
        width=16,
        max_sequence_length=16,
        output_type="latent",
        **options,
    ).images


def _encoded(pipe, text):
    """The pipeline's encoding of ``text`` (T5 tokens cut at 16) as from_diffusers' keys."""
    with torch.no_grad():
        embeds, pooled, text_ids = pipe.encode_prompt(text, prompt_2=None, max_sequence_length=16)
    return dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids)


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


# --------------------------------------------------------------------------- parity


_KINDS = {
    "dev": (True, False, _dev_scheduler),
    "dev-true-cfg": (True, True, _dev_scheduler),
    "schnell": (False, False, _schnell_scheduler),
}


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("kind", list(_KINDS))
def test_euler_is_the_flux_loop_step_by_step(request, kind):
    """bdia's euler on from_diffusers / diffusers_grid(mu=, sigmas=) is FluxPipeline's loop
    state by state, bit for bit in float32: the grid holds the scheduler's float32 sigmas,
    the transformer gets the pipeline's timestep t.to(float32) / 1000, the guidance embedding
    torch.full([1], 3.5) per sample, and the 2-D ids unbatched; true CFG makes the pipeline's
    two calls (conditional, then negative with its own 7 txt_ids) and its u + g (c - u)."""
    embedded, true_cfg, make_scheduler = _KINDS[kind]
    transformer = request.getfixturevalue("dev" if embedded else "schnell")
    cond = _cond(torch.float32, embedded=embedded, true_cfg=true_cfg)
    scheduler = make_scheduler()
    ode = from_diffusers(transformer, scheduler, **cond)
    assert isinstance(ode.schedule, bdia.RectifiedFlow) and ode.prediction == "flow"
    ts = diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())
    noise = _noise(torch.float32)
    calls = Counter(transformer)
    with torch.no_grad():
        ours = bdia.sample(
            ode, bdia.get_solver("euler"), noise, ts, trajectory=True, progress=False
        )
    assert calls.calls == N_STEPS * (2 if true_cfg else 1)  # FluxPipeline's count
    ref = _flux_loop(transformer, scheduler, noise, cond)
    assert len(ours) == len(ref) == N_STEPS + 1
    for k in range(len(ref)):
        assert torch.equal(ours[k], ref[k]), k


def test_float64_state_is_the_flux_loop_to_its_float32_rounding():
    """With a float64 transformer and state, diffusers' step still casts the sample to
    float32 (and keeps float32 sigmas, and the pipeline's timestep t / 1000 rounds t to
    float32); bdia keeps float64. The two agree to 1e-6 relative (measured 1.6e-7 with the
    guidance embedding, 1.1e-7 with true CFG too): a few float32 roundings (6e-8 each) of a
    state of size ~3."""
    transformer = tiny_flux_transformer(dtype=torch.float64)
    for true_cfg in (False, True):
        cond = _cond(torch.float64, true_cfg=true_cfg)
        scheduler = _dev_scheduler()
        noise = _noise(torch.float64)
        with torch.no_grad():
            ours = bdia.sample(
                from_diffusers(transformer, scheduler, **cond),
                bdia.get_solver("euler"),
                noise,
                diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas()),
                trajectory=True,
                progress=False,
            )
        ref = _flux_loop(transformer, scheduler, noise, cond)
        worst = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, ref))
        assert worst < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_transformer_sees_the_pipelines_arguments(dtype):
    """At every step the transformer gets FluxPipeline's timestep t.expand(batch).to(
    latents.dtype) / 1000 bit for bit (a bfloat16 transformer too, whose latents the pipeline
    keeps in bfloat16: the timestep is rounded to bfloat16 before the division), the guidance
    embedding per sample, and txt_ids and img_ids exactly as given (2-D, one row per token)."""
    transformer = tiny_flux_transformer(dtype=dtype)
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    scheduler = _dev_scheduler()
    cond = _cond(torch.float32)
    ode = from_diffusers(transformer, scheduler, **cond)
    assert ode.model_dtype == dtype
    ts = diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())
    with torch.no_grad():
        bdia.sample(ode, bdia.get_solver("euler"), _noise(torch.float32), ts, progress=False)
    scheduler.set_timesteps(sigmas=_sigmas(), mu=_mu(scheduler))
    assert len(seen) == N_STEPS
    for t, kwargs in zip(scheduler.timesteps, seen):
        assert torch.equal(kwargs["timestep"], t.expand(BATCH).to(dtype) / 1000)
        assert kwargs["hidden_states"].dtype == dtype
        assert torch.equal(kwargs["guidance"], torch.full([BATCH], EMBEDDED, dtype=dtype))
        assert kwargs["txt_ids"] is cond["txt_ids"] and kwargs["img_ids"] is cond["img_ids"]
        assert kwargs["encoder_hidden_states"].shape == (BATCH, 5, 16)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_flux_pipeline_gives_bdia_samples_latents(tmp_path, true_cfg):
    """FluxPipeline itself (tiny parts, prompts through its CLIP and T5 encoders, guidance
    embedding 3.5, with or without true CFG 4 and a negative prompt) returns the latents of
    bdia.sample with euler on the pipeline's encode_prompt output, bit for bit; the grid is
    its scheduler's sigmas after the run."""
    pipe = tiny_flux_pipeline(tmp_path)
    noise = _noise(torch.float32)
    prompt, negative = "a photo of a cat", "a blue painting"
    options = dict(negative_prompt=negative, true_cfg_scale=TRUE_CFG) if true_cfg else {}
    latents = _pipeline_latents(pipe, noise, prompt, **options)
    ts = diffusers_grid(pipe.scheduler, N_STEPS, mu=_mu(pipe.scheduler), sigmas=_sigmas())
    assert ts.tolist() == [float(s) for s in pipe.scheduler.sigmas]

    cond = dict(_encoded(pipe, prompt), img_ids=_img_ids(), guidance=EMBEDDED)
    if true_cfg:
        cond.update(guidance_scale=TRUE_CFG, negative_cond=_encoded(pipe, negative))
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)
    assert torch.equal(ours, latents)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_bdia_euler_inverts_to_float64_rounding(true_cfg):
    """bdia(euler, 0.96) on Flux-dev's dynamically shifted grid, from the noise at t = 1
    (alpha = 0) to 0 and back, returns the noise to 1e-12 relative (measured: 0, exactly; the
    pair's low words carry what the state's rounding drops)."""
    transformer = tiny_flux_transformer(dtype=torch.float64)
    scheduler = _dev_scheduler()
    ode = from_diffusers(transformer, scheduler, **_cond(torch.float64, true_cfg=true_cfg))
    ts = diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert flow_round_trip_error(ode, _noise(torch.float64), ts) < 1e-12


# ----------------------------------------------------------------------------- grids


@pytest.mark.parametrize("make", [_dev_scheduler, _schnell_scheduler], ids=["dev", "schnell"])
@pytest.mark.parametrize("steps", [1, 4, N_STEPS, 28, 50])
def test_grid_is_the_schedulers_sigmas_from_the_pipelines_sigmas(make, steps):
    """diffusers_grid(scheduler, n, mu=, sigmas=) is the scheduler's float32 sigmas after
    set_timesteps(sigmas=, mu=), as FluxPipeline calls it, widened exactly, the final 0
    included; num_inference_steps=None takes the sigmas' count. The scheduler is left as it
    was."""
    scheduler = make()
    mu = _mu(scheduler)
    sigmas = _sigmas(steps)
    before = scheduler.sigmas.clone()
    ts = diffusers_grid(scheduler, steps, mu=mu, sigmas=sigmas)
    assert torch.equal(scheduler.sigmas, before)
    assert diffusers_grid(scheduler, None, mu=mu, sigmas=list(sigmas)).tolist() == ts.tolist()
    scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    assert ts.dtype == torch.float64 and len(ts) == steps + 1
    assert ts.tolist() == [float(s) for s in scheduler.sigmas]
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert torch.equal((ts[:-1].float() * 1000).float(), scheduler.timesteps)


def test_grid_sigmas_refusals():
    """One line each: sigmas of another count than num_inference_steps, not finite, not 1-D,
    empty, with a noise-table scheduler, and a missing mu with dynamic shifting."""
    dev, ddim = _dev_scheduler(), diffusers.DDIMScheduler(clip_sample=False)
    mu = _mu(dev)
    for make, field in (
        (lambda: diffusers_grid(dev, N_STEPS, mu=mu, sigmas=_sigmas(5)), "num_inference_steps"),
        (lambda: diffusers_grid(dev, None, mu=mu, sigmas=[1.0, float("nan")]), "finite"),
        (lambda: diffusers_grid(dev, None, mu=mu, sigmas=[[1.0, 0.5]]), "sigmas"),
        (lambda: diffusers_grid(dev, None, mu=mu, sigmas=[]), "sigmas"),
        (lambda: diffusers_grid(dev, None, mu=mu, sigmas="abc"), "sigmas"),
        (lambda: diffusers_grid(ddim, N_STEPS, sigmas=_sigmas()), "sigmas"),
        (lambda: diffusers_grid(dev, None, sigmas=_sigmas()), "mu="),
        (lambda: diffusers_grid(dev, None, mu=mu, sigmas=[1.0, 2.0]), "not decreasing"),
    ):
        with pytest.raises(ValueError) as exc_info:
            make()
        _one_line_error(exc_info, field)


# -------------------------------------------------------------------------- refusals


def test_conditioning_the_transformer_cannot_take_is_refused(dev, schnell):
    """One line each, before any call: a missing guidance embedding (dev), one for schnell,
    guidance that is no number, missing embeddings or ids, batched (3-D) or malformed ids,
    embeddings whose length is not their txt_ids' (the negative branch's own), and a
    transformer whose out_channels is not its in_channels (Flux Fill's)."""
    flow = _dev_scheduler()
    counters = [Counter(dev), Counter(schnell)]
    base = _cond(torch.float32)

    def without(key):
        return {k: v for k, v in base.items() if k != key}

    negative = _prompt(torch.float32, 2, 7)
    cases = [
        (dev, without("guidance"), "guidance_embeds = True"),
        (schnell, base, "guidance_embeds = False"),
        (dev, dict(base, guidance=float("nan")), "finite"),
        (dev, dict(base, guidance=torch.ones(BATCH, 1)), "guidance"),
        (dev, without("encoder_hidden_states"), "encoder_hidden_states"),
        (dev, without("pooled_projections"), "pooled_projections"),
        (dev, without("txt_ids"), "txt_ids"),
        (dev, without("img_ids"), "_prepare_latent_image_ids"),
        (dev, dict(base, img_ids=base["img_ids"].expand(BATCH, -1, -1)), "img_ids[0]"),
        (dev, dict(base, txt_ids=torch.zeros(5, 2)), "(tokens, 3)"),
        (dev, dict(base, txt_ids=torch.zeros(6, 3)), "txt_ids has 6 rows"),
        (
            dev,
            dict(
                base, guidance_scale=TRUE_CFG, negative_cond=dict(negative, txt_ids=base["txt_ids"])
            ),
            "negative_cond['encoder_hidden_states']",
        ),
        (
            dev,
            dict(
                base, guidance_scale=TRUE_CFG, negative_cond=dict(negative, img_ids=torch.zeros(3))
            ),
            "negative_cond['img_ids']",
        ),
    ]
    for transformer, cond, field in cases:
        with pytest.raises((ValueError, TypeError)) as exc_info:
            from_diffusers(transformer, flow, **cond)
        _one_line_error(exc_info, field)
    with pytest.raises(TypeError) as exc_info:
        from_diffusers(dev, flow, **dict(base, guidance=True))
    _one_line_error(exc_info, "guidance")
    # A Fill-type transformer: image channels besides the packed latents' (FluxFillPipeline).
    fill = tiny_flux_transformer(in_channels=32, out_channels=16)
    counters.append(Counter(fill))
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(fill, flow, **base)
    _one_line_error(exc_info, "out_channels")
    assert [c.calls for c in counters] == [0, 0, 0]


def test_states_that_are_not_the_pipelines_are_refused_before_the_call(dev):
    """Image-shaped latents (the state is the packed one), packed latents of another channel
    count, and img_ids of another token count: one line at the first evaluation, before the
    transformer is called."""
    calls = Counter(dev)
    ode = from_diffusers(dev, _dev_scheduler(), **_cond(torch.float32))
    image = torch.zeros(BATCH, 4, 8, 8)
    for x, field in (
        (image, "_pack_latents"),
        (torch.zeros(BATCH, TOKENS, 8), "(batch, tokens, 16)"),
        (torch.zeros(BATCH, 4 * TOKENS, 16), "img_ids has 16 rows"),
    ):
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, x)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_the_callers_conditioning_is_left_as_it_was(dev):
    """from_diffusers makes its own tensor of a guidance number, in the ODE's cond and its
    negative_cond, without writing into the caller's dicts."""
    cond = _cond(torch.float32, true_cfg=True)
    negative = dict(cond["negative_cond"], guidance=2.0)
    cond["negative_cond"] = negative
    before = dict(negative)
    ode = from_diffusers(dev, _dev_scheduler(), **cond)
    assert cond["guidance"] == EMBEDDED and negative == before and negative["guidance"] == 2.0
    assert torch.equal(ode.cond["guidance"], torch.tensor([EMBEDDED]))
    assert torch.equal(ode.cond["negative_cond"]["guidance"], torch.tensor([2.0]))


# ------------------------------------------------------------------ BDIA scheduler


def _invert(pipe, pair, cond, extra=None, image=None):
    """BDIAInverseScheduler's loop from ``pair``, calling the transformer as the Flux
    pipelines do (with ``cond``'s guidance embedding, if it has one, and its img_ids; with
    ``extra`` or ``image`` as ``_hidden`` puts them); returns the inverse scheduler."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    # FluxPipeline's mu, which schnell's scheduler ignores.
    inverse.set_timesteps(sigmas=_sigmas(), mu=calculate_shift(TOKENS))
    guidance = torch.full([BATCH], cond["guidance"]) if "guidance" in cond else None
    embeds = cond["encoder_hidden_states"].expand(BATCH, -1, -1)
    pooled = cond["pooled_projections"].expand(BATCH, -1)
    with torch.no_grad():
        x = inverse.begin(pair)
        for t in inverse.timesteps:
            out = pipe.transformer(
                hidden_states=_hidden(x, extra, image),
                timestep=t.expand(BATCH).to(x.dtype) / 1000,
                guidance=guidance,
                pooled_projections=pooled,
                encoder_hidden_states=embeds,
                txt_ids=cond["txt_ids"],
                img_ids=cond["img_ids"],
                return_dict=False,
            )[0][:, :TOKENS]
            x = inverse.step(out, t, x).prev_sample
    return inverse


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("embedded", [True, False], ids=["dev", "schnell"])
def test_bdia_scheduler_in_flux_pipeline_is_bdia_sample_and_inverts(tmp_path, embedded):
    """FluxPipeline with BDIAScheduler.from_config(its config, gamma=0.9) gives the latents
    and the final pair (low words included) of bdia.sample with bdia(euler, 0.9) on
    from_diffusers / diffusers_grid(mu=, sigmas=), bit for bit. The pipeline passes its own
    sigmas and mu to set_timesteps (mu even without dynamic shifting, schnell's config, where
    the scheduler ignores it as FlowMatchEulerDiscreteScheduler does) and calls
    set_begin_index. The inverse scheduler's loop, with the pipeline's transformer calls,
    returns the starting noise bit for bit, and so does bdia.invert from the pair."""
    scheduler = _dev_scheduler() if embedded else _schnell_scheduler()
    pipe = tiny_flux_pipeline(tmp_path, scheduler=scheduler, guidance_embeds=embedded)
    source = pipe.scheduler.config
    pipe.scheduler = BDIAScheduler.from_config(source, gamma=0.9)
    assert pipe.scheduler.config.flow_matching
    noise = _noise(torch.float32)
    latents = _pipeline_latents(pipe, noise, "a photo of a fox")
    cond = dict(_encoded(pipe, "a photo of a fox"), img_ids=_img_ids())
    if embedded:
        cond["guidance"] = EMBEDDED
    mu = _mu(scheduler)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = diffusers_grid(pipe.scheduler, N_STEPS, mu=mu, sigmas=_sigmas())
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    inverse = _invert(pipe, pair, cond)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert len(inverse.timesteps) == N_STEPS - 1
    assert torch.equal(inverse.pair.earlier, noise)
    assert torch.equal(back.earlier, noise)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("embedded", [True, False], ids=["dev", "schnell"])
def test_bdia_scheduler_in_flux_img2img_pipeline_is_bdia_sample_and_inverts(tmp_path, embedded):
    """FluxImg2ImgPipeline with strength 0.6 runs the last 6 of 10 timesteps from the image
    latents noised by scale_noise to timesteps[4], then packed. With BDIAScheduler (gamma
    0.9) the noised latents are those of the pipeline with its own
    FlowMatchEulerDiscreteScheduler, bit for bit; the latents and final pair (low words
    included, start_index 4) are bdia.sample's with bdia(euler, 0.9) from them over
    grid[4:], bit for bit; bdia(euler, 0) there gives the own scheduler's latents bit for
    bit; and the inverse scheduler's loop stops at index 4 with the noised latents, bit for
    bit, as does bdia.invert on grid[4:]. Before, BDIAScheduler had no scale_noise and the
    pipeline stopped with an AttributeError."""
    scheduler = _dev_scheduler() if embedded else _schnell_scheduler()
    parts = tiny_flux_pipeline(tmp_path, scheduler=scheduler, guidance_embeds=embedded).components
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    def img2img(pipe):
        generator = torch.Generator().manual_seed(0)
        return _pipeline_latents(
            pipe, None, "a photo of a fox", image=image, strength=0.6, generator=generator
        )

    pipe, runs = flow_img2img_runs(diffusers.FluxImg2ImgPipeline, parts, img2img)
    assert runs[1][1][0].shape == (BATCH, TOKENS, 16)  # the packed latents, as FluxPipeline's
    cond = dict(_encoded(pipe, "a photo of a fox"), img_ids=_img_ids())
    if embedded:
        cond["guidance"] = EMBEDDED
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = diffusers_grid(pipe.scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())
    assert_flow_img2img_is_bdia_sample(
        pipe, runs, ode, ts, 4, lambda pair: _invert(pipe, pair, cond)
    )


def test_bdia_scheduler_sigmas_refusals():
    """Sigmas for a noise-table BDIA scheduler, and sigmas of another count than the steps:
    one line each."""
    with pytest.raises(ValueError) as exc_info:
        BDIAScheduler().set_timesteps(N_STEPS, sigmas=_sigmas())
    _one_line_error(exc_info, "sigmas")
    flow = BDIAScheduler.from_config(_dev_scheduler().config)
    with pytest.raises(ValueError) as exc_info:
        flow.set_timesteps(N_STEPS, sigmas=_sigmas(4), mu=0.5)
    _one_line_error(exc_info, "num_inference_steps")

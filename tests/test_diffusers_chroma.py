"""bdia.integrations.diffusers with Chroma: ChromaTransformer2DModel and
FlowMatchEulerDiscreteScheduler (dynamic shifting) as a rectified-flow ODE on ChromaPipeline's
packed latents.

Chroma's transformer is Flux's without pooled embeddings or a guidance embedding: T5
embeddings alone, an attention mask over the text and image tokens, and true CFG (a second
call with the negative prompt's embeddings and mask). The transformer is a tiny random
``ChromaTransformer2DModel`` (``tiny_chroma_transformer``); the pipeline
(``tiny_chroma_pipeline``) has a tiny T5 encoder with a tokenizer made in memory. As for Flux,
parity with diffusers is checked in float32, where both sides make the same float
operations on the same inputs and agree bit for bit; exactness of the inversion is checked
in float64.
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
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

import bdia
from bdia.integrations.diffusers import (
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (
    FLUX_DEV_SCHEDULER,
    tiny_chroma_pipeline,
    tiny_chroma_transformer,
    tiny_flux_transformer,
)

pytestmark = [
    # diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # diffusers' Chroma transformer builds the deprecated FluxPosEmbed; not ours.
    pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning"),
    pytest.mark.skipif(
        not hasattr(diffusers, "ChromaPipeline"),
        reason=f"diffusers {diffusers.__version__} has no ChromaPipeline",
    ),
]

N_STEPS = 10
BATCH = 2
TOKENS = 16  # 4 x 8 x 8 latents in patches of 2 x 2: 16 tokens of 16 channels
TRUE_CFG = 5.0  # ChromaPipeline's default guidance_scale, true CFG


def _scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)


def _mu(scheduler):
    """ChromaPipeline's mu for TOKENS image tokens, from the scheduler's config."""
    cfg = scheduler.config
    return calculate_shift(
        TOKENS, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift
    )


def _sigmas(steps=N_STEPS):
    """The unshifted sigmas ChromaPipeline passes to set_timesteps."""
    return np.linspace(1.0, 1 / steps, steps)


@pytest.fixture(scope="module")
def chroma():
    return tiny_chroma_transformer()


def _noise(dtype):
    """ChromaPipeline's state: image-shaped noise packed into tokens, (BATCH, 16, 16)."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(BATCH, 4, 8, 8, generator=g).to(dtype)
    return diffusers.ChromaPipeline._pack_latents(noise, BATCH, 4, 8, 8)


def _img_ids(dtype=torch.float32):
    return diffusers.ChromaPipeline._prepare_latent_image_ids(BATCH, 4, 4, "cpu", dtype)


def _mask(words, tokens, dtype):
    """The transformer's attention mask of a prompt of ``words`` T5 tokens padded to
    ``tokens``, as ChromaPipeline makes it: ones up to the first padding token, zeros after,
    then ones for the TOKENS image tokens; batch 1."""
    text = (torch.arange(tokens) <= words).to(dtype)
    return torch.cat([text, torch.ones(TOKENS, dtype=dtype)])[None]


def _prompt(dtype, seed, tokens, words):
    """Embeddings of batch 1, text ids and the attention mask, as ChromaPipeline passes them."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        encoder_hidden_states=torch.randn(1, tokens, 16, dtype=dtype, generator=g),
        txt_ids=torch.zeros(tokens, 3, dtype=dtype),
        attention_mask=_mask(words, tokens, dtype),
    )


def _cond(dtype, *, true_cfg=False):
    """from_diffusers' conditioning: a prompt of 3 words padded to 8 tokens, the image ids,
    and with ``true_cfg`` a negative prompt of 5 words padded to 10 (its own txt_ids and
    mask)."""
    cond = dict(_prompt(dtype, 1, 8, 3), img_ids=_img_ids(dtype))
    if true_cfg:
        cond.update(guidance_scale=TRUE_CFG, negative_cond=_prompt(dtype, 2, 10, 5))
    return cond


@torch.no_grad()
def _chroma_loop(transformer, scheduler, noise, cond, steps=N_STEPS):
    """ChromaPipeline's denoising loop, written out; every state, the start first."""
    batch = noise.shape[0]
    scheduler.set_timesteps(sigmas=_sigmas(steps), mu=_mu(scheduler))

    def call(latents, timestep, prompt):
        return transformer(
            hidden_states=latents,
            timestep=timestep / 1000,
            encoder_hidden_states=prompt["encoder_hidden_states"].expand(batch, -1, -1),
            txt_ids=prompt["txt_ids"],
            img_ids=cond["img_ids"],
            attention_mask=prompt["attention_mask"].expand(batch, -1),
            joint_attention_kwargs={},
            return_dict=False,
        )[0]

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
    """ChromaPipeline's latents from ``noise`` (BATCH images of one prompt, 16 x 16, T5 tokens
    padded to 16); for img2img, ``noise`` None and ``options`` the image, strength and
    generator."""
    return pipe(
        prompt=prompt,
        latents=noise,
        num_images_per_prompt=BATCH,
        num_inference_steps=N_STEPS,
        height=16,
        width=16,
        max_sequence_length=16,
        output_type="latent",
        **options,
    ).images


def _encoded(pipe, text, negative=None):
    """The pipeline's encoding of ``text`` (T5 tokens padded to 16) as from_diffusers' keys,
    the mask extended over the image tokens as the pipeline does; with ``negative``, under
    ``guidance_scale=TRUE_CFG`` with the negative prompt's as negative_cond."""
    with torch.no_grad():
        embeds, ids, mask, neg_embeds, neg_ids, neg_mask = pipe.encode_prompt(
            text,
            negative_prompt=negative,
            do_classifier_free_guidance=negative is not None,
            max_sequence_length=16,
        )

    def keys(e, i, m):
        full = pipe._prepare_attention_mask(1, TOKENS, e.dtype, m)
        return dict(encoder_hidden_states=e, txt_ids=i, attention_mask=full)

    cond = dict(keys(embeds, ids, mask), img_ids=_img_ids())
    if negative is not None:
        cond.update(guidance_scale=TRUE_CFG, negative_cond=keys(neg_embeds, neg_ids, neg_mask))
    return cond


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_euler_is_the_chroma_loop_step_by_step(chroma, true_cfg):
    """bdia's euler on from_diffusers / diffusers_grid(mu=, sigmas=) is ChromaPipeline's loop
    state by state, bit for bit in float32: the transformer gets the pipeline's timestep
    t.to(float32) / 1000, the 2-D ids unbatched and the attention mask expanded to the batch;
    true CFG makes the pipeline's two calls (conditional, then negative with its own 10
    txt_ids and mask) and its u + g (c - u)."""
    cond = _cond(torch.float32, true_cfg=true_cfg)
    scheduler = _scheduler()
    ode = from_diffusers(chroma, scheduler, **cond)
    assert isinstance(ode.schedule, bdia.RectifiedFlow) and ode.prediction == "flow"
    ts = diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())
    noise = _noise(torch.float32)
    calls = Counter(chroma)
    with torch.no_grad():
        ours = bdia.sample(
            ode, bdia.get_solver("euler"), noise, ts, trajectory=True, progress=False
        )
    assert calls.calls == N_STEPS * (2 if true_cfg else 1)  # ChromaPipeline's count
    ref = _chroma_loop(chroma, scheduler, noise, cond)
    assert len(ours) == len(ref) == N_STEPS + 1
    for k in range(len(ref)):
        assert torch.equal(ours[k], ref[k]), k


def test_the_attention_mask_changes_the_field(chroma):
    """The mask is no formality: the same prompt without masking its padding (all ones)
    moves the velocity by more than 1 % of its size, so the parity above checks that the
    mask reaches the transformer."""
    cond = _cond(torch.float32)
    unmasked = dict(cond, attention_mask=torch.ones_like(cond["attention_mask"]))
    x = _noise(torch.float32)
    with torch.no_grad():
        a = from_diffusers(chroma, _scheduler(), **cond).evaluate(0.7, x).derivative
        b = from_diffusers(chroma, _scheduler(), **unmasked).evaluate(0.7, x).derivative
    moved = float((a - b).abs().max() / a.abs().max())
    print(f"unmasked padding moves the velocity by {moved:.3g} (relative, max)")
    assert moved > 0.01


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_chroma_pipeline_gives_bdia_samples_latents(true_cfg):
    """ChromaPipeline itself (tiny parts, the prompt through its T5 encoder and its mask,
    guidance_scale 1 or true CFG 5 with a negative prompt) returns the latents of bdia.sample
    with euler on the pipeline's encode_prompt output (the masks extended by
    _prepare_attention_mask), bit for bit; the grid is its scheduler's sigmas after the
    run."""
    pipe = tiny_chroma_pipeline()
    noise = _noise(torch.float32)
    prompt, negative = "a photo of a cat", "a blue painting"
    options = dict(negative_prompt=negative) if true_cfg else dict(guidance_scale=1.0)
    latents = _pipeline_latents(pipe, noise, prompt, **options)
    ts = diffusers_grid(pipe.scheduler, N_STEPS, mu=_mu(pipe.scheduler), sigmas=_sigmas())
    assert ts.tolist() == [float(s) for s in pipe.scheduler.sigmas]

    cond = _encoded(pipe, prompt, negative if true_cfg else None)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)
    assert torch.equal(ours, latents)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_bdia_euler_inverts_to_float64_rounding(true_cfg):
    """bdia(euler, 0.96) on the dynamically shifted grid, from the noise at t = 1 to 0 and
    back, returns the noise to 1e-12 relative (measured: 0, exactly; the pair's low words
    carry what the state's rounding drops)."""
    transformer = tiny_chroma_transformer(dtype=torch.float64)
    scheduler = _scheduler()
    ode = from_diffusers(transformer, scheduler, **_cond(torch.float64, true_cfg=true_cfg))
    ts = diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())
    assert float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert flow_round_trip_error(ode, _noise(torch.float64), ts) < 1e-12


# -------------------------------------------------------------------------- refusals


def test_conditioning_the_transformer_cannot_take_is_refused(chroma):
    """One line each, before any call: Flux's pooled embeddings or guidance embedding, a
    missing key of the pipeline's call, batched ids, a mask over the prompt alone (not
    extended over the image tokens) or of another length, negative embeddings without their
    own mask, an image prompt for a transformer without an IP-Adapter loaded (one with an
    adapter takes it: tests/test_diffusers_chroma_ip_adapter.py), and Flux's extra inputs
    (controlnet, Fill, Kontext, Depth)."""
    flow = _scheduler()
    calls = Counter(chroma)
    base = _cond(torch.float32)

    def without(key):
        return {k: v for k, v in base.items() if k != key}

    negative = _prompt(torch.float32, 2, 10, 5)
    packed = torch.zeros(1, TOKENS, 16)
    cases = [
        (dict(base, pooled_projections=torch.zeros(1, 8)), "takes no pooled_projections"),
        (dict(base, guidance=3.5), "takes no guidance"),
        (without("encoder_hidden_states"), "'encoder_hidden_states'"),
        (without("txt_ids"), "'txt_ids'"),
        (without("attention_mask"), "_prepare_attention_mask"),
        (without("img_ids"), "_prepare_latent_image_ids"),
        (dict(base, img_ids=base["img_ids"].expand(BATCH, -1, -1)), "img_ids[0]"),
        (dict(base, txt_ids=torch.zeros(6, 3)), "txt_ids has 6 rows"),
        (dict(base, attention_mask=base["attention_mask"][:, :8]), "the prompt's mask alone"),
        (dict(base, attention_mask=torch.ones(1, 30)), "(batch or 1, 24)"),
        (dict(base, attention_mask=torch.ones(24)), "shape (24,)"),
        (
            dict(
                base,
                guidance_scale=TRUE_CFG,
                negative_cond={k: v for k, v in negative.items() if k != "attention_mask"},
            ),
            "negative_cond['attention_mask']",
        ),
        (
            dict(base, guidance_scale=TRUE_CFG, negative_cond=dict(negative, guidance=2.0)),
            "negative_cond['guidance']",
        ),
        (
            dict(base, joint_attention_kwargs={"ip_adapter_image_embeds": [torch.zeros(1, 1, 8)]}),
            "no IP-Adapter loaded",
        ),
        (dict(base, controlnet=tiny_flux_transformer()), "controlnet"),
        (dict(base, mask=packed, masked_image_latents=packed), "mask"),
        (dict(base, image_latents=packed), "image_latents"),
        (dict(base, control_latents=packed), "control_latents"),
    ]
    for cond, field in cases:
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(chroma, flow, **cond)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_states_that_are_not_the_pipelines_are_refused_before_the_call(chroma):
    """Image-shaped latents (the state is the packed one) and img_ids of another token count:
    one line at the first evaluation, before the transformer is called."""
    calls = Counter(chroma)
    ode = from_diffusers(chroma, _scheduler(), **_cond(torch.float32))
    for x, field in (
        (torch.zeros(BATCH, 4, 8, 8), "_pack_latents"),
        (torch.zeros(BATCH, 4 * TOKENS, 16), "img_ids has 16 rows"),
    ):
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, x)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


# ------------------------------------------------------------------ BDIA scheduler


def _invert(pipe, pair, cond):
    """BDIAInverseScheduler's loop from ``pair``, calling the transformer as ChromaPipeline
    does (``cond``'s embeddings, ids and mask, and its IP-Adapter's image embeddings where it
    has them, expanded to the batch; no guidance); returns the inverse scheduler."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(sigmas=_sigmas(), mu=_mu(pipe.scheduler))
    images = cond.get("joint_attention_kwargs", {}).get("ip_adapter_image_embeds", [])
    with torch.no_grad():
        x = inverse.begin(pair)
        for t in inverse.timesteps:
            # A dict of its own each call: the transformer pops the embeddings from it.
            joint = {"ip_adapter_image_embeds": [e.expand(BATCH, -1, -1) for e in images]}
            out = pipe.transformer(
                hidden_states=x,
                timestep=t.expand(BATCH).to(x.dtype) / 1000,
                encoder_hidden_states=cond["encoder_hidden_states"].expand(BATCH, -1, -1),
                txt_ids=cond["txt_ids"],
                img_ids=cond["img_ids"],
                attention_mask=cond["attention_mask"].expand(BATCH, -1),
                joint_attention_kwargs=joint if images else None,
                return_dict=False,
            )[0]
            x = inverse.step(out, t, x).prev_sample
    return inverse


def test_bdia_scheduler_in_chroma_pipeline_is_bdia_sample_and_inverts():
    """ChromaPipeline (guidance_scale 1) with BDIAScheduler.from_config(its config, gamma=0.9)
    gives the latents and the final pair (low words included) of bdia.sample with bdia(euler,
    0.9) on from_diffusers / diffusers_grid(mu=, sigmas=), bit for bit; the pipeline passes
    its own sigmas and mu to set_timesteps and calls set_begin_index, as FluxPipeline does.
    The inverse scheduler's loop, with the pipeline's transformer calls, returns the
    starting noise bit for bit, and so does bdia.invert from the pair."""
    pipe = tiny_chroma_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    assert pipe.scheduler.config.flow_matching
    noise = _noise(torch.float32)
    latents = _pipeline_latents(pipe, noise, "a photo of a fox", guidance_scale=1.0)
    cond = _encoded(pipe, "a photo of a fox")
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = diffusers_grid(pipe.scheduler, N_STEPS, mu=_mu(pipe.scheduler), sigmas=_sigmas())
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    inverse = _invert(pipe, pair, cond)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert len(inverse.timesteps) == N_STEPS - 1
    assert torch.equal(inverse.pair.earlier, noise)
    assert torch.equal(back.earlier, noise)


def test_bdia_scheduler_in_chroma_img2img_pipeline_is_bdia_sample_and_inverts():
    """ChromaImg2ImgPipeline (guidance_scale 1) with strength 0.6 runs the last 6 of 10
    timesteps from the image latents noised to timesteps[4], then packed. With
    BDIAScheduler (gamma 0.9) the noised latents are those of the pipeline with its own
    FlowMatchEulerDiscreteScheduler, bit for bit; the latents and final pair are
    bdia.sample's with bdia(euler, 0.9) from them over grid[4:], bit for bit; bdia(euler, 0)
    there gives the own scheduler's latents bit for bit; and the inverse scheduler's loop and
    bdia.invert return the noised latents, bit for bit."""
    parts = tiny_chroma_pipeline().components
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))

    def img2img(pipe):
        generator = torch.Generator().manual_seed(0)
        return _pipeline_latents(
            pipe,
            None,
            "a photo of a fox",
            image=image,
            strength=0.6,
            generator=generator,
            guidance_scale=1.0,
        )

    pipe, runs = flow_img2img_runs(diffusers.ChromaImg2ImgPipeline, parts, img2img)
    assert runs[1][1][0].shape == (BATCH, TOKENS, 16)  # the packed latents
    cond = _encoded(pipe, "a photo of a fox")
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = diffusers_grid(pipe.scheduler, N_STEPS, mu=_mu(pipe.scheduler), sigmas=_sigmas())
    assert_flow_img2img_is_bdia_sample(
        pipe, runs, ode, ts, 4, lambda pair: _invert(pipe, pair, cond)
    )


# ------------------------------------------------------------------------ edit_image


SOURCE, TARGET = "a photo of a cat", "a painting of a dog"


def _image(batch):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("cfg", [None, 1.0], ids=["true-cfg-5", "no-cfg"])
def test_edit_image_round_trip_is_exact(cfg):
    """edit_image on ChromaPipeline (bdia(euler, 0.96), float64 state): the grid is the
    pipeline's 10 sigmas, shifted by its mu for the 16 packed tokens, and the final 0; by
    default the pipeline's true CFG 5 with the negative prompt ""; reconstruct() returns
    the packed latents to 1e-12 relative (measured: 0, exactly)."""
    pipe = tiny_chroma_pipeline()
    out = edit_image(
        pipe, _image(2), SOURCE, TARGET, num_inference_steps=N_STEPS, guidance_scale=cfg
    )
    ts = diffusers_grid(pipe.scheduler, N_STEPS, mu=_mu(pipe.scheduler), sigmas=_sigmas())
    assert torch.equal(out.inversion.ts, ts)
    cond = out.inversion.ode.cond
    assert cond.get("guidance_scale") == (TRUE_CFG if cfg is None else None)
    assert ("negative_cond" in cond) == (cfg is None)
    assert cond["attention_mask"].shape == (1, 512 + TOKENS)  # T5's 512 tokens, then 16
    assert out.latents.shape == (2, TOKENS, 16) and out.latents.dtype == torch.float64
    assert out.latent_error < 1e-12
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)
    assert torch.isfinite(out.edited_latents).all()


def _calls(module, run):
    """The keyword arguments of each call of ``module`` while ``run()`` runs."""
    seen = []
    handle = module.register_forward_pre_hook(
        lambda m, a, k: seen.append(dict(k)), with_kwargs=True
    )
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    return seen


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("cfg", [None, 1.0], ids=["true-cfg-5", "no-cfg"])
def test_edit_image_gives_the_transformer_what_chroma_pipeline_gives_it(cfg):
    """ChromaPipeline.__call__ and edit_image (float32 state, the same prompt and guidance)
    give the transformer the same encoder_hidden_states, txt_ids, img_ids and
    attention_mask, bit for bit, in each branch (by default the conditional call, then the
    negative prompt ""'s), at the pipeline's timesteps and, once a branch, at timestep 0,
    where the inversion starts from the latents."""
    pipe = tiny_chroma_pipeline()
    options = {} if cfg is None else {"guidance_scale": cfg}
    theirs = _calls(
        pipe.transformer,
        lambda: pipe(
            SOURCE,
            height=16,
            width=16,
            num_inference_steps=N_STEPS,
            output_type="latent",
            **options,
        ),
    )
    ours = _calls(
        pipe.transformer,
        lambda: edit_image(
            pipe,
            _image(1),
            SOURCE,
            TARGET,
            num_inference_steps=N_STEPS,
            state_dtype=torch.float32,
            **options,
        ),
    )
    branches = 2 if cfg is None else 1
    assert len(theirs) == branches * N_STEPS and len(ours) == branches * (3 * N_STEPS - 1)
    for k in range(branches):
        for key in ("encoder_hidden_states", "txt_ids", "img_ids", "attention_mask"):
            assert torch.equal(ours[k][key], theirs[k][key]), (k, key)
    if branches == 2:  # the negative prompt's own embeddings and mask
        assert not torch.equal(ours[1]["attention_mask"], ours[0]["attention_mask"])
    timesteps = [{float(t) for r in run for t in r["timestep"]} for run in (ours, theirs)]
    assert timesteps[0] == timesteps[1] | {0.0} and len(timesteps[1]) == N_STEPS


def test_edit_image_refuses_what_chroma_does_not_take():
    """One line each, before any network runs: Flux's embedded guidance, prompt embeddings
    (their mask is made with them from the text), and an image prompt without an IP-Adapter
    loaded."""
    pipe = tiny_chroma_pipeline()
    calls = Counter(pipe.transformer)
    embeds = torch.zeros(1, 8, 16)
    for options, error, field in (
        (dict(guidance=3.5), ValueError, "embeds no guidance"),
        (dict(source_prompt=embeds), TypeError, "source_prompt must be text"),
        (dict(negative_prompt=embeds), TypeError, "negative_prompt must be text"),
        (dict(ip_adapter_image_embeds=[torch.zeros(1, 1, 8)]), ValueError, "no IP-Adapter loaded"),
    ):
        args = dict(source_prompt=SOURCE, target_prompt=TARGET, num_inference_steps=2)
        args.update(options)
        with pytest.raises(error) as exc_info:
            edit_image(pipe, _image(1), **args)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_edit_image_refuses_a_mask_without_pointing_to_a_fill_transformer():
    """A mask is refused in one line before any network runs, saying that the transformer
    takes the packed latents alone; unlike Flux's refusal it does not call a Fill transformer
    the one that takes a mask, since Chroma has none."""
    pipe = tiny_chroma_pipeline()
    calls = Counter(pipe.transformer)
    with pytest.raises(ValueError) as exc_info:
        edit_image(
            pipe,
            _image(1),
            SOURCE,
            TARGET,
            num_inference_steps=2,
            mask_image=torch.ones(1, 1, 16, 16),
        )
    _one_line_error(exc_info, "the packed latents alone")
    assert "a Fill transformer takes" not in str(exc_info.value)
    assert calls.calls == 0

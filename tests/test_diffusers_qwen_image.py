"""bdia.integrations.diffusers with Qwen-Image: QwenImageTransformer2DModel and
FlowMatchEulerDiscreteScheduler (exponential dynamic shifting, shift_terminal) as a
rectified-flow ODE on QwenImagePipeline's packed latents.

The transformer is a tiny random ``QwenImageTransformer2DModel``
(``tiny_qwen_image_transformer``); the pipeline (``tiny_qwen_image_pipeline``) has no text
encoder: it takes prompt embeddings and their padding masks directly. As for Flux, parity with
the pipeline is checked in float32, where both sides make the same float operations on the
same inputs and agree bit for bit; exactness of the inversion is checked in float64.
QwenImageImg2ImgPipeline runs the same transformer ODE on the grid's tail, from the image's
latents noised to its first timestep. QwenImagePipeline is in diffusers 0.35 and newer; with
older ones the module is skipped, and the img2img test where QwenImageImg2ImgPipeline is not.
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

if not hasattr(diffusers, "QwenImagePipeline"):
    pytest.skip("QwenImagePipeline is in diffusers 0.35 and newer", allow_module_level=True)

from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift  # noqa: E402

import bdia  # noqa: E402
from bdia.integrations.diffusers import (  # noqa: E402
    BDIAInverseScheduler,
    BDIAScheduler,
    diffusers_grid,
    edit_image,
    from_diffusers,
)
from bdia.integrations.diffusers.tiny import (  # noqa: E402
    QWEN_IMAGE_SCHEDULER,
    tiny_qwen_image_pipeline,
    tiny_qwen_image_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

N_STEPS = 8
BATCH = 2
TOKENS = 16  # 4 x 8 x 8 latents in patches of 2 x 2: 16 tokens of 16 channels
TRUE_CFG = 4.0  # the pipeline's true_cfg_scale
IMG_SHAPES = [[(1, 4, 4)]]  # QwenImagePipeline's for a 16 x 16 image (vae_scale_factor 2)


def _scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)


def _mu():
    """QwenImagePipeline's mu for TOKENS image tokens, from Qwen-Image's scheduler config."""
    cfg = QWEN_IMAGE_SCHEDULER
    return calculate_shift(
        TOKENS,
        cfg["base_image_seq_len"],
        cfg["max_image_seq_len"],
        cfg["base_shift"],
        cfg["max_shift"],
    )


def _grid(scheduler, steps=N_STEPS):
    """diffusers_grid with the unshifted sigmas and the mu QwenImagePipeline passes."""
    return diffusers_grid(scheduler, steps, mu=_mu(), sigmas=np.linspace(1.0, 1 / steps, steps))


def _noise(dtype):
    """QwenImagePipeline's state: image-shaped noise packed into tokens, (BATCH, 16, 16)."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(BATCH, 1, 4, 8, 8, generator=g).to(dtype)
    return diffusers.QwenImagePipeline._pack_latents(noise, BATCH, 4, 8, 8)


def _prompt(dtype, seed, tokens):
    """A batch of BATCH prompt embeddings of ``tokens`` tokens and their mask, the second
    prompt padded after 2 tokens fewer, as QwenImagePipeline.encode_prompt returns them."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(BATCH, tokens, dtype=torch.long)
    mask[1, tokens - 2 :] = 0
    return torch.randn(BATCH, tokens, 16, generator=g).to(dtype), mask


def _cond(dtype, *, true_cfg=False):
    """from_diffusers' conditioning: prompts of 5 tokens, the image shapes, and with
    ``true_cfg`` negative prompts of 7 tokens (their own mask)."""
    embeds, mask = _prompt(dtype, 1, 5)
    cond = dict(
        encoder_hidden_states=embeds, encoder_hidden_states_mask=mask, img_shapes=IMG_SHAPES
    )
    if true_cfg:
        negative, negative_mask = _prompt(dtype, 2, 7)
        cond.update(
            guidance_scale=TRUE_CFG,
            negative_cond=dict(
                encoder_hidden_states=negative, encoder_hidden_states_mask=negative_mask
            ),
        )
    return cond


def _pipeline_latents(pipe, noise, cond, **options):
    """QwenImagePipeline's latents from ``noise`` for ``cond``'s prompts (true CFG where it
    has a negative branch), 16 x 16 images; ``options`` are further arguments of the call
    (img2img's ``image``, ``strength`` and ``generator``)."""
    if "negative_cond" in cond:
        negative = cond["negative_cond"]
        options.update(
            negative_prompt_embeds=negative["encoder_hidden_states"],
            negative_prompt_embeds_mask=negative["encoder_hidden_states_mask"],
        )
    return pipe(
        prompt_embeds=cond["encoder_hidden_states"],
        prompt_embeds_mask=cond["encoder_hidden_states_mask"],
        true_cfg_scale=cond.get("guidance_scale", 1.0),
        latents=noise,
        num_inference_steps=N_STEPS,
        height=16,
        width=16,
        output_type="latent",
        **options,
    ).images


def _one_line_error(exc_info, field):
    message = str(exc_info.value)
    assert "\n" not in message and field in message, message


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_qwen_image_pipeline_gives_bdia_euler_latents(true_cfg):
    """QwenImagePipeline itself (tiny parts, prompt embeddings with a padded prompt, with or
    without true CFG 4 and negative prompts of another length) returns the latents of
    bdia.sample with euler on from_diffusers / diffusers_grid(mu=, sigmas=), bit for bit in
    float32: the grid holds the scheduler's float32 sigmas (shift_terminal's stretch and the
    exponential shift included), the transformer gets the pipeline's timestep t / 1000, and
    true CFG makes the pipeline's two calls and its u + g (c - u) rescaled token by token to
    the conditional velocity's norm."""
    pipe = tiny_qwen_image_pipeline()
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, true_cfg=true_cfg)
    latents = _pipeline_latents(pipe, noise, cond)
    ts = _grid(pipe.scheduler)
    assert ts.tolist() == [float(s) for s in pipe.scheduler.sigmas]
    assert float(ts[0]) == 1.0 and float(ts[-2]) == pytest.approx(0.02) and float(ts[-1]) == 0

    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    assert isinstance(ode.schedule, bdia.RectifiedFlow) and ode.prediction == "flow"
    calls = Counter(pipe.transformer)
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, ts, progress=False)
    assert calls.calls == N_STEPS * (2 if true_cfg else 1)  # the pipeline's count
    assert torch.equal(ours, latents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_transformer_sees_the_pipelines_arguments(dtype):
    """At every step the transformer gets QwenImagePipeline's timestep t.expand(batch).to(
    latents.dtype) / 1000 bit for bit (a bfloat16 transformer too: the timestep is rounded to
    bfloat16 before the division), the embeddings in its dtype with their integer mask as
    given, and img_shapes as given; the negative call of true CFG its own embeddings and
    mask, after the conditional call."""
    transformer = tiny_qwen_image_transformer(dtype=dtype)
    seen = []
    transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    scheduler = _scheduler()
    cond = _cond(torch.float32, true_cfg=True)
    ode = from_diffusers(transformer, scheduler, **cond)
    assert ode.model_dtype == dtype
    with torch.no_grad():
        bdia.sample(
            ode, bdia.get_solver("euler"), _noise(torch.float32), _grid(scheduler), progress=False
        )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / N_STEPS, N_STEPS), mu=_mu())
    assert len(seen) == 2 * N_STEPS
    negative = cond["negative_cond"]
    for k, t in enumerate(scheduler.timesteps):
        for kwargs, branch in zip(seen[2 * k : 2 * k + 2], (cond, negative)):
            assert torch.equal(kwargs["timestep"], t.expand(BATCH).to(dtype) / 1000)
            assert kwargs["hidden_states"].dtype == dtype
            embeds = kwargs["encoder_hidden_states"]
            assert torch.equal(embeds, branch["encoder_hidden_states"].to(dtype))
            assert kwargs["encoder_hidden_states_mask"] is branch["encoder_hidden_states_mask"]
            assert kwargs["img_shapes"] == IMG_SHAPES


@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_bdia_euler_inverts_to_float64_rounding(true_cfg):
    """bdia(euler, 0.96) on Qwen-Image's shifted grid, from the noise at t = 1 to 0 and back,
    returns the noise to 1e-12 relative (measured: 0, exactly, with the CFG rescaling too; the
    pair's low words carry what the state's rounding drops)."""
    transformer = tiny_qwen_image_transformer(dtype=torch.float64)
    scheduler = _scheduler()
    ode = from_diffusers(transformer, scheduler, **_cond(torch.float64, true_cfg=true_cfg))
    ts = _grid(scheduler)
    assert flow_round_trip_error(ode, _noise(torch.float64), ts) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


@torch.no_grad()
def _invert(pipe, pair, cond):
    """BDIAInverseScheduler's loop from ``pair``, calling the transformer as QwenImagePipeline
    does under true CFG (two calls, combined and rescaled); returns the inverse scheduler."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(sigmas=np.linspace(1.0, 1 / N_STEPS, N_STEPS), mu=_mu())

    def call(x, t, branch):
        return pipe.transformer(
            hidden_states=x,
            timestep=t.expand(BATCH).to(x.dtype) / 1000,
            encoder_hidden_states=branch["encoder_hidden_states"],
            encoder_hidden_states_mask=branch["encoder_hidden_states_mask"],
            img_shapes=IMG_SHAPES * BATCH,
            attention_kwargs={},
            return_dict=False,
        )[0]

    x = inverse.begin(pair)
    for t in inverse.timesteps:
        c, u = call(x, t, cond), call(x, t, cond["negative_cond"])
        guided = u + TRUE_CFG * (c - u)
        c_norm = torch.norm(c, dim=-1, keepdim=True)
        v = guided * (c_norm / torch.norm(guided, dim=-1, keepdim=True))
        x = inverse.step(v, t, x).prev_sample
    return inverse


def test_bdia_scheduler_in_qwen_image_pipeline_is_bdia_sample_and_inverts():
    """QwenImagePipeline (true CFG 4) with BDIAScheduler.from_config(its config, gamma=0.96)
    gives the latents and the final pair (low words included) of bdia.sample with bdia(euler,
    0.96) on from_diffusers / diffusers_grid(mu=, sigmas=), bit for bit: the pipeline passes
    its sigmas and mu to set_timesteps, reads base_image_seq_len and the other shift fields
    from the scheduler's config, and calls set_begin_index. bdia.invert from the pair, and
    the inverse scheduler's loop with the pipeline's transformer calls, return the pipeline's
    noise bit for bit."""
    pipe = tiny_qwen_image_pipeline()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.96)
    assert pipe.scheduler.config.flow_matching
    noise = _noise(torch.float32)
    cond = _cond(torch.float32, true_cfg=True)
    latents = _pipeline_latents(pipe, noise, cond)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = _grid(pipe.scheduler)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.96)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.96), pair, ts)
    assert torch.equal(back.earlier, noise)
    inverse = _invert(pipe, pair, cond)
    assert len(inverse.timesteps) == N_STEPS - 1
    assert torch.equal(inverse.pair.earlier, noise)


needs_img2img = pytest.mark.skipif(
    not hasattr(diffusers, "QwenImageImg2ImgPipeline"),
    reason="this diffusers has no QwenImageImg2ImgPipeline (0.35 and newer have it)",
)


def _img2img_parts():
    """tiny_qwen_image_pipeline's parts, its VAE given latents_mean and latents_std other
    than 0 and 1 (same weights), so that the pipeline's normalisation of the image latents
    shows in its start."""
    parts = tiny_qwen_image_pipeline().components
    vae = parts["vae"]
    stats = dict(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.5, 2.0, 1.5, 0.8])
    parts["vae"] = type(vae).from_config({**vae.config, **stats}).eval()
    parts["vae"].load_state_dict(vae.state_dict())
    return parts


@torch.no_grad()
def _img2img_start(pipe, image, k):
    """QwenImageImg2ImgPipeline's start, made by hand: the image's VAE latents (drawn with
    the generator of seed 0, then the noise from it), normalised to (z - latents_mean) /
    latents_std, repeated to the batch, noised to the grid's sigma at index ``k`` and packed
    (BATCH, TOKENS, 16)."""
    g = torch.Generator().manual_seed(0)
    x = pipe.image_processor.preprocess(image, height=16, width=16).to(torch.float32)
    z = pipe.vae.encode(x.unsqueeze(2)).latent_dist.sample(g)
    vae = pipe.vae.config
    z = (z - torch.tensor(vae.latents_mean).view(1, 4, 1, 1, 1)) * (
        1.0 / torch.tensor(vae.latents_std).view(1, 4, 1, 1, 1)
    )
    z = torch.cat([z] * BATCH).transpose(1, 2)
    noise = torch.randn(BATCH, 1, 4, 8, 8, generator=g)
    sigma = pipe.scheduler.sigmas[k]
    return diffusers.QwenImagePipeline._pack_latents(
        sigma * noise + (1.0 - sigma) * z, BATCH, 4, 8, 8
    )


@needs_img2img
def test_bdia_scheduler_in_qwen_image_img2img_pipeline_is_bdia_sample_and_inverts():
    """QwenImageImg2ImgPipeline (true CFG 4) with strength 0.6 runs the last 5 of 8
    timesteps (set_begin_index(3)) from the image's VAE latents, normalised with the VAE's
    latents_mean and latents_std, noised by scale_noise to timesteps[3] and packed, calling
    the transformer as QwenImagePipeline does (img_shapes included). With BDIAScheduler
    (gamma 0.9) the noised latents are those of the pipeline with its own scheduler, bit for
    bit, and those made by hand; the latents and final pair (low words included, start_index
    3) are bdia.sample's with bdia(euler, 0.9) from them over grid[3:] of from_diffusers /
    diffusers_grid(mu=, sigmas=), bit for bit; bdia(euler, 0) there gives the own
    scheduler's latents bit for bit; the inverse scheduler's loop and bdia.invert on grid[3:]
    return the noised latents bit for bit; and the pipeline given them as ``latents`` (with
    the same strength) runs from them to the same latents, bit for bit."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    cond = _cond(torch.float32, true_cfg=True)

    def img2img(pipe, latents=None):
        generator = torch.Generator().manual_seed(0)
        return _pipeline_latents(
            pipe, latents, cond, image=image, strength=0.6, generator=generator
        )

    pipe, runs = flow_img2img_runs(diffusers.QwenImageImg2ImgPipeline, _img2img_parts(), img2img)
    start = runs[1][1][0]
    assert start.shape == (BATCH, TOKENS, 16)  # the packed latents, as QwenImagePipeline's
    assert torch.equal(start, _img2img_start(pipe, image, 3))
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    ts = _grid(pipe.scheduler)
    assert_flow_img2img_is_bdia_sample(pipe, runs, ode, ts, 3, lambda p: _invert(pipe, p, cond))
    assert torch.equal(img2img(pipe, start.clone()), runs[1][0])


# -------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def transformer():
    return tiny_qwen_image_transformer()


def test_conditioning_the_transformer_cannot_take_is_refused(transformer):
    """One line each, before any call: missing embeddings or img_shapes, malformed
    img_shapes, embeddings of another width, a mask of another length, a key this diffusers'
    transformer does not take (txt_seq_lens, which 0.35's took), an embedded guidance, a
    ControlNet's residuals, under true CFG a negative branch without embeddings or without
    its own mask, the inputs of other pipelines (controlnet, mask, image_latents), and a
    guidance-distilled transformer."""
    flow = _scheduler()
    calls = Counter(transformer)
    base = _cond(torch.float32)
    guided = _cond(torch.float32, true_cfg=True)
    negative = guided["negative_cond"]

    def without(key, cond=base):
        return {k: v for k, v in cond.items() if k != key}

    cases = [
        (without("encoder_hidden_states"), "encoder_hidden_states"),
        (without("img_shapes"), "img_shapes"),
        (dict(base, img_shapes=[(1, 4, 4)]), "img_shapes"),
        (dict(base, img_shapes=[[(1, 4)]]), "img_shapes"),
        (dict(base, encoder_hidden_states=torch.zeros(BATCH, 5, 8)), "joint_attention_dim"),
        (dict(base, encoder_hidden_states_mask=torch.ones(BATCH, 4)), "encoder_hidden_states_mask"),
        (dict(base, txt_seq_lens=[5, 3]), "'txt_seq_lens'"),
        (dict(base, guidance=torch.ones(1)), "'guidance'"),
        (dict(base, controlnet_block_samples=[]), "controlnet_block_samples"),
        (dict(guided, negative_cond=without("encoder_hidden_states", negative)), "negative_cond"),
        (
            dict(guided, negative_cond=without("encoder_hidden_states_mask", negative)),
            "negative_cond['encoder_hidden_states_mask']",
        ),
        (dict(base, controlnet=torch.nn.Linear(1, 1)), "controlnet"),
        (dict(base, mask=torch.ones(1, TOKENS, 4)), "mask"),
        (dict(base, image_latents=torch.ones(1, TOKENS, 16)), "image_latents"),
    ]
    for cond, field in cases:
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(transformer, flow, **cond)
        _one_line_error(exc_info, field)
    distilled = tiny_qwen_image_transformer(guidance_embeds=True)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(distilled, flow, **base)
    _one_line_error(exc_info, "guidance_embeds = True")
    # edit_image maps Stable Diffusion's, SDXL's, SD3's and Flux's pipelines, not this one.
    pipe = tiny_qwen_image_pipeline()
    pipe.transformer = transformer
    with pytest.raises(ValueError) as exc_info:
        edit_image(pipe, torch.zeros(1, 3, 16, 16), "a fox", "a cat", num_inference_steps=4)
    _one_line_error(exc_info, "QwenImageTransformer2DModel")
    assert calls.calls == 0


def test_states_that_are_not_the_pipelines_are_refused_before_the_call(transformer):
    """Image-shaped latents (the state is the packed one), packed latents of another channel
    count, and img_shapes of another token count: one line at the first evaluation, before the
    transformer is called."""
    calls = Counter(transformer)
    ode = from_diffusers(transformer, _scheduler(), **_cond(torch.float32))
    for x, field in (
        (torch.zeros(BATCH, 1, 4, 8, 8), "_pack_latents"),
        (torch.zeros(BATCH, TOKENS, 4), "(batch, tokens, 16)"),
        (torch.zeros(BATCH, 4 * TOKENS, 16), "make 16 tokens"),
    ):
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, x)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


def test_a_transformer_that_takes_txt_seq_lens_needs_them_in_each_branch():
    """diffusers 0.35's transformer took txt_seq_lens (QwenImagePipeline passed
    prompt_embeds_mask.sum(dim=1).tolist()); where forward takes them, a branch without them
    is refused in one line, and each call of true CFG gets its own branch's."""

    class WithLengths(diffusers.QwenImageTransformer2DModel):
        def forward(self, hidden_states, txt_seq_lens=None, **kwargs):
            self.lengths.append(txt_seq_lens)
            return super().forward(hidden_states, **kwargs)

    torch.manual_seed(0)
    net = WithLengths(**dict(tiny_qwen_image_transformer().config)).eval()
    net.lengths = []
    cond = _cond(torch.float32, true_cfg=True)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(net, _scheduler(), **cond)
    _one_line_error(exc_info, "txt_seq_lens")
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(net, _scheduler(), **cond, txt_seq_lens=[5, 3])
    _one_line_error(exc_info, "negative_cond[txt_seq_lens]")
    cond["negative_cond"]["txt_seq_lens"] = [7, 5]
    ode = from_diffusers(net, _scheduler(), **cond, txt_seq_lens=[5, 3])
    with torch.no_grad():
        ode.evaluate(1.0, _noise(torch.float32))
    assert net.lengths == [[5, 3], [7, 5]]

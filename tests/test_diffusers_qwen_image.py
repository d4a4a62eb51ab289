"""bdia.integrations.diffusers with Qwen-Image: QwenImageTransformer2DModel and
FlowMatchEulerDiscreteScheduler (exponential dynamic shifting, shift_terminal) as a
rectified-flow ODE on QwenImagePipeline's packed latents.

The transformer is a tiny random ``QwenImageTransformer2DModel``
(``tiny_qwen_image_transformer``); the pipeline (``tiny_qwen_image_pipeline``) has no text
encoder: it takes prompt embeddings and their padding masks directly. As for Flux, parity with
the pipeline is checked in float32, where both sides make the same float operations on the
same inputs and agree bit for bit; exactness of the inversion is checked in float64.
QwenImageImg2ImgPipeline runs the same transformer ODE on the grid's tail, from the image's
latents noised to its first timestep. edit_image takes the pipeline's prompt embeddings with
their masks (text through its encode_prompt: test_diffusers_qwen_image_text) and its video
VAE's one-frame latents, normalised and packed as QwenImageImg2ImgPipeline makes them.
QwenImagePipeline and QwenImageImg2ImgPipeline are in diffusers 0.35 and newer, and import
with transformers 4.49 and newer (Qwen2.5-VL, their text encoder); elsewhere the module is
skipped.
"""

from __future__ import annotations

import sys

import diffusers
import numpy as np
import pytest
import torch
from _pipeline_runs import (
    assert_bdia_run_inverts,
    assert_decodes_as_the_pipeline,
    assert_edit_is_the_pipelines_run,
    refused_edit,
)
from conftest import (
    Counter,
    assert_flow_img2img_is_bdia_sample,
    flow_img2img_runs,
    flow_round_trip_error,
    untouched,
)
from test_diffusers_editing import _records

try:
    _QWEN_IMAGE = hasattr(diffusers, "QwenImagePipeline")
except RuntimeError as error:
    # diffusers imports the pipeline's module on first reading the name, and that module
    # imports transformers' Qwen2_5_VLForConditionalGeneration, which 4.48 and older lack.
    pytest.skip(
        f"diffusers {diffusers.__version__} cannot import QwenImagePipeline here: "
        f"{str(error).strip().splitlines()[-1]}",
        allow_module_level=True,
    )
if not _QWEN_IMAGE:
    pytest.skip(
        f"diffusers {diffusers.__version__} has no QwenImagePipeline (0.35 and newer have it)",
        allow_module_level=True,
    )

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
# diffusers 0.35's and 0.36's transformer needs the text lengths, which their pipeline passes;
# 0.37 and 0.38 count them from the mask (the argument deprecated, not passed), 0.39 on take none.
_DIFFUSERS = tuple(int(part) for part in diffusers.__version__.split(".")[:2])
LENGTHS = _DIFFUSERS < (0, 37)


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


def _lengths(mask):
    """The text lengths QwenImagePipeline passes with ``mask``'s prompts (LENGTHS), or none."""
    return dict(txt_seq_lens=mask.sum(dim=1).tolist()) if LENGTHS else {}


def _cond(dtype, *, true_cfg=False):
    """from_diffusers' conditioning: prompts of 5 tokens, the image shapes, and with
    ``true_cfg`` negative prompts of 7 tokens (their own mask); each branch with its text
    lengths where this diffusers' transformer needs them."""
    embeds, mask = _prompt(dtype, 1, 5)
    cond = dict(
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask,
        img_shapes=IMG_SHAPES,
        **_lengths(mask),
    )
    if true_cfg:
        negative, negative_mask = _prompt(dtype, 2, 7)
        cond.update(
            guidance_scale=TRUE_CFG,
            negative_cond=dict(
                encoder_hidden_states=negative,
                encoder_hidden_states_mask=negative_mask,
                **_lengths(negative_mask),
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
            assert kwargs.get("txt_seq_lens") == branch.get("txt_seq_lens")
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
def _invert(pipe, pair, cond, image=None, img_shapes=IMG_SHAPES * BATCH):
    """BDIAInverseScheduler's loop from ``pair``, calling the transformer as QwenImagePipeline
    does under true CFG (two calls, combined and rescaled; with a reference image's packed
    latents ``image``, as QwenImageEditPipeline does: its tokens after the latents', the
    output cut to the latents'); returns the inverse scheduler."""
    inverse = BDIAInverseScheduler.from_config(pipe.scheduler.config)
    inverse.set_timesteps(sigmas=np.linspace(1.0, 1 / N_STEPS, N_STEPS), mu=_mu())

    def call(x, t, branch):
        out = pipe.transformer(
            hidden_states=x if image is None else torch.cat([x, image], dim=1),
            timestep=t.expand(x.shape[0]).to(x.dtype) / 1000,
            encoder_hidden_states=branch["encoder_hidden_states"],
            encoder_hidden_states_mask=branch["encoder_hidden_states_mask"],
            img_shapes=img_shapes,
            attention_kwargs={},
            return_dict=False,
            **_lengths(branch["encoder_hidden_states_mask"]),
        )[0]
        return out[:, : x.shape[1]]

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
    pair = assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.96)
    inverse = _invert(pipe, pair, cond)
    assert len(inverse.timesteps) == N_STEPS - 1
    assert torch.equal(inverse.pair.earlier, noise)


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
    transformer does not take (txt_seq_lens, from 0.39 on), an embedded guidance, a
    ControlNet's residuals, under true CFG a negative branch without embeddings or without
    its own mask, the inputs of other pipelines (controlnet, mask, control_latents), and a
    guidance-distilled transformer. (QwenImageEditPipeline's image_latents are mapped; see
    test_diffusers_qwen_image_edit.)"""
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
        *([(dict(base, txt_seq_lens=[5, 3]), "'txt_seq_lens'")] if _DIFFUSERS >= (0, 39) else []),
        (dict(base, guidance=torch.ones(1)), "'guidance'"),
        (dict(base, controlnet_block_samples=[]), "controlnet_block_samples"),
        (dict(guided, negative_cond=without("encoder_hidden_states", negative)), "negative_cond"),
        (
            dict(guided, negative_cond=without("encoder_hidden_states_mask", negative)),
            "negative_cond['encoder_hidden_states_mask']",
        ),
        (dict(base, controlnet=torch.nn.Linear(1, 1)), "controlnet"),
        (dict(base, mask=torch.ones(1, TOKENS, 4)), "mask"),
        (dict(base, control_latents=torch.ones(1, TOKENS, 16)), "control_latents"),
    ]
    for cond, field in cases:
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(transformer, flow, **cond)
        _one_line_error(exc_info, field)
    distilled = tiny_qwen_image_transformer(guidance_embeds=True)
    with pytest.raises(ValueError) as exc_info:
        from_diffusers(distilled, flow, **base)
    _one_line_error(exc_info, "guidance_embeds = True")
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


class _WithLengths(diffusers.QwenImageTransformer2DModel):
    """0.35's and 0.36's transformer on any diffusers: its forward takes txt_seq_lens (kept in
    ``lengths``; handed on to diffusers' forward where that needs them), in a module, this
    test's, that has no compute_text_seq_len_from_mask."""

    def forward(self, hidden_states, txt_seq_lens=None, **kwargs):
        self.lengths.append(txt_seq_lens)
        return super().forward(
            hidden_states, **kwargs, **(dict(txt_seq_lens=txt_seq_lens) if LENGTHS else {})
        )


def _with_lengths():
    torch.manual_seed(0)
    net = _WithLengths(**dict(tiny_qwen_image_transformer().config)).eval()
    net.lengths = []
    return net


def _without_lengths(cond):
    """``cond`` and its negative branch without txt_seq_lens."""
    cond = {k: v for k, v in cond.items() if k != "txt_seq_lens"}
    negative = {k: v for k, v in cond["negative_cond"].items() if k != "txt_seq_lens"}
    return dict(cond, negative_cond=negative)


def test_a_transformer_that_needs_txt_seq_lens_needs_them_in_each_branch():
    """diffusers 0.35's and 0.36's transformer needs txt_seq_lens (QwenImagePipeline passes
    prompt_embeds_mask.sum(dim=1).tolist()); where forward takes them and its module cannot
    count them from the mask, a branch without them is refused in one line, and each call of
    true CFG gets its own branch's."""
    net = _with_lengths()
    cond = _without_lengths(_cond(torch.float32, true_cfg=True))
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


@pytest.mark.parametrize(
    "lengths, negative, field",
    [
        ([3, 3], [7, 5], "txt_seq_lens is [3, 3], whose longest is not the 5 tokens"),
        ([5, 3], [5, 5], "negative_cond['txt_seq_lens'] is [5, 5], whose longest is not the 7"),
        ([5.0, 3.0], [7, 5], "give a list of ints"),
    ],
    ids=["padded-batch", "negative", "floats"],
)
def test_text_lengths_whose_longest_is_not_the_embeddings_are_refused(lengths, negative, field):
    """diffusers 0.35's and 0.36's transformer gives the text max(txt_seq_lens) rotary
    positions, one per token of the embeddings, or fails part way through its call (their
    encode_prompt pads to the longest prompt alone): lengths whose longest is not the
    embeddings' token count, in either branch, or that are not ints, are refused in one line
    before any call, the caller's tensors untouched."""
    net = _with_lengths()
    calls = Counter(net)
    cond = _without_lengths(_cond(torch.float32, true_cfg=True))
    cond["negative_cond"]["txt_seq_lens"] = negative
    with untouched(cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"]):
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(net, _scheduler(), **cond, txt_seq_lens=lengths)
    _one_line_error(exc_info, field)
    assert calls.calls == 0 and net.lengths == []


# ------------------------------------------------------------------------ edit_image


def _image(batch=BATCH):
    return torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(5)) * 2 - 1


def _target():
    """The target prompt: 6 tokens, none of them padding (encode_prompt drops its mask)."""
    embeds, mask = _prompt(torch.float32, 3, 6)
    return embeds, torch.ones_like(mask)


def _negative():
    """The negative prompt of true CFG: 7 tokens, the second prompt padded after 5."""
    return _prompt(torch.float32, 2, 7)


def _target_args(target, negative=None):
    """QwenImagePipeline's arguments for the (embeddings, mask) pair ``target`` and, with the
    pair ``negative``, true CFG 4 against it (true_cfg_scale 1 without: no true CFG)."""
    args = dict(prompt_embeds=target[0], prompt_embeds_mask=target[1], true_cfg_scale=1.0)
    if negative is not None:
        args.update(
            true_cfg_scale=TRUE_CFG,
            negative_prompt_embeds=negative[0],
            negative_prompt_embeds_mask=negative[1],
        )
    return args


def _edit(pipe, true_cfg, dtype=torch.float64, image=None, **options):
    """edit_image on ``pipe`` from source prompts of 5 tokens to targets of 6, with true CFG 4
    and negative prompts of 7 tokens where ``true_cfg``."""
    if true_cfg:
        options.update(guidance_scale=TRUE_CFG, negative_prompt=_negative())
    return edit_image(
        pipe,
        _image() if image is None else image,
        _prompt(torch.float32, 1, 5),
        _target(),
        num_inference_steps=N_STEPS,
        state_dtype=dtype,
        **options,
    )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
@pytest.mark.parametrize(
    "state_dtype, bound",
    # As for Flux: float64 carries ~2^-106; a float32 state ~2^-48, magnified by prod(1 /
    # gamma) and true CFG, so 1e-5 there. Measured: 0 in all four.
    [(torch.float64, 1e-12), (torch.float32, 1e-5)],
)
def test_edit_image_round_trip_is_exact(true_cfg, state_dtype, bound):
    """edit_image on QwenImagePipeline (prompt embeddings and their masks, bdia(euler,
    0.96)): the grid is the pipeline's 8 sigmas, shifted by its mu for the 16 packed tokens,
    and the final 0; no true CFG by default (the pipeline's true_cfg_scale acts only with a
    negative prompt), true CFG 4 with negative embeddings; reconstruct() returns the packed
    latents to ``bound`` relative, and the decoded reconstruction's error is the VAE's
    own."""
    pipe = tiny_qwen_image_pipeline()
    out = _edit(pipe, true_cfg, state_dtype)
    assert torch.equal(out.inversion.ts, _grid(pipe.scheduler))
    assert out.inversion.solver.identity == "bdia(euler, gamma=0.96)"
    cond = out.inversion.ode.cond
    assert cond.get("guidance_scale") == (TRUE_CFG if true_cfg else None)
    assert ("negative_cond" in cond) == true_cfg
    assert cond["img_shapes"] == IMG_SHAPES * BATCH
    assert out.latents.shape == (BATCH, TOKENS, 16) and out.latents.dtype == state_dtype
    assert out.latent_error < bound
    assert out.reconstruction_error == pytest.approx(out.vae_error, rel=1e-6)
    assert torch.isfinite(out.edited_latents).all()
    assert out.images.shape == (BATCH, 3, 16, 16)


def _by_hand(pipe, image, dtype):
    """QwenImageImg2ImgPipeline's image latents made by hand in ``dtype``: the mean of the
    VAE's distribution of the one-frame video, (z - latents_mean) * (1 / latents_std), packed
    (BATCH, TOKENS, 16)."""
    vae = pipe.vae.config
    with torch.no_grad():
        z = pipe.vae.encode(image.unsqueeze(2)).latent_dist.mean.to(dtype)
    mean = torch.tensor(vae.latents_mean).view(1, 4, 1, 1, 1).to(dtype)
    scale = 1.0 / torch.tensor(vae.latents_std).view(1, 4, 1, 1, 1).to(dtype)
    return diffusers.QwenImagePipeline._pack_latents((z - mean) * scale, BATCH, 4, 8, 8)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_edit_is_a_hand_run_regenerate_under_the_target(true_cfg):
    """Every stage by hand (float64, a VAE with latents_mean and latents_std other than 0
    and 1): the packed, normalised latents; from_diffusers with the embeddings, their masks
    as encode_prompt returns them (None for the target's, all ones) and the image shapes;
    QwenImagePipeline's sigmas and mu; Inversion.of with bdia(euler, 0.96): its noise and the
    end state of its pair, bit for bit, and regenerate(target)."""
    pipe = diffusers.QwenImagePipeline(**_img2img_parts())
    out = _edit(pipe, true_cfg)
    latents = _by_hand(pipe, _image(), torch.float64)
    assert torch.equal(out.latents, latents)

    def ode(embeds, mask):
        cond = dict(
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None if mask.all() else mask,
            img_shapes=IMG_SHAPES * BATCH,
            **_lengths(mask),
        )
        if true_cfg:
            negative, negative_mask = _negative()
            cond.update(
                guidance_scale=TRUE_CFG,
                negative_cond=dict(
                    encoder_hidden_states=negative,
                    encoder_hidden_states_mask=negative_mask,
                    **_lengths(negative_mask),
                ),
            )
        return from_diffusers(pipe.transformer, pipe.scheduler, **cond)

    solver = bdia.bdia(bdia.get_solver("euler"), 0.96)
    with torch.no_grad():
        inversion = bdia.Inversion.of(
            ode(*_prompt(torch.float32, 1, 5)),
            solver,
            latents,
            _grid(pipe.scheduler),
            state_dtype=torch.float64,
        )
        edited = inversion.regenerate(ode(*_target()), rule="base")
    assert torch.equal(inversion.noise, out.inversion.noise)
    assert torch.equal(inversion.pair.earlier, out.inversion.pair.earlier)
    assert torch.equal(inversion.pair.later, out.inversion.pair.later)
    assert torch.equal(edited, out.edited_latents)
    assert float((out.edited_latents - out.reconstructed_latents).abs().max()) > 0.1


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_the_edit_is_the_pipelines_run_from_the_inverted_noise(true_cfg):
    """With a float32 state, edit_image's edited latents are bit for bit what
    QwenImagePipeline returns from the inverted noise under the target prompt (its
    true_cfg_scale 4 with the negative embeddings where guided), the edit's base solver
    being the pipeline's Euler step on its own sigmas."""
    pipe = tiny_qwen_image_pipeline()
    out = _edit(pipe, true_cfg, torch.float32)
    target = _target_args(_target(), _negative() if true_cfg else None)
    assert_edit_is_the_pipelines_run(pipe, out, N_STEPS, height=16, width=16, **target)


def test_edit_image_encodes_and_decodes_as_the_qwen_image_pipelines(monkeypatch):
    """With a float32 state (a VAE with latents_mean and latents_std other than 0 and 1),
    edit_image's latents are bit for bit what QwenImageImg2ImgPipeline's prepare_latents
    makes of the image (its sample of the latent distribution replaced by the mean, which
    edit_image takes, and its noising by none), and its decoded edit is bit for bit the image
    QwenImagePipeline decodes from the edited latents (_unpack_latents, latents / (1 /
    latents_std) + latents_mean, the frame's image). With a float64 state the reconstruction
    is the VAE's decoding of that map in float64."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_img2img

    parts = _img2img_parts()
    pipe = diffusers.QwenImagePipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = _image()
    out = _edit(pipe, False, torch.float32, image=image)
    monkeypatch.setattr(
        pipeline_qwenimage_img2img,
        "retrieve_latents",
        lambda output, generator=None, sample_mode="sample": output.latent_dist.mean,
    )
    img2img = diffusers.QwenImageImg2ImgPipeline(**parts)
    monkeypatch.setattr(img2img.scheduler, "scale_noise", lambda sample, timestep, noise: sample)
    with torch.no_grad():
        theirs = img2img.prepare_latents(image, None, BATCH, 4, 16, 16, torch.float32, "cpu", None)
    assert theirs.shape == (BATCH, TOKENS, 16)
    assert torch.equal(out.latents, theirs)

    embeds, mask = _prompt(torch.float32, 1, 5)
    assert_decodes_as_the_pipeline(
        pipe, out, prompt_embeds=embeds, prompt_embeds_mask=mask, height=16, width=16
    )

    double = _edit(pipe, False, image=image)
    config = pipe.vae.config
    z = pipe._unpack_latents(double.reconstructed_latents, 16, 16, 2)
    scale = 1.0 / torch.tensor(config.latents_std).view(1, 4, 1, 1, 1).double()
    z = z / scale + torch.tensor(config.latents_mean).view(1, 4, 1, 1, 1).double()
    with torch.no_grad():
        by_hand = pipe.vae.decode(z.float()).sample[:, :, 0].clamp(-1, 1)
    assert torch.equal(double.reconstruction, by_hand)


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_edit_image_gives_the_transformer_what_qwen_image_pipeline_gives_it(true_cfg):
    """QwenImagePipeline.__call__ and edit_image (float32 state, the same embeddings) give
    the transformer the same encoder_hidden_states, encoder_hidden_states_mask and
    img_shapes in each branch (the conditional call, then the negative one), bit for bit,
    at the pipeline's timesteps and, once a branch, at timestep 0, where the inversion
    starts from the latents."""
    pipe = tiny_qwen_image_pipeline()
    cond = _cond(torch.float32, true_cfg=true_cfg)
    theirs, _ = _records(
        pipe.transformer, lambda: _pipeline_latents(pipe, _noise(torch.float32), cond)
    )
    ours, _ = _records(pipe.transformer, lambda: _edit(pipe, true_cfg, torch.float32))
    branches = 2 if true_cfg else 1
    assert len(theirs) == branches * N_STEPS and len(ours) == branches * (3 * N_STEPS - 1)
    for k in range(branches):
        for key in ("encoder_hidden_states", "encoder_hidden_states_mask"):
            assert torch.equal(ours[k][key], theirs[k][key]), (k, key)
        assert ours[k]["img_shapes"] == theirs[k]["img_shapes"] == IMG_SHAPES * BATCH
    timesteps = [{float(t) for r in run for t in r["timestep"]} for run in (ours, theirs)]
    assert timesteps[0] == timesteps[1] | {0.0} and len(timesteps[1]) == N_STEPS


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("name", ["QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"])
def test_the_img2img_and_inpainting_pipelines_edit_as_the_text_to_image_one(name):
    """QwenImageImg2ImgPipeline (its strength plays no part) and, without a mask,
    QwenImageInpaintPipeline edit as QwenImagePipeline of the same parts, bit for bit."""
    if not hasattr(diffusers, name):
        pytest.skip(f"diffusers {diffusers.__version__} has no {name}")
    parts = tiny_qwen_image_pipeline().components
    ref = _edit(diffusers.QwenImagePipeline(**parts), True)
    out = _edit(getattr(diffusers, name)(**parts), True)
    assert torch.equal(out.inversion.noise, ref.inversion.noise)
    assert torch.equal(out.edited_latents, ref.edited_latents)


def test_text_prompts_go_through_the_pipelines_encode_prompt(monkeypatch):
    """With a tokenizer and a text encoder, text prompts go through the pipeline's
    encode_prompt (one call a prompt, num_images_per_prompt 1, the pipeline's
    max_sequence_length 512), whose (prompt_embeds, prompt_embeds_mask) the edit takes as it
    takes them given: the same edit, bit for bit. (test_diffusers_qwen_image_text runs the
    real encode_prompt on a tiny Qwen2.5-VL.)"""
    pipe = tiny_qwen_image_pipeline()
    ref = _edit(pipe, True)
    pairs = {"a cat": _prompt(torch.float32, 1, 5), "a dog": _target()}
    pairs[" "] = _negative()
    encode = pipe.encode_prompt
    seen = []

    def encode_prompt(prompt, device=None, num_images_per_prompt=1, **kwargs):
        seen.append((prompt, num_images_per_prompt, kwargs))
        embeds, mask = pairs[prompt]
        return encode(None, device, num_images_per_prompt, embeds, mask)

    # Stand-ins, never called: edit_image asks encode_prompt, which holds them.
    pipe.tokenizer, pipe.text_encoder = object(), torch.nn.Identity()
    monkeypatch.setattr(pipe, "encode_prompt", encode_prompt)
    out = edit_image(
        pipe,
        _image(),
        "a cat",
        "a dog",
        num_inference_steps=N_STEPS,
        guidance_scale=TRUE_CFG,
        negative_prompt=" ",
    )
    tokens = {"max_sequence_length": 512}
    assert seen == [("a cat", 1, tokens), ("a dog", 1, tokens), (" ", 1, tokens)]
    assert torch.equal(out.inversion.noise, ref.inversion.noise)
    assert torch.equal(out.edited_latents, ref.edited_latents)


def test_a_transformer_that_takes_txt_seq_lens_gets_each_prompts_own():
    """Where the transformer takes txt_seq_lens (diffusers 0.35's), edit_image passes each
    branch's mask.sum(dim=1).tolist(), as that QwenImagePipeline does (every token where
    encode_prompt drops an all-ones mask)."""
    pipe = tiny_qwen_image_pipeline()
    net = _WithLengths(**dict(pipe.transformer.config)).eval()
    net.load_state_dict(pipe.transformer.state_dict())
    net.lengths = []
    pipe.transformer = net
    _edit(pipe, True)
    # Per step the conditional call, then the negative one; the target's mask is all ones.
    assert net.lengths[:2] == [[5, 3], [7, 5]] and net.lengths[-2:] == [[6, 6], [7, 5]]


def test_edit_image_gives_no_lengths_to_a_transformer_that_counts_them_from_the_mask(
    monkeypatch,
):
    """diffusers 0.37's and 0.38's transformer takes txt_seq_lens only as a deprecated
    argument, counting the text from the mask (compute_text_seq_len_from_mask in its module),
    and their QwenImagePipeline passes none: neither does edit_image. This test's module
    stands in for theirs, on a diffusers whose own forward counts them too."""
    if LENGTHS:
        pytest.skip(
            f"diffusers {diffusers.__version__}'s QwenImageTransformer2DModel needs txt_seq_lens "
            "(counting the text from the mask is in 0.37 and newer), which the stand-in for "
            "0.37's does not hand on"
        )
    monkeypatch.setattr(
        sys.modules[__name__], "compute_text_seq_len_from_mask", lambda *a: None, raising=False
    )
    pipe = tiny_qwen_image_pipeline()
    net = _WithLengths(**dict(pipe.transformer.config)).eval()
    net.load_state_dict(pipe.transformer.state_dict())
    net.lengths = []
    pipe.transformer = net
    out = _edit(pipe, True)
    assert net.lengths and all(lengths is None for lengths in net.lengths)
    assert out.latent_error < 1e-12


def _refused(pipe, source=None, **options):
    """refused_edit's one-line message for an edit from ``source`` (the source prompt of 5
    tokens by default) to the target."""
    source = _prompt(torch.float32, 1, 5) if source is None else source
    return refused_edit(pipe, options.pop("image", _image()), source, _target(), **options)


@pytest.mark.parametrize(
    "kind, fragment",
    [
        ("text", "no tokenizer (QwenImagePipeline.tokenizer is missing or None)"),
        ("text", "to embed the text of source_prompt (or pass the pair (prompt_embeds,"),
        ("negative text", "to embed the text of negative_prompt"),
        ("one tensor", "a Qwen-Image transformer also needs the embeddings' mask"),
        ("mask shape", "the prompt_embeds_mask, must have shape (2, 5)"),
        ("embeddings dim", "dim 8, but the transformer's joint_attention_dim is 16"),
        ("guidance", "guidance is the guidance scale Flux.1-dev's transformer embeds"),
        ("size", "not a multiple of 4, the vae's downsampling factor 2 times 2, QwenImagePipe"),
        ("layered", "the pipeline is a QwenImageLayeredPipeline, which gives the transformer"),
        ("inpaint mask", "QwenImageInpaintPipeline whose transformer takes in_channels = 16,"),
        ("mask", "mask_image was given, but the pipeline's transformer takes in_channels = 16"),
        ("image prompt", "ip_adapter_image_embeds was given, but the pipeline's network has no"),
        ("no stats", "lacks latents_mean or latents_std"),
        ("channels", "the transformer takes in_channels = 32 but the vae's z_dim = 4"),
    ],
)
def test_edit_image_refuses_what_qwen_image_does_not_take(kind, fragment):
    """One line each, before the transformer or the VAE runs: a text prompt (the negative
    prompt's included) without a text encoder, one tensor without its mask, a mask that is
    not the embeddings', embeddings of another width, an embedded guidance, a size the
    packing cannot take, a Qwen-Image pipeline that conditions on more (Layered), a mask
    (the inpainting pipeline blends; the text-to-image one takes none), an image prompt, a
    VAE without its statistics and a transformer of other channels."""
    pipe, source, options = tiny_qwen_image_pipeline(), None, {}
    if kind == "text":
        source = "a photo of a cat"
    elif kind == "negative text":
        options = dict(guidance_scale=TRUE_CFG)  # the default negative prompt "" is text
    elif kind == "one tensor":
        source = _prompt(torch.float32, 1, 5)[0]
    elif kind == "mask shape":
        embeds, mask = _prompt(torch.float32, 1, 5)
        source = (embeds, mask[:, :4])
    elif kind == "embeddings dim":
        embeds, mask = _prompt(torch.float32, 1, 5)
        source = (embeds[..., :8], mask)
    elif kind == "guidance":
        options = dict(guidance=3.5)
    elif kind == "size":
        options = dict(image=_image()[..., :14])
    elif kind == "layered":  # by its name: its transformer is the same class
        name = "QwenImageLayeredPipeline"
        pipe = type(name, (diffusers.QwenImagePipeline,), {})(**pipe.components)
    elif kind == "inpaint mask":
        if not hasattr(diffusers, "QwenImageInpaintPipeline"):
            pytest.skip(f"diffusers {diffusers.__version__} has no QwenImageInpaintPipeline")
        pipe = diffusers.QwenImageInpaintPipeline(**pipe.components)
        options = dict(mask_image=torch.ones(1, 1, 16, 16))
    elif kind == "mask":
        options = dict(mask_image=torch.ones(1, 1, 16, 16))
    elif kind == "image prompt":
        options = dict(ip_adapter_image_embeds=[torch.zeros(1, 1, 8)])
    elif kind == "no stats":
        vae = pipe.vae
        vae.register_to_config(latents_std=None)
    else:
        pipe.transformer = tiny_qwen_image_transformer(in_channels=32)
    assert fragment in _refused(pipe, source, **options)


def test_a_transformer_that_counts_the_text_from_the_mask_is_not_asked_for_lengths(
    monkeypatch,
):
    """diffusers 0.37's and 0.38's transformer takes txt_seq_lens as a deprecated argument and
    counts the text tokens from the mask (compute_text_seq_len_from_mask in its module); their
    QwenImagePipeline passes none, and neither does from_diffusers unless they are given. Here
    this test's module stands in for theirs (where diffusers' own forward needs the lengths,
    0.35 and 0.36, the stand-in is only built, not called)."""
    net = _with_lengths()
    monkeypatch.setattr(
        sys.modules[__name__], "compute_text_seq_len_from_mask", lambda *a: None, raising=False
    )
    ode = from_diffusers(net, _scheduler(), **_without_lengths(_cond(torch.float32, true_cfg=True)))
    if not LENGTHS:
        with torch.no_grad():
            ode.evaluate(1.0, _noise(torch.float32))
        assert net.lengths == [None, None]

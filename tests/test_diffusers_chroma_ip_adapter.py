"""Chroma with Flux's IP-Adapter (image prompts, XLabs' format) in
bdia.integrations.diffusers: ChromaPipeline and ChromaImg2ImgPipeline load Flux's adapters
(``FluxIPAdapterMixin``; ``ChromaTransformer2DModel`` has Flux's loader) and pass their
embeddings as FluxPipeline does, in the transformer's ``joint_attention_kwargs={
"ip_adapter_image_embeds": [...]}``, the negative call of true CFG its own (by default an
all-zero image's). from_diffusers against the pipelines, BDIAScheduler in them, edit_image,
and the refusals.

Tiny random pipelines: ``tiny_chroma_pipeline`` with ``add_tiny_flux_ip_adapter``'s CLIP
image encoder and IP-Adapter of random weights. The image embeddings are fixed over the
run, so it is an ODE; as for Chroma without the adapter, parity is bit for bit in float32
and the round trip exact in float64.
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
    untouched,
)
from test_diffusers_chroma import (
    BATCH,
    N_STEPS,
    _encoded,
    _invert,
    _mu,
    _noise,
    _pipeline_latents,
    _sigmas,
)
from test_diffusers_flux_ip_adapter import (
    _edit,
    _embeds,
    _float64,
    _prompt_and_zero_embeds,
    _with_images,
    assert_image_prompt_refused,
    assert_ip_conditioning_refused,
    assert_one_image_prompt_for_both_calls,
)
from test_diffusers_ip_adapter import _edit_image, _image_prompt, _one_line_error, _rel

import bdia
from bdia.integrations.diffusers import BDIAScheduler, diffusers_grid, from_diffusers
from bdia.integrations.diffusers.tiny import add_tiny_flux_ip_adapter, tiny_chroma_pipeline

pytestmark = [
    # diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about.
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    # diffusers' Chroma transformer builds the deprecated FluxPosEmbed; not ours.
    pytest.mark.filterwarnings("ignore:`FluxPosEmbed` is deprecated:FutureWarning"),
    # The random transformer and IP-Adapter under true CFG 5 drive BDIA's parasitic mode past
    # the warning's threshold in edit_image's 8 steps; the round trip is exact all the same.
    pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning"),
    pytest.mark.skipif(
        not hasattr(diffusers, "ChromaPipeline"),
        reason=f"diffusers {diffusers.__version__} has no ChromaPipeline",
    ),
]

PROMPT, NEGATIVE = "a photo of a cat", "a blue painting"
EULER = bdia.get_solver("euler")


def _pipe(adapters=1):
    """A tiny ChromaPipeline with ``adapters`` Flux IP-Adapters loaded."""
    return add_tiny_flux_ip_adapter(tiny_chroma_pipeline(), adapters=adapters)


def _cond(pipe, embeds, negative=None):
    """from_diffusers' conditioning of the pipeline's prompt and image prompt ``embeds``;
    with ``negative`` (the negative call's image embeddings), true CFG 5 with NEGATIVE."""
    cond = _encoded(pipe, PROMPT, NEGATIVE if negative is not None else None)
    cond = _with_images(cond, embeds)
    if negative is not None:
        cond["negative_cond"] = _with_images(cond["negative_cond"], negative)
    return cond


def _run(pipe, embeds, negative=None, noise=None, **options):
    """ChromaPipeline's latents with ``embeds`` as its ip_adapter_image_embeds; with
    ``negative``, true CFG 5 with NEGATIVE and those as negative_ip_adapter_image_embeds,
    else guidance_scale 1."""
    if negative is not None:
        options.update(negative_prompt=NEGATIVE, negative_ip_adapter_image_embeds=negative)
    else:
        options.setdefault("guidance_scale", 1.0)
    with torch.no_grad():
        return _pipeline_latents(
            pipe,
            _noise(torch.float32) if noise is None else noise,
            PROMPT,
            ip_adapter_image_embeds=embeds,
            **options,
        )


def _grid(pipe):
    return diffusers_grid(pipe.scheduler, N_STEPS, mu=_mu(pipe.scheduler), sigmas=_sigmas())


def _sample(pipe, cond, solver=EULER):
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    with torch.no_grad():
        return bdia.sample(ode, solver, _noise(torch.float32), _grid(pipe), progress=False)


# --------------------------------------------------------------------------- parity


def test_a_chroma_transformer_loads_flux_ip_adapters():
    """ChromaPipeline has FluxIPAdapterMixin's load_ip_adapter and its transformer Flux's
    loader: the adapter becomes the transformer's image projection and the IP-Adapter
    processors of its double-stream blocks (the single-stream ones keep theirs)."""
    assert hasattr(diffusers.ChromaPipeline, "load_ip_adapter")
    assert hasattr(diffusers.ChromaImg2ImgPipeline, "load_ip_adapter")
    pipe = _pipe()
    # Processor class names change with diffusers (0.34's FluxIPAdapterJointAttnProcessor2_0
    # and FluxAttnProcessor2_0, later FluxIPAdapterAttnProcessor and FluxAttnProcessor).
    by_block = {name: type(p).__name__ for name, p in pipe.transformer.attn_processors.items()}
    assert by_block and all(
        ("IPAdapter" in kind) == name.startswith("transformer_blocks.")
        for name, kind in by_block.items()
    ), by_block
    assert any(name.startswith("single_transformer_blocks.") for name in by_block)
    assert pipe.transformer.encoder_hid_proj.num_ip_adapters == 1


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("adapters", [1, 2], ids=["one", "two"])
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_chroma_ip_adapter_pipeline_gives_bdia_samples_latents(true_cfg, adapters):
    """ChromaPipeline with IP-Adapters (guidance_scale 1; or its true CFG 5 with a negative
    prompt and negative image embeddings of their own, not zeros) returns the latents of
    bdia.sample with euler on from_diffusers' ODE with the image embeddings in
    joint_attention_kwargs, bit for bit: batch-1 embeddings expanded to the 2 images, the
    negative call given its own. Image embeddings given to the other call would be another
    run (checked: the conditional ones in both calls are off by more than 1e-2 relative;
    measured 1.0 and 0.95 with one and two adapters)."""
    pipe = _pipe(adapters)
    embeds = _embeds(adapters)
    negative = _embeds(adapters, seed=4) if true_cfg else None
    theirs = _run(pipe, embeds, negative)
    cond = _cond(pipe, embeds, negative)
    assert torch.equal(_sample(pipe, cond), theirs)
    if true_cfg:
        both = dict(cond, negative_cond=_with_images(cond["negative_cond"], embeds))
        other = _rel(_sample(pipe, both), theirs)
        print(f"the conditional image embeddings in both calls: {other:.3g} (relative, max)")
        assert other > 1e-2


def test_the_ip_adapter_pipeline_with_an_image_gives_bdia_samples_latents():
    """With ip_adapter_image (a PIL image through the pipeline's feature_extractor and
    image_encoder) and true CFG, ChromaPipeline embeds an all-zero image for the negative
    call, as FluxPipeline does; from prepare_ip_adapter_image_embeds of the image and of that
    all-zero image, bdia.sample gives the pipeline's latents bit for bit."""
    pipe = _pipe()
    image = _image_prompt(0)
    with torch.no_grad():
        theirs = _pipeline_latents(
            pipe, _noise(torch.float32), PROMPT, negative_prompt=NEGATIVE, ip_adapter_image=image
        )
    embeds, negative = _prompt_and_zero_embeds(pipe, image)
    assert torch.equal(_sample(pipe, _cond(pipe, embeds, negative)), theirs)
    assert negative[0].abs().max() > 0.1  # an all-zero image's embedding is not zeros


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_bdia_euler_inverts_exactly_under_the_image_prompt(true_cfg):
    """bdia(euler, 0.96) on the float64 transformer with its IP-Adapter, from the noise at
    t = 1 to 0 and back, returns the noise to 1e-12 relative (measured: 0, exactly)."""
    pipe = _pipe()
    embeds = _embeds(1, torch.float64)
    negative = _embeds(1, torch.float64, seed=4) if true_cfg else None
    cond = _float64(_cond(pipe, embeds, negative))
    pipe.transformer.to(torch.float64)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    assert ode.model_dtype == torch.float64
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(pipe)) < 1e-12


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["plain", "true-cfg"])
def test_bdia_scheduler_in_the_ip_adapter_pipeline_is_bdia_sample_and_inverts(true_cfg):
    """ChromaPipeline with an IP-Adapter and BDIAScheduler (gamma 0.9) gives the latents and
    final pair (low words included) of bdia.sample with bdia(euler, 0.9) on from_diffusers'
    ODE, bit for bit, and bdia.invert from that pair returns the pipeline's noise bit for
    bit."""
    pipe = _pipe()
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    embeds = _embeds(1)
    negative = _embeds(1, seed=4) if true_cfg else None
    noise = _noise(torch.float32)
    latents = _run(pipe, embeds, negative, noise=noise)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_cond(pipe, embeds, negative))
    ts = _grid(pipe)
    assert_bdia_run_inverts(pipe, latents, ode, noise, ts, gamma=0.9)


def test_bdia_scheduler_in_the_chroma_img2img_ip_adapter_pipeline_is_bdia_sample():
    """ChromaImg2ImgPipeline (guidance_scale 1, strength 0.6) with the IP-Adapter and an
    image prompt: with BDIAScheduler (gamma 0.9) its latents and final pair are bdia.sample's
    from the noised latents over grid[4:] with the image embeddings in
    joint_attention_kwargs, bit for bit; bdia(euler, 0) there is the own scheduler's run; the
    inverse scheduler's loop (the transformer given the embeddings) and bdia.invert return
    the noised latents, bit for bit."""
    parts = _pipe().components
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    embeds = _embeds(1)

    def img2img(pipe):
        return _pipeline_latents(
            pipe,
            None,
            PROMPT,
            image=image,
            strength=0.6,
            generator=torch.Generator().manual_seed(0),
            guidance_scale=1.0,
            ip_adapter_image_embeds=embeds,
        )

    pipe, runs = flow_img2img_runs(diffusers.ChromaImg2ImgPipeline, parts, img2img)
    cond = _cond(pipe, embeds)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **cond)
    assert_flow_img2img_is_bdia_sample(
        pipe, runs, ode, _grid(pipe), 4, lambda pair: _invert(pipe, pair, cond)
    )


def test_the_adapters_scale_is_the_pipelines_and_enters_the_fingerprint():
    """set_ip_adapter_scale sets the attention processors' scale, which the ODE's calls use
    as ChromaPipeline's do: at scale 0.5 the run is the pipeline's at 0.5 bit for bit, and
    another run than at scale 1 (relative difference above 1e-2; measured 0.19). The scale
    enters the fingerprint, read when it is taken: another at 0.5, the first again back at
    1."""
    pipe = _pipe()
    embeds = _embeds(1)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, **_cond(pipe, embeds))
    at_one = ode.fingerprint()
    full = _sample(pipe, _cond(pipe, embeds))
    pipe.set_ip_adapter_scale(0.5)
    half = _sample(pipe, _cond(pipe, embeds))
    assert ode.fingerprint() != at_one
    assert torch.equal(half, _run(pipe, embeds))
    moved = _rel(half, full)
    print(f"scale 0.5 against 1: {moved:.3g} (relative, max)")
    assert moved > 1e-2
    pipe.set_ip_adapter_scale(1.0)
    assert ode.fingerprint() == at_one


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def two():
    """A pipeline with two IP-Adapters, its conditioning without an image prompt (true CFG's
    keys left out), and the negative prompt's."""
    pipe = _pipe(adapters=2)
    cond = _encoded(pipe, PROMPT, NEGATIVE)
    negative = cond.pop("negative_cond")
    cond.pop("guidance_scale")
    return pipe, cond, negative


def test_ip_adapter_conditioning_that_does_not_fit_is_refused_when_the_ode_is_built(two):
    """Flux's refusals (assert_ip_conditioning_refused: image embeddings missing, not a list,
    of another count than the adapters, not 3-D floating tensors, missing from the negative
    call under true CFG), one line each before any call, naming ChromaPipeline's method."""
    assert_ip_conditioning_refused(*two, "ChromaPipeline")


def test_image_embeds_for_a_transformer_without_an_ip_adapter_are_refused():
    """A Chroma transformer without an IP-Adapter has no projection for image embeddings:
    refused when the ODE is built, naming load_ip_adapter (diffusers would fail mid-call),
    for the conditional call's and for both calls'."""
    pipe = tiny_chroma_pipeline()
    cond = _encoded(pipe, PROMPT, NEGATIVE)
    images = _embeds(1)
    for branch in (
        _with_images(cond, images),
        _with_images(dict(cond, negative_cond=_with_images(cond["negative_cond"], images)), images),
    ):
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(pipe.transformer, pipe.scheduler, **branch)
        _one_line_error(exc_info, "load_ip_adapter")


def test_one_image_prompt_for_both_calls_is_taken_and_the_callers_dicts_are_kept(two):
    """The negative call may be given the conditional image embeddings themselves: taken,
    and the model is then the transformer's two calls combined, each with its own prompt's
    embeddings, txt_ids and mask, bit for bit, the caller's dicts and tensors left as they
    were (assert_one_image_prompt_for_both_calls)."""

    def branch_kwargs(branch):
        return dict(
            encoder_hidden_states=branch["encoder_hidden_states"].expand(BATCH, -1, -1),
            txt_ids=branch["txt_ids"],
            attention_mask=branch["attention_mask"].expand(BATCH, -1),
        )

    assert_one_image_prompt_for_both_calls(*two, branch_kwargs)


# --------------------------------------------------------------------------- editing


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("cfg", [None, 1.0], ids=["true-cfg-5", "no-cfg"])
def test_edit_image_inverts_exactly_under_the_image_prompt(cfg):
    """edit_image on ChromaPipeline with an IP-Adapter and ip_adapter_image inverts and
    regenerates under the same image prompt: latent_error 0 with a float64 state (measured
    0), both ODEs given the pipeline's image embeddings (batch 1, expanded to the images'
    2) and, under its default true CFG 5, the negative call an all-zero image's, as
    ChromaPipeline makes them; another image prompt gives another edit (relative difference
    above 1e-2; measured 1.3 without CFG, 1.7 with it)."""
    pipe = _pipe()
    image = _edit_image()
    result = _edit(pipe, image, guidance_scale=cfg)
    assert result.latent_error == 0.0
    embeds, zeros = _prompt_and_zero_embeds(pipe, _image_prompt(0))
    for ode in (result.inversion.ode, result.target):
        (images,) = ode.cond["joint_attention_kwargs"]["ip_adapter_image_embeds"]
        assert torch.equal(images, embeds[0])
        assert ("negative_cond" in ode.cond) == (cfg is None)
        if cfg is None:
            negative = ode.cond["negative_cond"]["joint_attention_kwargs"]
            assert torch.equal(negative["ip_adapter_image_embeds"][0], zeros[0])
    other = _edit(pipe, image, ip_adapter_image=_image_prompt(1), guidance_scale=cfg)
    assert other.latent_error == 0.0
    moved = _rel(other.edited_latents, result.edited_latents)
    print(f"another image prompt moves the edit by {moved:.3g} (relative, max)")
    assert moved > 1e-2


def test_edit_image_gives_the_transformer_what_chroma_pipeline_gives_it():
    """ChromaPipeline.__call__ with ip_adapter_image and edit_image with the same image prompt
    (true CFG 5, float32 state) give the transformer's IP-Adapter processors the same image
    tokens in each call: the conditional call the image's, the negative call the all-zero
    image's (the transformer projects the embeddings into joint_attention_kwargs'
    ip_hidden_states, which the double-stream blocks' processors get), bit for bit."""
    pipe = _pipe()
    block = pipe.transformer.transformer_blocks[0].attn
    seen = []
    handle = block.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["ip_hidden_states"][0].clone()), with_kwargs=True
    )
    prompt = _image_prompt(0)
    try:
        with torch.no_grad():
            pipe(
                PROMPT,
                height=16,
                width=16,
                num_inference_steps=2,
                output_type="latent",
                ip_adapter_image=prompt,
            )
            theirs = seen[:2]
            seen.clear()
            _edit(pipe, _edit_image(1), ip_adapter_image=prompt, state_dtype=torch.float32)
    finally:
        handle.remove()
    ours = seen[:2]
    assert len(theirs) == len(ours) == 2
    for k in range(2):
        assert torch.equal(ours[k], theirs[k]), k
    assert not torch.equal(ours[0], ours[1])


def test_edit_image_takes_the_pipelines_image_embeddings():
    """ip_adapter_image_embeds made by the pipeline's prepare_ip_adapter_image_embeds of an
    image give edit_image's run with that image bit for bit, and are left as they were; under
    true CFG they are torch.cat([negative, positive]), as edit_image takes them for every
    pipeline."""
    pipe = _pipe()
    image, prompt = _edit_image(1), _image_prompt(2)
    ours = _edit(pipe, image, ip_adapter_image=prompt, state_dtype=torch.float32)
    (embeds,), (negative,) = _prompt_and_zero_embeds(pipe, prompt)
    stacked = [torch.cat([negative, embeds])]
    with untouched(*stacked):
        again = _edit(
            pipe,
            image,
            ip_adapter_image=None,
            ip_adapter_image_embeds=stacked,
            state_dtype=torch.float32,
        )
    assert torch.equal(again.edited_latents, ours.edited_latents)


def test_edit_image_refuses_an_image_prompt_that_does_not_fit_before_any_network():
    """A Chroma IP-Adapter pipeline without an image prompt, both an image and embeddings,
    another count than the adapters, embeddings of the wrong kind or batch, an image without
    the image encoder, and an image prompt for a Chroma pipeline without an IP-Adapter: one
    line each, before any network runs."""
    # Embeddings of batch 2, [negative, positive], under ChromaPipeline's default true CFG.
    assert_image_prompt_refused(_pipe(adapters=2), tiny_chroma_pipeline(), batch=2)

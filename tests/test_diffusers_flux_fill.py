"""bdia.integrations.diffusers with Flux Fill: from_diffusers(mask=..., masked_image_latents=...)
on a Fill transformer against FluxFillPipeline's run, BDIAScheduler in that pipeline (its
``strength`` start included), the refusals, and edit_image on FluxFillPipeline.

The transformer is a tiny random Fill one (``tiny_flux_transformer(in_channels=48,
out_channels=16)``, ``tiny_flux_fill_pipeline``): the pipeline calls it on the packed
latents followed along the channels by the packed masked image latents and the packed mask,
which are fixed over the run, so the run is an ODE in the latents. As for FluxPipeline,
parity is checked in float32, where both sides make the same float operations on the same
inputs and agree bit for bit; exactness of the inversion in float64.
"""

from __future__ import annotations

import diffusers
import pytest
import torch
from conftest import (
    Counter,
    assert_flow_img2img_is_bdia_sample,
    assert_flow_run_is_bdia_sample,
    flow_img2img_runs,
    flow_round_trip_error,
    untouched,
)
from test_diffusers_flux import (
    BATCH,
    EMBEDDED,
    N_STEPS,
    TOKENS,
    TRUE_CFG,
    _cond,
    _dev_scheduler,
    _encoded,
    _flux_loop,
    _invert,
    _mu,
    _noise,
    _one_line_error,
    _pipeline_latents,
    _prompt,
    _sigmas,
)

import bdia
from bdia.integrations.diffusers import BDIAScheduler, diffusers_grid, edit_image, from_diffusers
from bdia.integrations.diffusers.tiny import (
    tiny_flux_fill_pipeline,
    tiny_flux_transformer,
    tiny_sd3_transformer,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PROMPT = "a photo of a fox"
SEED = 6  # the generator's seed, whose first draw encodes the masked image


@pytest.fixture(scope="module")
def fill():
    return tiny_flux_transformer(in_channels=48, out_channels=16)


def _stand_ins(dtype=torch.float32):
    """A packed mask of 0 and 1 and packed masked image latents, each (1, TOKENS, 16), as
    FluxFillPipeline.prepare_mask_latents returns them for one 16 x 16 image."""
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(1, TOKENS, 16, generator=g) > 0.5).to(dtype)
    masked = torch.randn(1, TOKENS, 16, generator=g).to(dtype)
    return mask, masked


def _images():
    """The image (1, 3, 16, 16) in [0, 1] and a mask (1, 1, 16, 16) of 1 in a rectangle."""
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    mask_image = torch.zeros(1, 1, 16, 16)
    mask_image[..., 4:12, 2:10] = 1.0
    return image, mask_image


def _pipeline_mask_latents(pipe, image, mask_image):
    """The packed mask and masked image latents of one image as FluxFillPipeline makes them in
    a run with ``generator=torch.Generator().manual_seed(SEED)`` and ``latents`` given (the
    masked image's encoding is then the generator's first draw)."""
    condition = pipe.mask_processor.preprocess(mask_image, height=16, width=16)
    pixels = pipe.image_processor.preprocess(image, height=16, width=16).float()
    with torch.no_grad():
        return pipe.prepare_mask_latents(
            condition,
            pixels * (1 - condition),
            1,
            4,
            1,
            16,
            16,
            torch.float32,
            "cpu",
            torch.Generator().manual_seed(SEED),
        )


def _fill_run(pipe, noise, image, mask_image, **options):
    """FluxFillPipeline's latents from ``noise`` (test_diffusers_flux's run: BATCH images of
    PROMPT, 16 x 16, guidance embedding 3.5) of ``image`` and ``mask_image``, the masked image
    encoded by the generator of SEED."""
    generator = torch.Generator().manual_seed(SEED)
    return _pipeline_latents(
        pipe, noise, PROMPT, image=image, mask_image=mask_image, generator=generator, **options
    )


def _grid(scheduler):
    return diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_euler_is_the_fill_loop_step_by_step(fill, true_cfg):
    """bdia's euler on from_diffusers(mask=, masked_image_latents=) / diffusers_grid is
    FluxFillPipeline's loop state by state, bit for bit in float32: every transformer call
    takes torch.cat((latents, masked_image_latents, mask), dim=2) (48 channels, the pipeline's
    concatenation of its masked image latents and mask after the latents'), the batch-1
    conditioning shared by the batch, in both calls of true CFG; the state and the output
    keep the latents' 16 channels."""
    mask, masked = _stand_ins()
    cond = _cond(torch.float32, true_cfg=true_cfg)
    scheduler = _dev_scheduler()
    ode = from_diffusers(fill, scheduler, mask=mask, masked_image_latents=masked, **cond)
    noise = _noise(torch.float32)
    calls = Counter(fill)
    with torch.no_grad():
        ours = bdia.sample(
            ode, bdia.get_solver("euler"), noise, _grid(scheduler), trajectory=True, progress=False
        )
    assert calls.calls == N_STEPS * (2 if true_cfg else 1)
    extra = torch.cat((masked, mask), dim=2).expand(BATCH, -1, -1)
    ref = _flux_loop(fill, scheduler, noise, cond, extra=extra)
    assert len(ours) == len(ref) == N_STEPS + 1
    for k in range(len(ref)):
        assert torch.equal(ours[k], ref[k]), k
    # The mask matters: without it (zeros in its place) the run differs.
    unmasked = torch.cat((masked, 0 * mask), dim=2).expand(BATCH, -1, -1)
    other = _flux_loop(fill, scheduler, noise, cond, extra=unmasked)
    assert not torch.equal(other[-1], ref[-1])


def test_fill_pipeline_gives_bdia_samples_latents(tmp_path):
    """FluxFillPipeline itself (tiny parts, a prompt through its CLIP and T5 encoders, an
    image and a mask it prepares and encodes itself, guidance embedding 3.5) returns the
    latents of bdia.sample with euler on from_diffusers with the mask and masked image
    latents of its own prepare_mask_latents (the generator's draw reproduced), bit for bit."""
    pipe = tiny_flux_fill_pipeline(tmp_path)
    noise = _noise(torch.float32)
    image, mask_image = _images()
    latents = _fill_run(pipe, noise, image, mask_image)
    mask, masked = _pipeline_mask_latents(pipe, image, mask_image)
    assert mask.shape == masked.shape == (1, TOKENS, 16)
    cond = dict(_encoded(pipe, PROMPT), img_ids=_cond(torch.float32)["img_ids"], guidance=EMBEDDED)
    ode = from_diffusers(
        pipe.transformer, pipe.scheduler, mask=mask, masked_image_latents=masked, **cond
    )
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, _grid(pipe.scheduler))
    assert torch.equal(ours, latents)


def test_bdia_euler_inverts_the_fill_ode_to_float64_rounding():
    """bdia(euler, 0.96) on the Fill ODE (float64 transformer and state, Flux-dev's shifted
    grid), from the noise at t = 1 to 0 and back, returns the noise to 1e-12 relative
    (measured: 0; the pair's low words carry what the state's rounding drops)."""
    transformer = tiny_flux_transformer(in_channels=48, out_channels=16, dtype=torch.float64)
    mask, masked = _stand_ins(torch.float64)
    ode = from_diffusers(
        transformer,
        _dev_scheduler(),
        mask=mask,
        masked_image_latents=masked,
        **_cond(torch.float64),
    )
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_dev_scheduler())) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


def test_bdia_scheduler_in_fill_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """FluxFillPipeline with BDIAScheduler.from_config(its config, gamma=0.9) gives the
    latents and the final pair (low words included) of bdia.sample with bdia(euler, 0.9) on
    the Fill ODE, bit for bit; the inverse scheduler's loop, calling the transformer as the
    pipeline does (the masked image latents and mask after the latents' channels), returns the
    starting noise bit for bit, and so does bdia.invert from the pair."""
    pipe = tiny_flux_fill_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise(torch.float32)
    image, mask_image = _images()
    latents = _fill_run(pipe, noise, image, mask_image)
    mask, masked = _pipeline_mask_latents(pipe, image, mask_image)
    cond = dict(_encoded(pipe, PROMPT), img_ids=_cond(torch.float32)["img_ids"], guidance=EMBEDDED)
    ode = from_diffusers(
        pipe.transformer, pipe.scheduler, mask=mask, masked_image_latents=masked, **cond
    )
    ts = _grid(pipe.scheduler)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    extra = torch.cat((masked, mask), dim=2).expand(BATCH, -1, -1)
    inverse = _invert(pipe, pair, cond, extra=extra)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert torch.equal(inverse.pair.earlier, noise)
    assert torch.equal(back.earlier, noise)


def test_bdia_scheduler_in_fill_pipeline_with_strength(tmp_path):
    """FluxFillPipeline with strength 0.6 runs the last 6 of 10 timesteps from the image
    latents noised by scale_noise to timesteps[4]. With BDIAScheduler (gamma 0.9) the noised
    latents are those of the pipeline with its own FlowMatchEulerDiscreteScheduler, bit for
    bit; the latents and final pair are bdia.sample's from them over grid[4:] on the Fill ODE
    (the mask and masked image latents the transformer got), bdia(euler, 0) there gives the
    own scheduler's latents, and the inverse loop and bdia.invert return the noised latents,
    all bit for bit."""
    parts = tiny_flux_fill_pipeline(tmp_path).components
    image, mask_image = _images()
    seen = []
    parts["transformer"].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"]), with_kwargs=True
    )

    def run(pipe):
        return _fill_run(pipe, None, image, mask_image, strength=0.6)

    pipe, runs = flow_img2img_runs(diffusers.FluxFillPipeline, parts, run)
    # The BDIA run's conditioning: the channels after the latents' at its first call.
    extra = seen[-(N_STEPS - 4)][..., 16:]
    assert torch.equal(extra, seen[0][..., 16:])  # the same in both runs
    masked, mask = extra[:1, :, :16], extra[:1, :, 16:]
    cond = dict(_encoded(pipe, PROMPT), img_ids=_cond(torch.float32)["img_ids"], guidance=EMBEDDED)
    ode = from_diffusers(
        pipe.transformer, pipe.scheduler, mask=mask, masked_image_latents=masked, **cond
    )
    assert_flow_img2img_is_bdia_sample(
        pipe, runs, ode, _grid(pipe.scheduler), 4, lambda pair: _invert(pipe, pair, cond, extra)
    )


# -------------------------------------------------------------------------- refusals


def test_bad_fill_conditioning_is_refused_before_any_call(fill):
    """One line each, before any call, the caller's tensors untouched: a Fill transformer
    without its mask and masked image (or with one of them), them for a text-to-image
    transformer or a Depth-style one (in_channels twice the latents'), SD3's transformer, or
    the negative branch; tensors not packed (4-D), not floating or not tensors, of two token
    counts or of channels that are not the transformer's split (16 masked image latents, then
    16 mask)."""
    mask, masked = _stand_ins()
    flow = _dev_scheduler()
    dev = tiny_flux_transformer()
    depth = tiny_flux_transformer(in_channels=32, out_channels=16)
    counters = [Counter(fill), Counter(dev), Counter(depth)]
    base = _cond(torch.float32)
    both = dict(mask=mask, masked_image_latents=masked)
    wide = torch.zeros(1, TOKENS, 24)
    cases = [
        (fill, {}, ValueError, "masked_image_latents= and mask="),
        (fill, dict(mask=mask), ValueError, "mask was given without masked_image_latents"),
        (fill, dict(masked_image_latents=masked), ValueError, "without mask"),
        (dev, both, ValueError, "leaves no room"),
        (depth, both, ValueError, "leaves no room"),
        (fill, dict(both, mask=mask.reshape(1, 1, TOKENS, 16)), ValueError, "(batch or 1, tokens"),
        (fill, dict(both, mask=mask.long()), ValueError, "floating"),
        (fill, dict(both, mask=mask.numpy()), TypeError, "tensor"),
        (fill, dict(both, mask=mask[:, :4]), ValueError, "mask has 4 tokens"),
        (fill, dict(both, mask=wide), ValueError, "mask has 24 channels"),
        (fill, dict(both, masked_image_latents=wide), ValueError, "16 (masked image latents)"),
        (
            fill,
            dict(
                both,
                guidance_scale=TRUE_CFG,
                negative_cond={**_prompt(torch.float32, 2, 7), "mask": mask},
            ),
            ValueError,
            "negative_cond",
        ),
    ]
    with untouched(mask, masked):
        for transformer, kwargs, error, field in cases:
            with pytest.raises(error) as exc_info:
                from_diffusers(transformer, flow, **base, **kwargs)
            _one_line_error(exc_info, field)
        with pytest.raises(ValueError) as exc_info:
            from_diffusers(
                tiny_sd3_transformer(),
                flow,
                encoder_hidden_states=torch.zeros(1, 4, 16),
                pooled_projections=torch.zeros(1, 8),
                **both,
            )
        _one_line_error(exc_info, "SD3")
    assert [c.calls for c in counters] == [0, 0, 0]


def test_fill_states_that_are_not_the_pipelines_are_refused_before_the_call(fill):
    """At the first evaluation, before the transformer is called: a state of the
    transformer's 48 input channels (the latents have 16), a mask and masked image of another
    token count than the state's, or of a batch that is neither 1 nor the state's."""
    calls = Counter(fill)
    mask, masked = _stand_ins()
    for given, x, field in (
        ((mask, masked), torch.zeros(BATCH, TOKENS, 48), "(batch, tokens, 16)"),
        ((mask[:, :4], masked[:, :4]), _noise(torch.float32), "packed with the latents' tokens"),
        ((mask.repeat(3, 1, 1), masked.repeat(3, 1, 1)), _noise(torch.float32), "batch 3"),
    ):
        ode = from_diffusers(
            fill,
            _dev_scheduler(),
            mask=given[0],
            masked_image_latents=given[1],
            **_cond(torch.float32),
        )
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, x)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


# ----------------------------------------------------------------------- edit_image


def _edit(pipe, image, mask_image, **kwargs):
    kwargs.update(num_inference_steps=N_STEPS, mask_image=mask_image, progress=False)
    return edit_image(pipe, image, PROMPT, "a painting of a cat", **kwargs)


def test_edit_image_inverts_exactly_under_the_fill_mask(tmp_path):
    """edit_image on FluxFillPipeline inverts and regenerates two images under the same mask
    and masked image: latent_error 0 with a float64 state (measured 0), the packed mask and
    masked image latents of both images in both ODEs, the caller's image and mask left as they
    were; another mask gives another edit (relative difference above 1e-3; measured 0.60).
    A float32 state's round trip measured 0 too."""
    pipe = tiny_flux_fill_pipeline(tmp_path)
    image, mask_image = _images()
    image = torch.cat([image, image.flip(-1)]) * 2 - 1
    with untouched(image, mask_image):
        result = _edit(pipe, image, mask_image)
    assert result.latent_error == 0.0
    assert result.edited_latents.shape == (2, TOKENS, 16)
    for ode in (result.inversion.ode, result.target):
        assert ode.cond["mask"].shape == ode.cond["masked_image_latents"].shape == (2, TOKENS, 16)
    other = _edit(pipe, image, 1.0 - mask_image)
    assert other.latent_error == 0.0
    moved = (other.edited_latents - result.edited_latents).abs().max()
    assert float(moved / result.edited_latents.abs().max()) > 1e-3


def test_edit_image_conditions_as_the_fill_pipeline_prepares_its_mask(tmp_path, monkeypatch):
    """For a PIL image and a grayscale PIL mask with values between 0 and 255, the mask and
    masked image latents of edit_image's ODE are bit for bit those of FluxFillPipeline's own
    preparation: image_processor and mask_processor (binarised at 0.5), the image times
    (1 - mask), and prepare_mask_latents (shift and scale, packing, the mask's pixels
    packed), with the VAE's mean where the pipeline draws a sample (patched in for the
    comparison). The pipeline's draw differs from the mean (checked above 1e-3 relative)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    pipe = tiny_flux_fill_pipeline(tmp_path)
    g = torch.Generator().manual_seed(5)
    pixels = (torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()
    shades = (torch.rand(16, 16, generator=g) * 255).byte().numpy()
    image, mask_image = Image.fromarray(pixels), Image.fromarray(shades, mode="L")
    result = edit_image(
        pipe, image, PROMPT, "a dog", num_inference_steps=2, mask_image=mask_image, progress=False
    )
    cond = result.inversion.ode.cond
    condition = pipe.mask_processor.preprocess(mask_image, height=16, width=16)
    assert 0 < float(condition.sum()) < 256 and set(condition.unique().tolist()) == {0.0, 1.0}
    masked = pipe.image_processor.preprocess(image, height=16, width=16) * (1 - condition)

    def prepared():
        with torch.no_grad():
            return pipe.prepare_mask_latents(
                condition, masked, 1, 4, 1, 16, 16, torch.float32, "cpu", torch.Generator()
            )

    _, drawn = prepared()
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    mask, latents = prepared()
    assert torch.equal(cond["mask"], mask)
    assert torch.equal(cond["masked_image_latents"], latents)
    assert float((drawn - latents).abs().max() / latents.abs().max()) > 1e-3


def test_edit_image_refuses_what_a_fill_pipeline_cannot_take_before_any_network(tmp_path):
    """One line each, before any network runs: a Fill pipeline without mask_image, a mask
    for FluxPipeline (its transformer takes the packed latents alone), and a Flux transformer
    of 8 extra channels: neither Fill's 32 nor a Depth or Canny one's 16 (the packed
    latents')."""
    fill = tiny_flux_fill_pipeline(tmp_path)
    parts = dict(fill.components)
    plain = diffusers.FluxPipeline(**{**parts, "transformer": tiny_flux_transformer()})
    other = diffusers.FluxPipeline(
        **{**parts, "transformer": tiny_flux_transformer(in_channels=24, out_channels=16)}
    )
    image, mask_image = _images()
    calls = [Counter(p.transformer) for p in (fill, plain, other)] + [Counter(fill.text_encoder)]
    for pipe, mask, field in (
        (fill, None, "give mask_image"),
        (plain, mask_image, "a Fill transformer takes 48"),
        (other, None, "a Fill one of 48"),
    ):
        with pytest.raises(ValueError) as exc_info:
            edit_image(pipe, image * 2 - 1, PROMPT, "a dog", num_inference_steps=2, mask_image=mask)
        _one_line_error(exc_info, field)
    assert all(c.calls == 0 for c in calls)

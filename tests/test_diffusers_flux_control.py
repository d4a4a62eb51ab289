"""bdia.integrations.diffusers with Flux Depth and Canny: from_diffusers(control_latents=...)
on a Depth- or Canny-style transformer against FluxControlPipeline's run, BDIAScheduler in
that pipeline and in FluxControlImg2ImgPipeline (its ``strength`` start), the refusals, and
edit_image on FluxControlPipeline.

The transformer is a tiny random one with ``in_channels=32`` and ``out_channels=16``
(``tiny_flux_control_pipeline``): the pipeline calls it on the packed latents followed along
the channels by its control image's packed latents, which are fixed over the run, so the run
is an ODE in the latents. As for FluxPipeline, parity is checked in float32, where both sides
make the same float operations on the same inputs and agree bit for bit; exactness of the
inversion in float64.
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
    tiny_flux_control_pipeline,
    tiny_flux_fill_pipeline,
    tiny_flux_transformer,
    tiny_sd3_transformer,
    tiny_unet,
)

# diffusers' schedulers call np.array on torch tensors, which numpy 2 warns about; not ours.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

PROMPT = "a photo of a fox"
SEED = 6  # the generator's seed, whose first draws encode the control image


@pytest.fixture(scope="module")
def depth():
    return tiny_flux_transformer(in_channels=32, out_channels=16)


def _stand_in(dtype=torch.float32):
    """Packed control image latents (1, TOKENS, 16), as FluxControlPipeline makes them for
    one 16 x 16 control image."""
    return torch.randn(1, TOKENS, 16, generator=torch.Generator().manual_seed(5)).to(dtype)


def _control_image(seed=4):
    """A 16 x 16 RGB PIL control image (a stand-in for a depth map or an edge image)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy())


def _pipeline_control_latents(pipe, control_image, batch=BATCH):
    """The packed control image latents of a FluxControlPipeline run of ``batch`` images with
    ``generator=torch.Generator().manual_seed(SEED)`` and ``latents`` given: prepare_image,
    then the VAE's sample (the generator's first draws: one per image of the batch), shifted,
    scaled and packed, as the pipeline's __call__ makes them."""
    vae = pipe.vae
    with torch.no_grad():
        image = pipe.prepare_image(control_image, 16, 16, batch, batch, "cpu", vae.dtype)
        drawn = vae.encode(image).latent_dist.sample(torch.Generator().manual_seed(SEED))
        latents = (drawn - vae.config.shift_factor) * vae.config.scaling_factor
    return pipe._pack_latents(latents, *latents.shape)


def _control_run(pipe, noise, control_image, **options):
    """FluxControlPipeline's latents from ``noise`` (test_diffusers_flux's run: BATCH images
    of PROMPT, 16 x 16, guidance embedding 3.5) guided by ``control_image``, encoded with the
    generator of SEED."""
    generator = torch.Generator().manual_seed(SEED)
    return _pipeline_latents(
        pipe, noise, PROMPT, control_image=control_image, generator=generator, **options
    )


def _pipeline_cond(pipe):
    """from_diffusers' Flux conditioning of PROMPT as the pipeline encodes it."""
    return dict(_encoded(pipe, PROMPT), img_ids=_cond(torch.float32)["img_ids"], guidance=EMBEDDED)


def _grid(scheduler):
    return diffusers_grid(scheduler, N_STEPS, mu=_mu(scheduler), sigmas=_sigmas())


# --------------------------------------------------------------------------- parity


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("true_cfg", [False, True], ids=["embedded", "true-cfg"])
def test_euler_is_the_control_loop_step_by_step(depth, true_cfg):
    """bdia's euler on from_diffusers(control_latents=) / diffusers_grid is
    FluxControlPipeline's loop state by state, bit for bit in float32: every transformer call
    takes torch.cat([latents, control_image], dim=2) (32 channels, the control image's packed
    latents after the latents'), the batch-1 control image shared by the batch, in both calls
    of true CFG; the state and the output keep the latents' 16 channels."""
    control = _stand_in()
    cond = _cond(torch.float32, true_cfg=true_cfg)
    scheduler = _dev_scheduler()
    ode = from_diffusers(depth, scheduler, control_latents=control, **cond)
    noise = _noise(torch.float32)
    calls = Counter(depth)
    with torch.no_grad():
        ours = bdia.sample(
            ode, bdia.get_solver("euler"), noise, _grid(scheduler), trajectory=True, progress=False
        )
    assert calls.calls == N_STEPS * (2 if true_cfg else 1)
    ref = _flux_loop(depth, scheduler, noise, cond, extra=control.expand(BATCH, -1, -1))
    assert len(ours) == len(ref) == N_STEPS + 1
    for k in range(len(ref)):
        assert torch.equal(ours[k], ref[k]), k
    # The control image matters: another one gives another run.
    other = _flux_loop(depth, scheduler, noise, cond, extra=(-control).expand(BATCH, -1, -1))
    assert not torch.equal(other[-1], ref[-1])


def test_control_pipeline_gives_bdia_samples_latents(tmp_path):
    """FluxControlPipeline itself (tiny parts, a prompt through its CLIP and T5 encoders, a
    PIL control image it prepares and encodes itself, guidance embedding 3.5) returns the
    latents of bdia.sample with euler on from_diffusers with the control latents of its own
    preparation (the generator's draws reproduced: one per image, so batch 2), bit for bit."""
    pipe = tiny_flux_control_pipeline(tmp_path)
    noise = _noise(torch.float32)
    control_image = _control_image()
    latents = _control_run(pipe, noise, control_image)
    control = _pipeline_control_latents(pipe, control_image)
    assert control.shape == (BATCH, TOKENS, 16)
    ode = from_diffusers(
        pipe.transformer, pipe.scheduler, control_latents=control, **_pipeline_cond(pipe)
    )
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, _grid(pipe.scheduler))
    assert torch.equal(ours, latents)


def test_bdia_euler_inverts_the_control_ode_to_float64_rounding():
    """bdia(euler, 0.96) on the Depth/Canny ODE (float64 transformer and state, Flux-dev's
    shifted grid), from the noise at t = 1 to 0 and back, returns the noise to 1e-12 relative
    (measured: 0; the pair's low words carry what the state's rounding drops)."""
    transformer = tiny_flux_transformer(in_channels=32, out_channels=16, dtype=torch.float64)
    ode = from_diffusers(
        transformer,
        _dev_scheduler(),
        control_latents=_stand_in(torch.float64),
        **_cond(torch.float64),
    )
    assert flow_round_trip_error(ode, _noise(torch.float64), _grid(_dev_scheduler())) < 1e-12


# ------------------------------------------------------------------ BDIA scheduler


def test_bdia_scheduler_in_control_pipeline_is_bdia_sample_and_inverts(tmp_path):
    """FluxControlPipeline with BDIAScheduler.from_config(its config, gamma=0.9) gives the
    latents and the final pair (low words included) of bdia.sample with bdia(euler, 0.9) on
    the Depth/Canny ODE, bit for bit; the inverse scheduler's loop, calling the transformer
    as the pipeline does (the control latents after the latents' channels), returns the
    starting noise bit for bit, and so does bdia.invert from the pair."""
    pipe = tiny_flux_control_pipeline(tmp_path)
    pipe.scheduler = BDIAScheduler.from_config(pipe.scheduler.config, gamma=0.9)
    noise = _noise(torch.float32)
    control_image = _control_image()
    latents = _control_run(pipe, noise, control_image)
    control = _pipeline_control_latents(pipe, control_image)
    cond = _pipeline_cond(pipe)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, control_latents=control, **cond)
    ts = _grid(pipe.scheduler)
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, noise, ts, gamma=0.9)
    inverse = _invert(pipe, pair, cond, extra=control)
    with torch.no_grad():
        back = bdia.invert(ode, bdia.bdia(bdia.get_solver("euler"), 0.9), pair, ts)
    assert torch.equal(inverse.pair.earlier, noise)
    assert torch.equal(back.earlier, noise)


def test_bdia_scheduler_in_control_img2img_pipeline_with_strength(tmp_path):
    """FluxControlImg2ImgPipeline (FluxControlPipeline's parts) with strength 0.6 runs the
    last 6 of 10 timesteps from the image latents noised by scale_noise to timesteps[4].
    With BDIAScheduler (gamma 0.9) the noised latents are those of the pipeline with its own
    FlowMatchEulerDiscreteScheduler, bit for bit; the latents and final pair are
    bdia.sample's from them over grid[4:] on the Depth/Canny ODE (the control latents the
    transformer got), bdia(euler, 0) there gives the own scheduler's latents, and the inverse
    loop and bdia.invert return the noised latents, all bit for bit."""
    parts = tiny_flux_control_pipeline(tmp_path).components
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    control_image = _control_image()
    seen = []
    parts["transformer"].register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"]), with_kwargs=True
    )

    def run(pipe):
        return _control_run(pipe, None, control_image, image=image, strength=0.6)

    pipe, runs = flow_img2img_runs(diffusers.FluxControlImg2ImgPipeline, parts, run)
    # The BDIA run's conditioning: the channels after the latents' at its first call.
    control = seen[-(N_STEPS - 4)][..., 16:]
    assert torch.equal(control, seen[0][..., 16:])  # the same in both runs
    cond = _pipeline_cond(pipe)
    ode = from_diffusers(pipe.transformer, pipe.scheduler, control_latents=control, **cond)
    assert_flow_img2img_is_bdia_sample(
        pipe, runs, ode, _grid(pipe.scheduler), 4, lambda pair: _invert(pipe, pair, cond, control)
    )


# -------------------------------------------------------------------------- refusals


def test_bad_control_conditioning_is_refused_before_any_call(depth):
    """One line each, before any call, the caller's tensors untouched: a Depth/Canny
    transformer without its control latents; them for a text-to-image transformer or a Fill
    one, for SD3's transformer or a unet, beside a mask and masked image or a reference
    image, or in the negative branch; a tensor not packed (4-D), not floating or not a
    tensor, or of other channels than the latents'. The model itself refuses them for a
    network that is not Flux's, and beside a Fill transformer's mask and masked image."""
    control = _stand_in()
    flow = _dev_scheduler()
    dev = tiny_flux_transformer()
    fill = tiny_flux_transformer(in_channels=48, out_channels=16)
    counters = [Counter(depth), Counter(dev), Counter(fill)]
    base = _cond(torch.float32)
    given = dict(control_latents=control)
    stand_in = torch.zeros(1, TOKENS, 16)
    cases = [
        (depth, {}, ValueError, "pass control_latents="),
        (dev, given, ValueError, "no extra input channels"),
        (fill, given, ValueError, "32 extra input channels"),
        (
            depth,
            dict(given, mask=stand_in, masked_image_latents=stand_in),
            ValueError,
            "beside mask",
        ),
        (depth, dict(given, image_latents=stand_in), ValueError, "beside image_latents"),
        (depth, dict(control_latents=control[None]), ValueError, "(batch or 1, tokens"),
        (depth, dict(control_latents=control.long()), ValueError, "floating"),
        (depth, dict(control_latents=control.numpy()), TypeError, "tensor"),
        (depth, dict(control_latents=torch.zeros(1, TOKENS, 24)), ValueError, "24 channels"),
        (
            depth,
            dict(
                given,
                guidance_scale=TRUE_CFG,
                negative_cond={**_prompt(torch.float32, 2, 7), "control_latents": control},
            ),
            ValueError,
            "negative_cond",
        ),
    ]
    with untouched(control):
        for transformer, kwargs, error, field in cases:
            with pytest.raises(error) as exc_info:
                from_diffusers(transformer, flow, **base, **kwargs)
            _one_line_error(exc_info, field)
        sd3 = dict(
            encoder_hidden_states=torch.zeros(1, 4, 16), pooled_projections=torch.zeros(1, 8)
        )
        unet = tiny_unet(conditional=True, channels=4, cross_attention_dim=16)
        ddim = diffusers.DDIMScheduler(clip_sample=False)
        for network, scheduler, cond in ((tiny_sd3_transformer(), flow, sd3), (unet, ddim, {})):
            with pytest.raises(ValueError) as exc_info:
                from_diffusers(network, scheduler, **cond, **given)
            _one_line_error(exc_info, "no FluxTransformer2DModel")
        ode = from_diffusers(unet, ddim, encoder_hidden_states=torch.zeros(1, 4, 16))
        with pytest.raises(ValueError) as exc_info:
            ode.f(torch.zeros(1, 4, 8, 8), torch.ones(1), **given)
        _one_line_error(exc_info, "no Flux transformer")
        masked = dict(mask=stand_in, masked_image_latents=stand_in)
        ode = from_diffusers(fill, flow, **base, **masked)
        with pytest.raises(ValueError) as exc_info:
            ode.f(_noise(torch.float32), torch.ones(BATCH), **ode.cond, control_latents=control)
        _one_line_error(exc_info, "not both")
    assert [c.calls for c in counters] == [0, 0, 0]


def test_control_states_that_are_not_the_pipelines_are_refused_before_the_call(depth):
    """At the first evaluation, before the transformer is called: a state of the
    transformer's 32 input channels (the latents have 16), control latents of another token
    count than the state's, or of a batch that is neither 1 nor the state's."""
    calls = Counter(depth)
    control = _stand_in()
    for given, x, field in (
        (control, torch.zeros(BATCH, TOKENS, 32), "(batch, tokens, 16)"),
        (control[:, :4], _noise(torch.float32), "packed with the latents' tokens"),
        (control.repeat(3, 1, 1), _noise(torch.float32), "batch 3"),
    ):
        ode = from_diffusers(depth, _dev_scheduler(), control_latents=given, **_cond(torch.float32))
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, x)
        _one_line_error(exc_info, field)
    assert calls.calls == 0


# ----------------------------------------------------------------------- edit_image


def _edit(pipe, image, control_image, **kwargs):
    kwargs.update(num_inference_steps=N_STEPS, control_image=control_image, progress=False)
    return edit_image(pipe, image, PROMPT, "a painting of a cat", **kwargs)


def test_edit_image_inverts_exactly_under_the_control_image(tmp_path):
    """edit_image on FluxControlPipeline inverts and regenerates two images under one control
    image: latent_error 0 with a float64 state (measured 0) and with a float32 one (measured
    0), the packed control latents of both images in both ODEs, the caller's images left as
    they were; another control image gives another edit (relative difference above 1e-3;
    measured 0.29)."""
    pipe = tiny_flux_control_pipeline(tmp_path)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    image = torch.cat([image, image.flip(-1)]) * 2 - 1
    control = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1
    with untouched(image, control):
        result = _edit(pipe, image, control)
    assert result.latent_error == 0.0
    assert result.edited_latents.shape == (2, TOKENS, 16)
    for ode in (result.inversion.ode, result.target):
        assert ode.cond["control_latents"].shape == (2, TOKENS, 16)
    assert _edit(pipe, image, control, state_dtype=torch.float32).latent_error == 0.0
    other = _edit(pipe, image, control.flip(-2))
    assert other.latent_error == 0.0
    moved = (other.edited_latents - result.edited_latents).abs().max()
    assert float(moved / result.edited_latents.abs().max()) > 1e-3


def test_edit_image_conditions_as_the_control_pipeline_prepares_its_image(tmp_path, monkeypatch):
    """For a PIL control image, the control latents of edit_image's ODE are bit for bit those
    FluxControlPipeline gives its transformer (its prepare_image, the VAE's encoding, shift,
    scale and packing), with the VAE's mean where the pipeline draws a sample (patched in
    for the comparison: edit_image takes the mean, so that its edit is deterministic). The
    pipeline's draw differs from the mean (checked above 1e-3 relative)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from PIL import Image

    pipe = tiny_flux_control_pipeline(tmp_path)
    pixels = (torch.rand(16, 16, 3, generator=torch.Generator().manual_seed(5)) * 255).byte()
    image, control_image = Image.fromarray(pixels.numpy()), _control_image()
    result = _edit(pipe, image, control_image)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["hidden_states"][..., 16:]), with_kwargs=True
    )

    def pipeline_control():
        seen.clear()
        pipe(
            prompt=PROMPT,
            control_image=control_image,
            num_inference_steps=1,
            height=16,
            width=16,
            max_sequence_length=16,
            output_type="latent",
        )
        return seen[0]

    drawn = pipeline_control()
    monkeypatch.setattr(
        DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean
    )
    mean = pipeline_control()
    for ode in (result.inversion.ode, result.target):
        assert torch.equal(ode.cond["control_latents"], mean)
    assert float((drawn - mean).abs().max() / mean.abs().max()) > 1e-3


def test_edit_image_refuses_what_a_control_pipeline_cannot_take_before_any_network(tmp_path):
    """One line each, before any network runs: a Depth/Canny pipeline without control_image,
    with a mask_image, with control images of another batch than 1 and the image's, or with
    a tensor control image not at the image's size or outside [-1, 1] (the pipeline's
    prepare_image passes tensors to the VAE as they are); a FluxPipeline holding a
    Depth/Canny transformer (it has no prepare_image); and a control image for a Fill
    pipeline given its mask (without one, the missing mask is reported first)."""
    control_pipe = tiny_flux_control_pipeline(tmp_path)
    plain = diffusers.FluxPipeline(**control_pipe.components)
    fill = tiny_flux_fill_pipeline(tmp_path)
    image = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)) * 2 - 1
    control = torch.zeros(1, 3, 16, 16)
    mask_image = torch.ones(1, 1, 16, 16)
    pipes = (control_pipe, plain, fill)
    calls = [Counter(p.transformer) for p in pipes] + [Counter(p.text_encoder) for p in pipes]
    calls += [Counter(p.vae) for p in pipes]
    for pipe, kwargs, field in (
        (control_pipe, {}, "give control_image"),
        (control_pipe, dict(control_image=control, mask_image=mask_image), "a control image's"),
        (control_pipe, dict(control_image=control.repeat(3, 1, 1, 1)), "holds 3 images for 2"),
        (control_pipe, dict(control_image=control[..., :8]), "(1 or 2, 3, 16, 16)"),
        (control_pipe, dict(control_image=control + 2), "in [-1, 1]"),
        (plain, dict(control_image=control), "no prepare_image"),
        (fill, dict(control_image=control, mask_image=mask_image), "control_image was given"),
    ):
        with pytest.raises(ValueError) as exc_info:
            edit_image(pipe, image, PROMPT, "a dog", num_inference_steps=2, **kwargs)
        _one_line_error(exc_info, field)
    assert all(c.calls == 0 for c in calls)

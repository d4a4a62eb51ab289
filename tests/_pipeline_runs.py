"""Shared checks of bdia against the diffusers pipelines it runs on (flow-matching families:
Qwen-Image, Z-Image, Flux, Flux.2, Chroma, and their ControlNet and IP-Adapter pipelines).

The tests of each family check the same things in the same way: that an edit's latents are
the pipeline's own run from the inverted noise under the target prompt and its images the
pipeline's decoding (``assert_edit_is_the_pipelines_run``, ``assert_decodes_as_the_pipeline``),
that edit_image refuses bad input in one line before any network runs (``refused_edit``), that
a pipeline's BDIAScheduler run is bdia.sample's and inverts back to its start
(``assert_bdia_run_inverts``), and that a ControlNet pipeline's run is euler's on the ODE of
its own parts (``pipeline_controlnet_ode``, ``controlnet_euler_sample``), refusing control
latents that do not fit at the first evaluation (``assert_refused_at_first_evaluation``).
Each test passes only its pipeline's own arguments and states its own numbers. Imported as
the tests import ``conftest``: tests/ is on sys.path, and pytest collects no test from here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import Counter, assert_flow_run_is_bdia_sample, untouched

import bdia
from bdia.integrations.diffusers import edit_image, from_diffusers


def pipeline_run(
    pipe: Any, latents: torch.Tensor, steps: int, put: torch.Tensor | None = None, **call: Any
) -> tuple[torch.Tensor, Any]:
    """``pipe(latents=latents, num_inference_steps=steps, **call)`` (``output_type="latent"``
    unless ``call`` says otherwise), under no_grad.

    Returns the latents the pipeline holds after its last step, as its callback_on_step_end
    sees them (a pipeline that unpacks or denormalises its latents for output_type="latent",
    as Flux2KleinPipeline does, still holds the packed ones there), and the call's ``images``.
    With ``put``, the latents after every step are replaced by ``put``, so that the pipeline
    decodes ``put``. Asserts that the callback ran once a step.
    """
    seen = []

    def keep(_pipe: Any, _i: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        seen.append(kwargs["latents"])
        return {} if put is None else {"latents": put}

    call.setdefault("output_type", "latent")
    with torch.no_grad():
        images = pipe(
            latents=latents, num_inference_steps=steps, callback_on_step_end=keep, **call
        ).images
    assert len(seen) == steps
    return seen[-1], images


def assert_edit_is_the_pipelines_run(
    pipe: Any, out: Any, steps: int, latents: Any = None, *, last_step: bool = False, **call: Any
) -> None:
    """Assert that ``out``, edit_image's result on ``pipe``, edited its latents bit for bit as
    ``pipe`` runs from the inverted noise for ``steps`` steps with ``call``, its arguments for
    the target prompt, guidance and size.

    Bit for bit holds where ``out`` ran with a float32 state: the edit's base solver is then
    the pipeline's Euler step on the pipeline's own grid, making the same float operations on
    the same inputs. The pipeline starts from ``latents``, by default a copy of
    ``out.inversion.noise`` (its step may write into its latents); a pipeline that takes them
    unpacked is given them so. Its ``images`` for output_type="latent" are compared, or with
    ``last_step`` the latents it holds after its last step (see ``pipeline_run``).
    """
    latents = out.inversion.noise.clone() if latents is None else latents
    last, images = pipeline_run(pipe, latents, steps, **call)
    assert torch.equal(out.edited_latents, last if last_step else images)


def assert_decodes_as_the_pipeline(pipe: Any, out: Any, latents: Any = None, **call: Any) -> None:
    """Assert that ``out``'s decoded edit, ``out.images`` (B, 3, H, W) in [-1, 1], is bit for
    bit the image ``pipe`` decodes from ``out.edited_latents`` with output_type="pt".

    The pipeline runs 2 steps of ``call`` (any prompt: its latents are replaced by the edited
    ones after every step, see ``pipeline_run``) from ``latents`` (None: its own noise). Its
    images are (x / 2 + 0.5).clamp(0, 1) of edit_image's x.clamp(-1, 1), both exact maps, so
    the comparison is exact.
    """
    steps = call.pop("num_inference_steps", 2)
    _, decoded = pipeline_run(
        pipe, latents, steps, put=out.edited_latents, output_type="pt", **call
    )
    assert torch.equal(decoded, out.images / 2 + 0.5)


def refused_edit(pipe: Any, image: torch.Tensor, source: Any, target: Any, **options: Any) -> str:
    """edit_image(pipe, image, source, target, num_inference_steps=2, **options)'s message,
    after asserting that it raised ValueError or TypeError in one line, before the
    transformer or the VAE's encoder or decoder ran, and that ``image`` is untouched."""
    counters = [Counter(pipe.transformer), Counter(pipe.vae.encoder), Counter(pipe.vae.decoder)]
    options.setdefault("num_inference_steps", 2)
    with untouched(image), pytest.raises((ValueError, TypeError)) as exc_info:
        edit_image(pipe, image, source, target, **options)
    assert [c.calls for c in counters] == [0, 0, 0]
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def assert_bdia_run_inverts(
    pipe: Any,
    latents: torch.Tensor,
    ode: Any,
    start: torch.Tensor,
    ts: torch.Tensor,
    gamma: float,
    start_index: int = 0,
) -> Any:
    """Assert that ``pipe``'s run with its BDIAScheduler (``latents``, and the scheduler's
    final pair) is bdia.sample's with bdia(euler, ``gamma``) on ``ode`` over
    ``ts[start_index:]`` from ``start``, bit for bit (conftest's
    assert_flow_run_is_bdia_sample), and that bdia.invert from that pair over the same grid
    returns ``start`` bit for bit: the pair's low words carry what the state's rounding
    drops. Returns the pair."""
    pair = assert_flow_run_is_bdia_sample(pipe, latents, ode, start, ts, gamma, start_index)
    solver = bdia.bdia(bdia.get_solver("euler"), gamma)
    with torch.no_grad():
        back = bdia.invert(ode, solver, pair, ts[start_index:])
    assert torch.equal(back.earlier, start)
    return pair


def assert_refused_at_first_evaluation(
    transformer: Any,
    controlnet: Any,
    scheduler: Any,
    noise: torch.Tensor,
    cond: dict[str, Any],
    cases: list[tuple[dict[str, Any], str]],
) -> None:
    """For each ``(options, fragment)`` of ``cases``, assert that from_diffusers(transformer,
    scheduler, controlnet=controlnet, **options, **cond) builds (``options`` may give another
    controlnet, one that wraps ``controlnet``), and that its first evaluation, at t = 1 on
    ``noise``, raises ValueError in one line holding ``fragment``; then that neither the
    transformer nor ``controlnet`` ran: what from_diffusers can check only once it sees the
    state is refused before any call."""
    calls = [Counter(transformer), Counter(controlnet)]
    for options, fragment in cases:
        options = dict(dict(controlnet=controlnet), **options)
        ode = from_diffusers(transformer, scheduler, **options, **cond)
        with pytest.raises(ValueError) as exc_info:
            ode.evaluate(1.0, noise)
        message = str(exc_info.value)
        assert "\n" not in message and fragment in message, message
    assert [c.calls for c in calls] == [0, 0]


def pipeline_controlnet_ode(pipe: Any, control: Any, **options: Any) -> Any:
    """from_diffusers on a ControlNet pipeline's transformer, scheduler and controlnet, with
    the control input ``control`` (its control latents; a list of them for a union wrapper)
    as controlnet_cond; ``options``: the scale and bounds, the prompt's conditioning."""
    return from_diffusers(
        pipe.transformer,
        pipe.scheduler,
        controlnet=pipe.controlnet,
        controlnet_cond=control,
        **options,
    )


def controlnet_euler_sample(
    pipe: Any, control: Any, noise: torch.Tensor, ts: torch.Tensor, **options: Any
) -> tuple[torch.Tensor, list[int]]:
    """bdia.sample with euler from ``noise`` over ``ts`` on pipeline_controlnet_ode(pipe, control,
    **options), and how many times it called the pipeline's controlnet and its transformer,
    in that order; for comparison with a ControlNet pipeline's own run."""
    ode = pipeline_controlnet_ode(pipe, control, **options)
    calls = [Counter(pipe.controlnet), Counter(pipe.transformer)]
    with torch.no_grad():
        ours = bdia.sample(ode, bdia.get_solver("euler"), noise, ts)
    return ours, [c.calls for c in calls]

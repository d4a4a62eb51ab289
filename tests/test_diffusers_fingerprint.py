"""The fingerprint of from_diffusers' ODEs sees the unet's settings that change the vector
field without changing a parameter or buffer: an IP-Adapter's scale (``set_ip_adapter_scale``),
FreeU's factors (``enable_freeu``) and LoRA adapters' weights and
state (``set_adapters``, ``disable_lora``, ``fuse_lora``). A BDIA pair sampled under one
setting and inverted under another then warns, since its inversion is exact only under the
field that made it.

Tiny random pipelines (``tiny_ip_adapter_pipeline``, ``tiny_text_to_image_pipeline``), the
LoRA adapters by peft, which .ci/run installs (not the test extra: the peft releases
diffusers accepts need a newer transformers than the extra's lowest); without it the LoRA
tests skip.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import diffusers
import pytest
import torch
from conftest import run_child
from test_diffusers_ip_adapter import GAMMA, STEPS, _embeds, _noise, _ode

import bdia
from bdia.integrations.diffusers import diffusers_grid, from_diffusers
from bdia.integrations.diffusers.tiny import (
    tiny_ip_adapter_pipeline,
    tiny_sd3_pipeline,
    tiny_text_to_image_pipeline,
    tiny_unet,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _pair_then_invert(sample_ode, invert_ode, pipe, steps=STEPS):
    """Sample a BDIA pair under ``sample_ode`` (float64 state) and invert it under
    ``invert_ode``; returns the warnings the inversion raised and the inverted noise."""
    solver = bdia.bdia("ddim", GAMMA)
    noise = _noise(torch.float64)
    ts = diffusers_grid(pipe.scheduler, steps)
    with torch.no_grad():
        pair = bdia.sample(sample_ode, solver, noise, ts, return_pair=True, progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            back = bdia.invert(invert_ode, solver, pair, ts, progress=False)
    return [w for w in caught if issubclass(w.category, bdia.PairMismatchWarning)], back, noise


def test_the_ip_adapter_scale_enters_the_fingerprint(tmp_path):
    """Same unet, same scale: one fingerprint, over two from_diffusers calls; another scale
    (set after the first ODE was made) another; back to the first scale, the first."""
    pipe = tiny_ip_adapter_pipeline(tmp_path)
    embeds = _embeds(1)
    first = _ode(pipe, False, embeds)
    at_one = first.fingerprint()
    assert _ode(pipe, False, embeds).fingerprint() == at_one
    pipe.set_ip_adapter_scale(0.5)
    assert first.fingerprint() != at_one  # read when taken, not when the ODE was made
    assert _ode(pipe, False, embeds).fingerprint() != at_one
    pipe.set_ip_adapter_scale(1.0)
    assert _ode(pipe, False, embeds).fingerprint() == at_one


def test_a_pair_sampled_at_one_ip_adapter_scale_warns_when_inverted_at_another(tmp_path):
    """Sampled at scale 1 and inverted at 0.5: PairMismatchWarning, and the noise does not
    come back (the inversion is exact only under the field that made the pair); inverted at
    1: no warning, and the noise comes back within 1e-12 relative (float64 state; measured
    0 in test_diffusers_ip_adapter)."""
    pipe = tiny_ip_adapter_pipeline(tmp_path)
    embeds = _embeds(1)
    ode = _ode(pipe, False, embeds)
    same, back, noise = _pair_then_invert(ode, ode, pipe)
    assert same == []
    assert float((back.earlier - noise).abs().max() / noise.abs().max()) < 1e-12

    solver = bdia.bdia("ddim", GAMMA)
    ts = diffusers_grid(pipe.scheduler, STEPS)
    with torch.no_grad():
        pair = bdia.sample(ode, solver, noise, ts, return_pair=True, progress=False)
        pipe.set_ip_adapter_scale(0.5)
        with pytest.warns(bdia.PairMismatchWarning, match="different ODE"):
            back = bdia.invert(_ode(pipe, False, embeds), solver, pair, ts, progress=False)
    assert float((back.earlier - noise).abs().max() / noise.abs().max()) > 1e-3


def test_freeu_enters_the_fingerprint(tmp_path):
    """enable_freeu changes the field (the up blocks scale their features); disable_freeu
    brings the unet's fingerprint back."""
    pipe = tiny_ip_adapter_pipeline(tmp_path)
    embeds = _embeds(1)
    before = _ode(pipe, False, embeds).fingerprint()
    pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert _ode(pipe, False, embeds).fingerprint() != before
    pipe.unet.disable_freeu()
    assert _ode(pipe, False, embeds).fingerprint() == before


def test_gradient_checkpointing_keeps_the_fingerprint(tmp_path):
    """Gradient checkpointing changes how the unet computes its gradients, not the field
    (backpropagating through an inversion may turn it on after sampling without it): a pair
    is not flagged for it."""
    pipe = tiny_ip_adapter_pipeline(tmp_path)
    embeds = _embeds(1)
    before = _ode(pipe, False, embeds).fingerprint()
    pipe.unet.enable_gradient_checkpointing()
    assert _ode(pipe, False, embeds).fingerprint() == before


@pytest.mark.slow  # another process: its start costs seconds on busy cores
def test_the_ip_adapter_fingerprint_is_the_same_in_another_process(tmp_path):
    (tmp_path / "child").mkdir()
    (tmp_path / "here").mkdir()
    code = (
        "import sys, torch; from test_diffusers_fingerprint import _scaled_fingerprint; "
        "print(_scaled_fingerprint(sys.argv[1]))"
    )
    child = run_child(["-c", code, str(tmp_path / "child")], timeout=300, cwd=Path(__file__).parent)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split()[-1] == _scaled_fingerprint(tmp_path / "here")


def _scaled_fingerprint(folder):
    """The fingerprint of the tiny IP-Adapter pipeline's ODE at scale 0.5 with FreeU on."""
    pipe = tiny_ip_adapter_pipeline(folder)
    pipe.set_ip_adapter_scale(0.5)
    pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    return _ode(pipe, False, _embeds(1)).fingerprint()


# ------------------------------------------------------------------------------ LoRA


def _lora_pipeline(folder):
    """The tiny SD pipeline with two LoRA adapters of random weights ("a", "b": peft's
    ``init_lora_weights=False``, so that each changes the field) on the attention
    projections, both active at weight 1."""
    peft = pytest.importorskip(
        "peft", reason="peft (diffusers' LoRA backend) is not installed; .ci/run installs it"
    )

    pipe = tiny_text_to_image_pipeline(folder)
    for seed, name in enumerate("ab"):
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=2,
            lora_alpha=2,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
        with warnings.catch_warnings():
            # peft's note that a second adapter joins the first: meant here.
            warnings.filterwarnings("ignore", "Already found a `peft_config`", UserWarning)
            pipe.unet.add_adapter(config, adapter_name=name)
    pipe.unet.set_adapters(["a", "b"], weights=[1.0, 1.0])
    return pipe


def _lora_ode(pipe, **cond):
    hidden = torch.randn(
        1, 7, pipe.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1)
    )
    return from_diffusers(pipe.unet, pipe.scheduler, encoder_hidden_states=hidden, **cond)


def test_lora_adapters_weights_and_state_enter_the_fingerprint(tmp_path):
    pipe = _lora_pipeline(tmp_path)
    unet = pipe.unet
    both = _lora_ode(pipe).fingerprint()
    assert _lora_ode(pipe).fingerprint() == both
    seen = {both}
    unet.set_adapters(["a", "b"], weights=[1.0, 0.5])
    seen.add(_lora_ode(pipe).fingerprint())
    unet.set_adapters(["a"])  # the same weight for "a", "b" inactive
    seen.add(_lora_ode(pipe).fingerprint())
    unet.set_adapters(["a", "b"], weights=[1.0, 1.0])
    assert _lora_ode(pipe).fingerprint() == both
    unet.disable_lora()
    seen.add(_lora_ode(pipe).fingerprint())
    unet.enable_lora()
    assert _lora_ode(pipe).fingerprint() == both
    # A LoRA scale given in the call is conditioning.
    seen.add(_lora_ode(pipe, cross_attention_kwargs={"scale": 0.5}).fingerprint())
    unet.fuse_lora(lora_scale=1.0)
    seen.add(_lora_ode(pipe).fingerprint())
    assert len(seen) == 6


def test_a_lora_scale_in_the_call_keeps_the_fingerprint_over_a_run(tmp_path):
    """A unet called with cross_attention_kwargs={"scale": 0.7} multiplies each LoRA layer's
    scaling by 0.7 and divides it back afterwards, which leaves an adapter at weight 0.1 an
    ulp off (0.1 * 0.7 / 0.7 != 0.1 in float64). The fingerprint taken after a run (a pair's)
    is the one taken before it (by a fresh process that loads the pair and the pipeline)."""
    pipe = _lora_pipeline(tmp_path)
    pipe.unet.set_adapters(["a", "b"], weights=[1.0, 0.1])
    ode = _lora_ode(pipe, cross_attention_kwargs={"scale": 0.7})
    before = ode.fingerprint()
    with torch.no_grad():
        ode.evaluate(0.5, _noise())
    drifted = {m.scaling["b"] for m in pipe.unet.modules() if hasattr(m, "merged_adapters")}
    assert drifted == {0.1 * 0.7 / 0.7} != {0.1}
    assert ode.fingerprint() == before


def test_the_adapters_own_settings_enter_the_fingerprint(tmp_path):
    """Settings the adapter takes from the scheduler, not from the unet or the schedule: how
    a noise level maps to the unet's timestep (Karras sigmas interpolate log sigma between
    integer timesteps, the default sigmas sigma itself), an EDM-preconditioned unet's
    prediction and sigma_data, and a flow transformer's N in ``tau = sigma N``. Each is
    another vector field on the same weights and the same ``EDM()`` or ``RectifiedFlow()``
    schedule, so each must give another fingerprint; equal settings give equal ones."""
    unet = tiny_unet()

    def fingerprint(scheduler):
        return from_diffusers(unet, scheduler).fingerprint()

    plain = fingerprint(diffusers.EulerDiscreteScheduler())
    assert fingerprint(diffusers.EulerDiscreteScheduler()) == plain
    assert fingerprint(diffusers.EulerDiscreteScheduler(use_karras_sigmas=True)) != plain

    preconditioned = [
        fingerprint(diffusers.EDMEulerScheduler(prediction_type=p, sigma_data=d))
        for p, d in (("epsilon", 0.5), ("v_prediction", 0.5), ("epsilon", 1.0))
    ]
    assert len(set(preconditioned)) == 3
    assert fingerprint(diffusers.EDMEulerScheduler()) == preconditioned[0]

    transformer = tiny_sd3_pipeline(tmp_path).transformer
    flows = [
        from_diffusers(
            transformer, diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=n)
        ).fingerprint()
        for n in (1000, 500, 1000)
    ]
    assert flows[0] != flows[1] and flows[0] == flows[2]

"""The Python examples of README.md and docs/ run, page by page, as a reader would run them.

Each page's ```python blocks run in order in one namespace, in an empty working folder. A
``print`` whose line ends in a comment is checked against the comment: ``below X`` bounds
the printed number; any other comment is the printed text, up to its first ``:`` or ``=``
(``# 53 = 2 + 17 * 3`` says the line prints 53). Three tables say what the reader brings,
each keyed by the page and a piece of text that one of its blocks holds:

* ``SIGNATURES``: blocks that list signatures rather than code to run; each is compared with
  the code's (parameter names, kinds and defaults);
* ``STAND_INS``: names a fragment takes to be the reader's own (their network, pipeline,
  labels), bound before the block to small stand-ins with the same call contract;
* ``LOCAL``: what only the reader's machine has (a model folder, a CUDA device, a photo of
  512 x 512), replaced in the block's text before it runs; every replaced text must occur.

An entry that matches no block fails, so a doc edit that moves a block cannot make this
test run less than it did. ``AFTER`` checks, right after a block, what its comments and the
page's prose claim of its result. ``NEWER`` names blocks that need a newer release of a
package than the oldest supported one, skipped where an older one is installed (or, for a
package no extra installs, none).

The ``bdia`` command lines of the pages' shell blocks (``torchrun -m bdia.cli`` ones
included) are parsed against the command-line interface: option names, values and required
options. Those that need no file the reader must bring (README's, and docs/edm_cifar10.md's
pipeline without downloads, on a smaller network) also run, with the slow tests. The
``$ bdia ...`` transcripts of the text blocks run in order, one folder per page, and print
the lines shown (durations and the torch build aside), also with the slow tests.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import inspect
import io
import math
import pydoc
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import click
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO

from bdia.cli import main

PAGES = ["README.md", *sorted(p.relative_to(REPO).as_posix() for p in (REPO / "docs").glob("*.md"))]

# Blocks that list signatures, not code to run: what each lists, by dotted path, in order.
SIGNATURES = {
    ("docs/diffusers.md", "diffusers_grid(scheduler, num_inference_steps, *"): (
        "bdia.integrations.diffusers.from_diffusers",
        "bdia.integrations.diffusers.diffusers_grid",
    ),
    ("docs/diffusers.md", "edit_image(pipe, image, source_prompt"): (
        "bdia.integrations.diffusers.edit_image",
    ),
    ("docs/k_diffusion.md", "sample_bdia(model, x, sigmas, extra_args=None"): (
        "bdia.k_diffusion.sample_bdia",
        "bdia.k_diffusion.invert_bdia",
    ),
    ("docs/solvers.md", "flow(ode, t, t_next, x, first"): ("bdia.SingleStepSolver.flow",),
}

# A conditional EDM network of 16 x 16 RGB images, random weights (bdia.generate's tiny-cond).
_EDM_NET = """
import torch
from bdia.generate import random_network
net = random_network("tiny-cond")
"""

# A folder in diffusers' layout ("sd") holding a tiny random Stable Diffusion pipeline:
# 16 x 16 images, 4 x 8 x 8 latents, a 16-token CLIP tokenizer (bdia's tiny module).
_SD_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_text_to_image_pipeline
if not pathlib.Path("sd").is_dir():
    pathlib.Path("sd").mkdir()
    tiny_text_to_image_pipeline("sd").save_pretrained("sd")
"""

# The same for a tiny random SDXL pipeline ("sdxl"): two text encoders, a unet with SDXL's
# added conditioning.
_SDXL_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_sdxl_pipeline
if not pathlib.Path("sdxl").is_dir():
    pathlib.Path("sdxl").mkdir()
    tiny_sdxl_pipeline("sdxl").save_pretrained("sdxl")
"""

# Beside it, a tiny random SDXL refiner ("sdxl_refiner"): the second text encoder alone, a
# unet of its own with the aesthetic score in its added conditioning.
_SDXL_ENSEMBLE_FOLDERS = (
    _SDXL_FOLDER
    + """
from bdia.integrations.diffusers.tiny import tiny_sdxl_refiner_pipeline
if not pathlib.Path("sdxl_refiner").is_dir():
    pathlib.Path("sdxl_refiner").mkdir()
    tiny_sdxl_refiner_pipeline("sdxl_refiner").save_pretrained("sdxl_refiner")
"""
)

# The same for a tiny random Playground v2.5-style pipeline ("playground"): the SDXL one with
# EDMDPMSolverMultistepScheduler and VAE latent statistics.
_PLAYGROUND_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_playground_pipeline
if not pathlib.Path("playground").is_dir():
    pathlib.Path("playground").mkdir()
    tiny_playground_pipeline("playground").save_pretrained("playground")
"""

# The same for a tiny random SD3 pipeline ("sd3"): two CLIP text encoders, no T5, an
# SD3Transformer2DModel and SD3's FlowMatchEulerDiscreteScheduler.
_SD3_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_sd3_pipeline
if not pathlib.Path("sd3").is_dir():
    pathlib.Path("sd3").mkdir()
    tiny_sd3_pipeline("sd3").save_pretrained("sd3")
"""

# The same for a tiny random Flux pipeline ("flux"): CLIP and T5 text encoders, a
# FluxTransformer2DModel with a guidance embedding and Flux.1-dev's scheduler.
_FLUX_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_flux_pipeline
if not pathlib.Path("flux").is_dir():
    pathlib.Path("flux").mkdir()
    tiny_flux_pipeline("flux").save_pretrained("flux")
"""

# The tiny PixArt-Sigma pipeline in diffusers' layout ("pixart").
_PIXART_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_pixart_pipeline
if not pathlib.Path("pixart").is_dir():
    tiny_pixart_pipeline().save_pretrained("pixart")
"""

# The tiny Chroma pipeline in diffusers' layout ("chroma").
_CHROMA_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_chroma_pipeline
if not pathlib.Path("chroma").is_dir():
    tiny_chroma_pipeline().save_pretrained("chroma")
"""

# The tiny Flux.2 pipeline in diffusers' layout ("flux2"), without its text encoder.
_FLUX2_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_flux2_pipeline
if not pathlib.Path("flux2").is_dir():
    tiny_flux2_pipeline().save_pretrained("flux2")
"""

# A ControlNet of the tiny Stable Diffusion pipeline's unet in diffusers' layout
# ("controlnet"), beside that pipeline's folder, and a 16 x 16 edge map.
_CONTROLNET_FOLDER = (
    _SD_FOLDER
    + """
from PIL import Image
from bdia.integrations.diffusers.tiny import tiny_controlnet
if not pathlib.Path("controlnet").is_dir():
    pathlib.Path("sd_parts").mkdir(exist_ok=True)
    tiny_controlnet(tiny_text_to_image_pipeline("sd_parts").unet).save_pretrained("controlnet")
Image.new("RGB", (16, 16), (255, 255, 255)).save("edges.png")
"""
)

# A 16 x 16 photo and a mask white in its middle.
_BENCH = """
from PIL import Image
Image.new("RGB", (16, 16), (200, 120, 40)).save("bench.png")
mask = Image.new("L", (16, 16), 0)
mask.paste(255, (4, 4, 12, 12))
mask.save("bench_mask.png")
"""

# A tiny random Stable Diffusion inpainting pipeline ("inpaint": a 9-channel unet), with
# _BENCH's photo and mask.
_INPAINT_FOLDER = (
    """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_inpaint_pipeline
if not pathlib.Path("inpaint").is_dir():
    pathlib.Path("inpaint").mkdir()
    tiny_inpaint_pipeline("inpaint").save_pretrained("inpaint")
"""
    + _BENCH
)

# The reader's pipeline with an IP-Adapter loaded: a tiny random Stable Diffusion one
# (tiny_ip_adapter_pipeline), and a 16 x 16 image prompt.
_IP_ADAPTER_PIPELINE = """
import pathlib
from PIL import Image
from bdia.integrations.diffusers.tiny import tiny_ip_adapter_pipeline
pathlib.Path("ip_parts").mkdir(exist_ok=True)
pipe = tiny_ip_adapter_pipeline("ip_parts")
Image.new("RGB", (16, 16), (40, 120, 200)).save("style.png")
"""

# The reader's Flux pipeline with an IP-Adapter loaded: a tiny random one
# (tiny_flux_ip_adapter_pipeline), and a 16 x 16 image prompt.
_FLUX_IP_ADAPTER_PIPELINE = """
import pathlib
from PIL import Image
from bdia.integrations.diffusers.tiny import tiny_flux_ip_adapter_pipeline
pathlib.Path("flux_ip_parts").mkdir(exist_ok=True)
pipe = tiny_flux_ip_adapter_pipeline("flux_ip_parts")
Image.new("RGB", (16, 16), (40, 120, 200)).save("style.png")
"""

# The reader's SD3 pipeline with an IP-Adapter loaded (a tiny random one), a 16 x 16 image
# prompt, and the prompt embeddings the block takes.
_SD3_IP_ADAPTER_PIPELINE = """
import pathlib
import torch
from PIL import Image
from bdia.integrations.diffusers import from_diffusers
from bdia.integrations.diffusers.tiny import add_tiny_sd3_ip_adapter, tiny_sd3_pipeline
pathlib.Path("sd3_ip_parts").mkdir(exist_ok=True)
pipe = add_tiny_sd3_ip_adapter(tiny_sd3_pipeline("sd3_ip_parts"))
style, device = Image.new("RGB", (16, 16), (40, 120, 200)), "cpu"
with torch.no_grad():
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        "a fox", None, None, device=device, negative_prompt="blurry"
    )
"""

# A tiny random Flux Fill pipeline ("flux_fill": a Fill transformer of 48 input channels for
# 16), with _BENCH's photo and mask.
_FLUX_FILL_FOLDER = (
    """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_flux_fill_pipeline
if not pathlib.Path("flux_fill").is_dir():
    pathlib.Path("flux_fill").mkdir()
    tiny_flux_fill_pipeline("flux_fill").save_pretrained("flux_fill")
"""
    + _BENCH
)

# A tiny random Flux Canny-style pipeline ("flux_control": a transformer of 32 input
# channels for 16) and a 16 x 16 edge map.
_FLUX_CONTROL_FOLDER = """
import pathlib
from PIL import Image
from bdia.integrations.diffusers.tiny import tiny_flux_control_pipeline
if not pathlib.Path("flux_control").is_dir():
    pathlib.Path("flux_control").mkdir()
    tiny_flux_control_pipeline("flux_control").save_pretrained("flux_control")
edges = Image.new("RGB", (16, 16), (0, 0, 0))
edges.paste((255, 255, 255), (4, 4, 12, 6))
edges.save("bench_edges.png")
"""

# A tiny random Flux Kontext pipeline ("flux_kontext": the tiny Flux parts) and a 16 x 16
# photo.
_FLUX_KONTEXT_FOLDER = """
import pathlib
from PIL import Image
from bdia.integrations.diffusers.tiny import tiny_flux_kontext_pipeline
if not pathlib.Path("flux_kontext").is_dir():
    pathlib.Path("flux_kontext").mkdir()
    tiny_flux_kontext_pipeline("flux_kontext").save_pretrained("flux_kontext")
Image.new("RGB", (16, 16), (200, 120, 40)).save("cat.png")
"""

# A tiny random Qwen-Image pipeline in diffusers' layout ("qwen_image"): no text encoder or
# tokenizer (the page's block loads it without them, and gives random prompt embeddings in
# place of encode_prompt's), a QwenImageTransformer2DModel and Qwen-Image's scheduler.
_QWEN_IMAGE_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_qwen_image_pipeline
if not pathlib.Path("qwen_image").is_dir():
    tiny_qwen_image_pipeline().save_pretrained("qwen_image")
"""

# A tiny random Sana pipeline in diffusers' layout ("sana"): no text encoder or tokenizer.
_SANA_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_sana_pipeline
if not pathlib.Path("sana").is_dir():
    tiny_sana_pipeline().save_pretrained("sana")
"""

# A tiny random Wan pipeline in diffusers' layout ("wan"): no text encoder or tokenizer.
_WAN_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_wan_pipeline
if not pathlib.Path("wan").is_dir():
    tiny_wan_pipeline().save_pretrained("wan")
"""

# A tiny random Wan 2.2 pipeline of two experts in diffusers' layout ("wan22"), boundary 0.875.
_WAN22_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_wan_pipeline
if not pathlib.Path("wan22").is_dir():
    tiny_wan_pipeline(boundary_ratio=0.875).save_pretrained("wan22")
"""

# A tiny random Z-Image pipeline in diffusers' layout ("z_image"): no text encoder.
_Z_IMAGE_FOLDER = """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_z_image_pipeline
if not pathlib.Path("z_image").is_dir():
    tiny_z_image_pipeline().save_pretrained("z_image")
"""

# The Qwen-Image img2img block continues the Qwen-Image example, whose names later blocks
# of the page rebind: that example's pipe, sizes, steps, prompt embeddings and mu, made
# again as its block (with its LOCAL replacements) makes them, and a 16 x 16 fox.png.
_QWEN_IMAGE_EXAMPLE = (
    _QWEN_IMAGE_FOLDER
    + """
import numpy as np
import torch
from PIL import Image
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
pipe = QwenImagePipeline.from_pretrained(
    "qwen_image", text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16
)
pipe.set_progress_bar_config(disable=True)
height = width = 16
steps = 50
embeds, mask = torch.randn(1, 5, 16, dtype=torch.bfloat16), None
negative, negative_mask = torch.randn(1, 3, 16, dtype=torch.bfloat16), None
cfg = pipe.scheduler.config
mu = calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len,
                     cfg.base_shift, cfg.max_shift)
h = w = 8
Image.new("RGB", (16, 16), (200, 120, 40)).save("fox.png")
"""
)

STAND_INS = {
    ("docs/quickstart.md", "source = bdia.DiffusionODE(net"): (
        _EDM_NET
        + """
images = torch.randn(2, 3, 16, 16)
old_labels, new_labels = torch.eye(10)[[3, 5]], torch.eye(10)[[8, 8]]
"""
    ),
    ("docs/quickstart.md", "ode = bdia.DiffusionODE(net, bdia.EDM(), cond="): (
        _EDM_NET + "labels = torch.eye(10)[[0, 1]]\n"
    ),
    ("docs/quickstart.md", "ode = bdia.DiffusionODE.from_eps(eps_net"): """
def eps_net(x, t):
    return torch.zeros_like(x)
x0_net = v_net = eps_net
""",
    ("docs/quickstart.md", "ode = bdia.DiffusionODE.from_flow(flow_net"): """
from bdia.models import toy
flow_net = toy.GaussianMixture.random(dim=2, components=4, seed=0).flow_velocity
""",
    ("docs/quickstart.md", "lambda x, t, **cond: unet("): """
def unet(x, t, **cond):
    return torch.zeros_like(x)
""",
    # The half-precision blocks continue the toy example's solver with an image network.
    ("docs/quickstart.md", "net = net.to(torch.bfloat16)"): (
        _EDM_NET + "noise, ts = 80.0 * torch.randn(2, 3, 16, 16), bdia.karras_grid(4)\n"
    ),
    ("docs/quickstart.md", "net.compute_dtype = torch.bfloat16"): _EDM_NET,
    ("docs/diffusers.md", "encoder_hidden_states=prompt_embeds"): """
import diffusers
import torch
from bdia.integrations.diffusers import diffusers_grid, from_diffusers
from bdia.integrations.diffusers.tiny import tiny_unet
unet = tiny_unet(conditional=True, channels=4, cross_attention_dim=16)
scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
prompt_embeds, negative_embeds = torch.randn(2, 1, 16, 16)
""",
    ("docs/diffusers.md", "unet = UNet2DConditionModel.from_pretrained("): _SD_FOLDER,
    ("docs/diffusers.md", "result.reconstruction[0].save("): (
        _SD_FOLDER
        + """
from PIL import Image
Image.new("RGB", (32, 32), (200, 120, 40)).save("cat.png")
"""
    ),
    ("docs/diffusers.md", '"/path/to/stable-diffusion-xl-base-1.0"'): _SDXL_FOLDER,
    ("docs/diffusers.md", '"/models/stable-diffusion-xl-refiner-1.0"'): _SDXL_ENSEMBLE_FOLDERS,
    # The FlowMatchHeunDiscreteScheduler recipe: a tiny SD3 transformer's ODE under it.
    ("docs/diffusers.md", 'bdia.get_solver("heun"), noise, ts[:-1]'): """
import diffusers
import torch
import bdia
from bdia.integrations.diffusers import diffusers_grid, from_diffusers
from bdia.integrations.diffusers.tiny import tiny_sd3_transformer
transformer = tiny_sd3_transformer()
scheduler = diffusers.FlowMatchHeunDiscreteScheduler(shift=3.0)
cond = dict(encoder_hidden_states=torch.randn(1, 5, 16), pooled_projections=torch.randn(1, 8))
ode = from_diffusers(transformer, scheduler, **cond)
n, noise = 10, torch.randn(1, 4, 8, 8)
""",
    ("docs/diffusers.md", '"/models/stable-diffusion-3-medium-diffusers"'): _SD3_FOLDER,
    ("docs/diffusers.md", '"/models/playground-v2.5-1024px-aesthetic"'): _PLAYGROUND_FOLDER,
    ("docs/diffusers.md", '"/path/to/playground-v2.5-1024px-aesthetic"'): _PLAYGROUND_FOLDER,
    ("docs/diffusers.md", '"/path/to/stable-diffusion-3-medium-diffusers"'): (
        _SD3_FOLDER
        + """
from PIL import Image
Image.new("RGB", (32, 32), (200, 120, 40)).save("cat.png")
"""
    ),
    # The BDIA scheduler's first block assigns it to the reader's pipeline (a DDIM-type
    # scheduler's): a tiny Stable Diffusion one, in float32 as the CPU runs it.
    ("docs/diffusers.md", 'images = pipe("a photo of a dog", num_inference_steps=50)'): """
import pathlib
from bdia.integrations.diffusers.tiny import tiny_text_to_image_pipeline
pathlib.Path("sd_parts").mkdir(exist_ok=True)
pipe = tiny_text_to_image_pipeline("sd_parts")
""",
    ("docs/diffusers.md", '"/models/FLUX.1-dev"'): _FLUX_FOLDER,
    ("docs/diffusers.md", '"/models/Chroma1-HD"'): _CHROMA_FOLDER,
    ("docs/diffusers.md", '"/models/PixArt-Sigma-XL-2-1024-MS"'): _PIXART_FOLDER,
    ("docs/diffusers.md", '"/models/FLUX.2-dev"'): _FLUX2_FOLDER,
    # The key-value cache of Flux2KleinKVPipeline's references: the tiny pipeline, one
    # reference of 64 x 64 pixels prepared as the pipeline prepares it, a prompt's embeddings.
    ("docs/diffusers.md", "pipe.prepare_image_latents(references, batch"): """
import torch
from PIL import Image
from bdia.integrations.diffusers.tiny import tiny_flux2_klein_kv_pipeline
pipe = tiny_flux2_klein_kv_pipeline()
batch, device, dtype = 1, "cpu", torch.float32
references = [pipe.image_processor.preprocess(Image.new("RGB", (64, 64), (200, 120, 40)))]
embeds, text_ids = pipe.encode_prompt(None, prompt_embeds=torch.randn(1, 5, 16))
latent_ids = pipe._prepare_latent_ids(torch.zeros(1, 16, 4, 4))
""",
    ("docs/diffusers.md", '"/path/to/FLUX.1-dev"'): (
        _FLUX_FOLDER
        + """
from PIL import Image
Image.new("RGB", (32, 32), (200, 120, 40)).save("cat.png")
"""
    ),
    ("docs/diffusers.md", "bdia.sample(from_diffusers(unet, scheduler)"): """
import diffusers
from bdia.integrations.diffusers.tiny import tiny_unet
unet = tiny_unet(channels=4)
scheduler = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1)
gamma, n, noise = 0.96, 10, torch.randn(1, 4, 8, 8)
""",
    ("docs/diffusers.md", "inverse = BDIAInverseScheduler.from_config("): _SD_FOLDER,
    ("docs/diffusers.md", '"/models/sd-controlnet-canny"'): _CONTROLNET_FOLDER,
    ("docs/diffusers.md", '"/models/stable-diffusion-inpainting"'): _INPAINT_FOLDER,
    ("docs/diffusers.md", '"/models/FLUX.1-Fill-dev"'): _FLUX_FILL_FOLDER,
    ("docs/diffusers.md", '"/models/FLUX.1-Canny-dev"'): _FLUX_CONTROL_FOLDER,
    ("docs/diffusers.md", '"/models/FLUX.1-Kontext-dev"'): _FLUX_KONTEXT_FOLDER,
    ("docs/diffusers.md", '"/models/Qwen-Image"'): _QWEN_IMAGE_FOLDER,
    ("docs/diffusers.md", '"/models/Z-Image-Turbo"'): _Z_IMAGE_FOLDER,
    ("docs/diffusers.md", '"/models/Sana_1600M_1024px_BF16_diffusers"'): _SANA_FOLDER,
    ("docs/diffusers.md", '"/models/Wan2.1-T2V-1.3B-Diffusers"'): _WAN_FOLDER,
    ("docs/diffusers.md", '"/models/Wan2.2-T2V-A14B-Diffusers"'): _WAN22_FOLDER,
    ("docs/diffusers.md", "img2img = QwenImageImg2ImgPipeline("): _QWEN_IMAGE_EXAMPLE,
    # edit_image's Z-Image example: the tiny folder and a cat.png.
    ("docs/diffusers.md", '"/path/to/Z-Image-Turbo"'): (
        _Z_IMAGE_FOLDER
        + """
from PIL import Image
Image.new("RGB", (32, 32), (200, 120, 40)).save("cat.png")
"""
    ),
    # edit_image's Qwen-Image example: the tiny folder and a cat.png.
    ("docs/diffusers.md", '"/path/to/Qwen-Image"'): (
        _QWEN_IMAGE_FOLDER
        + """
from PIL import Image
Image.new("RGB", (32, 32), (200, 120, 40)).save("cat.png")
"""
    ),
    # edit_image's ControlNet example takes the reader's ControlNet pipeline: a tiny one.
    ("docs/diffusers.md", 'control_image=Image.open("cat_edges.png")'): """
import pathlib
from PIL import Image
from bdia.integrations.diffusers.tiny import tiny_controlnet_pipeline
pathlib.Path("cn_parts").mkdir(exist_ok=True)
pipe = tiny_controlnet_pipeline("cn_parts")
Image.new("RGB", (32, 32), (200, 120, 40)).save("cat.png")
Image.new("RGB", (16, 16), (255, 255, 255)).save("cat_edges.png")
""",
    # The IP-Adapter examples take the reader's pipeline with an adapter loaded: a tiny
    # one, and a 16 x 16 image prompt (and, to edit, a photo).
    ("docs/diffusers.md", '"/models/IP-Adapter"'): _IP_ADAPTER_PIPELINE,
    ("docs/diffusers.md", 'ip_adapter_image=Image.open("style.png")'): (
        _IP_ADAPTER_PIPELINE + 'Image.new("RGB", (32, 32), (200, 120, 40)).save("cat.png")\n'
    ),
    ("docs/diffusers.md", '"/models/flux-ip-adapter"'): _FLUX_IP_ADAPTER_PIPELINE,
    ("docs/diffusers.md", "negative_half, positive_half = e.chunk(2)"): _SD3_IP_ADAPTER_PIPELINE,
    # edit_image's inpainting example takes the reader's inpainting pipeline: a tiny one.
    ("docs/diffusers.md", 'mask_image=Image.open("bench_mask.png")'): (
        _INPAINT_FOLDER
        + """
from bdia.integrations.diffusers.tiny import tiny_inpaint_pipeline
pathlib.Path("inpaint_parts").mkdir(exist_ok=True)
pipe = tiny_inpaint_pipeline("inpaint_parts")
"""
    ),
    # The SD3 scheduler blocks: a tiny SD3 pipeline, its prompt embeddings, the seed of the
    # pipeline's noise (drawn from the global generator), and the guidance it applies.
    ("docs/diffusers.md", 'pair.solver == "bdia(euler'): """
import pathlib
import torch
from bdia.integrations.diffusers import BDIAInverseScheduler, BDIAScheduler
from bdia.integrations.diffusers.tiny import tiny_sd3_pipeline
pathlib.Path("sd3_parts").mkdir(exist_ok=True)
pipe = tiny_sd3_pipeline("sd3_parts")
prompt = "a photo of a cat"
torch.manual_seed(0)
""",
    ("docs/diffusers.md", "bdia.sample(from_diffusers(pipe.transformer"): """
import bdia
from bdia.integrations.diffusers import diffusers_grid, from_diffusers
with torch.no_grad():
    pe, npe, pp, npp = pipe.encode_prompt(prompt, None, None, do_classifier_free_guidance=True)
cond = dict(encoder_hidden_states=pe, pooled_projections=pp, guidance_scale=7.0,
            negative_cond=dict(encoder_hidden_states=npe, pooled_projections=npp))
gamma, n, mu, noise = 0.96, 28, None, torch.randn(1, 4, 8, 8)
""",
    # The SD3 ControlNet inpainting block: the tiny pipeline, a 16 x 16 image and mask.
    ("docs/diffusers.md", "pipe.prepare_image_with_mask("): """
import pathlib
from PIL import Image
from bdia.integrations.diffusers.tiny import tiny_sd3_controlnet_inpaint_pipeline
pathlib.Path("sd3_inpaint_parts").mkdir(exist_ok=True)
pipe = tiny_sd3_controlnet_inpaint_pipeline("sd3_inpaint_parts")
image, mask = Image.new("RGB", (16, 16), (200, 120, 40)), Image.new("L", (16, 16), 255)
width = height = 16
""",
    ("docs/diffusers.md", "# and mu=..., as the run had it"): """
steps, guidance = 28, 7.0
embeds, pooled = torch.cat([npe, pe]), torch.cat([npp, pp])
""",
    # The Flux scheduler blocks: a tiny Flux pipeline whose default image is 16 x 16 (16
    # tokens), its prompt's encoding and ids, FluxPipeline's mu for 16 tokens, and the seed
    # of the pipeline's noise (drawn from the global generator).
    ("docs/diffusers.md", "diffusers_grid(pipe.scheduler, n, mu=mu, sigmas="): """
import pathlib
import numpy as np
import torch
import bdia
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from bdia.integrations.diffusers import diffusers_grid, from_diffusers
from bdia.integrations.diffusers.tiny import tiny_flux_pipeline
pathlib.Path("flux_parts").mkdir(exist_ok=True)
pipe = tiny_flux_pipeline("flux_parts")
pipe.default_sample_size = 8
prompt = "a photo of a cat"
with torch.no_grad():
    embeds, pooled, text_ids = pipe.encode_prompt(prompt, None)
img_ids = pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)
cond = dict(encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=text_ids,
            img_ids=img_ids, guidance=3.5)
gamma, n, mu, noise = 0.96, 28, calculate_shift(16), torch.randn(1, 16, 16)
""",
    ("docs/diffusers.md", "# packed latents, as the pipeline's"): """
from bdia.integrations.diffusers import BDIAInverseScheduler, BDIAScheduler
steps = 28
torch.manual_seed(0)
""",
    ("docs/edm_cifar10.md", "net = load_network("): (
        _EDM_NET
        + """
from bdia.models.checkpoints import save_network
save_network(net, "ddpmpp-cond.safetensors")
"""
    ),
    # k-diffusion's two functions the page calls, by their contracts: CompVisDenoiser wraps a
    # model into model(x, sigma, cond=c) -> denoised; get_sigmas_karras is EDM's rho = 7 grid
    # with a final zero. The model is the exact denoiser of standard normal data.
    ("docs/k_diffusion.md", "import k_diffusion as K"): """
import sys
import types
import torch

def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, device="cpu"):
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)

class CompVisDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x, sigma, cond):
        return self.inner(x, sigma, cond)

def ldm_model(x, sigma, cond):
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)

c = None
K = types.ModuleType("k_diffusion")
K.external = types.SimpleNamespace(CompVisDenoiser=CompVisDenoiser)
K.sampling = types.SimpleNamespace(get_sigmas_karras=get_sigmas_karras)
sys.modules["k_diffusion"] = K
""",
}

_SD_PATH = '"/models/stable-diffusion-v1-5"'
LOCAL = {
    ("docs/diffusers.md", "unet = UNet2DConditionModel.from_pretrained("): [
        (_SD_PATH, '"sd"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("torch.randn(1, 4, 64, 64,", "torch.randn(1, 4, 8, 8,"),
    ],
    ("docs/diffusers.md", "result.reconstruction[0].save("): [
        ('"/path/to/stable-diffusion-v1-5"', '"sd"'),
        ('.to("cuda")', '.to("cpu")'),
        (".resize((512, 512))", ".resize((16, 16))"),
    ],
    ("docs/diffusers.md", '"/path/to/stable-diffusion-xl-base-1.0"'): [
        ('"/path/to/stable-diffusion-xl-base-1.0"', '"sdxl"'),
        ('.to("cuda")', '.to("cpu")'),
        (".resize((1024, 1024))", ".resize((16, 16))"),
    ],
    ("docs/diffusers.md", '"/models/stable-diffusion-xl-refiner-1.0"'): [
        ('"/models/stable-diffusion-xl-base-1.0"', '"sdxl"'),
        ('"/models/stable-diffusion-xl-refiner-1.0"', '"sdxl_refiner"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("1024.0", "16.0"),
        ("torch.randn(1, 4, 128, 128,", "torch.randn(1, 4, 8, 8,"),
    ],
    ("docs/diffusers.md", '"/models/stable-diffusion-3-medium-diffusers"'): [
        ('"/models/stable-diffusion-3-medium-diffusers"', '"sd3"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("torch.randn(1, 16, 128, 128,", "torch.randn(1, 4, 8, 8,"),
    ],
    ("docs/diffusers.md", '"/models/playground-v2.5-1024px-aesthetic"'): [
        ('"/models/playground-v2.5-1024px-aesthetic"', '"playground"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("torch.randn(1, 4, 128, 128,", "torch.randn(1, 4, 8, 8,"),
    ],
    ("docs/diffusers.md", '"/path/to/playground-v2.5-1024px-aesthetic"'): [
        ('"/path/to/playground-v2.5-1024px-aesthetic"', '"playground"'),
        ('"cuda"', '"cpu"'),
        ("height=1024, width=1024", "height=16, width=16"),
        ("[[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]]", "[[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]]"),
    ],
    ("docs/diffusers.md", '"/path/to/stable-diffusion-3-medium-diffusers"'): [
        ('"/path/to/stable-diffusion-3-medium-diffusers"', '"sd3"'),
        ('.to("cuda")', '.to("cpu")'),
        (".resize((1024, 1024))", ".resize((16, 16))"),
    ],
    ("docs/diffusers.md", '"/models/FLUX.1-dev"'): [
        ('"/models/FLUX.1-dev"', '"flux"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("height = width = 1024", "height = width = 16"),
    ],
    ("docs/diffusers.md", '"/models/FLUX.2-dev"'): [
        ('"/models/FLUX.2-dev"', '"flux2"'),
        ("from_pretrained(path, ", "from_pretrained(path, text_encoder=None, tokenizer=None, "),
        ('device = "cuda"', 'device = "cpu"'),
        ("height = width = 1024", "height = width = 16"),
        # The tiny pipeline has no text encoder: embeddings of the transformer's width.
        (
            'pipe.encode_prompt("a watercolour fox in the snow", device=device)',
            "pipe.encode_prompt(None, device=device, prompt_embeds=torch.randn(1, 5, 16))",
        ),
    ],
    ("docs/diffusers.md", '"/models/PixArt-Sigma-XL-2-1024-MS"'): [
        ('"/models/PixArt-Sigma-XL-2-1024-MS"', '"pixart"'),
        ('device = "cuda"', 'device = "cpu"'),
        # float16 runs on the CPU, but diffusers warns that it should not.
        ("torch_dtype=torch.float16", "torch_dtype=torch.float32"),
        ("height = width = 1024", "height = width = 16"),
    ],
    ("docs/diffusers.md", '"/models/Chroma1-HD"'): [
        ('"/models/Chroma1-HD"', '"chroma"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("height = width = 1024", "height = width = 16"),
    ],
    ("docs/diffusers.md", '"/path/to/FLUX.1-dev"'): [
        ('"/path/to/FLUX.1-dev"', '"flux"'),
        ('.to("cuda")', '.to("cpu")'),
        (".resize((1024, 1024))", ".resize((16, 16))"),
    ],
    ("docs/diffusers.md", "inverse = BDIAInverseScheduler.from_config("): [
        (_SD_PATH, '"sd"'),
        ('"cuda"', '"cpu"'),
    ],
    ("docs/diffusers.md", '"/models/sd-controlnet-canny"'): [
        ('"/models/sd-controlnet-canny"', '"controlnet"'),
        (_SD_PATH, '"sd"'),
        ('"cuda"', '"cpu"'),
        ("height=512, width=512", "height=16, width=16"),
        ("torch.randn(1, 4, 64, 64,", "torch.randn(1, 4, 8, 8,"),
    ],
    ("docs/diffusers.md", 'control_image=Image.open("cat_edges.png")'): [
        (".resize((512, 512))", ".resize((16, 16))"),
    ],
    ("docs/diffusers.md", 'mask_image=Image.open("bench_mask.png")'): [
        (".resize((512, 512))", ".resize((16, 16))"),
    ],
    ("docs/diffusers.md", "pipe.prepare_image_with_mask("): [('"cuda"', '"cpu"')],
    ("docs/diffusers.md", '"/models/IP-Adapter"'): [
        ("torch.randn(1, 4, 64, 64,", "torch.randn(1, 4, 8, 8,"),
    ],
    ("docs/diffusers.md", 'ip_adapter_image=Image.open("style.png")'): [
        (".resize((512, 512))", ".resize((16, 16))"),
    ],
    ("docs/diffusers.md", '"/models/flux-ip-adapter"'): [
        ("height = width = 1024", "height = width = 16"),
    ],
    ("docs/diffusers.md", '"/models/FLUX.1-Fill-dev"'): [
        ('"/models/FLUX.1-Fill-dev"', '"flux_fill"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("height = width = 1024", "height = width = 16"),
    ],
    ("docs/diffusers.md", '"/models/FLUX.1-Canny-dev"'): [
        ('"/models/FLUX.1-Canny-dev"', '"flux_control"'),
    ],
    # The tiny folder has no text encoder: the prompts as (prompt_embeds, prompt_embeds_mask).
    ("docs/diffusers.md", '"/path/to/Qwen-Image"'): [
        ('"/path/to/Qwen-Image"', '"qwen_image"'),
        ('.to("cuda")', '.to("cpu")'),
        (".resize((1024, 1024))", ".resize((16, 16))"),
        (
            "torch_dtype=torch.bfloat16,",
            "text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16,",
        ),
        ('"a photo of a cat",', "(torch.randn(1, 5, 16), torch.ones(1, 5, dtype=torch.long)),"),
        ('"a photo of a dog",', "(torch.randn(1, 6, 16), torch.ones(1, 6, dtype=torch.long)),"),
        ('negative_prompt=" ",', "negative_prompt=(torch.randn(1, 3, 16), torch.ones(1, 3)),"),
    ],
    # The tiny folder has no text encoder: the prompts as lists of per-sample embeddings.
    ("docs/diffusers.md", '"/path/to/Z-Image-Turbo"'): [
        ('"/path/to/Z-Image-Turbo"', '"z_image"'),
        ('.to("cuda")', '.to("cpu")'),
        (".resize((1024, 1024))", ".resize((16, 16))"),
        (
            "torch_dtype=torch.bfloat16,",
            "text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16,",
        ),
        ('"a photo of a cat",', "[torch.randn(5, 16)],"),
        ('"a photo of a dog",', "[torch.randn(6, 16)],"),
    ],
    # The tiny folder has no text encoder: a prompt's embeddings drawn; 16 x 16 images.
    ("docs/diffusers.md", '"/models/Z-Image-Turbo"'): [
        ('"/models/Z-Image-Turbo",', '"z_image", text_encoder=None, tokenizer=None,'),
        ('.to("cuda")', '.to("cpu")'),
        ('device="cuda"', 'device="cpu"'),
        ('torch.Generator("cuda")', "torch.Generator()"),
        (
            'embeds, _ = pipe.encode_prompt("a watercolour fox in the snow", device="cpu",',
            "embeds, _ = [torch.randn(5, 16, dtype=torch.bfloat16)], (",
        ),
        ("do_classifier_free_guidance=False)", ")"),
        ("torch.randn(1, 16, 128, 128,", "torch.randn(1, 4, 8, 8,"),
    ],
    ("docs/diffusers.md", '"/models/Qwen-Image"'): [
        ('"/models/Qwen-Image"', '"qwen_image"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("height = width = 1024", "height = width = 16"),
        (
            "torch_dtype=torch.bfloat16)",
            "text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16)",
        ),
        (
            'pipe.encode_prompt("a watercolour fox in the snow", device=device)',
            "torch.randn(1, 5, 16, dtype=torch.bfloat16), None",
        ),
        (
            'pipe.encode_prompt(" ", device=device)',
            "torch.randn(1, 3, 16, dtype=torch.bfloat16), None",
        ),
    ],
    ("docs/diffusers.md", '"/models/FLUX.1-Kontext-dev"'): [
        ('"/models/FLUX.1-Kontext-dev"', '"flux_kontext"'),
    ],
    ("docs/diffusers.md", '"/models/Wan2.1-T2V-1.3B-Diffusers"'): [
        ('"/models/Wan2.1-T2V-1.3B-Diffusers"', '"wan"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("height, width, frames = 480, 832, 81", "height, width, frames = 64, 64, 5"),
        ("steps = 50", "steps = 4"),
        (
            "vae=vae, torch_dtype=torch.bfloat16)",
            "vae=vae, text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16)",
        ),
        (
            """pipe.encode_prompt(
        "a fox running through the snow", device=device, max_sequence_length=512)""",
            "(torch.randn(1, 7, 16, dtype=torch.bfloat16),"
            " torch.randn(1, 7, 16, dtype=torch.bfloat16))",
        ),
    ],
    ("docs/diffusers.md", '"/models/Wan2.2-T2V-A14B-Diffusers"'): [
        ('"/models/Wan2.2-T2V-A14B-Diffusers"', '"wan22"'),
        (
            "vae=vae, torch_dtype=torch.bfloat16)",
            "vae=vae, text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16)",
        ),
        (
            """pipe.encode_prompt(
        "a fox running through the snow", device=device, max_sequence_length=512)""",
            "(torch.randn(1, 7, 16, dtype=torch.bfloat16),"
            " torch.randn(1, 7, 16, dtype=torch.bfloat16))",
        ),
    ],
    ("docs/diffusers.md", '"/models/Sana_1600M_1024px_BF16_diffusers"'): [
        ('"/models/Sana_1600M_1024px_BF16_diffusers"', '"sana"'),
        ('device = "cuda"', 'device = "cpu"'),
        ("height = width = 1024", "height = width = 32"),
        (
            "torch_dtype=torch.bfloat16)",
            "text_encoder=None, tokenizer=None, torch_dtype=torch.bfloat16)",
        ),
        (
            """pipe.encode_prompt(
        "a watercolour fox in the snow", device=device,
        complex_human_instruction=instruction.default)""",
            "(torch.randn(1, 5, 16, dtype=torch.bfloat16), torch.tensor([[1, 1, 1, 0, 0]]),"
            " torch.randn(1, 5, 16, dtype=torch.bfloat16), torch.ones(1, 5, dtype=torch.long))",
        ),
    ],
    ("docs/diffusers.md", '"/models/stable-diffusion-inpainting"'): [
        ('"/models/stable-diffusion-inpainting"', '"inpaint"'),
        ('"cuda"', '"cpu"'),
        ("height = width = 512", "height = width = 16"),
        ("torch.randn(1, 4, 64, 64,", "torch.randn(1, 4, 8, 8,"),
    ],
    ("docs/k_diffusion.md", "import k_diffusion as K"): [('device="cuda"', 'device="cpu"')],
}


# What a block's comments and prose claim of its result, checked right after it runs.
def _pipeline_inverted(ns):
    # "the pipeline's starting latents, in float32": the float16 draw of the page's generator
    # (diffusers' randn_tensor, times init_noise_sigma = 1). The two-word float32 state
    # inverts to about u^2 of the state (measured: 0 here), so the draw comes back exactly
    # once rounded to float16, and to 1e-10 of its size in float32, far below the ~1e-6 that
    # an inversion in single float32 words loses.
    noise = ns["noise"]
    assert noise.dtype == torch.float32 and noise.shape == ns["pair"].later.shape
    drawn = torch.randn(
        noise.shape, generator=torch.Generator("cpu").manual_seed(0), dtype=torch.float16
    )
    assert torch.equal(noise.half(), drawn)
    assert float((noise - drawn.float()).abs().max()) <= 1e-10 * float(drawn.abs().max())


def _edit_round_trip(ns):
    # The UNet round trip is rounding only (the page: exact; float32 state here).
    assert ns["result"].latent_error < 1e-6


def _kv_cache_made(ns):
    # The pipeline's first call makes it: keys and values of the reference's 256 tokens.
    cache = ns["cache"]
    assert type(cache).__name__ == "Flux2KVCache" and cache.num_ref_tokens == 256


def _inpaint_edited(ns):
    # "0.0: the round trip under the mask is exact", with the mask in both ODEs.
    result = ns["result"]
    assert result.latent_error == 0.0
    for ode in (result.inversion.ode, result.target):
        assert ode.cond["mask"].shape == (1, 1, 8, 8) and 0 < float(ode.cond["mask"].sum()) < 64


def _controlnet_inverted(ns):
    # "back.earlier is noise, to rounding", the controlnet on to 80 % of the 50 steps: from
    # the grid's start down to the time of step 39 (measured: 0).
    noise, ts = ns["noise"], ns["ts"]
    assert ns["ode"].cond["control_range"] == [(float(ts[39]), float("inf"))]
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _ip_adapter_inverted(ns):
    # Each branch its own image embeddings (the negative ones zeros), and "back.earlier is
    # noise, to rounding" (float64 state).
    cond, noise = ns["ode"].cond, ns["noise"]
    (images,) = cond["added_cond_kwargs"]["image_embeds"]
    (negative,) = cond["negative_cond"]["added_cond_kwargs"]["image_embeds"]
    assert images.abs().max() > 0 and not negative.any()
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-12 * float(noise.abs().max())


def _flux_ip_adapter_inverted(ns):
    # The image prompt in the conditional call, the all-zero image's embeddings (not zeros)
    # in the negative one, and "back.earlier is noise, to rounding" (float64 state).
    cond, noise = ns["ode"].cond, ns["noise"]
    (images,) = cond["joint_attention_kwargs"]["ip_adapter_image_embeds"]
    (negative,) = cond["negative_cond"]["joint_attention_kwargs"]["ip_adapter_image_embeds"]
    assert images.shape == negative.shape == (1, 1, 8) and negative.abs().max() > 0.1
    assert not torch.equal(images, negative)
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-12 * float(noise.abs().max())


def _sd3_ip_adapter_made(ns):
    # Each half of the pipeline's one tensor in its branch: the image's, and zeros.
    cond = ns["ode"].cond
    images = cond["joint_attention_kwargs"]["ip_adapter_image_embeds"]
    negative = cond["negative_cond"]["joint_attention_kwargs"]["ip_adapter_image_embeds"]
    assert images.shape == negative.shape == (1, 4, 8)
    assert images.abs().max() > 0 and not negative.any()


def _ip_adapter_edited(ns):
    # "0.0: the round trip under the image prompt is exact", the prompt in both ODEs.
    result = ns["result"]
    assert result.latent_error == 0.0
    for ode in (result.inversion.ode, result.target):
        assert ode.cond["added_cond_kwargs"]["image_embeds"][0].abs().max() > 0


def _inpaint_inverted(ns):
    # The mask at the latents' size in the unet's dtype, the masked image's latents beside
    # it, and "back.earlier is noise, to rounding" (measured: 0).
    cond, noise = ns["ode"].cond, ns["noise"]
    assert cond["mask"].shape == (1, 1, 8, 8) and cond["mask"].dtype == torch.float16
    assert cond["masked_image_latents"].shape == (1, 4, 8, 8)
    assert 0 < float(cond["mask"].sum()) < 64
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _inpaint_scheduler_inverted(ns):
    # "the pipeline's first latents, noise.half()": the float32 state of the float16 latents
    # comes back exactly (measured: 0), and its pair is the scheduler's run from the start.
    assert ns["pair"].start_index == 0
    assert torch.equal(ns["start"], ns["noise"].half().float())


def _sd3_inverted(ns):
    # "29 sigmas, from 1.0 to 0.0" and "back.earlier is noise, to rounding": the float32
    # state's two words invert the transformer's steps exactly (measured: 0).
    ts, noise = ns["ts"], ns["noise"]
    assert len(ts) == 29 and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _flow_heun_followed(ns):
    # "n + 1 times, from 1.0 to 0.0", and the prose: the scheduler's run (the SD3 pipeline's
    # loop) to float32 rounding (measured: 4.6e-7 relative here).
    ts, scheduler, noise, cond = ns["ts"], ns["scheduler"], ns["noise"], ns["cond"]
    assert len(ts) == 11 and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    scheduler.set_timesteps(ns["n"])
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = ns["transformer"](hidden_states=x, timestep=t.expand(1), return_dict=False, **cond)
            x = scheduler.step(v[0], t, x, return_dict=False)[0]
    latents = ns["latents"]
    assert float((latents - x).abs().max()) <= 1e-5 * float(x.abs().max())


def _ensemble_inverted(ns):
    # "33 times: 32 steps", "9 times, from ts[-1]", and the two inversions "to rounding": the
    # float32 state's two words invert the float16 unets' steps (measured: 0).
    ts, ts2, noise, later = ns["ts"], ns["ts2"], ns["noise"], ns["base_pair"].later
    assert len(ts) == 33 and len(ts2) == 9 and float(ts[-1]) == float(ts2[0])
    assert float((ns["handed"] - later).abs().max()) <= 1e-6 * float(later.abs().max())
    assert float((ns["back"] - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _ensemble_scheduler_pairs(ns):
    # "end_index: 32" and "start_index: 32": where the base stopped and the refiner began;
    # the base's pair holds the latents it returned (their float32 state).
    base_pair, refiner_pair = ns["base_pair"], ns["refiner_pair"]
    assert base_pair.end_index == 32 and base_pair.start_index == 0
    assert refiner_pair.start_index == 32 and refiner_pair.end_index == 40
    assert torch.equal(base_pair.later.half(), ns["latents"])


def _playground_inverted(ns):
    # "50 sigmas from 80 to 0.002, then 0" and "back.earlier is start, to rounding": the
    # float32 state's two words invert the float16 unet's steps (measured: 0).
    ts, start = ns["ts"], ns["start"]
    assert len(ts) == 51 and float(ts[-1]) == 0.0
    assert float(ts[0]) == pytest.approx(80.0, rel=1e-6)
    assert float(ts[-2]) == pytest.approx(0.002, rel=1e-6)
    assert float((ns["back"].earlier - start).abs().max()) <= 1e-6 * float(start.abs().max())


def _playground_scheduler_inverted(ns):
    # "the pipeline's first latents, noise * init_noise_sigma": the float16 draw of the page's
    # generator times sqrt(80^2 + 1), in float16 as StableDiffusionXLPipeline makes them, bit
    # for bit; and the pair the pipeline's run left.
    assert ns["pair"].solver == "bdia(euler, gamma=0.96)"
    drawn = torch.randn(
        1, 4, 8, 8, generator=torch.Generator("cpu").manual_seed(0), dtype=torch.float16
    )
    sigma = ns["pipe"].scheduler.init_noise_sigma
    assert sigma == (80.0**2 + 1) ** 0.5
    assert torch.equal(ns["start"], (drawn * sigma).float())


def _sd3_solver_recorded(ns):
    # "pair.solver == ...": the pair the pipeline's run left.
    assert ns["pair"].solver == "bdia(euler, gamma=0.96)"


def _sd3_scheduler_inverted(ns):
    # "noise = inv.pair.earlier": the noise the pipeline drew after torch.manual_seed(0),
    # bit for bit.
    torch.manual_seed(0)
    assert torch.equal(ns["noise"], torch.randn(1, 4, 8, 8))


def _flux_inverted(ns):
    # "(1, 4096, 64)" packed latents (here (1, 16, 16): 16 x 16 images, 4 channels in 2 x 2
    # patches) and "back.earlier is noise, to rounding": the float32 state's two words invert
    # the bfloat16 transformer's steps exactly (measured: 0).
    ts, noise = ns["ts"], ns["noise"]
    assert noise.shape == (1, 16, 16) and len(ts) == 29 and float(ts[0]) == 1.0
    assert float(ts[-1]) == 0.0 and ns["ode"].model_dtype == torch.bfloat16
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _pixart_inverted(ns):
    # "21 times, ending at t = 0", PixArtSigmaPipeline's guidance 4.5 with its negative
    # prompt's own mask, and "back.earlier is noise, to rounding" (measured: 0).
    ts, noise, ode = ns["ts"], ns["noise"], ns["ode"]
    assert len(ts) == 21 and float(ts[-1]) == 0.0 and noise.shape == (1, 4, 8, 8)
    assert ode.cond["guidance_scale"] == 4.5
    assert ode.cond["negative_cond"]["encoder_attention_mask"].shape == (1, 300)
    assert ode.cond["added_cond_kwargs"] == {"resolution": None, "aspect_ratio": None}
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _chroma_inverted(ns):
    # Chroma's packed latents (here (1, 16, 16)) under true CFG 5 with the negative prompt's
    # own mask, "(batch or 1, L + tokens)", and "back.earlier is noise, to rounding": the
    # float32 state's two words invert the bfloat16 transformer's steps exactly (measured: 0).
    cond, noise = ns["ode"].cond, ns["noise"]
    assert noise.shape == (1, 16, 16) and ns["ode"].model_dtype == torch.bfloat16
    assert cond["guidance_scale"] == 5.0 and cond["attention_mask"].shape == (1, 512 + 16)
    assert cond["negative_cond"]["attention_mask"].shape == (1, 512 + 16)
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _z_image_inverted(ns):
    # Turbo's 8 steps without CFG in the bfloat16 transformer on image-shaped latents, and
    # "back.earlier is noise, to rounding": the float32 state's two words invert the steps
    # exactly (measured: 0).
    ts, noise, ode = ns["ts"], ns["noise"], ns["ode"]
    assert noise.shape == (1, 4, 8, 8) and len(ts) == 9 and float(ts[0]) == 1.0
    assert float(ts[-1]) == 0.0 and ode.model_dtype == torch.bfloat16
    assert ns["image"].shape == (1, 3, 16, 16)
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _sana_inverted(ns):
    # "the flow-matching scheduler of the shift of Sana's DPM-Solver" (the tiny one's, 3.0),
    # "21 times, from 1 to 0", SanaPipeline's guidance 4.5 with the negative prompt's own
    # mask, the instructions read from the signature, and "back.earlier is noise, to
    # rounding": the float32 state's two words invert the bfloat16 transformer's steps
    # exactly (measured: 0).
    ts, noise, ode = ns["ts"], ns["noise"], ns["ode"]
    assert ns["scheduler"].config.shift == 3.0
    assert len(ts) == 21 and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    assert noise.shape == (1, 4, 8, 8) and ode.model_dtype == torch.bfloat16
    assert ode.cond["guidance_scale"] == 4.5
    assert ode.cond["negative_cond"]["encoder_attention_mask"].shape == (1, 5)
    default = ns["instruction"].default
    assert isinstance(default, list) and all(isinstance(line, str) for line in default)
    assert ns["image"].shape == (1, 3, 32, 32)
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _wan_inverted(ns):
    # "the flow-matching scheduler of the shift of Wan's UniPC" (the tiny one's, 3.0), the
    # video latents of the pipeline's factors, WanPipeline's guidance 5 with its own negative
    # embeddings, a first frame saved, and "back.earlier is noise, to rounding": the float32
    # state's two words invert the bfloat16 transformer's steps exactly (measured: 0).
    ts, noise, ode, pipe = ns["ts"], ns["noise"], ns["ode"], ns["pipe"]
    assert ns["scheduler"].config.shift == 3.0
    assert len(ts) == 5 and float(ts[0]) == 1.0 and float(ts[-1]) == 0.0
    t_factor, s_factor = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    assert noise.shape == (1, 4, 4 // t_factor + 1, 64 // s_factor, 64 // s_factor)
    assert ode.model_dtype == torch.bfloat16 and ode.cond["guidance_scale"] == 5.0
    assert ode.cond["negative_cond"]["encoder_hidden_states"].shape == (1, 7, 16)
    assert ns["video"].ndim == 5 and Path("fox_frame0.png").is_file()
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _wan22_inverted(ns):
    # Wan 2.2's two experts switched at the pipeline's boundary_ratio (the tiny one's 0.875),
    # guidance 4 and 3, and "back.earlier is noise, to rounding" (measured: 0).
    ode, pipe, noise = ns["ode"], ns["pipe"], ns["noise"]
    assert ode.f.unet_2 is pipe.transformer_2 and pipe.config.boundary_ratio == 0.875
    assert ode.cond["guidance_scale"] == 4.0 and ode.cond["guidance_scale_2"] == 3.0
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _flux2_inverted(ns):
    # Flux.2's packed latents "(1, 4096, 128)" (here (1, 16, 16)) under FLUX.2-dev's embedded
    # guidance 4 in the bfloat16 transformer, and "back.earlier is noise, to rounding": the
    # float32 state's two words invert the steps to rounding.
    cond, noise = ns["ode"].cond, ns["noise"]
    assert noise.shape == (1, 16, 16) and ns["ode"].model_dtype == torch.bfloat16
    assert float(cond["guidance"]) == 4.0 and cond["img_ids"].shape == (1, 16, 4)
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _qwen_image_inverted(ns):
    # "(1, 4096, 64)" packed latents (here (1, 16, 16): 16 x 16 images, 4 channels in 2 x 2
    # patches), true CFG in the bfloat16 transformer, and "back.earlier is noise, to
    # rounding": the float32 state's two words invert the steps exactly (measured: 0).
    ts, noise, ode = ns["ts"], ns["noise"], ns["ode"]
    assert noise.shape == (1, 16, 16) and len(ts) == 51 and float(ts[0]) == 1.0
    assert float(ts[-1]) == 0.0 and ode.model_dtype == torch.bfloat16
    assert ode.cond["guidance_scale"] == 4.0 and ns["image"].shape == (1, 3, 16, 16)
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _qwen_image_img2img_inverted(ns):
    # "start_index 20 for 50 steps", and start is the pipeline's noised image latents: the
    # pipeline given them as latents (the same image, strength and steps) returns the run's
    # latents, bit for bit.
    pair, start, img2img = ns["pair"], ns["start"], ns["img2img"]
    assert pair.start_index == 20 and start.shape == (1, 16, 16)
    again = img2img(
        image=ns["Image"].open("fox.png"),
        prompt_embeds=ns["embeds"],
        negative_prompt_embeds=ns["negative"],
        true_cfg_scale=4.0,
        strength=0.6,
        height=16,
        width=16,
        num_inference_steps=50,
        latents=start,
        output_type="latent",
    ).images
    assert torch.equal(again, ns["latents"])


def _flux_fill_inverted(ns):
    # The packed mask and masked image latents in the transformer's dtype, "(1, 4096, 256)
    # and (1, 4096, 64)" (here (1, 16, 16) each: 16 tokens of the 4 x 4 mask pixels a latent
    # pixel and of the 4 latent channels, in 2 x 2 patches), the mask neither empty nor
    # whole, and "back.earlier is noise, to rounding" (measured: 0).
    cond, noise, ts = ns["ode"].cond, ns["noise"], ns["ts"]
    assert cond["mask"].shape == cond["masked_image_latents"].shape == (1, 16, 16)
    assert cond["mask"].dtype == torch.bfloat16 and 0 < float(cond["mask"].sum()) < 256
    assert noise.shape == (1, 16, 16) and len(ts) == 51 and float(ts[-1]) == 0.0
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _flux_control_inverted(ns):
    # The control image's packed latents "(1, 4096, 64)" (here (1, 16, 16): 16 tokens of the
    # 4 latent channels in 2 x 2 patches) in the transformer's dtype, and "back.earlier is
    # noise, to rounding" (measured: 0).
    cond, noise = ns["ode"].cond, ns["noise"]
    assert cond["control_latents"].shape == noise.shape == (1, 16, 16)
    assert cond["control_latents"].dtype == torch.bfloat16
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _flux_kontext_inverted(ns):
    # The reference image's packed latents "(1, 4096, 64)" (here (1, 16, 16)), img_ids
    # "(8192, 3)" (here 32 rows: the latents' 16, then the image's, whose first column is 1),
    # and "back.earlier is noise, to rounding" (measured: 0).
    cond, noise = ns["ode"].cond, ns["noise"]
    assert cond["image_latents"].shape == noise.shape == (1, 16, 16)
    assert cond["img_ids"].shape == (32, 3) and cond["img_ids"][16:, 0].eq(1).all()
    assert float((ns["back"].earlier - noise).abs().max()) <= 1e-6 * float(noise.abs().max())


def _flux_scheduler_inverted(ns):
    # "noise = inv.pair.earlier": the packed noise the pipeline drew after
    # torch.manual_seed(0), bit for bit; and the pair the pipeline's run left.
    pipe = ns["pipe"]
    assert ns["pair"].solver == "bdia(euler, gamma=0.96)"
    torch.manual_seed(0)
    assert torch.equal(ns["noise"], pipe._pack_latents(torch.randn(1, 4, 8, 8), 1, 4, 8, 8))


def _steered_toward_eight(ns):
    # The prose: the optimised noise makes the classifier call the samples 8 more often.
    assert (ns["after"] > ns["before"]).all()


def _k_diffusion_round_trip(ns):
    # "the x you started from" and "retraces the trajectory": exact up to float32 rounding.
    assert (ns["noise"] - ns["x"]).abs().max() <= 1e-5 * ns["x"].abs().max()
    assert (ns["again"] - ns["image"]).abs().max() <= 1e-5 * ns["x"].abs().max()


def _bfloat16_inferred(ns):
    # "model_dtype = bfloat16, inferred", with the state in float64.
    assert ns["ode"].model_dtype == torch.bfloat16 and ns["back"].earlier.dtype == torch.float64


def _float32_inferred(ns):
    # "model_dtype = float32, inferred": the U-Net's compute dtype is not the model's dtype.
    assert ns["ode"].model_dtype == torch.float32


def _one_preview_per_step(ns):
    assert len(ns["previews"]) == len(ns["ts"]) - 1


AFTER = {
    ("docs/diffusers.md", "inverse = BDIAInverseScheduler.from_config("): _pipeline_inverted,
    ("docs/diffusers.md", "pipe.prepare_image_latents(references, batch"): _kv_cache_made,
    ("docs/diffusers.md", "result.reconstruction[0].save("): _edit_round_trip,
    ("docs/diffusers.md", '"/models/sd-controlnet-canny"'): _controlnet_inverted,
    ("docs/diffusers.md", '"/models/stable-diffusion-inpainting"'): _inpaint_inverted,
    ("docs/diffusers.md", "extra = torch.cat([mask, masked_latents]"): _inpaint_scheduler_inverted,
    ("docs/diffusers.md", 'control_image=Image.open("cat_edges.png")'): _edit_round_trip,
    ("docs/diffusers.md", 'mask_image=Image.open("bench_mask.png")'): _inpaint_edited,
    ("docs/diffusers.md", '"/models/IP-Adapter"'): _ip_adapter_inverted,
    ("docs/diffusers.md", 'ip_adapter_image=Image.open("style.png")'): _ip_adapter_edited,
    ("docs/diffusers.md", '"/models/flux-ip-adapter"'): _flux_ip_adapter_inverted,
    ("docs/diffusers.md", "negative_half, positive_half = e.chunk(2)"): _sd3_ip_adapter_made,
    ("docs/diffusers.md", '"/path/to/stable-diffusion-xl-base-1.0"'): _edit_round_trip,
    ("docs/diffusers.md", '"/models/stable-diffusion-xl-refiner-1.0"'): _ensemble_inverted,
    ("docs/diffusers.md", "denoising_end=cut, guidance_scale=guidance"): (
        _ensemble_scheduler_pairs
    ),
    ("docs/diffusers.md", 'bdia.get_solver("heun"), noise, ts[:-1]'): _flow_heun_followed,
    ("docs/diffusers.md", '"/models/stable-diffusion-3-medium-diffusers"'): _sd3_inverted,
    ("docs/diffusers.md", '"/models/playground-v2.5-1024px-aesthetic"'): _playground_inverted,
    ("docs/diffusers.md", '"/path/to/playground-v2.5-1024px-aesthetic"'): (
        _playground_scheduler_inverted
    ),
    ("docs/diffusers.md", '"/path/to/stable-diffusion-3-medium-diffusers"'): _edit_round_trip,
    ("docs/diffusers.md", 'pair.solver == "bdia(euler'): _sd3_solver_recorded,
    ("docs/diffusers.md", "# and mu=..., as the run had it"): _sd3_scheduler_inverted,
    ("docs/diffusers.md", '"/models/FLUX.1-dev"'): _flux_inverted,
    ("docs/diffusers.md", '"/models/Z-Image-Turbo"'): _z_image_inverted,
    ("docs/diffusers.md", '"/models/Sana_1600M_1024px_BF16_diffusers"'): _sana_inverted,
    ("docs/diffusers.md", '"/models/Wan2.1-T2V-1.3B-Diffusers"'): _wan_inverted,
    ("docs/diffusers.md", '"/models/Wan2.2-T2V-A14B-Diffusers"'): _wan22_inverted,
    ("docs/diffusers.md", '"/models/Chroma1-HD"'): _chroma_inverted,
    ("docs/diffusers.md", '"/models/PixArt-Sigma-XL-2-1024-MS"'): _pixart_inverted,
    ("docs/diffusers.md", '"/models/FLUX.2-dev"'): _flux2_inverted,
    ("docs/diffusers.md", '"/path/to/FLUX.1-dev"'): _edit_round_trip,
    ("docs/diffusers.md", "# packed latents, as the pipeline's"): _flux_scheduler_inverted,
    ("docs/diffusers.md", '"/models/FLUX.1-Fill-dev"'): _flux_fill_inverted,
    ("docs/diffusers.md", '"/models/FLUX.1-Canny-dev"'): _flux_control_inverted,
    ("docs/diffusers.md", '"/models/FLUX.1-Kontext-dev"'): _flux_kontext_inverted,
    ("docs/diffusers.md", '"/models/Qwen-Image"'): _qwen_image_inverted,
    ("docs/diffusers.md", "img2img = QwenImageImg2ImgPipeline("): _qwen_image_img2img_inverted,
    ("docs/diffusers.md", '"/path/to/Qwen-Image"'): _edit_round_trip,
    ("docs/diffusers.md", '"/path/to/Z-Image-Turbo"'): _edit_round_trip,
    ("docs/gradients.md", "optimizer = torch.optim.Adam"): _steered_toward_eight,
    ("docs/k_diffusion.md", "again = bk.sample_bdia("): _k_diffusion_round_trip,
    ("docs/quickstart.md", "net = net.to(torch.bfloat16)"): _bfloat16_inferred,
    ("docs/quickstart.md", "net.compute_dtype = torch.bfloat16"): _float32_inferred,
    ("docs/quickstart.md", "previews = []"): _one_preview_per_step,
}


# Blocks that need a newer release of a package than the oldest the project supports, by
# each package's name and that release: skipped where an older one is installed. Such a
# block defines nothing that a later block of its page uses. Qwen-Image's pipelines import
# transformers' Qwen2.5-VL text encoder, which transformers 4.49 and newer have.
_QWEN_IMAGE_NEEDS = (("diffusers", (0, 35)), ("transformers", (4, 49)))
# Wan's pipelines load in bfloat16 with some modules kept in float32, which diffusers does
# only with accelerate installed (peft brings it; no extra does).
_ACCELERATE_NEEDS = (("accelerate", (0,)),)
# SanaPipeline imports transformers' Gemma 2, which 4.42 and newer have.
_SANA_NEEDS = (("transformers", (4, 42)),)
NEWER = {
    ("docs/diffusers.md", '"/models/FLUX.1-Kontext-dev"'): (("diffusers", (0, 35)),),
    ("docs/diffusers.md", '"/models/FLUX.2-dev"'): (("diffusers", (0, 36)),),
    ("docs/diffusers.md", "pipe.prepare_image_latents(references, batch"): (
        ("diffusers", (0, 38)),
    ),
    ("docs/diffusers.md", '"/models/Qwen-Image"'): _QWEN_IMAGE_NEEDS,
    ("docs/diffusers.md", '"/models/Sana_1600M_1024px_BF16_diffusers"'): _SANA_NEEDS,
    # WanPipeline takes a second transformer in diffusers 0.35 and newer.
    ("docs/diffusers.md", '"/models/Wan2.2-T2V-A14B-Diffusers"'): (
        ("diffusers", (0, 35)),
        *_ACCELERATE_NEEDS,
    ),
    ("docs/diffusers.md", '"/models/Wan2.1-T2V-1.3B-Diffusers"'): _ACCELERATE_NEEDS,
    ("docs/diffusers.md", '"/models/Z-Image-Turbo"'): (("diffusers", (0, 36)),),
    ("docs/diffusers.md", "img2img = QwenImageImg2ImgPipeline("): _QWEN_IMAGE_NEEDS,
    ("docs/diffusers.md", '"/path/to/Qwen-Image"'): _QWEN_IMAGE_NEEDS,
    ("docs/diffusers.md", '"/path/to/Z-Image-Turbo"'): (("diffusers", (0, 36)),),
}


def _older(needs: tuple[tuple[str, tuple[int, ...]], ...]) -> bool:
    """Whether any package of ``needs``, pairs of a name and a release, is older here, or
    missing (a package no extra installs, which the block's page names)."""
    for package, release in needs:
        if importlib.util.find_spec(package) is None:
            return True
        version = importlib.import_module(package).__version__
        if tuple(int(part) for part in version.split(".")[: len(release)]) < release:
            return True
    return False


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO / page).read_text(), flags=re.S)


def _matches(key: tuple[str, str], page: str, block: str) -> bool:
    """A key names a page and a piece of text that one of its blocks holds."""
    return key[0] == page and key[1] in block


def _one_entry(table, page, block):
    found = [value for key, value in table.items() if _matches(key, page, block)]
    assert len(found) <= 1, f"{page}: more than one entry matches the block {block[:60]!r}"
    return found[0] if found else None


_COMMENTED_PRINT = re.compile(r"^(\s*)print\((.*)\)\s+# (.*)$", flags=re.M)


def _with_checked_prints(block: str) -> str:
    """``print(args)  # claim`` becomes ``__printed__(args, claim=...)``: printed, then checked."""
    return _COMMENTED_PRINT.sub(lambda m: f"{m[1]}__printed__({m[2]}, claim={m[3]!r})", block)


def _check_claim(text: str, claim: str, where: str) -> None:
    bound = re.match(r"below ([0-9.e+-]+)", claim)
    if bound:
        value = re.search(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?", text)
        assert value and float(value[0]) < float(bound[1]), f"{where}: printed {text}, {claim}"
        return
    expected = re.split(r"\s*[:=](?:\s|$)", claim, maxsplit=1)[0].strip()
    assert text == expected, f"{where}: printed {text!r}, the comment says {expected!r}"


def run_page(page: str) -> list[str]:
    """Run the page's blocks as the module docstring says, checking claims as they come;
    returns the keys (their text) of the ``AFTER`` checks that ran."""
    namespace: dict = {}
    checked: list[str] = []
    for i, block in enumerate(python_blocks(page)):
        where = f"{page}, python block {i + 1} ({block.splitlines()[0]!r})"
        if any(_matches(key, page, block) for key in SIGNATURES):
            continue
        newer = _one_entry(NEWER, page, block)
        if newer is not None and _older(newer):
            continue
        stand_in = _one_entry(STAND_INS, page, block)
        if stand_in is not None:
            exec(compile(stand_in, f"<stand-ins for {where}>", "exec"), namespace)
        # Keyed by the block as the page has it, before LOCAL replaces any of its text.
        check = _one_entry(AFTER, page, block)
        keys = [key[1] for key in AFTER if _matches(key, page, block)]
        for old, new in _one_entry(LOCAL, page, block) or []:
            assert old in block, f"{where}: LOCAL replaces {old!r}, which the block lacks"
            block = block.replace(old, new)

        def printed(*args, claim, where=where):
            out = io.StringIO()
            builtins.print(*args, file=out)
            text = out.getvalue().rstrip("\n")
            builtins.print(text)
            _check_claim(text, claim, where)

        namespace["__printed__"] = printed
        exec(compile(_with_checked_prints(block), where, "exec"), namespace)
        if check is not None:
            check(namespace)
            checked.extend(keys)
    return checked


# With the slow tests: the gradients page optimises through 35-step samplers (about 16 s),
# the diffusers page builds, saves and runs a tiny pipeline per family it shows (about 21 s).
_SLOW_PAGES = {"docs/gradients.md", "docs/diffusers.md"}


# Random-weight stand-ins are no denoisers: BDIA's parasitic mode grows under them, and the
# tiny float16 VAE decodes such latents to Inf. Neither says anything about the page.
@pytest.mark.first_case_by_default
@pytest.mark.filterwarnings("ignore::bdia.ParasiticWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(
    "page", [pytest.param(p, marks=pytest.mark.slow) if p in _SLOW_PAGES else p for p in PAGES]
)
def test_page_examples_run_and_print_what_their_comments_say(page, tmp_path, monkeypatch):
    from bdia.solvers import registry

    monkeypatch.chdir(tmp_path)
    # A stand-in module (k_diffusion) must not outlive the page: setitem undoes itself.
    monkeypatch.setitem(sys.modules, "k_diffusion", sys.modules.get("k_diffusion"))
    # Nor must a solver a page registers (docs/solvers.md writes one): the tests that list
    # every registered solver would find it.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    with redirect_stdout(io.StringIO()):
        checked = run_page(page)
    # Every check of the page ran, where its block ran: not that of a NEWER block skipped here.
    skipped = [
        block
        for block in python_blocks(page)
        if (newer := _one_entry(NEWER, page, block)) is not None and _older(newer)
    ]
    expected = [
        key[1]
        for key in AFTER
        if key[0] == page and not any(_matches(key, page, block) for block in skipped)
    ]
    assert sorted(checked) == sorted(expected)


def test_every_table_entry_matches_a_block():
    for table in (SIGNATURES, STAND_INS, LOCAL, AFTER, NEWER):
        for key in table:
            page, first = key
            found = sum(_matches(key, page, b) for b in python_blocks(page))
            assert found == 1, (
                f"{found} python blocks of {page} hold {first!r}, not one: update the table "
                "in tests/test_docs.py along with the page"
            )


def _documented_signatures(block: str) -> list[ast.FunctionDef]:
    """Each ``name(...) -> ...`` entry of a signature block (one starting at column 0, its
    continuation lines indented) parsed as the header of a ``def``."""
    entries: list[str] = []
    for line in block.splitlines():
        if re.match(r"\w+\(", line):
            entries.append(line)
        elif line.startswith(" ") and entries:
            entries[-1] += "\n" + line
    return [ast.parse(f"def {entry}: ...").body[0] for entry in entries]


def _source(value) -> str:
    return ast.unparse(ast.parse(repr(value), mode="eval").body)


def _parameters(fn: ast.FunctionDef) -> list[tuple[str, str, str | None]]:
    """(name, kind, default's source or None) of a parsed header, as inspect names kinds."""
    args = fn.args
    defaults = [None] * (len(args.args) - len(args.defaults)) + list(args.defaults)
    out = [(a.arg, "POSITIONAL_OR_KEYWORD", d) for a, d in zip(args.args, defaults)]
    if args.vararg:
        out.append((args.vararg.arg, "VAR_POSITIONAL", None))
    out += [(a.arg, "KEYWORD_ONLY", d) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    if args.kwarg:
        out.append((args.kwarg.arg, "VAR_KEYWORD", None))
    return [(name, kind, None if d is None else ast.unparse(d)) for name, kind, d in out]


@pytest.mark.parametrize("key", list(SIGNATURES), ids=lambda key: f"{key[0]}:{key[1][:24]}")
def test_signature_blocks_match_the_code(key):
    """Names, kinds and defaults of every listed parameter are the code's, none missing."""
    page, first = key
    (block,) = [b for b in python_blocks(page) if first in b]
    headers = _documented_signatures(block)
    assert [h.name for h in headers] == [path.rpartition(".")[2] for path in SIGNATURES[key]]
    for header, path in zip(headers, SIGNATURES[key]):
        obj = pydoc.locate(path)
        assert obj is not None, f"{path} does not exist"
        actual = [
            (p.name, p.kind.name, None if p.default is p.empty else _source(p.default))
            for p in inspect.signature(obj).parameters.values()
            if p.name != "self"
        ]
        assert _parameters(header) == actual, f"{page} documents {path} otherwise"


def test_a_signature_block_is_read_as_the_code_would_declare_it():
    (header,) = _documented_signatures('f(a, b=None (0.96), *, c="x",\n  **d) -> X')
    assert _parameters(header) == [
        ("a", "POSITIONAL_OR_KEYWORD", None),
        ("b", "POSITIONAL_OR_KEYWORD", "None(0.96)"),  # not None: an annotated default fails
        ("c", "KEYWORD_ONLY", "'x'"),
        ("d", "VAR_KEYWORD", None),
    ]


def test_a_false_claim_is_caught():
    with pytest.raises(AssertionError, match="the comment says '54'"):
        _check_claim("53", "54 = 2 + 17 * 3 (see Theory: cost)", "here")
    with pytest.raises(AssertionError, match="below 1e-12"):
        _check_claim("tensor(3.0e-10, dtype=torch.float64)", "below 1e-12: rounding only", "here")
    _check_claim("tensor(0., dtype=torch.float64)", "tensor(0., dtype=torch.float64): exact", "")
    _check_claim("True", "True: bdia's unstep is exact here", "")


# ------------------------------------------------------------------------------ commands
def shell_commands(page: str) -> list[list[str]]:
    """The argument lists after ``bdia`` in a page's shell blocks: continuation lines joined,
    comments dropped, ``&&`` chains split; ``torchrun ... -m bdia.cli ARGS`` gives ARGS."""
    text = (REPO / page).read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                command = words[: words.index("&&")] if "&&" in words else words
                words = words[len(command) + 1 :]
                if command[:1] == ["bdia"]:
                    commands.append(command[1:])
                elif "bdia.cli" in command and command[command.index("bdia.cli") - 1] == "-m":
                    commands.append(command[command.index("bdia.cli") + 1 :])
    return commands


COMMANDS = [(page, args) for page in PAGES for args in shell_commands(page)]
# Input files named on a command line are made empty before it is parsed: parsing checks that
# they exist, not what they hold. So are the photo of `bdia edit --image`, its mask and
# control images, its pipeline folder, whose model_index.json parsing reads for the
# pipeline's class, and its IP-Adapter's image encoder folder.
_INPUT_SUFFIXES = (".pkl", ".npz", ".pt", ".safetensors")
_PIPELINE_INDEX = '{"_class_name": "StableDiffusionPipeline"}'


def test_the_pages_have_commands_to_check():
    pages = {page for page, _ in COMMANDS}
    assert {"README.md", "docs/digits.md", "docs/edm_cifar10.md"} <= pages
    assert any(args[0] == "fid" for _, args in COMMANDS)


@pytest.mark.parametrize(
    "page, args", COMMANDS, ids=[f"{page}:{' '.join(args)[:40]}" for page, args in COMMANDS]
)
def test_documented_command_parses(page, args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for word in args:
        if word.endswith(_INPUT_SUFFIXES) and not Path(word).exists():
            Path(word).parent.mkdir(parents=True, exist_ok=True)
            Path(word).touch()
    for option, value in zip(args, args[1:]):
        if (
            option in ("--image", "--mask", "--control-image", "--ip-adapter-image")
            and not Path(value).exists()
        ):
            Path(value).touch()
        if option == "--image-encoder" and not Path(value).exists():
            Path(value).mkdir(parents=True)
        if option == "--pipeline" and not Path(value).exists():
            Path(value).mkdir(parents=True)
            (Path(value) / "model_index.json").write_text(_PIPELINE_INDEX)
    name, *rest = args
    with main.make_context("bdia", [name]) as group:
        command = main.get_command(group, name)
        assert command is not None, f"{page}: no command `bdia {name}`"
        try:
            command.make_context(name, list(rest), parent=group)
        except click.UsageError as err:
            pytest.fail(f"{page}: `bdia {' '.join(args)}` does not parse: {err.format_message()}")


@pytest.mark.slow
def test_readme_commands_run(tmp_path, monkeypatch):
    """README's set-up and comparison commands, as printed (about 45 s on one thread)."""
    monkeypatch.chdir(tmp_path)
    commands = shell_commands("README.md")
    assert [args[0] for args in commands] == ["sample", "invert", "compare"]
    outputs = {}
    for args in commands:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, f"`bdia {' '.join(args)}`: {result.output}"
        outputs[args[0]] = result.stdout
    assert Path("digits.png").is_file()
    # "invert all 360 held-out digits to noise and back": exact with bdia, not without.
    exact = re.search(r"^bdia\(euler, 0\.96\) \(exact\)\s+(\S+)", outputs["invert"], re.M)
    approximate = re.search(r"^euler backward \(approximate\)\s+(\S+)", outputs["invert"], re.M)
    assert float(exact[1]) < 1e-12 < 1e-3 < float(approximate[1])
    # "prints a markdown table and writes nothing": the grid is the only file written.
    assert re.search(r"^\| bdia\(heun, ", outputs["compare"], re.M)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.png"]


@pytest.mark.slow
def test_edm_pipeline_without_downloads_runs(tmp_path, monkeypatch):
    """docs/edm_cifar10.md's block "without any downloaded file", as printed but for the
    network: random:tiny-cond (16 x 16) for the full-size DDPM++, whose eight samples take
    minutes on a CPU. About 25 s, most of it the 2048-feature FID's matrix square root."""
    text = (REPO / "docs/edm_cifar10.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "--write-standin-detector" in b]
    assert "random:ddpmpp-cond" in block
    monkeypatch.chdir(tmp_path)
    printed = []
    for line in block.replace("random:ddpmpp-cond", "random:tiny-cond").splitlines():
        words = shlex.split(line, comments=True)
        if words[0] == "bdia":
            result = CliRunner().invoke(main, words[1:])
            assert result.exit_code == 0, f"`{line}`: {result.output}"
            printed.append(result.stdout)
        else:
            assert words[:2] == ["python", "benchmarks/edm_cifar10.py"], line
            command = [sys.executable, str(REPO / words[1]), *words[2:]]
            subprocess.run(command, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref.npz", "standin.pt"]
    assert len(list((tmp_path / "out").rglob("*.png"))) == 8
    # The images against their own statistics: 0 up to the square root of a singular
    # covariance, which the page says can come out negative; a number, whatever it is.
    assert math.isfinite(float(printed[-1]))


def transcripts(page: str) -> list[tuple[list[str], list[str]]]:
    """(arguments after ``$ bdia``, the lines printed after it) of a page's ```text blocks."""
    found = []
    for block in re.findall(r"```text\n(.*?)```", (REPO / page).read_text(), flags=re.S):
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("$ bdia "):
                printed = []
                for after in lines[i + 1 :]:
                    if after.startswith("$ "):
                        break
                    printed.append(after)
                found.append((shlex.split(line[2:], comments=True)[1:], printed))
    return found


TRANSCRIPT_PAGES = [page for page in PAGES if transcripts(page)]


# Files a page's transcripts take as the reader's own, made before its first command.
def _rgb_photo(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 120, 40)).save(path)


TRANSCRIPT_FILES = {"docs/cli.md": {"photo.png": _rgb_photo}}


def _comparable(line: str) -> str:
    """A printed line without what belongs to the machine: durations ("in 0.6 s") and the
    torch build a message names ("(torch 2.13.0+cpu, a CPU-only build)")."""
    line = re.sub(r" in [\d.]+ s\b", " in ... s", line)
    return re.sub(r"\(torch [^)]*\)", "(torch ...)", line)


def test_the_pages_have_transcripts_to_check():
    assert "docs/cli.md" in TRANSCRIPT_PAGES
    assert len(transcripts("docs/cli.md")) >= 10


@pytest.mark.slow  # it samples, inverts and regenerates the digits (about 6 s)
@pytest.mark.parametrize("page", TRANSCRIPT_PAGES)
def test_documented_transcripts_print_what_the_page_shows(page, tmp_path, monkeypatch):
    """The page's ``$ bdia ...`` sessions, run in order in one folder: each prints the lines
    shown (stdout and stderr as a terminal shows them); one that prints an error exits
    non-zero and leaves the folder as it was."""
    if torch.cuda.is_available():
        pytest.skip("the pages show a machine without CUDA")
    monkeypatch.chdir(tmp_path)
    for name, make in TRANSCRIPT_FILES.get(page, {}).items():
        make(tmp_path / name)
    for args, printed in transcripts(page):
        before = sorted(tmp_path.rglob("*"))
        result = CliRunner().invoke(main, args)
        where = f"{page}: `bdia {' '.join(args)}`"
        shown = [_comparable(line) for line in result.output.splitlines()]
        assert shown == [_comparable(line) for line in printed], where
        if printed[0].startswith("Error:"):
            assert result.exit_code != 0, where
            assert sorted(tmp_path.rglob("*")) == before, f"{where} left files behind"
        else:
            assert result.exit_code == 0, where


def test_every_dotted_bdia_name_the_pages_mention_exists():
    """``bdia.x.y`` in any page (prose, tables, code) names something importable."""
    files = (".py", ".md", ".json", ".safetensors", ".png", ".pt", ".npz")
    missing = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for name in set(re.findall(r"\bbdia(?:\.[A-Za-z_]\w*)+", page.read_text())):
            if not name.endswith(files) and pydoc.locate(name) is None:
                missing.append(f"{page.relative_to(REPO)}: {name}")
    assert not missing, "names that do not exist:\n" + "\n".join(sorted(missing))

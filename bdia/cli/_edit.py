"""``bdia edit``: a photo inverted exactly through a diffusers pipeline and regenerated
under the target prompt (``bdia.integrations.diffusers.edit_image``), with every option
checked against the pipeline before it loads."""

from __future__ import annotations

import importlib
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import click
import torch

from .._files import write_png
from . import _ranks
from ._common import (
    MAX_STEPS,
    NETWORK_DTYPE,
    STATE_DTYPE,
    InputPathType,
    OutputPathType,
    _base_solver,
    _count,
    _default_device,
    _device_option,
    _invertible_gamma_option,
    _one_line,
    _overwrite_option,
    _Progress,
    _progress_option,
    _refuse_existing_file,
    _set_threads,
    _state_dtype,
    _threads_option,
    _warning_line,
    dtype_name,
)
from ._ip_adapter import _ip_adapter_options, _ip_adapter_scale, _load_ip_adapter
from ._pipelines import (
    SizeType,
    _check_photo_size,
    _control_images,
    _load_pipeline,
    _pipeline_folder,
    _read_beside,
    _read_image,
    _resized,
    _transformer_class,
)

#: edit_image's names in its messages, and the options that set them (or the words of a
#: command line), in the order tried at each place.
_EDIT_OPTIONS = {
    "num_inference_steps = ": "--steps ",
    "num_inference_steps": "--steps",
    "guidance_scale = ": "--guidance ",
    "guidance_scale": "--guidance",
    "guidance_rescale = ": "--guidance-rescale ",
    "guidance_rescale": "--guidance-rescale",
    "negative_prompt": "--negative",
    "state_dtype": "--state-dtype",
    # A pipeline's own parameter keeps its name: "as the pipeline's mask_image".
    "'s mask_image": "'s mask_image",
    "mask_image": "--mask",
    "'s control_image=": "'s control_image=",
    "control_image": "--control-image",
    "(a list, one per controlnet, for several)": "(once per controlnet, for several)",
}


def _finite_if_given(ctx: Any, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


@click.command(name="edit")
@click.option(
    "--pipeline",
    required=True,
    type=InputPathType(path_type=Path),
    callback=_pipeline_folder,
    help="The local folder of a diffusers pipeline (save_pretrained's, with model_index.json): "
    "Stable Diffusion, SDXL, Playground v2.5, PixArt-alpha and PixArt-Sigma, Stable Diffusion 3, "
    "Flux, Flux Kontext, Chroma, "
    "Qwen-Image (QwenImagePipeline and its img2img one), Z-Image (ZImagePipeline and its img2img "
    "one), FLUX.2-dev (Flux2Pipeline) or FLUX.2-klein (Flux2KleinPipeline, "
    "Flux2KleinKVPipeline); "
    "SD's and SDXL's inpainting pipelines and Flux Fill with --mask, their ControlNet and "
    "ControlNet img2img pipelines, Flux Depth and Canny and Flux's, SD3's, Qwen-Image's and "
    "Z-Image's ControlNet pipelines with --control-image, SD's and SDXL's ControlNet "
    "inpainting pipelines and SD3's, Qwen-Image's and Z-Image's (their controlnet takes the "
    "mask) with both. Nothing is downloaded.",
)
@click.option(
    "--image",
    required=True,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="The photo to edit (PNG, JPEG, WebP, ...: any image PIL reads), read as RGB; its "
    "sides must be multiples of the pipeline's factor (8 for SD, 16 for PixArt, SD3, Flux, "
    "Chroma, Qwen-Image, Z-Image and Flux.2) "
    "unless --size resizes it.",
)
@click.option(
    "--mask",
    default=None,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="For StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline, "
    "StableDiffusionControlNetInpaintPipeline and StableDiffusionXLControlNetInpaintPipeline "
    "with an inpainting unet (in_channels 9: the latents, the mask and the masked image's "
    "latents; a 4-channel unet in them is refused), FluxFillPipeline, "
    "StableDiffusion3ControlNetInpaintingPipeline (its control_mask, with --control-image) "
    "QwenImageControlNetInpaintPipeline and ZImageControlNetInpaintPipeline (their "
    "mask_image, with --control-image): "
    "the region the edit may repaint, white there and black elsewhere, as diffusers' "
    "mask_image (read as grey, binarised at 0.5); of the photo's size, resized with it by "
    "--size.",
)
@click.option(
    "--control-image",
    multiple=True,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="For a ControlNet pipeline, or Flux Depth or Canny: the image that guides its "
    "controlnet or transformer (the pipeline's image= or control_image=; e.g. the photo's "
    "edges or depth map; for SD3's ControlNet inpainting pipeline the image kept outside "
    "--mask, as a rule the photo itself), "
    "read as RGB, of the photo's size, resized with it by --size; once per controlnet, in "
    "their order, for several.",
)
@click.option(
    "--reference-image",
    multiple=True,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="For Flux.2's pipelines (FLUX.2-dev, FLUX.2-klein): a reference image of the "
    "pipeline's image= "
    "list, read as RGB (the photo itself may be one, as FLUX.2 edits with it); the pipeline "
    "shrinks one above 1024 x 1024 pixels' area and crops its sides to multiples of 16 "
    "(--size does not resize it); at least 64 pixels a side; once per reference, in order.",
)
@click.option(
    "--ip-adapter",
    default=None,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="An IP-Adapter's weight file (.safetensors or .bin: h94/IP-Adapter's "
    "models/ip-adapter_sd15.safetensors, XLabs-AI/flux-ip-adapter's ip_adapter.safetensors, "
    "InstantX/SD3.5-Large-IP-Adapter's ip-adapter.bin, ...), loaded by the pipeline's "
    "load_ip_adapter; for a Stable Diffusion, SDXL, Flux, Chroma (Flux's adapters) or SD3 "
    "pipeline that has one, with --ip-adapter-image.",
)
@click.option(
    "--ip-adapter-image",
    default=None,
    type=InputPathType(exists=True, dir_okay=False, path_type=Path),
    help="The image prompt, the pipeline's ip_adapter_image: any image, read as RGB; the "
    "image encoder's processor resizes and crops it (--size does not).",
)
@click.option(
    "--image-encoder",
    default=None,
    type=InputPathType(exists=True, file_okay=False, path_type=Path),
    help="The IP-Adapter's image encoder, a folder (save_pretrained's): a "
    "CLIPVisionModelWithProjection for SD, SDXL and Flux, a SiglipVisionModel with its "
    "SiglipImageProcessor for SD3 (a whole CLIP or SigLIP model's folder is read for its "
    "vision model).  [default: the pipeline's image_encoder, else the folder image_encoder "
    "beside --ip-adapter, where SD's load_ip_adapter looks for it]",
)
@click.option(
    "--ip-adapter-scale",
    default=None,
    type=float,
    callback=_ip_adapter_scale,
    help="The IP-Adapter's scale (set_ip_adapter_scale): the image prompt's weight, 0 to "
    "turn it off.  [default: 1.0]",
)
@click.option("--source", required=True, help="What the image shows ('' is the unconditional).")
@click.option("--target", required=True, help="What the edited image should show.")
@click.option(
    "--out",
    required=True,
    type=OutputPathType(suffix=".png"),
    help="The edited image, a PNG.",
)
@click.option(
    "--reconstruction",
    default=None,
    type=OutputPathType(suffix=".png"),
    help="Also write the reconstruction (the inverted latents decoded back: the VAE's round "
    "trip, as the network's is exact), a PNG.",
)
@_overwrite_option("Replace --out and --reconstruction if they exist.")
@click.option(
    "--negative",
    default="",
    show_default=True,
    help="Negative prompt: the unconditional branch of classifier-free guidance.",
)
@click.option(
    "--steps",
    default=50,
    show_default=True,
    type=click.IntRange(1, MAX_STEPS),
    help="num_inference_steps of the pipeline's scheduler.",
)
@click.option(
    "--guidance",
    default=None,
    type=float,
    callback=_finite_if_given,
    help="Classifier-free guidance scale (1: none, but 0 for Z-Image; below that refused, as "
    "the pipelines run none there, SD-Turbo's 0 included; true CFG for Chroma, Qwen-Image and "
    "FLUX.2-klein).  [default: 7.5; 4.5 for PixArt, 1 for Flux and Qwen-Image, 5 "
    "for Chroma and Z-Image, 4 for FLUX.2-klein]",
)
@click.option(
    "--guidance-rescale",
    default=None,
    type=click.FloatRange(0.0, 1.0),
    help="The pipeline's guidance_rescale (StableDiffusionPipeline's and SDXL's, Lin et al. "
    "2024: 0.7 for zero-terminal-SNR models): the guided prediction rescaled towards the "
    "conditional one's standard deviation; only under guidance.  [default: 0, none]",
)
@click.option(
    "--embedded-guidance",
    default=None,
    type=float,
    callback=_finite_if_given,
    help="Flux.1-dev's embedded guidance scale (FluxPipeline's guidance_scale); only for a "
    "transformer that embeds one.  [default: 3.5]",
)
@click.option(
    "--solver",
    "solver_name",
    default=None,
    help="Base solver (`bdia solvers` lists them).  [default: ddim; euler for SD3, Flux, "
    "Chroma, Qwen-Image, Z-Image and Flux.2]",
)
@_invertible_gamma_option
@click.option(
    "--rule",
    type=click.Choice(["base", "restart"]),
    default="base",
    show_default=True,
    help="How the edit regenerates from the inverted noise: the base solver, or bdia "
    "started afresh (bdia.editing).",
)
@click.option(
    "--size",
    default=None,
    type=SizeType(),
    help="Resize the image (and --mask, --control-image) to WxH first (Lanczos), e.g. "
    "512x512; by default the image's own size, which must fit the pipeline.",
)
@click.option(
    "--dtype",
    type=NETWORK_DTYPE,
    default="float32",
    show_default=True,
    help="Dtype the pipeline is loaded in (torch_dtype); float16 or bfloat16 on a GPU.",
)
@click.option(
    "--state-dtype",
    type=STATE_DTYPE,
    default=None,
    help="Dtype of the sampler's state.  [default: float64; float32 on mps, which has no float64]",
)
@_device_option
@_threads_option("torch's (one per core)")
@_progress_option
def edit_command(
    pipeline: Path,
    image: Path,
    mask: Path | None,
    control_image: tuple[Path, ...],
    reference_image: tuple[Path, ...],
    ip_adapter: Path | None,
    ip_adapter_image: Path | None,
    image_encoder: Path | None,
    ip_adapter_scale: float | None,
    source: str,
    target: str,
    out: Path,
    reconstruction: Path | None,
    overwrite: bool,
    negative: str,
    steps: int,
    guidance: float | None,
    guidance_rescale: float | None,
    embedded_guidance: float | None,
    solver_name: str | None,
    gamma: float | str,
    rule: str,
    size: tuple[int, int] | None,
    dtype: torch.dtype,
    state_dtype: torch.dtype | None,
    device: str | None,
    threads: int | None,
    no_progress: bool,
) -> None:
    """Edit a photo with a diffusers pipeline: invert it exactly under --source with bdia,
    regenerate it under --target.

    The pipeline (Stable Diffusion, SDXL, PixArt, SD3, Flux, Flux Kontext, Chroma, Qwen-Image,
    Z-Image, FLUX.2-dev, FLUX.2-klein; an
    inpainting one with --mask, a ControlNet one with --control-image, a ControlNet inpainting
    one with both; SD, SDXL, Flux and SD3 ones with an IP-Adapter's image prompt, --ip-adapter
    and --ip-adapter-image; FLUX.2 with reference images, --reference-image) is loaded
    from a local folder;
    bdia.integrations.diffusers.edit_image does the work. Prints the latent round trip's error
    (rounding only) and the VAE's.
    """
    if not target.strip():
        raise click.BadParameter(
            "the prompt is empty: give what the edited image should show", param_hint="'--target'"
        )
    if solver_name is not None:
        _base_solver(solver_name)
    state_dtype = _state_dtype(state_dtype, device)
    outputs = {"--out": out, "--reconstruction": reconstruction}
    inputs = [
        ("--image", image),
        ("--mask", mask),
        *(("--control-image", c) for c in control_image),
        *(("--reference-image", r) for r in reference_image),
        ("--ip-adapter-image", ip_adapter_image),
    ]
    for option, path in outputs.items():
        for given, read in inputs:
            if path is not None and read is not None and path.resolve() == read.resolve():
                raise click.BadParameter(
                    f"{str(path)!r} is {given}; give another file", param_hint=f"'{option}'"
                )
    if reconstruction is not None and reconstruction.resolve() == out.resolve():
        raise click.BadParameter("it is --out; give another file", param_hint="'--reconstruction'")
    photo = _read_image(image, "--image")
    # The mask and the control images are drawn on the photo: its size, resized with it.
    mask_image = None
    if mask is not None:
        grey = _read_beside(mask, "--mask", "a mask", photo, image).convert("L")
        mask_image = _resized(grey, size)
    controls = [
        _resized(_read_beside(c, "--control-image", "a control image", photo, image), size)
        for c in control_image
    ]
    picture = _resized(photo, size)
    references = [_read_image(r, "--reference-image") for r in reference_image]
    image_prompt, encoder, family = _ip_adapter_options(
        pipeline, ip_adapter, image_encoder, ip_adapter_image, ip_adapter_scale
    )
    index = json.loads((pipeline / "model_index.json").read_text())
    if embedded_guidance is not None and _never_embeds_guidance(index, pipeline):
        # Known from model_index.json and the transformer's config.json; without the latter,
        # from the transformer's config once it loads.
        raise _no_embedded_guidance(index["_class_name"])
    _check_qwen_image(index)
    _check_latents_alone(index, mask, control_image)
    if references and _transformer_class(index) != _FLUX2_TRANSFORMER:
        raise click.BadParameter(
            f"a {index['_class_name']} takes no reference images: Flux.2's pipelines do "
            "(their image= list); leave it out",
            param_hint="'--reference-image'",
        )
    for option, path in outputs.items():
        # Before the pipeline loads, which can take minutes.
        _refuse_existing_file(path, option, overwrite)
    for module in ("diffusers", "transformers"):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise click.ClickException(
                f"bdia edit needs the diffusers library and transformers ({err}); install "
                "them with pip install 'bdia[diffusers]'"
            ) from None
    _check_edit_network(index)
    if not _ranks.rank_zero_alone():
        return

    _set_threads(threads)
    device = _default_device(device)
    # An IP-Adapter's image encoder and processor: the folder's own, as diffusers loads them,
    # but an --image-encoder given.
    keep = ("feature_extractor",) + (("image_encoder",) if encoder is None else ())
    pipe = _load_pipeline(pipeline, dtype, keep if ip_adapter is not None else ())
    name = type(pipe).__name__
    _check_photo_size(pipe, picture, image, size, name)
    scale = 1.0 if ip_adapter_scale is None else ip_adapter_scale
    if ip_adapter is not None:
        _load_ip_adapter(pipe, name, family, ip_adapter, encoder, scale, dtype)
    if embedded_guidance is not None and not _embeds_guidance(getattr(pipe, "transformer", None)):
        raise _no_embedded_guidance(name)
    controls_given = _control_images(pipe, controls, name)
    result = _edit(
        pipe.to(device),
        picture,
        source,
        target,
        mask_image=mask_image,
        control_image=controls_given,
        reference_image=references or None,
        ip_adapter_image=image_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_rescale=guidance_rescale,
        guidance=embedded_guidance,
        negative_prompt=negative,
        solver=solver_name,
        gamma=gamma,
        rule=rule,
        state_dtype=state_dtype,
        progress=not no_progress,
    )
    pixels = {"the edit": result.images, "the reconstruction": result.reconstruction}
    for what, decoded in pixels.items():
        if not bool(torch.isfinite(decoded).all()):
            raise click.ClickException(
                f"{what} decoded to NaN or Inf (a float16 VAE overflowing? try --dtype "
                "bfloat16 or float32); nothing written"
            )
    import numpy as np

    from ..integrations.diffusers.editing import _output

    edited = np.asarray(_output(result.images, "pil")[0])
    click.echo(
        f"{image.name} ({picture.size[0]}x{picture.size[1]}) with {name}: "
        f"bdia({result.inversion.solver.solver.name}, {gamma}), "
        f"{_count(len(result.inversion.ts) - 1, 'step')}, {dtype_name(state_dtype)} state"
        + (f", IP-Adapter {ip_adapter.name} at scale {scale:g}" if ip_adapter else "")
    )
    click.echo(
        f"round trip: latent error {result.latent_error:.3e} (the network's, exact up to "
        f"rounding); vae error {result.vae_error:.3e}, reconstruction error "
        f"{result.reconstruction_error:.3e} (rms, pixels in [-1, 1])"
    )
    write_png(out, edited)
    wrote = f"wrote {out}"
    if reconstruction is not None:
        write_png(reconstruction, np.asarray(_output(result.reconstruction, "pil")[0]))
        wrote += f" and {reconstruction} (the reconstruction)"
    click.echo(wrote, err=True)


#: The transformer of Flux.2's pipelines, which take reference images (their image= list).
_FLUX2_TRANSFORMER = "Flux2Transformer2DModel"
#: The transformers that embed no guidance scale, whatever their config: SD3's, Chroma's,
#: whose guidance is true CFG, Qwen-Image's, whose guidance-distilled kind (config
#: guidance_embeds) edit_image refuses, and Z-Image's, which has no guidance embedding.
#: Flux's and Flux.2's embed one as their config's guidance_embeds says (Flux.1-dev's and
#: FLUX.2-dev's do, Flux.1-schnell's and FLUX.2-klein's, of the same classes, not).
_NO_GUIDANCE_EMBEDDING = (
    "SD3Transformer2DModel",
    "ChromaTransformer2DModel",
    "QwenImageTransformer2DModel",
    "ZImageTransformer2DModel",
)


def _embeds_guidance(transformer: Any) -> bool:
    """Whether a loaded ``transformer`` embeds a guidance scale (Flux.1-dev's, FLUX.2-dev's):
    its config's ``guidance_embeds``; for a Flux.2 transformer a config without the key is
    diffusers 0.36's, which always embeds one."""
    config = getattr(transformer, "config", None) or {}
    if type(transformer).__name__ == _FLUX2_TRANSFORMER:
        from ..integrations.diffusers._conditioning import _flux2_embeds_guidance

        return _flux2_embeds_guidance(config)
    return bool(config.get("guidance_embeds", False))


def _never_embeds_guidance(index: dict[str, Any], folder: Path) -> bool:
    """Whether the network of the pipeline in ``folder`` (``index``, its model_index.json)
    cannot embed a guidance scale: a unet, a transformer of _NO_GUIDANCE_EMBEDDING, or one
    whose config.json says guidance_embeds false (an unreadable one is left to loading)."""
    unet = index.get("unet") not in (None, [None, None])
    if unet or _transformer_class(index) in _NO_GUIDANCE_EMBEDDING:
        return True
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("guidance_embeds") is False


def _check_edit_network(index: dict[str, Any]) -> None:
    """Refuse, from model_index.json ``index`` and before the pipeline loads (minutes for a
    transformer of billions of weights), a pipeline whose transformer edit_image does not
    take (Sana's, Wan's, ...). A pipeline with a unet, or whose parts the index does not
    name, is left to edit_image once it loads."""
    unet = index.get("unet")
    if isinstance(unet, list) and len(unet) == 2 and unet[1] is not None:
        return
    name = _transformer_class(index)
    if name is None:
        return
    from ..integrations.diffusers._edit_network import _takes_transformer, _untaken_transformer

    if not _takes_transformer(name):
        raise click.BadParameter(
            f"a {index['_class_name']}: {_untaken_transformer(name)}; nothing was loaded",
            param_hint="'--pipeline'",
        )


def _check_qwen_image(index: dict[str, Any]) -> None:
    """Refuse, from model_index.json ``index`` and before the pipeline loads (Qwen-Image's
    20B transformer takes minutes), QwenImageEditPipeline, QwenImageEditPlusPipeline and
    QwenImageEditInpaintPipeline, which embed text with the image."""
    name = index["_class_name"]
    edits = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")
    if name in edits:
        raise click.BadParameter(
            f"a {name} embeds the prompt with the image through Qwen2.5-VL (its "
            "encode_prompt(prompt, image)), which edit_image does not map from text; it edits "
            "with that pipeline's prompt embeddings, from Python (docs/diffusers.md)",
            param_hint="'--pipeline'",
        )


#: The transformers that take their latents alone (no mask channels) and whose pipelines
#: take no control image but through a controlnet: their family, what the transformer
#: takes, and their inpainting pipeline, which blends the image back after each step.
_LATENTS_ALONE = {
    "QwenImageTransformer2DModel": ("Qwen-Image", "packed latents", "QwenImageInpaintPipeline"),
    "ZImageTransformer2DModel": ("Z-Image", "latents", "ZImageInpaintPipeline"),
    _FLUX2_TRANSFORMER: ("Flux.2", "packed latents", "Flux2KleinInpaintPipeline"),
}


def _check_latents_alone(
    index: dict[str, Any], mask: Path | None, controls: tuple[Path, ...]
) -> None:
    """Refuse, from model_index.json ``index`` and before the pipeline loads (these
    transformers have billions of weights: minutes), what a pipeline of _LATENTS_ALONE's
    transformers without a controlnet cannot take: --mask and --control-image."""
    known = _LATENTS_ALONE.get(_transformer_class(index) or "")
    if known is None or index.get("controlnet") not in (None, [None, None]):
        return
    family, latents, inpainting = known
    name = index["_class_name"]
    if mask is not None:
        raise click.BadParameter(
            f"a {name} takes no mask: {family}'s transformer takes the {latents} alone "
            f"({inpainting} blends the image back after each step, which is no ODE step, and "
            "is edited without one); leave it out",
            param_hint="'--mask'",
        )
    if controls:
        raise click.BadParameter(
            f"a {name} has no controlnet: {family}'s transformer takes the {latents} alone; "
            "leave it out",
            param_hint="'--control-image'",
        )


def _no_embedded_guidance(name: str) -> click.BadParameter:
    """--embedded-guidance refused for the pipeline of class ``name``."""
    return click.BadParameter(
        f"the {name}'s network embeds no guidance scale (only Flux.1-dev's and FLUX.2-dev's "
        "transformers do); leave it out (--guidance is classifier-free guidance)",
        param_hint="'--embedded-guidance'",
    )


def _in_the_commands_words(message: str, name: str) -> str:
    """edit_image's refusal ``message`` in one line, its arguments by the options that set
    them (in one pass, so that no replacement is rewritten) and "the pipeline" by its class
    ``name``: a mask refused names the pipeline that takes none."""
    import re

    words = re.compile("|".join(map(re.escape, _EDIT_OPTIONS)))
    message = words.sub(lambda match: _EDIT_OPTIONS[match.group()], _one_line(message))
    return re.sub(r"\bthe pipeline\b", f"the {name}", message)


def _edit(pipe: Any, picture: Any, source: str, target: str, **options: Any) -> Any:
    """``edit_image(pipe, picture, source, target, **options)`` with decoded tensors in
    [-1, 1]; a refusal by its checks (no network has run yet) is one line with the options'
    names and the pipeline's class, and exit status 2, running out of memory one line that
    says what to shrink, and bdia's instability one warning line in the command's words."""
    from ..integrations.diffusers import edit_image
    from ..sampling import ParasiticWarning

    ran: list[bool] = []

    def note(module: torch.nn.Module, args: Any) -> None:
        ran.append(True)
        hook.remove()

    unstable: list[str] = []

    def show(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
        if issubclass(category, ParasiticWarning):
            unstable.append(str(message))
        else:
            _warning_line(message, category)

    # edit_image checks everything before any network runs: a failure before the first
    # forward call of any module is a refusal of what it was given.
    hook = torch.nn.modules.module.register_module_forward_pre_hook(note)
    show_progress = options.pop("progress")
    live = show_progress and sys.stderr.isatty()
    try:
        with (
            warnings.catch_warnings(),
            _Progress(1, "edit", "img", show_progress and not live) as bar,
        ):
            # The library's warning, once per run, advises Python calls that the command
            # already makes.
            warnings.simplefilter("always", ParasiticWarning)
            warnings.showwarning = show
            result = edit_image(
                pipe, picture, source, target, output_type="pt", progress=live, **options
            )
            bar.update()
    except (ValueError, TypeError) as err:
        if ran:
            raise
        raise click.UsageError(_in_the_commands_words(str(err), type(pipe).__name__)) from err
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise click.ClickException(
            f"out of memory editing a {picture.size[0]}x{picture.size[1]} image: use a smaller "
            "--size, or --dtype float16 or bfloat16"
        ) from None
    finally:
        hook.remove()
    if unstable:
        click.echo(
            "Warning: bdia's parasitic mode outgrew the state: the inverted noise, from which "
            "the edit is sampled, is dominated by it rather than by the image (the "
            "reconstruction is exact all the same); use more --steps or another --gamma",
            err=True,
        )
    return result

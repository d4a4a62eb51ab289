"""``bdia edit``'s inputs: a diffusers pipeline folder (checked, then loaded quietly, without
the parts an edit never uses), the photo and the images beside it, and their sizes."""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import torch

from ._common import _count, _one_line

#: Parts of a pipeline folder that edit_image never uses, left unloaded: Stable Diffusion's
#: safety checker alone is a CLIP vision model of 1.2 GB.
_UNUSED_PARTS = ("safety_checker", "feature_extractor", "image_encoder")
#: Image modes read as RGB: 8 bits a channel, grey, palette, CMYK or YCbCr (an alpha channel
#: must be opaque). 16-bit and float images (I;16, I, F) would be clipped by the conversion.
_PHOTO_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
#: The largest side --size takes: a typo such as 51200x51200 would fill the memory.
MAX_SIDE = 16384


class SizeType(click.ParamType):
    """An image size ``WxH`` (width first, as image sizes are written), each side in
    1..MAX_SIDE."""

    name = "WxH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: Any) -> tuple[int, int]:
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isascii() and p.strip().isdigit() for p in parts):
            self.fail(f"{value!r} is not a size WxH, such as 512x512 or 1024x768", param, ctx)
        width, height = (int(p) for p in parts)
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE):
            self.fail(f"{value!r}: each side must lie in 1..{MAX_SIDE}", param, ctx)
        return width, height


def _pipeline_folder(ctx: Any, param: click.Parameter, value: Path) -> Path:
    """--pipeline: a folder that ``save_pretrained`` wrote (its model_index.json names the
    pipeline's class); nothing is downloaded, so a hub name is no pipeline here."""
    if not value.exists():
        raise click.BadParameter(
            f"{str(value)!r} does not exist: give the local folder of a diffusers pipeline "
            "(bdia downloads nothing; hf download NAME --local-dir DIR fetches one)",
            ctx,
            param,
        )
    if not value.is_dir():
        raise click.BadParameter(
            f"{str(value)!r} is a file; give the folder of a diffusers pipeline, which holds "
            "model_index.json",
            ctx,
            param,
        )
    index = value / "model_index.json"
    try:
        config = json.loads(index.read_text())
    except (OSError, ValueError) as err:
        why = "has no model_index.json" if not index.exists() else f"model_index.json: {err}"
        raise click.BadParameter(
            f"{str(value)!r} is not a diffusers pipeline folder ({_one_line(why)}); give the "
            "folder that save_pretrained wrote, with model_index.json and one folder per part",
            ctx,
            param,
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("_class_name"), str):
        raise click.BadParameter(
            f"{str(index)!r} names no pipeline class (_class_name); it is not a diffusers "
            "pipeline's model_index.json",
            ctx,
            param,
        )
    return value


def _read_image(path: Path, option: str) -> Any:
    """The image file ``path`` given as ``option`` (--image, --mask, --control-image) as an RGB
    PIL image, upright as its EXIF orientation says; a file that is no image, a transparent
    image or a 16-bit one is refused naming ``option``."""
    import numpy as np
    from PIL import Image, ImageOps

    from ..metrics.fid import _IMAGE_ERRORS

    def refuse(why: str) -> click.BadParameter:
        return click.BadParameter(f"{str(path)!r} {why}", param_hint=f"'{option}'")

    try:
        with Image.open(path) as im:
            im.load()
            picture = ImageOps.exif_transpose(im)
    except (*_IMAGE_ERRORS, Image.DecompressionBombError) as err:
        raise refuse(f"is not a readable image ({_one_line(str(err))})") from None
    if picture.mode not in _PHOTO_MODES:
        raise refuse(
            f"has mode {picture.mode} (16-bit or float pixels), which RGB would clip; save it "
            "with 8 bits a channel"
        )
    if "A" in picture.getbands() or "transparency" in picture.info:
        if int(np.asarray(picture.convert("RGBA"))[..., 3].min()) < 255:
            # The colour under a transparent pixel is whatever the file holds there.
            raise refuse(
                "has transparent pixels, whose colour means nothing; flatten it onto a "
                "background first"
            )
    return picture.convert("RGB")


def _read_beside(path: Path, option: str, what: str, photo: Any, image: Path) -> Any:
    """--mask or a --control-image (``what`` names it), read as ``_read_image`` reads it and
    refused unless it has the size of ``photo``, the image at ``image`` as read: it is drawn
    on the photo, and --size resizes the two alike."""
    picture = _read_image(path, option)
    if picture.size != photo.size:
        raise click.BadParameter(
            f"{str(path)!r} is {picture.size[0]}x{picture.size[1]}, but --image "
            f"{str(image)!r} is {photo.size[0]}x{photo.size[1]}; give {what} of the photo's "
            "own size (--size resizes both alike)",
            param_hint=f"'{option}'",
        )
    return picture


def _resized(picture: Any, size: tuple[int, int] | None) -> Any:
    """``picture`` resized to ``size`` (W, H) with Lanczos filtering, if given."""
    from PIL import Image

    if size is None or picture.size == size:
        return picture
    # Image.LANCZOS, not Image.Resampling (missing from Pillow 9.0, the oldest supported).
    return picture.resize(size, Image.LANCZOS)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _quietly() -> Iterator[None]:
    """diffusers' and transformers' log lines and loading bars off while loading, and as
    they were after."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    loggers = (diffusers_logging, transformers_logging)
    before = [(log.get_verbosity(), log.is_progress_bar_enabled()) for log in loggers]
    for log in loggers:
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # Newer diffusers and transformers call it dtype and warn of torch_dtype, the only
            # name diffusers 0.34 to 0.36 and transformers before 4.56 know.
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated")
            # diffusers' own ChromaTransformer2DModel and FluxControlNetModel build FluxPosEmbed
            # from the module that deprecates it: nothing the user can change.
            warnings.filterwarnings("ignore", "`FluxPosEmbed` is deprecated", FutureWarning)
            yield
    finally:
        for log, (level, bars) in zip(loggers, before):
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()


def _load_pipeline(folder: Path, dtype: torch.dtype, keep: tuple[str, ...] = ()) -> Any:
    """``DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)``
    without its log lines and bars; a folder it cannot load is refused naming --pipeline.

    Parts recorded as absent in model_index.json (an SD3 pipeline saved without T5) are
    passed as None, which diffusers requires of them, and so are those edit_image never
    uses (_UNUSED_PARTS) but the ones named in ``keep`` (an IP-Adapter's image encoder and
    feature extractor).
    """
    import diffusers

    config = json.loads((folder / "model_index.json").read_text())
    unused = set(_UNUSED_PARTS) - set(keep)
    parts = {
        name: None
        for name, value in config.items()
        if not name.startswith("_") and (value == [None, None] or name in unused)
    }
    try:
        with _quietly():
            return diffusers.DiffusionPipeline.from_pretrained(
                folder, local_files_only=True, torch_dtype=dtype, **parts
            )
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:  # whatever the folder lacks or holds wrong, in diffusers' words
        raise click.BadParameter(
            f"{str(folder)!r} does not load as a diffusers pipeline ({type(err).__name__}: "
            f"{_one_line(str(err))})",
            param_hint="'--pipeline'",
        ) from err


def _check_photo_size(
    pipe: Any, picture: Any, image: Path, size: tuple[int, int] | None, name: str
) -> None:
    """Refuse an image (or --size) that ``pipe`` cannot take, before any network runs."""
    from ..integrations.diffusers.editing import _image_sizes, _network

    try:
        net, kind = _network(pipe)
    except ValueError as err:
        raise click.BadParameter(
            f"a {name}: {_one_line(str(err))}", param_hint="'--pipeline'"
        ) from None
    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise click.BadParameter(
            f"a {name} without a vae: edit_image edits the latents of a latent-diffusion "
            "pipeline (Stable Diffusion, SDXL, PixArt, SD3, Flux, Chroma, Qwen-Image, Z-Image, "
            "Flux.2)",
            param_hint="'--pipeline'",
        )
    sizes = _image_sizes(pipe, vae, getattr(net, "config", None) or {}, kind)
    factor, (width, height) = sizes.factor, picture.size
    largest = sizes.patches * factor if sizes.patches is not None else None
    if not (width % factor or height % factor) and (
        largest is None or max(picture.size) <= largest
    ):
        return
    fit = [max(factor, min(side, largest or side) // factor * factor) for side in picture.size]
    needs = f"a {name} takes sides that are multiples of {sizes.what}"
    if largest is not None:
        needs += f", at most {largest}"
    if size is not None:
        raise click.BadParameter(
            f"{width}x{height}: {needs}; use e.g. --size {fit[0]}x{fit[1]}", param_hint="'--size'"
        )
    raise click.BadParameter(
        f"{str(image)!r} is {width}x{height}; {needs}: pass --size {fit[0]}x{fit[1]} to resize "
        "it, or crop it to that size",
        param_hint="'--image'",
    )


def _control_images(pipe: Any, images: list[Any], name: str) -> Any:
    """--control-image as edit_image's ``control_image``: None, the one image of a
    ControlNetModel, or a list of one per net of a MultiControlNetModel, in their order;
    another count than the pipeline's nets is refused. For a pipeline without a controlnet,
    the images as given, which edit_image refuses in its words."""
    from ..integrations.diffusers._controlnet import _MULTI_CONTROLNET
    from ..integrations.diffusers._scheduler_config import _class_names

    if not images:
        return None
    controlnet = getattr(pipe, "controlnet", None)
    if controlnet is None:
        return images[0] if len(images) == 1 else images
    multi = _MULTI_CONTROLNET in _class_names(controlnet)
    count = len(controlnet.nets) if multi else 1
    if len(images) != count:
        nets = f"{count} controlnets ({_MULTI_CONTROLNET})" if multi else "one controlnet"
        times = f"{count} times, one per controlnet in their order" if multi else "once"
        raise click.BadParameter(
            f"given {_count(len(images), 'time')}, but the {name} has {nets}; give it {times}",
            param_hint="'--control-image'",
        )
    return images if multi else images[0]


def _transformer_class(index: dict[str, Any]) -> str | None:
    """The class model_index.json ``index`` gives the pipeline's transformer, None without."""
    network = index.get("transformer")
    return network[1] if isinstance(network, list) and len(network) == 2 else None

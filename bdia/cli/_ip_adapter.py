"""``bdia edit --ip-adapter``: an IP-Adapter's file and image encoder checked against the
pipeline from their headers and configs before anything loads, then loaded by the
pipeline's own ``load_ip_adapter`` with nothing downloaded."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NoReturn

import click
import torch

from ._common import _count, _one_line
from ._pipelines import _quietly, _read_image, _transformer_class

#: The IP-Adapter weight files that load_ip_adapter reads (its weight_name): safetensors, keys
#: image_proj.NAME and ip_adapter.NAME (or XLabs' names, for Flux), or a torch file of the
#: two dicts.
_IP_ADAPTER_SUFFIXES = (".safetensors", ".bin")
#: The parts of XLabs' Flux IP-Adapter files by their key prefixes, as Flux's load_ip_adapter
#: reads them beside image_proj and ip_adapter.
_XLABS_PARTS = {"ip_adapter_proj_model": "image_proj", "double_blocks": "ip_adapter"}
#: The networks whose IP-Adapters bdia edit loads, by the class model_index.json gives the
#: pipeline's transformer; a unet's (Stable Diffusion, SDXL) is "unet". Chroma's transformer
#: loads Flux's (ChromaPipeline has FluxIPAdapterMixin's load_ip_adapter).
_IP_ADAPTER_TRANSFORMERS = {
    "FluxTransformer2DModel": "flux",
    "ChromaTransformer2DModel": "flux",
    "SD3Transformer2DModel": "sd3",
}
#: Each family's image encoder, its transformers class and model_type (a whole CLIP or SigLIP
#: model's folder is read for its vision model, as from_pretrained reads it), and the image
#: processor SD3's load_ip_adapter reads from the encoder's folder (the others make one).
_IMAGE_ENCODERS = {
    "unet": ("CLIPVisionModelWithProjection", "clip", None),
    "flux": ("CLIPVisionModelWithProjection", "clip", None),
    "sd3": ("SiglipVisionModel", "siglip", "SiglipImageProcessor"),
}
#: The load_ip_adapter argument of each family that says where its image encoder is, None
#: once it is registered.
_ENCODER_ARGUMENT = {
    "unet": "image_encoder_folder",
    "flux": "image_encoder_pretrained_model_name_or_path",
    "sd3": "image_encoder_folder",
}
#: The folder of the network an IP-Adapter loads into, by family.
_NETWORK_FOLDER = {"unet": "unet", "flux": "transformer", "sd3": "transformer"}


def _ip_adapter_scale(ctx: Any, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise click.BadParameter(
            f"{value} is not a finite number >= 0 (the image prompt's weight: 0 turns it off, "
            "1 is the adapter's own)",
            ctx,
            param,
        )
    return value


def _ip_adapter_family(index: dict[str, Any]) -> str:
    """Whose IP-Adapter the pipeline of ``index`` (its model_index.json) takes: "unet" (Stable
    Diffusion, SDXL), "flux" (Flux's and Chroma's) or "sd3", by its network; a pipeline class
    of diffusers without load_ip_adapter, and another network, are refused naming
    --ip-adapter."""
    name = index["_class_name"]

    def refuse(why: str) -> click.BadParameter:
        return click.BadParameter(
            f"a {name} {why}: give a Stable Diffusion, SDXL, SD3, Flux or Chroma pipeline that "
            "loads one (e.g. StableDiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline)",
            param_hint="'--ip-adapter'",
        )

    try:
        import diffusers
    except ImportError:  # the command says how to install it, after these checks
        known = None
    else:
        known = getattr(diffusers, name, None)
    if isinstance(known, type) and not hasattr(known, "load_ip_adapter"):
        raise refuse("takes no IP-Adapter (it has no load_ip_adapter)")
    if index.get("unet") not in (None, [None, None]):
        return "unet"
    kind = _transformer_class(index)
    if kind not in _IP_ADAPTER_TRANSFORMERS:
        raise refuse(
            f"has {'a ' + str(kind) if kind else 'no unet or transformer'}, whose IP-Adapter "
            "bdia edit does not map (it takes those of SD's and SDXL's unets, Flux's, Chroma's "
            "and SD3's transformers)"
        )
    return _IP_ADAPTER_TRANSFORMERS[kind]


def _xlabs_name(name: str) -> str:
    """A Flux IP-Adapter's key and value map ``name`` in diffusers' words, as Flux's
    load_ip_adapter renames XLabs' (``N.processor.ip_adapter_double_stream_k_proj.weight``:
    ``N.to_k_ip.weight``)."""
    for xlabs, ours in (("k", "to_k_ip"), ("v", "to_v_ip")):
        name = name.replace(f"ip_adapter_double_stream_{xlabs}_proj", ours)
    return name.replace("processor.", "")


#: Each family's IP-Adapters in words: the article and family, whose pipelines load them,
#: and a released one.
_ADAPTER_FAMILIES = {
    "unet": ("a Stable Diffusion or SDXL", "Stable Diffusion's and SDXL's", "h94/IP-Adapter's"),
    "flux": ("a Flux", "Flux's", "XLabs-AI/flux-ip-adapter's"),
    "sd3": ("an SD3", "SD3's", "InstantX/SD3.5-Large-IP-Adapter's"),
}


def _ip_adapter_kind(
    shapes: dict[str, dict[str, tuple[int, ...]]], xlabs: bool
) -> tuple[str, str] | None:
    """Whose IP-Adapter the weights of ``shapes`` (by part and name, XLabs' renamed; ``xlabs``
    where the file had XLabs' keys) are, by what tells the families apart, and that evidence
    in words: ("flux", ...) for XLabs' keys or key and value maps with biases, ("sd3", ...) for
    a time-conditioned image projection or the processors' ``norm_ip``, ("unet", ...) for
    key and value maps without biases; None where nothing tells."""
    proj, maps = shapes["image_proj"], shapes["ip_adapter"]
    if xlabs:
        return "flux", "XLabs' keys ip_adapter_proj_model.* and double_blocks.*"
    if "time_embedding.linear_1.weight" in proj or any(".norm_ip." in n for n in maps):
        return "sd3", "its image projection is conditioned on the timestep"
    if any(n.endswith(".to_k_ip.bias") for n in maps):
        return "flux", "its key and value maps have biases"
    if any(n.endswith(".to_k_ip.weight") for n in maps):
        return "unet", "its key and value maps have no biases"
    return None


def _ip_adapter_shapes(path: Path, family: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """The shapes of the IP-Adapter weights in ``path`` (--ip-adapter) by part
    (``image_proj``, ``ip_adapter``) and name, read without their values as ``family``'s
    load_ip_adapter names them: a safetensors file's header (for Flux, XLabs' keys
    ``ip_adapter_proj_model.*`` and ``double_blocks.*`` too), or a torch file memory-mapped
    where it is a zip (torch.save's format since 1.6). A suffix load_ip_adapter does not read,
    a file that does not read and one without both parts are refused naming --ip-adapter."""
    import zipfile

    def refuse(why: str) -> click.BadParameter:
        return click.BadParameter(f"{str(path)!r} {why}", param_hint="'--ip-adapter'")

    if path.suffix not in _IP_ADAPTER_SUFFIXES:
        raise refuse(
            "is not an IP-Adapter's weight file: give its .safetensors or .bin file (as "
            "load_ip_adapter's weight_name, e.g. ip-adapter_sd15.safetensors)"
        )
    flux, xlabs = family == "flux", False
    shapes: dict[str, dict[str, tuple[int, ...]]] = {"image_proj": {}, "ip_adapter": {}}
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    part, _, name = key.partition(".")
                    # XLabs' names are read for every family, so that a Flux adapter given
                    # to another pipeline is refused as one.
                    xlabs = xlabs or part in _XLABS_PARTS
                    part = _XLABS_PARTS.get(part, part)
                    if part in shapes:
                        name = _xlabs_name(name) if part == "ip_adapter" else name
                        shapes[part][name] = tuple(f.get_slice(key).get_shape())
        else:
            mmap = zipfile.is_zipfile(path)
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            for part in shapes:
                tensors = state.get(part, {}) if isinstance(state, dict) else {}
                if isinstance(tensors, dict):
                    shapes[part] = {
                        str(k): tuple(v.shape) for k, v in tensors.items() if torch.is_tensor(v)
                    }
            if flux and isinstance(state, dict) and list(state) != list(shapes):
                raise refuse(
                    f"holds {[str(k) for k in state]}: Flux's load_ip_adapter takes a torch "
                    "file of exactly the dicts image_proj and ip_adapter, in that order"
                )
    except (MemoryError, click.BadParameter):
        raise
    except Exception as err:  # whatever the file holds wrong, in the reader's words
        raise refuse(f"does not read ({type(err).__name__}: {_one_line(str(err))})") from None
    found = _ip_adapter_kind(shapes, xlabs)
    if found is not None and found[0] != family:
        kind, evidence = found
        article, whose, example = _ADAPTER_FAMILIES[kind]
        wanted = _ADAPTER_FAMILIES[family]
        raise refuse(
            f"is {article} IP-Adapter ({evidence}), which only {whose} pipelines load; give "
            f"this pipeline {wanted[0]} IP-Adapter (e.g. {wanted[2]}), or this one to "
            f"{article} pipeline"
        )
    if not (shapes["image_proj"] and shapes["ip_adapter"]):
        raise refuse(
            "holds no IP-Adapter weights: load_ip_adapter needs image_proj and ip_adapter "
            "tensors (an IP-Adapter's own file, not a LoRA's or a model's)"
        )
    return shapes


def _image_encoder(
    pipeline: Path, adapter: Path, given: Path | None, family: str
) -> tuple[Path | None, dict[str, Any]]:
    """Where an IP-Adapter's image encoder comes from, and its (vision model's) config:
    --image-encoder (``given``), else the pipeline folder's own image_encoder (None: loaded
    with the pipeline), else the folder image_encoder beside the adapter's file, where Stable
    Diffusion's load_ip_adapter looks for it (h94/IP-Adapter's layout: models/image_encoder
    beside models/*.bin). None at all, and a folder that is not ``family``'s kind (a CLIP
    vision model, SD3's a SigLIP one with its processor), are refused naming
    --image-encoder."""
    model, kind, processor = _IMAGE_ENCODERS[family]
    what = f"{model} (save_pretrained's, with config.json" + (
        f", and its {processor}'s preprocessor_config.json)" if processor else ")"
    )
    index = json.loads((pipeline / "model_index.json").read_text())
    own = given is None and index.get("image_encoder") not in (None, [None, None])
    folder = pipeline / "image_encoder" if own else given or adapter.parent / "image_encoder"
    hint = "'--image-encoder'"
    if given is None and not folder.is_dir():
        raise click.BadParameter(
            f"the IP-Adapter needs an image encoder: {str(pipeline)!r} has none, nor is "
            f"there an image_encoder folder beside {str(adapter)!r}; give the folder of its "
            f"{what}",
            param_hint=hint,
        )
    if own and processor and index.get("feature_extractor") in (None, [None, None]):
        raise click.BadParameter(
            f"{str(pipeline)!r} has an image_encoder but no feature_extractor, which "
            f"{index['_class_name']} embeds the image prompt with; give the folder of a "
            f"{what}",
            param_hint=hint,
        )
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        if own:  # diffusers loads the pipeline's own by model_index.json, and says why not
            return None, {}
        raise click.BadParameter(
            f"{str(folder)!r} has no readable config.json ({_one_line(str(err))}); give the "
            f"folder of a {what}",
            param_hint=hint,
        ) from None
    if not isinstance(config, dict):
        config = {}
    found = config.get("model_type")
    if found not in (f"{kind}_vision_model", kind) and not own:
        name = {"clip": "CLIP", "siglip": "SigLIP"}[kind]
        held = found or config.get("_class_name") or "no model_type"
        whose = "SD3's" if family == "sd3" else "an"
        raise click.BadParameter(
            f"{str(folder)!r} holds {held!r} (its config.json), not a {name} vision model "
            f"(model_type '{kind}_vision_model', or a whole '{kind}' model's): {whose} "
            f"IP-Adapter's image encoder is a {model}",
            param_hint=hint,
        )
    if processor and not own and not (folder / "preprocessor_config.json").is_file():
        raise click.BadParameter(
            f"{str(folder)!r} has no preprocessor_config.json: SD3's load_ip_adapter reads the "
            f"image encoder's {processor} from its folder; give the folder of a {what}",
            param_hint=hint,
        )
    if found == kind and isinstance(config.get("vision_config"), dict):
        config = config["vision_config"]
    return (None if own else folder), config


def _refuse_ip_adapter(adapter: Path, why: str, option: str = "--ip-adapter") -> NoReturn:
    raise click.BadParameter(f"{str(adapter)!r} {why}", param_hint=f"'{option}'")


#: An IP-Adapter file's tensor shapes by part (image_proj, ip_adapter) and name.
_Shapes = dict[str, dict[str, tuple[int, ...]]]
#: What an IP-Adapter's image projection takes: embeddings of a width, the image encoder's
#: config field that must equal it (None: nothing to check).
_Embedding = tuple[int | None, str]


def _check_embedding_width(adapter: Path, takes: _Embedding, encoder: dict[str, Any]) -> None:
    """Refuse an adapter whose image projection takes embeddings of a width (``takes``)
    other than the field of the image encoder's config (``encoder``) that gives them."""
    width, field = takes
    given = encoder.get(field)
    if isinstance(width, int) and isinstance(given, int) and width != given:
        _refuse_ip_adapter(
            adapter,
            f"takes image embeddings of width {width} (the image encoder's {field}), but its "
            f"image encoder gives {given}; give the encoder the adapter was trained with",
            "--image-encoder",
        )


def _check_ip_adapter_fits(
    shapes: dict[str, dict[str, tuple[int, ...]]],
    adapter: Path,
    pipeline: Path,
    family: str,
) -> _Embedding:
    """Refuse, before the pipeline loads, an IP-Adapter that does not fit the pipeline's
    network (its config), read from the file's shapes; return what its image projection
    takes. A unet's: key and value maps of another ``cross_attention_dim`` (an SD 1.5 adapter
    on SDXL); a plain adapter's ``proj`` takes the encoder's ``projection_dim``, a Plus
    adapter's resampler (``proj_in``) its ``hidden_size``. Flux's and SD3's:
    ``_check_flux_ip_adapter``'s and ``_check_sd3_ip_adapter``'s checks."""
    try:
        net = json.loads((pipeline / _NETWORK_FOLDER[family] / "config.json").read_text())
    except (OSError, ValueError):
        net = {}  # diffusers says why when it loads the pipeline
    net = net if isinstance(net, dict) else {}
    if family != "unet":
        check = _check_flux_ip_adapter if family == "flux" else _check_sd3_ip_adapter
        return check(shapes, adapter, pipeline, net)
    cross = net.get("cross_attention_dim")
    keys = [s for name, s in shapes["ip_adapter"].items() if name.endswith("to_k_ip.weight")]
    if isinstance(cross, int) and keys and len(keys[0]) == 2 and keys[0][1] != cross:
        _refuse_ip_adapter(
            adapter,
            f"is an IP-Adapter for a unet of cross_attention_dim {keys[0][1]}, but the unet of "
            f"{str(pipeline)!r} has {cross}; give the adapter made for the pipeline's model "
            "(SD 1.5's and SDXL's differ)",
        )
    proj = shapes["image_proj"]
    for name, field in (("proj.weight", "projection_dim"), ("proj_in.weight", "hidden_size")):
        if name in proj:
            return proj[name][-1], field
    return None, ""


def _ints(config: dict[str, Any], *fields: str) -> list[int] | None:
    values = [config.get(field) for field in fields]
    return values if all(isinstance(v, int) for v in values) else None  # type: ignore[return-value]


def _check_flux_ip_adapter(
    shapes: _Shapes, adapter: Path, pipeline: Path, net: dict[str, Any]
) -> _Embedding:
    """Refuse a Flux IP-Adapter that Flux's load_ip_adapter would not load into the
    transformer of config ``net``, or that would not run: no plain image projection
    (``proj.weight``, of 4 tokens, or 16 for 65536 rows, of ``joint_attention_dim``), or key
    and value maps with biases missing for any of its ``num_layers`` double-stream blocks or
    not from ``joint_attention_dim`` to its width. The projection takes the image encoder's
    ``projection_dim``."""
    proj = shapes["image_proj"].get("proj.weight")
    where = f"the transformer of {str(pipeline)!r}"
    if proj is None or len(proj) != 2:
        _refuse_ip_adapter(
            adapter,
            "has no image_proj.proj.weight (ip_adapter_proj_model.proj.weight in XLabs' "
            "files): it is no Flux IP-Adapter, whose image projection Flux's load_ip_adapter "
            "takes; give one made for Flux (e.g. XLabs-AI/flux-ip-adapter's)",
        )
    sizes = _ints(net, "num_layers", "joint_attention_dim", "num_attention_heads")
    head = net.get("attention_head_dim")
    if sizes is not None and isinstance(head, int):
        layers, joint, heads = sizes
        maps = shapes["ip_adapter"]
        for block in range(layers):
            for name in (f"{block}.to_{kv}_ip.{p}" for kv in "kv" for p in ("weight", "bias")):
                if name not in maps:
                    _refuse_ip_adapter(
                        adapter,
                        f"lacks ip_adapter.{name} (double_blocks.{block}.processor."
                        f"ip_adapter_double_stream_*_proj in XLabs' files): it is no IP-Adapter "
                        f"for {where}, of {_count(layers, 'double-stream block')}",
                    )
        key = maps.get("0.to_k_ip.weight")
        if key is not None and key != (heads * head, joint):
            _refuse_ip_adapter(
                adapter,
                f"maps image tokens of width {key[-1]} to {key[0]}, but {where} takes "
                f"{joint} (joint_attention_dim) to {heads * head}; give the adapter made for "
                "the pipeline's model",
            )
        tokens = 16 if proj[0] == 65536 else 4  # as the loader counts them
        if proj[0] != tokens * joint:
            _refuse_ip_adapter(
                adapter,
                f"projects an image to {tokens} tokens of width {proj[0] / tokens:g}, but "
                f"{where} takes image tokens of its joint_attention_dim, {joint}",
            )
    return proj[-1], "projection_dim"


#: The image projection of an SD3 IP-Adapter (InstantX's), which SD3's load_ip_adapter reads
#: its sizes from.
_SD3_IMAGE_PROJ = ("proj_in.weight", "proj_out.weight", "latents", "time_embedding.linear_1.weight")


def _check_sd3_ip_adapter(
    shapes: _Shapes, adapter: Path, pipeline: Path, net: dict[str, Any]
) -> _Embedding:
    """Refuse an SD3 IP-Adapter that SD3's load_ip_adapter would not load into the
    transformer of config ``net``, or that would not run: no time-conditioned resampler
    (``_SD3_IMAGE_PROJ``) or first attention layer's ``norm_ip``, image tokens not of the
    transformer's width, or processors for another count of attention layers (one a block,
    two in its ``dual_attention_layers``). The resampler takes the image encoder's hidden
    states, of its ``hidden_size``."""
    proj, maps = shapes["image_proj"], shapes["ip_adapter"]
    needed = [f"image_proj.{n}" for n in _SD3_IMAGE_PROJ if n not in proj]
    needed += ["ip_adapter.0.norm_ip.linear.weight"] * ("0.norm_ip.linear.weight" not in maps)
    where = f"the transformer of {str(pipeline)!r}"
    if needed:
        _refuse_ip_adapter(
            adapter,
            f"lacks {needed[0]}: it is no SD3 IP-Adapter (a time-conditioned resampler and a "
            "processor of each attention layer, as InstantX/SD3.5-Large-IP-Adapter's); give "
            "one made for SD3",
        )
    sizes = _ints(net, "num_layers", "num_attention_heads", "attention_head_dim")
    if sizes is not None:
        layers, heads, head = sizes
        dual = net.get("dual_attention_layers") or ()
        layers += len(dual) if isinstance(dual, (list, tuple)) else 0
        found = {name.split(".")[0] for name in maps}
        if found != {str(i) for i in range(layers)}:
            _refuse_ip_adapter(
                adapter,
                f"has the processors of {len(found)} attention layers, but {where} has "
                f"{layers}; give the adapter made for the pipeline's model (SD3.5 Large's and "
                "Medium's differ)",
            )
        width = proj["proj_out.weight"][0]
        if width != heads * head:
            _refuse_ip_adapter(
                adapter,
                f"makes image tokens of width {width}, but {where} is {heads * head} wide "
                "(num_attention_heads x attention_head_dim); give the adapter made for the "
                "pipeline's model",
            )
    return proj["proj_in.weight"][-1], "hidden_size"


def _load_ip_adapter(
    pipe: Any,
    name: str,
    family: str,
    adapter: Path,
    encoder: Path | None,
    scale: float,
    dtype: torch.dtype,
) -> None:
    """``pipe.load_ip_adapter(adapter's folder, subfolder="", weight_name=its name)`` after
    registering ``family``'s image encoder in ``encoder`` (None: the pipeline's own) in
    ``dtype`` as its image_encoder (SD3's with its SiglipImageProcessor as its
    feature_extractor, as SD3's load_ip_adapter loads them), and
    ``pipe.set_ip_adapter_scale(scale)``; nothing is downloaded. A pipeline without
    IP-Adapter support, and an adapter or encoder that does not load, are refused naming
    their option."""
    if not hasattr(pipe, "load_ip_adapter"):
        raise click.BadParameter(
            f"the {name} takes no IP-Adapter (it has no load_ip_adapter); give a Stable "
            "Diffusion, SDXL, SD3 or Flux pipeline that loads one",
            param_hint="'--ip-adapter'",
        )
    import transformers

    option, path = "'--image-encoder'", encoder
    model, _, processor = _IMAGE_ENCODERS[family]
    try:
        with _quietly():
            if encoder is not None:
                parts = {
                    "image_encoder": getattr(transformers, model).from_pretrained(
                        encoder, local_files_only=True, torch_dtype=dtype
                    )
                }
                if processor is not None:
                    parts["feature_extractor"] = getattr(transformers, processor).from_pretrained(
                        encoder, local_files_only=True
                    )
                pipe.register_modules(**parts)
            option, path = "'--ip-adapter'", adapter
            # No encoder's folder: it is registered already, and diffusers would otherwise
            # look for one beside the adapter or on the hub.
            pipe.load_ip_adapter(
                str(adapter.parent),
                subfolder="",
                weight_name=adapter.name,
                local_files_only=True,
                **{_ENCODER_ARGUMENT[family]: None},
            )
            pipe.set_ip_adapter_scale(scale)
    except (MemoryError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as err:  # a file that does not fit the pipeline, in diffusers' words
        raise click.BadParameter(
            f"{str(path)!r} does not load into the {name} ({type(err).__name__}: "
            f"{_one_line(str(err))})",
            param_hint=option,
        ) from err


def _ip_adapter_options(
    pipeline: Path,
    adapter: Path | None,
    encoder: Path | None,
    prompt: Path | None,
    scale: float | None,
) -> tuple[Any, Path | None, str]:
    """The image prompt (--ip-adapter-image, read as RGB; None without --ip-adapter), the
    image encoder's folder to load (None: the pipeline's own) and whose IP-Adapter it is
    ("unet", "flux", "sd3"), all checked before the pipeline loads: the options go together,
    the pipeline must load an adapter that edit_image maps (Stable Diffusion's and SDXL's
    unets', Flux's and SD3's transformers'), and the adapter's file must fit the network and
    the encoder."""
    if adapter is None:
        for option, value in (
            ("--ip-adapter-image", prompt),
            ("--image-encoder", encoder),
            ("--ip-adapter-scale", scale),
        ):
            if value is not None:
                raise click.BadParameter(
                    "it belongs to an IP-Adapter: give --ip-adapter too (the adapter's weight "
                    "file), or leave it out",
                    param_hint=f"'{option}'",
                )
        return None, None, ""
    if prompt is None:
        raise click.BadParameter(
            "an IP-Adapter conditions the edit on an image prompt: give --ip-adapter-image "
            "FILE too, or leave --ip-adapter out",
            param_hint="'--ip-adapter'",
        )
    family = _ip_adapter_family(json.loads((pipeline / "model_index.json").read_text()))
    shapes = _ip_adapter_shapes(adapter, family)
    takes = _check_ip_adapter_fits(shapes, adapter, pipeline, family)
    folder, config = _image_encoder(pipeline, adapter, encoder, family)
    _check_embedding_width(adapter, takes, config)
    return _read_image(prompt, "--ip-adapter-image"), folder, family

"""Reading EDM's network pickles without running the code inside them.

EDM saves networks with ``torch_utils.persistence``: every persistent object is pickled as a
call of ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` whose ``meta`` carries
the whole source of the defining module (``module_src``), the class name and the object's
``__dict__``. Unpickling such a file the usual way executes that source.

``read_records`` unpickles with a restricted unpickler instead. The persistent-object hook
becomes a ``PersistentRecord`` of its metadata (class name, init args and kwargs, state);
``module_src`` is kept as text and never executed. Only the torch, numpy and collections
globals that such files need are resolved, each to a function that builds data and nothing
else; any other global is refused with an error that names it.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._files import replace_atomic

# Imported for their side effect: they register the built-in network classes.
from . import digits, networks  # noqa: F401
from .registry import network_class

__all__ = [
    "build_network",
    "probe_network",
    "check_fit",
    "load_edm_pickle",
    "load_network",
    "save_network",
    "network_from_records",
    "PersistentRecord",
    "ModuleRecord",
    "UnsafeCheckpointError",
    "read_records",
    "state_dict_of",
    "SHIPPED_NETWORKS",
    "read_metadata",
    "shipped_network_path",
]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint names a global that loading it would have to import or run."""


@dataclass
class PersistentRecord:
    """What ``_reconstruct_persistent_obj(meta)`` would have rebuilt, as plain data.

    Attributes:
        class_name: the class's name in the embedded source (e.g. ``"EDMPrecond"``).
        module_src: the embedded source, as text; never executed.
        init_args: positional constructor arguments recorded by the persistence wrapper.
        init_kwargs: keyword constructor arguments.
        state: the object's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ...).
    """

    class_name: str
    module_src: str = field(repr=False)
    init_args: tuple[Any, ...]
    init_kwargs: dict[str, Any]
    state: dict[str, Any] = field(repr=False)


class ModuleRecord(dict):
    """Stand-in for a torch.nn container (ModuleDict, ModuleList, Sequential): its state."""

    def __init__(self, class_name: str) -> None:
        super().__init__()
        self.class_name = class_name

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.update(state)


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise UnsafeCheckpointError(f"unexpected persistent-object metadata {type(meta).__name__}")
    state = dict(meta.get("state") or {})
    return PersistentRecord(
        class_name=str(meta.get("class_name")),
        module_src=str(meta.get("module_src", "")),
        init_args=tuple(state.get("_init_args", ())),
        init_kwargs=dict(state.get("_init_kwargs", {})),
        state=state,
    )


def _load_storage_from_bytes(data: bytes) -> Any:
    """Nested ``torch.save`` bytes of one storage, read by torch's weights-only loader."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _container(class_name: str) -> type:
    return type(
        class_name,
        (ModuleRecord,),
        {"__init__": lambda self: ModuleRecord.__init__(self, class_name)},
    )


class _EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict."""


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None) -> Any:
    """A numpy scalar from its dtype and raw bytes (object dtypes refused)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject or data is None:
        raise UnsafeCheckpointError("refusing a numpy object scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("torch", "Size"): torch.Size,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): np.dtype,
    ("dnnlib.util", "EasyDict"): _EasyDict,
}
for _name in ("ModuleDict", "ModuleList", "Sequential"):
    _SAFE_GLOBALS[("torch.nn.modules.container", _name)] = _container(_name)
for _name in (
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ByteStorage",
    "BoolStorage",
):
    _SAFE_GLOBALS[("torch", _name)] = getattr(torch, _name)
for _name in ("float16", "float32", "float64", "bfloat16", "int64", "int32", "uint8", "bool"):
    _SAFE_GLOBALS[("torch", _name)] = getattr(torch, _name)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"{self._path}: refusing global {module}.{name}; loading it would import or run "
                "code from the file. Only EDM network pickles (torch, numpy and collections "
                "data) can be read"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(
            f"{self._path}: persistent id {pid!r}; this looks like a torch.save archive, not "
            "an EDM pickle"
        )


# What damaged bytes raise inside the unpickler or torch's reader of the nested storages
# (a wrong opcode for the stack's contents, a bad storage size or key, a bad struct field).
# No code of the file runs, so each of these can only come from the file's bytes.
_MALFORMED_PICKLE_ERRORS = (
    EOFError,
    pickle.UnpicklingError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    RuntimeError,
    AssertionError,
    OverflowError,
    struct.error,
)


def _require_file(path: Path, what: str) -> None:
    """FileNotFoundError unless ``path`` is a file; the message tells a folder from nothing."""
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory, not a {what}")
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")


def read_records(path: str | os.PathLike[str]) -> Any:
    """Unpickle an EDM network pickle into plain data, running none of its code.

    Args:
        path: an ``edm-*.pkl`` file (a dict whose ``'ema'`` entry is the network).

    Returns:
        The unpickled object with every persistent object as a ``PersistentRecord``.

    Raises:
        FileNotFoundError: there is no file at ``path`` (or it is a directory).
        UnsafeCheckpointError: the file names a global outside the allow-list.
        ValueError: the file is truncated, corrupt or not a pickle.
    """
    path = Path(path)
    _require_file(path, "checkpoint")
    with path.open("rb") as fh:
        head = fh.read(4)
        fh.seek(0)
        if zipfile.is_zipfile(fh):
            raise ValueError(f"{path} is a torch.save zip archive, not an EDM pickle")
        fh.seek(0)
        if not head.startswith(b"\x80"):
            raise ValueError(f"{path} is not a pickle (it does not start with a protocol mark)")
        try:
            data = _RestrictedUnpickler(fh, str(path)).load()
        except UnsafeCheckpointError:
            raise
        except MemoryError:
            raise ValueError(
                f"{path} is corrupt or not a valid pickle: it declares more data than fits in "
                "memory"
            ) from None
        except _MALFORMED_PICKLE_ERRORS as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ValueError(
                f"{path} is truncated or not a valid pickle ({type(err).__name__}"
                f"{': ' + reason if reason else ''}); get the file again"
            ) from None
    # torch.save's legacy (non-zip) format is a run of pickles whose first is this number: the
    # file is no EDM pickle, and the number would otherwise pass for the network.
    if type(data) is int and data == torch.serialization.MAGIC_NUMBER:
        raise ValueError(
            f"{path} is a torch.save file (the legacy, non-zip format), not an EDM pickle; "
            "only EDM network pickles and bdia .safetensors files can be loaded"
        )
    return data


def state_dict_of(record: PersistentRecord | ModuleRecord, prefix: str = "") -> dict[str, Tensor]:
    """Flatten a record's parameters and buffers into a ``state_dict`` with torch's key names.

    Buffers that the module registered as non-persistent are included as found.

    Raises:
        ValueError: a record's ``_parameters``, ``_buffers`` or ``_modules`` is not a dict, or
            a parameter or buffer is neither a tensor nor None.
    """
    state = record.state if isinstance(record, PersistentRecord) else record
    out: dict[str, Tensor] = {}
    for group in ("_parameters", "_buffers", "_modules"):
        entries = state.get(group) or {}
        if not isinstance(entries, dict):
            raise ValueError(
                f"the record of {prefix.rstrip('.') or 'the network'}: {group} is a "
                f"{type(entries).__name__}, not a dict; the file is damaged or no EDM network"
            )
        for name, value in entries.items():
            if group == "_modules":
                if isinstance(value, (PersistentRecord, ModuleRecord)):
                    out.update(state_dict_of(value, f"{prefix}{name}."))
            elif isinstance(value, Tensor):
                out[prefix + name] = value.detach()
            elif value is not None:
                raise ValueError(
                    f"the record's tensor {prefix + name!r} is a {type(value).__name__}, not a "
                    "tensor; the file is damaged or no EDM network"
                )
    return out


#: What recorded constructor arguments may hold: JSON's values (tuples and numpy scalars, as
#: EDM's pickles have them, too).
_PLAIN = (str, int, float, bool, type(None))


def _plain_data(value: Any, where: str) -> Any:
    """``value`` with numpy scalars as Python numbers; a ValueError for anything but data."""
    if isinstance(value, np.generic) and not isinstance(value, np.object_):
        return value.item()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain_data(v, where) for v in value]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, dict):
        return {_plain_data(k, where): _plain_data(v, where) for k, v in value.items()}
    raise ValueError(
        f"{where}: a recorded argument is a {type(value).__name__}, not data; only numbers, "
        "strings, lists and dicts can be recorded"
    )


def build_network(class_name: str, init_kwargs: dict[str, Any]) -> torch.nn.Module:
    """A freshly initialised network of a registered class from its recorded kwargs.

    The class is looked up by name in ``bdia.models.registry`` (the classes of
    ``bdia.models.networks`` and ``bdia.models.digits`` are registered); nothing is imported
    by name. The kwargs must be plain data. The network records them as ``.config``.

    Raises:
        ValueError: for a class that is not registered, an architecture (``model_type``)
            this library does not implement, kwargs that are not plain data, or kwargs the
            constructor does not accept or cannot build a network of (a negative width, say;
            whatever the constructor raises is the cause).
    """
    cls = network_class(class_name)
    if not isinstance(init_kwargs, dict):
        raise ValueError(f"{class_name}: recorded kwargs are a {type(init_kwargs).__name__}")
    kwargs = _plain_data(init_kwargs, f"the recorded kwargs of {class_name}")
    try:
        return cls(**kwargs)
    except _BUILD_ERRORS as err:
        raise ValueError(f"cannot build {class_name} from the recorded kwargs: {err}") from err


# What a constructor raises for kwargs it cannot build a network of, beyond what it checks
# itself: a size that divides by zero, an empty level list, torch's "negative dimension".
_BUILD_ERRORS = (TypeError, ValueError, RuntimeError, ArithmeticError, LookupError)


def probe_network(class_name: str, init_kwargs: dict[str, Any]) -> torch.nn.Module:
    """``build_network`` on the meta device: the network's tensors with their shapes and
    dtypes but no memory, for ``check_fit`` to compare with a file's before the real build.
    A damaged or hostile config (a width of millions beside small tensors) is thus refused
    with the mismatch named before anything is allocated.

    Raises:
        ValueError: as ``build_network``.
    """
    with torch.device("meta"):
        return build_network(class_name, init_kwargs)


def check_fit(net: torch.nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Raise a ValueError naming the missing, unexpected and misfitting keys of ``state`` for
    ``net`` (on any device, the meta device included), if any.

    A tensor fits when its shape is the network's and it is floating point where the network's
    is (and not where it is not); floats of another width are rounded to the network's dtype,
    as ``load_state_dict`` does. The message counts each kind of mismatch and names up to five.
    """
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shared = [k for k in own if k in state]
    shape = [k for k in shared if tuple(own[k].shape) != tuple(state[k].shape)]
    # An integer tensor in a float slot (or the reverse) is damage: a cast would hide it.
    kind = [k for k in shared if own[k].is_floating_point() != state[k].is_floating_point()]
    if missing or unexpected or shape or kind:
        problems = [
            f"{label} ({len(keys)}): {keys[:5]}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", shape),
                ("wrong dtype", [f"{k} ({state[k].dtype}, not {own[k].dtype})" for k in kind]),
            )
            if keys
        ]
        raise ValueError(
            f"the tensors of {source} do not fit {type(net).__name__}: " + "; ".join(problems)
        )


def network_from_records(record: PersistentRecord) -> torch.nn.Module:
    """Rebuild our network from a preconditioner's record: its kwargs, then its tensors.

    Raises:
        ValueError: for a class or ``model_type`` this library does not implement, or a
            state that does not fit the rebuilt network (the message lists the mismatch).
    """
    if not isinstance(record, PersistentRecord):
        raise ValueError(f"unknown network class {type(record).__name__!r}")
    if record.init_args:
        raise ValueError(f"{record.class_name} was recorded with positional arguments")
    state = state_dict_of(record)
    probe = probe_network(record.class_name, record.init_kwargs)
    check_fit(probe, state, f"the {record.class_name} record")
    net = build_network(record.class_name, record.init_kwargs)
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False)


def load_edm_pickle(path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load the ``'ema'`` network of an EDM pickle as our own module, running none of its code.

    Returns:
        An ``EDMPrecond``/``VPPrecond``/``VEPrecond`` in eval mode, float32, on the CPU.

    Raises:
        FileNotFoundError: there is no file at ``path``.
        UnsafeCheckpointError: the file names a global outside the allow-list.
        ValueError: the file is not an EDM pickle, holds no network (a dict without an
            ``'ema'`` network, or no persistent object), or a network this library cannot
            rebuild.
    """
    data = read_records(path)
    record = data.get("ema") if isinstance(data, dict) else data
    if not isinstance(record, PersistentRecord):
        if isinstance(data, dict):
            keys = ", ".join(sorted(repr(k) for k in data)[:10])
            found = f"a dict with keys {keys or 'none'}"
            if "ema" in data:
                found += f", whose 'ema' is a {type(record).__name__}"
        else:
            found = f"a {type(data).__name__}"
        raise ValueError(
            f"{path} holds no EDM network: EDM pickles are a dict whose 'ema' entry is the "
            f"network, this file holds {found}"
        )
    try:
        return network_from_records(record)
    except ValueError as err:
        # The record's own errors name a class or a tensor, not the file a user passed.
        raise ValueError(f"{path}: {err}") from err


FORMAT_TAG = "bdia-network-v1"
# Metadata keys save_network writes itself; a caller's entry under one would be lost.
RESERVED_METADATA = {"format": "format tag", "config": "network's class and kwargs"}


def save_network(
    net: torch.nn.Module,
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``net`` as safetensors with its JSON config in the file's metadata, atomically.

    The config (``{"class_name", "init_kwargs"}``) is ``net.config``, which every instance of
    a registered class (``bdia.models.registry.register_network``) records when it is built;
    ``metadata`` adds string entries of the caller's (``read_metadata`` gives them back);
    the keys ``"format"`` and ``"config"`` are the file's own.

    Nothing is written when it fails: the file is filled under a temporary name beside
    ``path`` and renamed into place.

    Raises:
        ValueError: ``path`` does not end in ``.safetensors``, in any case
            (``load_network`` reads a file by its suffix), the network has no config (its
            class is not registered), its recorded arguments are not JSON data (e.g. a
            ``model_type`` given as a class), or a ``metadata`` entry is not a string or has
            one of the file's own keys.
        IsADirectoryError: ``path`` is a directory.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give the path of the file to write")
    # Under another name load_network could not read the file back, and under .pkl it would
    # replace an EDM pickle with a file that is none.
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{path} does not end in .safetensors (in any case), the suffix load_network "
            "reads a network file by; name the file NAME.safetensors"
        )
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            bad = (
                f"entry {key!r} is a {type(value).__name__}"
                if isinstance(key, str)
                else (f"key {key!r} is a {type(key).__name__}")
            )
            raise ValueError(f"metadata {bad}; metadata are strings (use json.dumps for data)")
        if key in RESERVED_METADATA:
            raise ValueError(
                f"metadata key {key!r} is the file's own (it holds the "
                f"{RESERVED_METADATA[key]}); give your entry another name"
            )
    config = getattr(net, "config", None)
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            f"the network ({type(net).__name__}) has no .config: only instances of a class "
            "registered with bdia.models.registry.register_network record their class and "
            "kwargs"
        )
    try:
        config_json = json.dumps(config)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"the recorded kwargs of {config['class_name']} are not JSON data ({err}); only a "
            "network built from names and numbers can be saved"
        ) from None
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    metadata = {**(metadata or {}), "format": FORMAT_TAG, "config": config_json}
    replace_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


#: Networks shipped inside the package, loadable by name.
SHIPPED_NETWORKS = {
    "digits": "digits.safetensors",
    "digits-classifier": "digits_classifier.safetensors",
}


def shipped_network_path(name: str) -> Path:
    """Where the shipped network ``name`` (a key of ``SHIPPED_NETWORKS``) lies."""
    if name not in SHIPPED_NETWORKS:
        raise ValueError(f"no shipped network {name!r}; choose from {sorted(SHIPPED_NETWORKS)}")
    return Path(__file__).parent / "weights" / SHIPPED_NETWORKS[name]


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata of a bdia safetensors file (or shipped network name).

    Raises:
        FileNotFoundError: there is no file at ``path`` (or it is a directory).
        ValueError: the file is not a safetensors file (the message names it).
    """
    from safetensors import SafetensorError, safe_open

    if isinstance(path, str) and path in SHIPPED_NETWORKS:
        path = shipped_network_path(path)
    _require_file(Path(path), "network file")
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from None


def _network_config(text: str, path: Path) -> dict[str, Any]:
    """The ``{"class_name", "init_kwargs"}`` config of a network file's metadata, checked."""
    try:
        config = json.loads(text)
    except ValueError as err:
        problem = f"its config is not JSON ({err})"
    else:
        if isinstance(config, dict) and {"class_name", "init_kwargs"} <= set(config):
            return config
        problem = "its config is not an object with class_name and init_kwargs"
    raise ValueError(
        f"{path}: {problem}; the file's metadata is damaged, write it again with "
        "bdia convert or save_network"
    )


def load_network(path: str | os.PathLike[str]) -> torch.nn.Module:
    """Load a shipped network by name, an EDM pickle (``.pkl``) or our safetensors file.

    ``"digits"`` and ``"digits-classifier"`` are the networks shipped with the package (see
    ``bdia.models.digits``). A file's format is read from its suffix, in any case
    (``NET.SAFETENSORS`` is a safetensors file). No path runs code from the file. Returns the
    network in eval mode, float32, on the CPU, with ``.config`` set.

    Raises:
        FileNotFoundError: there is no file at ``path`` (or it is a directory).
        ValueError: the suffix is neither ``.pkl`` nor ``.safetensors`` (the message lists
            the accepted ones), or the file is no network this library can rebuild.
        UnsafeCheckpointError: an EDM pickle names a global outside the allow-list.
    """
    if isinstance(path, str) and path in SHIPPED_NETWORKS:
        path = shipped_network_path(path)
    path = Path(path)
    if path.is_dir():
        _require_file(path, "network file")
    suffix = path.suffix.lower()
    if suffix == ".pkl":
        return load_edm_pickle(path)
    if suffix != ".safetensors":
        given = f"suffix {path.suffix!r} is no network format" if path.suffix else "no suffix"
        raise ValueError(
            f"{path}: {given}; a network file ends in .pkl (an EDM network pickle) or "
            ".safetensors (a bdia network file), in any case, or give the name of a shipped "
            f"network ({', '.join(sorted(SHIPPED_NETWORKS))})"
        )
    _require_file(path, "network file")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except SafetensorError as err:
        raise ValueError(f"{path} is not a valid safetensors file: {err}") from None
    if metadata.get("format") != FORMAT_TAG or "config" not in metadata:
        raise ValueError(f"{path} has no bdia network config in its metadata")
    config = _network_config(metadata["config"], path)
    try:
        probe = probe_network(config["class_name"], config["init_kwargs"])
    except ValueError as err:
        raise ValueError(
            f"{path}: {err} (the file's config cannot build a network: it is damaged, or the "
            "class has changed since the file was written)"
        ) from err
    check_fit(probe, tensors, str(path))
    net = build_network(config["class_name"], config["init_kwargs"])
    net.load_state_dict(tensors, strict=True)
    return net.eval().requires_grad_(False)

"""Reading EDM-format pickles without running the code they carry."""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import sys
import types

import numpy as np
import pytest
import torch

from bdia.models.checkpoints import (
    PersistentRecord,
    UnsafeCheckpointError,
    read_records,
    state_dict_of,
)


@pytest.fixture
def persistence(tmp_path, monkeypatch):
    """A stand-in ``torch_utils.persistence``: objects pickle as EDM's do.

    Its ``_reconstruct_persistent_obj`` runs ``module_src`` as EDM's would, so a loader that
    called it would create the marker file named in the source.
    """
    marker = tmp_path / "code-ran"
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what a normal unpickle would call
        exec(compile(meta["module_src"], "<module_src>", "exec"), {})
        raise AssertionError("unreachable in these tests")

    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)

    source = f"open({str(marker)!r}, 'w').write('ran')\nclass Net: pass\n"

    class Persistent:
        def __init__(self, class_name, module, init_kwargs):
            self.meta = dict(
                type="class",
                version=6,
                module_src=source,
                class_name=class_name,
                state=dict(module.__dict__, _init_args=(), _init_kwargs=init_kwargs),
            )

        def __reduce__(self):
            return (_reconstruct_persistent_obj, (self.meta,))

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    return Persistent, marker


def _network(Persistent):
    """EDMPrecond(SongUNet)-shaped: persistent layers, a torch ModuleDict, a buffer."""
    torch.manual_seed(0)
    inner = torch.nn.Module()
    inner.lin = torch.nn.Linear(3, 4)
    inner.blocks = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 2)})
    inner.register_buffer("freqs", torch.randn(5))
    expected = inner.state_dict()
    inner._modules["lin"] = Persistent("Linear", inner.lin, {"in_features": 3})
    inner.blocks._modules["a"] = Persistent("Linear", inner.blocks.a, {"in_features": 4})
    inner_p = Persistent("SongUNet", inner, {"model_channels": 128, "channel_mult": [2, 2, 2]})
    outer = torch.nn.Module()
    outer._modules["model"] = inner_p
    outer_p = Persistent("EDMPrecond", outer, {"sigma_data": np.float64(0.5), "label_dim": 10})
    return expected, outer_p


def test_edm_format_pickle_loads_to_identical_tensors_without_running_code(tmp_path, persistence):
    Persistent, marker = persistence
    inner_state, net = _network(Persistent)
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"ema": net, "augment_pipe": None}, protocol=4))
    data = read_records(path)
    assert not marker.exists()  # module_src was never executed
    record = data["ema"]
    assert isinstance(record, PersistentRecord) and record.class_name == "EDMPrecond"
    assert record.init_kwargs == {"sigma_data": 0.5, "label_dim": 10}
    assert "open(" in record.module_src  # kept as text
    state = state_dict_of(record)
    expected = {f"model.{k}": v for k, v in inner_state.items()}
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert state_dict_of(record)["model.lin.weight"].dtype == torch.float32
    assert record.state["_modules"]["model"].init_kwargs["channel_mult"] == [2, 2, 2]


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "func,name",
    [(os.system, "system"), (eval, "builtins.eval"), (__import__("subprocess").call, "subprocess")],
)
def test_pickle_naming_a_dangerous_global_is_refused(tmp_path, func, name):
    marker = tmp_path / "pwned"
    arg = f"touch {marker}" if func is not eval else f"open({str(marker)!r}, 'w')"
    if func is not os.system and func is not eval:
        arg = ["touch", str(marker)]
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": _Evil(func, arg)}, protocol=4))
    with pytest.raises(UnsafeCheckpointError, match=name):
        read_records(path)
    assert not marker.exists()


def test_module_source_that_would_create_a_file_is_not_run(tmp_path, persistence):
    Persistent, marker = persistence
    _, net = _network(Persistent)
    path = tmp_path / "net.pkl"
    path.write_bytes(pickle.dumps({"ema": net}))
    read_records(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "not a pickle"),
        (b"hello world", "not a pickle"),
        (None, "truncated"),
    ],
)
def test_truncated_or_non_pickle_files_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.pkl"
    if content is None:
        full = pickle.dumps({"ema": collections.OrderedDict(w=torch.ones(3))}, protocol=4)
        content = full[: len(full) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_records(path)


class _StorageBytes:
    """Pickles as the nested ``torch.save`` bytes of a storage, as a tensor in an EDM pickle."""

    def __init__(self, data):
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


def _storage_bytes(storage):
    import io

    buffer = io.BytesIO()
    torch.save(storage, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "case,error",
    [
        ("storage of a wrong size", "RuntimeError"),
        ("storage bytes of junk", "error"),
        ("opcode that does not fit the stack", "AttributeError"),
    ],
)
def test_corrupt_pickles_are_refused_with_a_value_error_naming_the_file(tmp_path, case, error):
    """Damaged bytes (not only a cut-off end) are a bad file, reported as a truncated one."""
    path = tmp_path / "damaged.pkl"
    if case == "storage of a wrong size":
        data = _storage_bytes(torch.arange(6.0).storage())
        six, seven = (6).to_bytes(8, "little"), (7).to_bytes(8, "little")
        assert data.count(six) == 1  # the storage's recorded element count
        payload = pickle.dumps({"ema": _StorageBytes(data.replace(six, seven))}, protocol=4)
    elif case == "storage bytes of junk":
        payload = pickle.dumps({"ema": _StorageBytes(b"\x80\x02junk")}, protocol=4)
    else:
        payload = b"\x80\x04}K\x01a."  # APPEND to a dict
    path.write_bytes(payload)
    expected = rf"damaged.pkl is truncated or not a valid pickle \({error}"
    with pytest.raises(ValueError, match=expected):
        read_records(path)


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here.pkl"):
        read_records(tmp_path / "nothing-here.pkl")


def test_torch_save_archive_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="zip archive"):
        read_records(path)


def test_legacy_torch_save_file_is_refused_as_such(tmp_path):
    from bdia.models.checkpoints import load_network

    path = tmp_path / "model.pkl"
    state = {"ema": torch.nn.Linear(2, 2).state_dict()}
    torch.save(state, path, _use_new_zipfile_serialization=False)
    # Its first pickle is torch's magic number, which used to come back as the "network".
    with pytest.raises(ValueError, match="model.pkl is a torch.save file .*legacy, non-zip"):
        load_network(path)


SMALL = dict(
    img_resolution=16,
    img_channels=3,
    label_dim=10,
    sigma_data=0.5,
    model_type="SongUNet",
    model_channels=16,
    channel_mult=[1, 2],
    num_blocks=1,
    attn_resolutions=[8],
    embedding_type="fourier",
    channel_mult_noise=2,
    encoder_type="residual",
    resample_filter=[1, 3, 3, 1],
    augment_dim=9,
)


def _edm_format(Persistent, module, kwargs=None):
    """Pickle-ready copy of ``module`` whose modules are persistent objects, as in EDM files."""
    import copy

    module = copy.deepcopy(module)

    def convert(m):
        for name, child in list(m._modules.items()):
            if isinstance(child, (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.Sequential)):
                convert(child)
            elif child is not None:
                m._modules[name] = Persistent(type(child).__name__, convert(child), {})
        return m

    return Persistent(type(module).__name__, convert(module), kwargs or {})


def test_edm_pickle_of_our_network_loads_to_the_same_outputs(tmp_path, persistence):
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import load_edm_pickle

    Persistent, marker = persistence
    torch.manual_seed(3)
    net = EDMPrecond(**SMALL).eval()
    for p in net.parameters():  # non-trivial weights everywhere, including zero-init layers
        p.data.normal_(0, 0.05)
    path = tmp_path / "edm-small.pkl"
    path.write_bytes(pickle.dumps({"ema": _edm_format(Persistent, net, SMALL)}, protocol=4))
    loaded = load_edm_pickle(path)
    assert not marker.exists()
    assert type(loaded) is EDMPrecond
    ours, theirs = net.state_dict(), loaded.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.5, 3.0])
    labels = torch.eye(10)[[1, 7]]
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_unknown_architecture_in_the_kwargs_is_refused(tmp_path, persistence):
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import load_edm_pickle

    Persistent, _ = persistence
    net = EDMPrecond(**SMALL)
    path = tmp_path / "dhariwal.pkl"
    kwargs = dict(SMALL, model_type="DhariwalUNet")
    path.write_bytes(pickle.dumps({"ema": _edm_format(Persistent, net, kwargs)}, protocol=4))
    # Each error names the file first: the record's own message names only a class.
    named = re.escape(f"{path}: ")
    with pytest.raises(ValueError, match=named + ".*unknown architecture model_type='Dhariwal"):
        load_edm_pickle(path)
    other = Persistent("StyleGAN2Generator", torch.nn.Module(), {})
    path.write_bytes(pickle.dumps({"ema": other}, protocol=4))
    with pytest.raises(ValueError, match=named + "unknown network class 'StyleGAN2Generator'"):
        load_edm_pickle(path)


def test_safetensors_round_trip_and_convert_command(tmp_path, persistence):
    from click.testing import CliRunner

    from bdia.cli import main
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import build_network, load_network, save_network

    Persistent, marker = persistence
    torch.manual_seed(5)
    net = build_network("EDMPrecond", SMALL).eval()
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    pkl = tmp_path / "edm-small.pkl"
    pkl.write_bytes(pickle.dumps({"ema": _edm_format(Persistent, net, SMALL)}, protocol=4))
    out = tmp_path / "small.safetensors"
    result = CliRunner().invoke(main, ["convert", str(pkl), str(out)])
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    loaded = load_network(out)
    assert type(loaded) is EDMPrecond and loaded.config == net.config
    ours, theirs = net.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.1, 10.0])
    with torch.no_grad():
        assert torch.equal(
            loaded(x, sigma, torch.eye(10)[[0, 9]]), net(x, sigma, torch.eye(10)[[0, 9]])
        )
    # Writing again goes through a temporary file: no stray files are left beside the target.
    save_network(loaded, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edm-small.pkl", "small.safetensors"]


def test_convert_reports_bad_input(tmp_path):
    from click.testing import CliRunner

    from bdia.cli import main

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle")
    result = CliRunner().invoke(main, ["convert", str(bad), str(tmp_path / "x.safetensors")])
    # A file that is not a network is a bad value of SOURCE: click's usage-error status 2.
    assert result.exit_code == 2 and "not a pickle" in result.stderr and "'SOURCE'" in result.stderr
    assert not (tmp_path / "x.safetensors").exists()
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 16)
    from bdia.models.checkpoints import load_network, read_metadata

    for read in (load_network, read_metadata):
        with pytest.raises(ValueError, match="corrupt.safetensors is not a valid safetensors file"):
            read(corrupt)
    with pytest.raises(FileNotFoundError, match="no network file at .*absent.safetensors"):
        read_metadata(tmp_path / "absent.safetensors")


_NOT_A_CONFIG = "its config is not an object with class_name and init_kwargs"


@pytest.mark.parametrize(
    "config,problem",
    [
        ("{not json", "its config is not JSON"),
        ('{"init_kwargs": {}}', _NOT_A_CONFIG),
        ('{"class_name": "EDMPrecond"}', _NOT_A_CONFIG),
        ('["EDMPrecond"]', _NOT_A_CONFIG),
    ],
)
def test_a_network_file_with_a_damaged_config_is_named(tmp_path, config, problem):
    from safetensors.torch import save_file

    from bdia.models.checkpoints import FORMAT_TAG, load_network

    path = tmp_path / "damaged.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"format": FORMAT_TAG, "config": config})
    with pytest.raises(ValueError, match=f"damaged.safetensors: {problem}"):
        load_network(path)


def _write_config(path, class_name, kwargs):
    """A bdia network file holding the tensors of EDMPrecond(**SMALL) under another config."""
    from safetensors.torch import save_file

    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import FORMAT_TAG

    tensors = {k: v.contiguous() for k, v in EDMPrecond(**SMALL).state_dict().items()}
    config = json.dumps({"class_name": class_name, "init_kwargs": kwargs})
    save_file(tensors, str(path), metadata={"format": FORMAT_TAG, "config": config})


_NO_CHANNELS = {k: v for k, v in SMALL.items() if k != "img_channels"}


@pytest.mark.parametrize(
    "class_name,kwargs,words",
    [
        # A negative width was "math domain error", with no file named.
        ("EDMPrecond", dict(SMALL, model_channels=-16), "model_channels must be an integer >= 1"),
        # ZeroDivisionError, IndexError ("pop from empty list") and torch's RuntimeError
        # ("negative dimension -3") escaped load_network as they were.
        ("EDMPrecond", dict(SMALL, model_channels=0), "model_channels must be an integer >= 1"),
        ("EDMPrecond", dict(SMALL, img_resolution=0), "img_resolution must be an integer >= 1"),
        ("EDMPrecond", dict(SMALL, img_channels=-3), "img_channels must be an integer >= 1"),
        ("VPPrecond", dict(SMALL, label_dim=-1), "label_dim must be an integer >= 0, got -1"),
        ("EDMPrecond", dict(SMALL, num_blocks=1.5), "num_blocks must be an integer >= 0, got 1.5"),
        ("EDMPrecond", dict(SMALL, channel_mult=[]), "channel_mult must be a non-empty list"),
        ("EDMPrecond", dict(SMALL, channel_mult=[1, 0]), r"channel_mult must .*, got \[1, 0\]"),
        # 15 was built as a network with layers named 15x15 and 7x7, refused for its tensors.
        (
            "EDMPrecond",
            dict(SMALL, img_resolution=15),
            r"img_resolution 15 is not divisible by 2 \(channel_mult's 2 levels halve it once\)",
        ),
        ("Nope", SMALL, "unknown network class 'Nope'; supported: "),
        ("EDMPrecond", _NO_CHANNELS, "missing 1 required positional argument: 'img_channels'"),
    ],
)
def test_a_config_that_cannot_build_a_network_is_named_with_the_file(
    tmp_path, class_name, kwargs, words
):
    from bdia.models.checkpoints import load_network

    path = tmp_path / "damaged.safetensors"
    _write_config(path, class_name, kwargs)
    with pytest.raises(ValueError, match=words) as info:
        load_network(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert message.endswith(
        "(the file's config cannot build a network: it is damaged, or the class has changed "
        "since the file was written)"
    )


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("source", ["safetensors", "pickle"])
def test_a_config_asking_for_another_network_is_refused_before_anything_is_allocated(
    tmp_path, monkeypatch, persistence, source
):
    """A config whose network is far larger than the file's tensors (model_channels 4096
    beside those of 16: about 2e10 weights, 80 GB in float32) is compared with them on the
    meta device and refused, naming the mismatch, without a real build."""
    import bdia.models.checkpoints as checkpoints
    from bdia.models import EDMPrecond

    huge = dict(SMALL, model_channels=4096)
    if source == "safetensors":
        path = tmp_path / "huge.safetensors"
        _write_config(path, "EDMPrecond", huge)
    else:
        Persistent, _ = persistence
        path = tmp_path / "huge.pkl"
        record = _edm_format(Persistent, EDMPrecond(**SMALL), huge)
        path.write_bytes(pickle.dumps({"ema": record}, protocol=4))
    devices = []
    build = checkpoints.build_network

    def watched(*args, **kwargs):
        devices.append(torch.empty(0).device.type)  # the default device of this build
        return build(*args, **kwargs)

    monkeypatch.setattr(checkpoints, "build_network", watched)
    with pytest.raises(ValueError, match="do not fit EDMPrecond: wrong shape"):
        checkpoints.load_network(path)
    assert devices == ["meta"]
    # A file whose tensors fit is built once on the meta device, then once for real.
    devices.clear()
    fitting = tmp_path / "fitting.safetensors"
    _write_config(fitting, "EDMPrecond", SMALL)
    assert type(checkpoints.load_network(fitting)) is EDMPrecond
    assert devices == ["meta", "cpu"]


@pytest.mark.first_case_by_default
@pytest.mark.parametrize("class_name", ["EDMPrecond", "VPPrecond", "VEPrecond"])
def test_a_network_built_on_the_meta_device_is_the_real_one_without_memory(class_name):
    """The check before a real build is only as good as the probe: the same tensors by name,
    shape and dtype, and the same numbers computed at construction (VPPrecond's sigma range
    is computed on the host even under the meta device)."""
    from bdia.models.checkpoints import build_network, probe_network

    kwargs = {k: v for k, v in SMALL.items() if class_name == "EDMPrecond" or k != "sigma_data"}
    probe, real = probe_network(class_name, kwargs), build_network(class_name, kwargs)
    assert {p.device.type for p in probe.state_dict().values()} == {"meta"}
    shapes = {k: (v.shape, v.dtype) for k, v in real.state_dict().items()}
    assert {k: (v.shape, v.dtype) for k, v in probe.state_dict().items()} == shapes
    assert (probe.sigma_min, probe.sigma_max) == (real.sigma_min, real.sigma_max)


def test_an_error_no_check_foresaw_is_wrapped_from_the_original(tmp_path):
    """Only the cheap mistakes are checked; anything else the constructor raises comes out
    as a ValueError naming the file, with the original as its cause."""
    from bdia.models.checkpoints import load_network

    path = tmp_path / "damaged.safetensors"
    # A resampling filter of two dimensions: torch's outer product refuses it (RuntimeError).
    _write_config(path, "EDMPrecond", dict(SMALL, resample_filter=[[1, 3, 3, 1]]))
    with pytest.raises(ValueError) as info:
        load_network(path)
    assert str(info.value).startswith(
        f"{path}: cannot build EDMPrecond from the recorded kwargs: outer: Expected 1-D"
    )
    built = info.value.__cause__  # build_network's error, whose cause is torch's
    assert isinstance(built, ValueError) and isinstance(built.__cause__, RuntimeError)


# ------------------------------------------------------------------------------ the registry


def test_networks_record_their_own_constructor_arguments():
    from bdia.models import EDMPrecond, VEPrecond
    from bdia.models.digits import DigitClassifier

    net = EDMPrecond(16, 3, label_dim=10, model_channels=16, channel_mult=[1, 2], num_blocks=1)
    # Positional arguments under their names, in call order, then the keywords as given.
    assert net.config == {
        "class_name": "EDMPrecond",
        "init_kwargs": dict(
            img_resolution=16,
            img_channels=3,
            label_dim=10,
            model_channels=16,
            channel_mult=[1, 2],
            num_blocks=1,
        ),
    }
    assert list(net.config["init_kwargs"])[:2] == ["img_resolution", "img_channels"]
    assert DigitClassifier().config == {"class_name": "DigitClassifier", "init_kwargs": {}}
    assert DigitClassifier(width=8).config["init_kwargs"] == {"width": 8}
    # The record is a copy: changing the caller's list afterwards does not change it.
    mult = [1, 2]
    ve = VEPrecond(8, 1, model_channels=16, channel_mult=mult, num_blocks=1)
    mult.append(4)
    assert ve.config["init_kwargs"]["channel_mult"] == [1, 2]


def test_only_registered_classes_are_built():
    from bdia.models import registry
    from bdia.models.checkpoints import build_network

    assert {"EDMPrecond", "VPPrecond", "VEPrecond", "DigitClassifier"} <= set(
        registry.registered_networks()
    )
    # Names of importable things are not looked up: no import, no attribute access.
    for name in ("SongUNet", "os.system", "builtins.eval", "torch.nn.Linear", "_Precond"):
        with pytest.raises(ValueError, match=f"unknown network class '{name}'; supported: "):
            build_network(name, {})
    with pytest.raises(ValueError, match="unknown network class"):
        build_network(["EDMPrecond"], {})  # an unhashable name from a JSON file
    # Recorded kwargs must be data: a callable (here a class a pickle may name) is refused.
    kwargs = dict(img_resolution=8, img_channels=1, model_type=collections.OrderedDict)
    with pytest.raises(ValueError, match="recorded argument is a type, not data"):
        build_network("EDMPrecond", kwargs)
    with pytest.raises(ValueError, match="cannot build DigitClassifier from the recorded kwargs"):
        build_network("DigitClassifier", {"depth": 3})


def test_a_registered_class_of_the_users_saves_and_loads(tmp_path, monkeypatch):
    from bdia.models import register_network, registry
    from bdia.models.checkpoints import load_network, save_network

    monkeypatch.setattr(registry, "_NETWORKS", dict(registry._NETWORKS))

    @register_network(name="TinyLinear")
    class Tiny(torch.nn.Module):
        def __init__(self, width: int, bias: bool = True) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(width, width, bias=bias)

    class Unregistered(Tiny):
        pass

    net = Tiny(3, bias=False)
    assert net.config == {"class_name": "TinyLinear", "init_kwargs": {"width": 3, "bias": False}}
    save_network(net, tmp_path / "tiny.safetensors")
    loaded = load_network(tmp_path / "tiny.safetensors")
    assert type(loaded) is Tiny and loaded.config == net.config
    assert torch.equal(loaded.lin.weight, net.lin.weight)
    # A subclass that is not registered records nothing, so it cannot be saved as its base.
    with pytest.raises(ValueError, match=r"\(Unregistered\) has no \.config"):
        save_network(Unregistered(3), tmp_path / "sub.safetensors")
    with pytest.raises(ValueError, match="'TinyLinear' is taken"):
        register_network(name="TinyLinear")(Unregistered)
    with pytest.raises(TypeError, match="takes \\*args"):

        @register_network
        class Varargs(torch.nn.Module):
            def __init__(self, *sizes: int) -> None:
                super().__init__()


def test_a_network_with_a_model_class_cannot_be_saved(tmp_path):
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import save_network

    class Inner(torch.nn.Module):
        def __init__(self, **kwargs):
            super().__init__()

    net = EDMPrecond(8, 1, model_type=Inner)
    assert net.config["init_kwargs"]["model_type"] is Inner
    with pytest.raises(ValueError, match="recorded kwargs of EDMPrecond are not JSON data"):
        save_network(net, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------ malformed inputs


def _registered_tiny(monkeypatch):
    """A registered two-tensor network class (a float weight and an int64 counter)."""
    from bdia.models import register_network, registry

    monkeypatch.setattr(registry, "_NETWORKS", dict(registry._NETWORKS))

    @register_network(name="TinyCounter")
    class TinyCounter(torch.nn.Module):
        def __init__(self, width: int = 2) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(width))
            self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    return TinyCounter


@pytest.mark.parametrize(
    "content", [None, [1, 2], {1: "a", "b": 2}, {"ema": 3}, collections.OrderedDict(ema=[1])]
)
def test_a_pickle_without_an_edm_network_is_refused_as_such(tmp_path, content):
    from bdia.models.checkpoints import load_edm_pickle

    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps(content, protocol=4))
    # It used to end in a TypeError (sorting the keys, iterating None) or in "unknown network
    # class 'int'", which named no file.
    with pytest.raises(ValueError, match="other.pkl holds no EDM network"):
        load_edm_pickle(path)


@pytest.mark.parametrize(
    "state, problem",
    [
        (dict(_parameters=[1]), "_parameters is a list, not a dict"),
        (dict(_modules=[1]), "_modules is a list, not a dict"),
        (dict(_parameters={"weight": 3}), "'weight' is a int, not a tensor"),
    ],
)
def test_a_record_with_malformed_state_is_refused(tmp_path, persistence, state, problem):
    from bdia.models.checkpoints import load_edm_pickle

    Persistent, _ = persistence
    record = Persistent("EDMPrecond", torch.nn.Module(), SMALL)
    record.meta["state"] = dict(state, _init_args=(), _init_kwargs=SMALL)
    path = tmp_path / "odd.pkl"
    path.write_bytes(pickle.dumps({"ema": record}, protocol=4))
    with pytest.raises(ValueError, match=problem):
        load_edm_pickle(path)


def test_tensors_of_the_wrong_kind_of_dtype_are_refused(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from bdia.models.checkpoints import FORMAT_TAG, load_network

    tiny = _registered_tiny(monkeypatch)
    meta = {"format": FORMAT_TAG, "config": json.dumps(tiny().config)}
    path = tmp_path / "tiny.safetensors"
    # Float tensors of another width are rounded to the network's float32, as load_state_dict
    # does; the value 1.5 is exact in every float dtype.
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        tensors = {"weight": torch.full((2,), 1.5, dtype=dtype), "count": torch.tensor(7)}
        save_file(tensors, str(path), metadata=meta)
        net = load_network(path)
        assert net.weight.dtype == torch.float32 and torch.equal(net.weight, torch.full((2,), 1.5))
    # An integer tensor where the network holds floats (or the reverse) is damage, not
    # rounding: load_state_dict used to convert it silently.
    for tensors in (
        {"weight": torch.ones(2, dtype=torch.int32), "count": torch.tensor(7)},
        {"weight": torch.ones(2), "count": torch.tensor(7.0)},
    ):
        save_file(tensors, str(path), metadata=meta)
        wrong = r"wrong dtype \(1\): \['(weight|count) \(torch\.\w+, not torch\.\w+\)'\]"
        with pytest.raises(ValueError, match=wrong):
            load_network(path)


def test_a_mismatch_counts_the_keys_it_names(tmp_path):
    from safetensors.torch import save_file

    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import FORMAT_TAG, load_network

    net = EDMPrecond(**SMALL)
    path = tmp_path / "partial.safetensors"
    state = dict(list(net.state_dict().items())[:3])
    meta = {"format": FORMAT_TAG, "config": json.dumps(net.config)}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=meta)
    missing = len(net.state_dict()) - 3
    with pytest.raises(ValueError, match=rf"missing \({missing}\): \['model\."):
        load_network(path)


def test_directories_are_named_as_directories(tmp_path):
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import load_network, read_metadata, read_records, save_network

    for name in ("net.safetensors", "net.pkl"):
        folder = tmp_path / name
        folder.mkdir()
        with pytest.raises(FileNotFoundError, match=f"{name} is a directory, not a network file"):
            load_network(folder)
    with pytest.raises(FileNotFoundError, match="net.pkl is a directory"):
        read_records(tmp_path / "net.pkl")
    with pytest.raises(FileNotFoundError, match="net.safetensors is a directory"):
        read_metadata(tmp_path / "net.safetensors")
    # It used to fail in the final rename, naming the temporary file.
    with pytest.raises(IsADirectoryError, match="net.safetensors is a directory; give the path"):
        save_network(EDMPrecond(**SMALL), tmp_path / "net.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pkl", "net.safetensors"]


def test_save_network_refuses_metadata_that_is_not_text_and_writes_nothing(tmp_path):
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import save_network

    with pytest.raises(ValueError, match="metadata entry 'epoch' is a int; metadata are strings"):
        save_network(EDMPrecond(**SMALL), tmp_path / "x.safetensors", metadata={"epoch": 3})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["net.pkl", "net.st", "net", "net.PKL"])
def test_save_network_refuses_a_name_load_network_would_not_read(tmp_path, name):
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import save_network

    # load_network reads a file by its suffix: under any other name the file could not be
    # loaded, and under .pkl it would replace an EDM pickle with what no longer is one.
    path = tmp_path / name
    path.write_bytes(b"the user's file")
    with pytest.raises(ValueError, match=f"{name} does not end in .safetensors"):
        save_network(EDMPrecond(**SMALL), path)
    assert path.read_bytes() == b"the user's file"
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_network_suffixes_are_read_in_any_case(tmp_path, persistence):
    """NET.SAFETENSORS and net.PKL (as some systems and downloads name files) used to be
    'expected an EDM .pkl, a bdia .safetensors file...', and save_network and bdia convert
    refused the first."""
    from click.testing import CliRunner

    from bdia.cli import main
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import load_network, save_network

    Persistent, marker = persistence
    torch.manual_seed(6)
    net = EDMPrecond(**SMALL).eval()
    upper = tmp_path / "NET.SAFETENSORS"
    save_network(net, upper)
    pkl = tmp_path / "net.PKL"
    pkl.write_bytes(pickle.dumps({"ema": _edm_format(Persistent, net, SMALL)}, protocol=4))
    converted = tmp_path / "Net.SafeTensors"
    result = CliRunner().invoke(main, ["convert", str(pkl), str(converted)])
    assert result.exit_code == 0, result.output
    for path in (upper, pkl, converted):
        loaded = load_network(path)
        assert type(loaded) is EDMPrecond and loaded.config == net.config
        ours, theirs = net.state_dict(), loaded.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name,given", [("net.pt", "suffix '.pt' is no network format"), ("net", "no suffix")]
)
def test_an_unknown_suffix_is_named_with_the_accepted_ones(tmp_path, name, given):
    from bdia.models.checkpoints import load_network

    path = tmp_path / name
    path.write_bytes(b"a network of another library")
    with pytest.raises(ValueError) as info:
        load_network(path)
    msg = str(info.value)
    assert msg.startswith(
        f"{path}: {given}; a network file ends in .pkl (an EDM network pickle) or "
        ".safetensors (a bdia network file), in any case"
    )
    assert msg.endswith("or give the name of a shipped network (digits, digits-classifier)")


def test_save_network_refuses_metadata_keys_of_its_own_and_writes_nothing(tmp_path):
    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import read_metadata, save_network

    # These two keys carry the file's format tag and the network's config: a caller's entry
    # under either name used to be replaced without a word, so it never came back.
    for key in ("format", "config"):
        with pytest.raises(ValueError, match=f"metadata key {key!r} is the file's own"):
            save_network(EDMPrecond(**SMALL), tmp_path / "x.safetensors", metadata={key: "mine"})
        assert list(tmp_path.iterdir()) == []
    save_network(EDMPrecond(**SMALL), tmp_path / "x.safetensors", metadata={"note": "mine"})
    assert read_metadata(tmp_path / "x.safetensors")["note"] == "mine"


def test_save_network_interrupted_leaves_no_file(tmp_path, monkeypatch):
    import safetensors.torch

    from bdia.models import EDMPrecond
    from bdia.models.checkpoints import save_network

    def fail_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_network(EDMPrecond(**SMALL), tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_constructor_that_refuses_the_recorded_kwargs_is_named():
    from bdia.models.checkpoints import build_network

    # A negative width used to fail inside the constructor with a bare "math domain error".
    kwargs = dict(img_resolution=8, img_channels=1, model_channels=-1)
    with pytest.raises(
        ValueError,
        match="cannot build EDMPrecond from the recorded kwargs: model_channels must be an "
        "integer >= 1, got -1",
    ):
        build_network("EDMPrecond", kwargs)

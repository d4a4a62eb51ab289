"""``bdia convert``: an EDM network pickle to a bdia safetensors file."""

from __future__ import annotations

from pathlib import Path

import click

from . import _ranks
from ._common import (
    InputPathType,
    OutputPathType,
    _one_line,
    _overwrite_option,
    _refuse_existing_file,
)


@click.command()
@click.argument("source", type=InputPathType(exists=True, dir_okay=False, path_type=Path))
@click.argument("target", type=OutputPathType(suffix=".safetensors"))
@_overwrite_option("Replace TARGET if it exists.")
def convert(source: Path, target: Path, overwrite: bool) -> None:
    """Convert an EDM network pickle to a bdia safetensors file (no code from SOURCE runs)."""
    from ..models.checkpoints import UnsafeCheckpointError, load_network, save_network

    _refuse_existing_file(target, "TARGET", overwrite)
    try:
        net = load_network(source)
    except (FileNotFoundError, ValueError, UnsafeCheckpointError) as err:
        raise click.BadParameter(_one_line(str(err)), param_hint="'SOURCE'") from None
    if not _ranks.rank_zero_alone():
        return
    save_network(net, target)
    count = sum(p.numel() for p in net.parameters())
    # save_network has checked the recorded config dict, which nn.Module's typing takes for a
    # tensor or submodule.
    name = net.config["class_name"]  # type: ignore[index]
    click.echo(f"wrote {target}: {name}, {count:,} parameters")

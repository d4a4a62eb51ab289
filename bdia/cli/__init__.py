"""The ``bdia`` command line: solvers, compare, sample, invert, fid, fid-ref, convert and edit.

Every user mistake ends the command with one line on stderr that names the option at fault
and says what to do, before any heavy work and before anything is written; ``bdia --debug``
shows the traceback instead.

One module a command (``_compare`` holds ``solvers`` too); the options, types and helpers
they share are in ``_common``; ``_pipelines`` reads diffusers pipeline folders and photos
for ``edit``, and ``_ip_adapter`` checks an IP-Adapter's files against the pipeline before
it loads.
"""

from __future__ import annotations

import logging

import click

from .. import __version__
from ._common import _Command
from ._compare import compare_command, solvers
from ._convert import convert
from ._edit import edit_command
from ._fid import fid_command, fid_ref_command
from ._invert import invert_command
from ._sample import sample_command

__all__ = ["main"]


@click.group(
    cls=_Command,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "--version", "-V", prog_name="bdia")
@click.option(
    "--debug", is_flag=True, help="Show the full traceback of an error instead of one line."
)
def main(debug: bool) -> None:
    """Single-step ODE solvers for diffusion sampling and their exactly invertible BDIA form."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")


for _command in (
    solvers,
    compare_command,
    sample_command,
    invert_command,
    fid_command,
    fid_ref_command,
    convert,
    edit_command,
):
    main.add_command(_command)

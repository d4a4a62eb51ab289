"""``python -m bdia.cli`` (as ``torchrun -m bdia.cli`` runs it): the ``bdia`` command."""

from . import main

main()

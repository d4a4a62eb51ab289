"""Adapters from other libraries' models and schedulers to bdia's ODEs and grids.

Each adapter lives in its own subpackage and imports its library only when it is imported
itself (``import bdia.integrations.diffusers`` needs diffusers; a missing library raises an
ImportError that names the extra to install). The core package ``bdia`` never imports them,
so it keeps its own small set of dependencies.
"""

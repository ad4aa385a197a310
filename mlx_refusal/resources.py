"""Where the bundled data lives: the prompt sets (prompts/) and the web page (export/).

Both stay at the top of the repository, where the user's layout puts them. The wheel carries them
inside the package as mlx_refusal/data/prompts and mlx_refusal/data/export (setup.cfg maps the
folders in with package_dir), found here through importlib.resources; a source checkout or an
editable install has no such copy, so there they are read from the checkout itself.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

PACKAGED = "data"  # the folder inside the installed package that holds the copies


def data_dir(name: str) -> Path:
    """The folder of bundled data `name` ('prompts' or 'export'): the installed package's copy,
    else the source checkout's top-level folder."""
    packaged = resources.files(__package__) / PACKAGED / name
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / name

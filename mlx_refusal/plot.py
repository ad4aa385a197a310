"""The report figures' one way to be drawn and written.

matplotlib's Figure is used directly and pyplot is never imported: that import (backend
selection, the global figure manager) is half of matplotlib's ~2 s start-up on a 2-core machine,
and a report needs no window. The PNG is written atomically, like every other output."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def figure(path: Path, width: float, height: float) -> Iterator:
    """Yield the axes of a new width x height inch figure; when the block ends, lay it out and
    write it to `path` as a PNG."""
    from matplotlib.figure import Figure

    from .atomic import atomic_file

    fig = Figure(figsize=(width, height), dpi=120)
    yield fig.subplots()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")

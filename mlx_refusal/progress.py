"""The one progress protocol of the library.

A long step reports through an `Update`, `update(n_items, n_tokens=0)`: the items (prompts,
batches, layers, trials, tensor batches) and tokens finished *since its previous call*, never
running counts or totals. Increments compose: a step made of passes (both prompt sets, then a
base model's pass; a resumed search's earlier trials, then each new one) just keeps calling.

A caller that wants progress passes a `ProgressFactory`, `progress(desc, total)`: a context
manager for one step of `total` items (0 when unknown) that yields its `Update`. `silent`
reports nothing; the CLI's factory is `console.progress_bar`. The library never prints.
"""
from __future__ import annotations

import contextlib
from typing import Callable

Update = Callable[..., None]  # update(n_items, n_tokens=0)
ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager]


def silent(desc: str, total: int):
    return contextlib.nullcontext(lambda n, tokens=0: None)

"""mlx_lm, imported without the transformers import its package __init__ makes.

mlx_lm's `__init__` imports its convert, generate and utils modules and, through them,
transformers, whose own `__init__` reads the source of each of its ~3400 model files to build a
lazy index: 1.2 s of a 2.5 s start-up on a 2-core machine. Building, running and capturing a
model needs none of it (mlx_lm.models is plain MLX). So `register` puts the package in
sys.modules with its `__init__` not yet run: its submodules import as usual (mlx_lm.generate and
mlx_lm.utils import transformers themselves when something needs them), and the first name asked
of the package itself (`mlx_lm.load`, `from mlx_lm import generate`) runs the `__init__` then.
mlx_lm's own files are left as they are.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import threading

_lock = threading.Lock()


def register() -> None:
    """Register mlx_lm's package with its __init__ deferred; no-op if mlx_lm is already imported
    (or not installed, so that the import fails where it is made)."""
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or spec.loader is None:
        return
    package = importlib.util.module_from_spec(spec)

    def finish_init(name: str):  # PEP 562: called only for names the package does not hold yet
        with _lock:
            if package.__dict__.pop("__getattr__", None) is not None:
                spec.loader.exec_module(package)
        return getattr(package, name)

    package.__getattr__ = finish_init
    # what the __init__ sets first: its submodules may now import transformers before it runs
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    sys.modules["mlx_lm"] = package

"""Multi-step jobs shared by the CLI commands: prompts -> captures -> directions.

Progress is reported through `progress(desc, total)`, a context manager factory that yields
`update(n_items, n_tokens)`; pass None for silence.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
from pathlib import Path
from typing import Callable

from . import __version__
from .capture import cached_capture
from .directions import Directions, from_captures

ProgressFactory = Callable[[str, int], contextlib.AbstractContextManager]


def _silent(desc: str, total: int):
    return contextlib.nullcontext(lambda n, t=0: None)


def compute_directions(model, tokenizer, info, harmful, harmless, positions: str = "last",
                       system: str | None = None, batch_size: int = 16, use_cache: bool = True,
                       progress: ProgressFactory | None = None) -> tuple[Directions, dict]:
    """Capture both prompt sets (cached) and take the difference in means. Returns the
    directions and a dict of what was cached/computed (for the report)."""
    progress = progress or _silent
    caps, hits = {}, {}
    for name, ps in (("harmful", harmful), ("harmless", harmless)):
        with progress(f"capture {name}", len(ps)) as update:
            caps[name], hits[name] = cached_capture(
                model, tokenizer, ps.texts, info.fingerprint, positions, system, batch_size,
                use_cache=use_cache, progress=update)
            if hits[name]:
                update(len(ps), 0)
    meta = {
        "tool": "mlx-refusal", "version": __version__,
        "model": {"spec": info.spec, "fingerprint": info.fingerprint, "model_type": info.model_type},
        "prompts": {"harmful": {"name": harmful.name, "n": len(harmful), "sha256": harmful.sha256},
                    "harmless": {"name": harmless.name, "n": len(harmless), "sha256": harmless.sha256}},
        "positions": positions, "system": system,
        "chat_template_sha256": _sha(getattr(tokenizer, "chat_template", None) or ""),
        "date": now(),
    }
    return from_captures(caps["harmful"], caps["harmless"], meta), {"cache_hits": hits,
                                                                     "stats": {k: c.stats for k, c in caps.items()}}


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_provenance(out_dir: Path, record: dict, name: str = "provenance.json") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    tmp = out_dir / f".{name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, path)
    return path

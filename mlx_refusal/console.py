"""Terminal presentation for the CLI: tables and progress bars. The library never imports this."""
from __future__ import annotations

import sys
from contextlib import contextmanager

import click


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain aligned table; numbers right-aligned, text left-aligned."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_num(r[i]) for r in rows) if rows else False for i in range(len(headers))]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    out = []
    if title:
        out.append(click.style(title, bold=True))
    out.append(click.style(line(headers), bold=True))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


@contextmanager
def progress_bar(desc: str, total: int, unit: str = "prompt"):
    """A tqdm bar that also shows tokens/s; yields `update(n_items, n_tokens)`."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=True)
    state = {"tokens": 0}

    def update(n: int, tokens: int = 0):
        state["tokens"] += tokens
        rate = bar.format_dict.get("elapsed") or 0
        if rate > 0 and state["tokens"]:
            bar.set_postfix_str(f"{state['tokens'] / rate:,.0f} tok/s", refresh=False)
        bar.update(n)

    try:
        yield update
    finally:
        bar.close()

"""Terminal presentation for the CLI: one-line errors and notes, tables and progress bars. The
library never imports this."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import click

from .errors import UserError


class CommandGroup(click.Group):
    """Turns UserError (and a few environment errors) into one line on stderr, exit status 2."""

    def invoke(self, ctx):
        import warnings

        warnings.showwarning = note
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        except click.UsageError as exc:  # a bad option value: one line too, not click's usage block
            where = f"{exc.ctx.command_path} --help" if exc.ctx else "--help"
            click.secho(f"error: {exc.format_message()} (see {where})", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted (nothing half-written was left behind)", fg="yellow", err=True)
            sys.exit(130)


def note(message, category=None, filename=None, lineno=None, file=None, line=None):
    """Library warnings and notes as one `note:` line, above a running progress bar, not in it."""
    from tqdm import tqdm

    tqdm.write(click.style(f"note: {message}", fg="yellow"), file=sys.stderr)


def say(message: str) -> None:
    """A step the library reports (fetching, converting, saving), indented under the command's line."""
    click.echo(f"  {message}", err=True)


def quiet_other_ranks() -> None:
    """Under mlx.launch every rank runs the command; rank 0 alone reports (errors still show)."""
    if os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) != "0":
        import functools

        import tqdm

        sys.stdout = open(os.devnull, "w")
        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)


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


# what the library's steps count, by their progress description; any other step counts prompts
STEP_UNITS = {"score layers": "layer", "search": "trial", "confirm on held-out val": "trial", "rewrite tensors": "tensor"}


@contextmanager
def progress_bar(desc: str, total: int, unit: str | None = None):
    """A tqdm bar that also shows tokens/s; yields `update(n_items, n_tokens)`."""
    from tqdm import tqdm

    unit = unit or STEP_UNITS.get(desc, "prompt")
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

#!/usr/bin/env python
"""mlx-refusal command line: a thin shell over the `mlx_refusal` library.

Every command prints progress and tables; the library itself never prints.
"""
from __future__ import annotations

import mlx_refusal  # noqa: F401  (first: loads a fast BLAS before mlx.core on Linux)

import sys
from pathlib import Path

import click

from mlx_refusal.errors import UserError

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class _Group(click.Group):
    """Turns UserError (and a few environment errors) into one line on stderr, exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.secho("interrupted (nothing half-written was left behind)", fg="yellow", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """RefusaLLM toolkit: find the refusal direction of a chat model in MLX, then ablate it
    (the model stops refusing) or steer along it (the model refuses everything, coherently)."""


model_option = click.option(
    "--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
    help="Model: a preset name, a local mlx_lm folder, a .gguf file, or a Hugging Face repo id.",
)



harmful_option = click.option(
    "--harmful", default="harmful", show_default=True,
    help="Harmful prompts: 'harmful' (bundled set) or a .txt/.json/.jsonl/.csv file.")
harmless_option = click.option(
    "--harmless", default="harmless", show_default=True,
    help="Harmless prompts: 'harmless' (bundled set) or a .txt/.json/.jsonl/.csv file.")
positions_option = click.option(
    "--positions", type=click.Choice(["last", "post-instruction"]), default="last", show_default=True,
    help="Token positions to read: the last prompt token, or every token the chat template puts "
         "after the user's text (averaged).")
system_option = click.option("--system", default=None,
                             help="System prompt to render prompts with (default: the template's own).")
batch_option = click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1, 512),
                            help="Prompts per forward pass.")
cache_option = click.option("--no-cache", is_flag=True,
                            help="Recompute activations instead of reusing the on-disk cache.")


def _load_model(spec: str):
    from mlx_refusal.loading import load

    click.echo(f"loading {spec} ...", err=True)
    return load(spec)


def _prompt_sets(harmful: str, harmless: str, split: str):
    from mlx_refusal.prompts import resolve_prompts

    return resolve_prompts(harmful, split), resolve_prompts(harmless, split)


def _default_out(info, what: str) -> Path:
    name = Path(str(info.spec).rstrip("/")).name.replace(".gguf", "") or "model"
    return Path("runs") / name / what


def _directions_for(model, tok, info, harmful, harmless, split, positions, system, batch_size, no_cache):
    from mlx_refusal.console import progress_bar
    from mlx_refusal.workflow import compute_directions

    hset, lset = _prompt_sets(harmful, harmless, split)
    d, run = compute_directions(model, tok, info, hset, lset, positions, system, batch_size,
                                use_cache=not no_cache, progress=progress_bar)
    if d.degenerate:
        click.secho(f"warning: zero or non-finite direction at rows {d.degenerate}; they are never selected",
                    fg="yellow", err=True)
    return d, run


@main.command()
@model_option
@harmful_option
@harmless_option
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="train", show_default=True,
              help="Which split of the prompt sets to use (bundled or file, split deterministically).")
@positions_option
@system_option
@batch_option
@cache_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: runs/<model>/directions].")
@click.option("--top", default=10, show_default=True, help="Rows of the ranking table to print.")
def directions(model_spec, harmful, harmless, split, positions, system, batch_size, no_cache, out, top):
    """Capture residual activations for harmful and harmless prompts and write one candidate
    refusal direction per layer (directions.safetensors), ranked (ranking.json, ranking.png)."""
    import time

    from mlx_refusal.console import table
    from mlx_refusal.directions import save_directions
    from mlx_refusal.select import heuristic_scores, rank_heuristic, write_ranking
    from mlx_refusal.workflow import write_provenance

    t0 = time.perf_counter()
    model, tok, info = _load_model(model_spec)
    d, run = _directions_for(model, tok, info, harmful, harmless, split, positions, system, batch_size, no_cache)
    out = out or _default_out(info, "directions")
    path = save_directions(d, out)
    scores = heuristic_scores(d)
    ranked = rank_heuristic(d)
    jpath, ppath = write_ranking(scores, ranked, out)
    write_provenance(out, {**d.metadata, "split": split, "run": run, "outputs": [path.name, jpath.name, ppath.name]})
    rows = [[r.layer, r.heuristic, r.diff_norm, r.relative_diff] for r in ranked[:top]]
    click.echo(table(["layer", "heuristic", "|diff|", "|diff|/norm"], rows, title="Top layers (FailSpy heuristic)"))
    click.echo(f"wrote {path}, {jpath}, {ppath} in {time.perf_counter() - t0:.1f} s"
               + (" (activations from cache)" if all(run["cache_hits"].values()) else ""))


if __name__ == "__main__":
    main()

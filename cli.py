#!/usr/bin/env python
"""mlx-refusal command line: parses options, calls the Python API (mlx_refusal.api), and prints
progress bars and tables. The library itself never prints."""
from __future__ import annotations

import mlx_refusal  # noqa: F401  (first: loads a fast BLAS before mlx.core on Linux)

import time
from pathlib import Path

import click

from mlx_refusal import cli_options as opt
from mlx_refusal.cli_text import before_after, evaluation, print_choice, print_trial
from mlx_refusal.console import CommandGroup, note, say


@click.group(cls=CommandGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """RefusaLLM toolkit: find the refusal direction of a chat model in MLX, then ablate it
    (the model stops refusing) or steer along it (the model refuses everything, coherently)."""
    from mlx_refusal.console import quiet_other_ranks

    quiet_other_ranks()


@main.command()
@opt.model
def info(model_spec):
    """Show a model's architecture, size, dtype, and where and how fast it will run."""
    from mlx_refusal import api
    from mlx_refusal.cli_text import model_info

    start = time.perf_counter()
    m = api.load(model_spec, note=say, chat_template=opt.chat_template_file())
    click.echo(model_info(m.info, time.perf_counter() - start))


@main.command("import-gguf")
@click.argument("gguf_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write the mlx_lm model to (must not exist unless --force).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float32",
              show_default=True, help="Dtype the dequantized weights are stored in.")
def import_gguf(gguf_file, out_dir, force, dtype):
    """Convert a llama.cpp GGUF file into an mlx_lm folder that stock `mlx_lm.load` opens."""
    from mlx_refusal import validate
    from mlx_refusal.gguf import convert

    validate.out_folder(out_dir, force)
    click.echo(f"converting {gguf_file} -> {out_dir}", err=True)
    convert(gguf_file, out_dir, dtype=dtype, force=force, progress=say)
    click.echo(f"wrote {out_dir}")


def _load(spec: str, tensor_parallel: bool = False):
    from mlx_refusal import api

    click.echo(f"loading {spec}{' (tensor parallel)' if tensor_parallel else ''} ...", err=True)
    return api.load(spec, tensor_parallel=tensor_parallel, chat_template=opt.chat_template_file())


def _directions(m, harmful, harmless, split, positions, system, batch_size, no_cache, directions_file=None):
    """The directions of `directions_file`, else computed (activations cached), with what was used."""
    from mlx_refusal import api
    from mlx_refusal.cli_text import direction_notes
    from mlx_refusal.console import progress_bar
    from mlx_refusal.directions import load_directions

    if directions_file is not None:
        d = api.check_directions(load_directions(directions_file), m.info, str(directions_file))
        used = d.metadata.get("prompts", {})
        click.echo(f"directions from {directions_file} ({used.get('harmful', {}).get('n', '?')} harmful and "
                   f"{used.get('harmless', {}).get('n', '?')} harmless prompts)", err=True)
        return d
    method = click.get_current_context().meta.get("direction_method", "auto")
    d = api.compute_directions(m, harmful, harmless, split=split, positions=positions, system=system,
                               batch_size=batch_size, method=method, use_cache=not no_cache, progress=progress_bar)
    for line, color in direction_notes(d):
        click.secho(line, fg=color, err=True)
    return d


@main.command()
@opt.model
@opt.harmful
@opt.harmless
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default=None,
              help="Which split of the prompt sets to use, split deterministically [default: train for a bundled "
                   "set, so its val and test splits stay held out; all of a file you pass].")
@opt.positions
@opt.system
@opt.batch
@opt.cache
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: runs/<model>/directions].")
@click.option("--top", default=10, show_default=True, help="Rows of the ranking table to print.")
@opt.tensor_parallel
def directions(model_spec, harmful, harmless, split, positions, system, batch_size, no_cache, out, top,
               tensor_parallel):
    """Capture residual activations for harmful and harmless prompts and write one candidate
    refusal direction per layer (directions.safetensors), ranked (ranking.json, ranking.png)."""
    from mlx_refusal import api, distributed, validate
    from mlx_refusal.cli_text import ranking
    from mlx_refusal.console import progress_bar

    t0 = time.perf_counter()
    out = out or opt.default_out(model_spec, "directions")
    validate.before_loading(model_spec, harmful, harmless, out, True, system=system, out_kind="directions",
                            chat_template=opt.chat_template_file(), note=say)
    m = _load(model_spec, tensor_parallel)
    d = _directions(m, harmful, harmless, split, positions, system, batch_size, no_cache)
    if not distributed.is_writer():
        return
    prov = api.write_directions(m, d, out, harmful, harmless, split, system, batch_size, use_cache=not no_cache,
                                progress=progress_bar)
    click.echo(ranking(d, prov["separation_auroc_val"], top))
    click.echo(f"wrote {', '.join(str(out / f) for f in prov['outputs'])} in {time.perf_counter() - t0:.1f} s"
               + (" (activations from cache)" if all(d.run["cache_hits"].values()) else ""))


@main.command()
@click.argument("webdir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; the default keeps the page reachable from this machine only.")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port (0 picks a free one).")
@click.option("--quiet", is_flag=True, help="Do not log each request.")
def serve(webdir, host, port, quiet):
    """Serve the web page with an exported bundle (WEBDIR, from `export-onnx --out`) and the
    page's JS runtime, fully offline, with the headers onnxruntime-web's wasm threads need.
    The first run installs the pinned runtime (npm ci from export/package-lock.json): into export/
    in a checkout; for an installed package, into a copy of the page in the per-user cache."""
    from mlx_refusal.serve import is_loopback, serve as serve_page

    if not is_loopback(host):
        click.secho(f"warning: binding {host} makes the page reachable from other machines", fg="yellow", err=True)
    log = None if quiet else (lambda line: click.echo(line, err=True))
    try:
        serve_page(webdir, host=host, port=port, log=log, progress=say,
                   on_ready=lambda url: click.echo(f"serving {webdir} at {url} (Ctrl-C to stop)"))
    except KeyboardInterrupt:
        click.echo("stopped")


@main.command("export-onnx")
@opt.export_options
def export_onnx_cmd(model_spec, out_dir, dtypes, layer, force, with_page, share_embedding):
    """Export a model to ONNX for the browser: a KV-cache decoder graph with an activations output
    in each chosen dtype; for a steered model, standard onnx/model*.onnx files (steering fixed, for
    stock transformers.js) plus onnx/steerable*.onnx slider graphs sharing their weights. The
    bundle's chat template is --chat-template's, else the one the edit was made under, else the model's."""
    from mlx_refusal import api, validate
    from mlx_refusal.loading import resolve
    from mlx_refusal.onnx import parse_dtypes
    from mlx_refusal.template import read_chat_template

    parse_dtypes(dtypes)  # fail on a typo before loading anything
    validate.out_folder(out_dir, True)  # file / read-only; export_onnx refuses a folder that is not an export
    template = opt.chat_template_file()
    if template is not None:
        read_chat_template(template)  # a missing or empty file before a download
    folder = resolve(model_spec, progress=say)
    t0 = time.perf_counter()
    res = api.export_onnx(folder, out_dir, dtypes, layer=layer, force=force, with_page=with_page, note=say,
                          chat_template=template, share_embedding=share_embedding)
    click.echo(f"exported {folder} -> {res.out_dir} in {time.perf_counter() - t0:.1f} s "
               f"({res.model_type}, activations.layer{res.activations_layer}"
               f"{', steering_scale input' if res.steered else ''})")
    for rel, size in res.files.items():
        if rel.startswith("onnx/") or rel in ("config.json", "steering.json", "export.json"):
            click.echo(f"  {rel:32s} {size / 2**20:10.1f} MiB")


@main.command("eval")
@opt.eval_options
def eval_cmd(model_spec, base_spec, harmful, harmless, split, max_tokens, limit, system, batch_size,
             json_out, md_out, examples, tensor_parallel):
    """Generate greedy answers to harmful and harmless prompts and report refusal rates (per set
    and per category), coherence and, with --base, the first-token KL against the unedited model."""
    import json

    from mlx_refusal import api, distributed
    from mlx_refusal.atomic import write_text_atomic
    from mlx_refusal.console import progress_bar
    from mlx_refusal.evaluation import report_json, report_markdown

    t0 = time.perf_counter()
    m = _load(model_spec, tensor_parallel)
    base = _load(base_spec, tensor_parallel) if base_spec else None
    report = api.evaluate(m, harmful, harmless, split=split, base=base, limit=limit, max_tokens=max_tokens,
                          system=system, batch_size=batch_size, progress=progress_bar)
    click.echo(evaluation(report, m.info.spec, base and base.info.spec, examples))
    title = f"Evaluation of {m.info.spec}"
    if json_out and distributed.is_writer():
        write_text_atomic(json_out, json.dumps(report_json(report), indent=2, ensure_ascii=False) + "\n")
        click.echo(f"wrote {json_out}")
    if md_out and distributed.is_writer():
        write_text_atomic(md_out, report_markdown(report, title=title))
        click.echo(f"wrote {md_out}")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s")


# ---------------------------------------------------------------------------------------------
# Edits: steer, ablate, project. Each: check the options, load, directions, the API verb, save.


def _plan_streaming(model_spec: str, directions_file: Path | None, max_memory: str | None):
    """(model folder, memory budget) if the edit is to be streamed shard by shard, else None."""
    from mlx_refusal import stream_edit as se

    plan = se.plan(model_spec, directions_file, se.parse_size(max_memory) if max_memory else None, note=say)
    if plan is not None:
        click.secho(f"streaming the edit shard by shard: {plan.why}. No before/after report (the model is never "
                    "loaded whole); evaluate the result with `eval --model OUT`.", fg="yellow", err=True)
        for warning in plan.warnings:
            note(warning)
    return plan


def _save(edit, out: Path, force: bool, save_dtype: str, t0: float) -> None:
    from mlx_refusal import distributed
    from mlx_refusal.console import progress_bar

    if not distributed.is_writer():
        return
    click.echo(f"saving {out} ...", err=True)
    edit.save(out, force=force, dtype=save_dtype, progress=progress_bar, note=say)
    if edit.after is not None:
        click.echo(before_after(edit.before, edit.after, edit.record["metrics"].get("perplexity")))
    hint = (f"; try: mlx_lm.generate --model {out} --prompt 'What is the capital of France?'"
            if edit.kind == "steer" else "")
    click.secho(f"\nwrote {out}{' (streamed)' if edit.model is None else ''} in {time.perf_counter() - t0:.0f} s"
                f"{hint}", fg="green")


@main.command()
@opt.model
@opt.harmful
@opt.harmless
@opt.steer_options
@opt.positions
@opt.system
@opt.batch
@opt.cache
@opt.directions_file
@opt.edit_outputs
@opt.scale_out
def steer(model_spec, harmful, harmless, positions, system, batch_size, no_cache, directions_file, out, force,
          eval_limit, max_tokens, gen_batch_size, save_dtype, tensor_parallel, max_memory, **choice):
    """Make a RefusaLLM: add alpha x the refusal direction as a bias at one layer, so the model
    refuses every request, coherently. With no options: default model, cached directions, the
    layer and alpha calibrated on the validation split, a before/after report on the test split."""
    from mlx_refusal import api, validate
    from mlx_refusal.console import progress_bar
    from mlx_refusal.directions import load_directions

    t0 = time.perf_counter()
    out = out or opt.default_out(model_spec, "steer")
    api.check_steer(choice["alpha"], choice["alpha_multiple"], choice["voice"], tensor_parallel)
    folder = validate.before_loading(model_spec, harmful, harmless, out, force, layer_index=choice["layer"],
                                     directions_file=directions_file, system=system,
                                     chat_template=opt.chat_template_file(), note=say)
    plan = _plan_streaming(model_spec, directions_file, max_memory)
    if plan is not None:
        edit = api.streamed_steer(folder, load_directions(directions_file), choice["layer"], choice["alpha"],
                                  choice["alpha_multiple"], plan.limit, system, opt.chat_template_file())
        return _save(edit, out, force, save_dtype, t0)
    m = _load(model_spec, tensor_parallel)
    d = _directions(m, harmful, harmless, "train", positions, system, batch_size, no_cache, directions_file)
    edit = api.steer(m, d, harmful, harmless, system=system, batch_size=batch_size, eval_limit=eval_limit,
                     max_tokens=max_tokens, gen_batch_size=gen_batch_size, use_cache=not no_cache,
                     progress=progress_bar, on_trial=print_trial, **choice)
    print_choice(edit.choice)
    _save(edit, out, force, save_dtype, t0)


def _orthogonal_edit(kind, model_spec, harmful, harmless, positions, system, batch_size, no_cache, directions_file,
                     out, force, eval_limit, max_tokens, gen_batch_size, save_dtype, tensor_parallel,
                     max_memory, scale, layers_text, search_trials=0, search_prompts=32, **choice):
    """ablate and project: the same edit with scale 1 or the given scale; ablate --search: the
    edit shape found by a search."""
    from mlx_refusal import api, validate
    from mlx_refusal.cli_text import print_projection
    from mlx_refusal.console import progress_bar
    from mlx_refusal.directions import load_directions

    t0 = time.perf_counter()
    out = out or opt.default_out(model_spec, kind)
    validate.finite("--scale", scale, limit=validate.MAX_SCALE)
    api.check_search(search_trials, layer=choice["layer"] is not None, per_layer=choice["per_layer"],
                     layers=bool(layers_text), norm_preserve=choice["norm_preserve"], max_memory=bool(max_memory),
                     tensor_parallel=tensor_parallel)
    folder = validate.before_loading(model_spec, harmful, harmless, out, force, layer_index=choice["layer"],
                                     layers_text=layers_text, directions_file=directions_file, system=system,
                                     chat_template=opt.chat_template_file(), note=say)
    writers = validate.layer_range(layers_text, int(validate.model_config(folder)["num_hidden_layers"]))
    plan = _plan_streaming(model_spec, directions_file, max_memory)
    if plan is not None:
        edit = api.streamed_project(folder, load_directions(directions_file), scale, layer=choice["layer"],
                                    select=choice["select"], writer_layers=writers, per_layer=choice["per_layer"],
                                    norm_preserve=choice["norm_preserve"], max_memory=plan.limit,
                                    system=system, kind=kind, chat_template=opt.chat_template_file())
        return _save(edit, out, force, save_dtype, t0)
    m = _load(model_spec, tensor_parallel)
    d = _directions(m, harmful, harmless, "train", positions, system, batch_size, no_cache, directions_file)
    edit = api.project(m, d, scale, harmful, harmless, writer_layers=writers, system=system, batch_size=batch_size,
                       eval_limit=eval_limit, max_tokens=max_tokens, gen_batch_size=gen_batch_size,
                       use_cache=not no_cache, progress=progress_bar, kind=kind, search_trials=search_trials,
                       search_prompts=search_prompts, **choice)
    print_projection(edit, scale, writers, choice["per_layer"])
    _save(edit, out, force, save_dtype, t0)


@main.command()
@opt.orthogonal_options
@opt.search
def ablate(**options):
    """Abliterate: project the refusal direction out of every matrix that writes to the residual
    stream (embedding, attention output, MLP down projection), so the model stops refusing."""
    _orthogonal_edit("ablate", scale=1.0, **options)


@main.command()
@opt.orthogonal_options
@click.option("--scale", required=True, type=float,
              help="Signed scale s in W <- W - s d d^T W: 1 ablates, 2 flips the sign of the direction, "
                   "-4 amplifies it 5x, 0 changes nothing.")
def project(**options):
    """Signed projection along the refusal direction, for study: the "flip the sign" (--scale 2)
    and "x5" (--scale -4) experiments."""
    _orthogonal_edit("project", **options)


if __name__ == "__main__":
    main()

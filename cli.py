#!/usr/bin/env python
"""mlx-refusal command line: a thin shell over the `mlx_refusal` library.

Every command prints progress and tables; the library itself never prints.
"""
from __future__ import annotations

import mlx_refusal  # noqa: F401  (first: loads a fast BLAS before mlx.core on Linux)

import sys
from pathlib import Path

import click

from mlx_refusal.atomic import write_text_atomic
from mlx_refusal.errors import UserError

DEFAULT_MODEL = "qwen2.5-coder-0.5b"


class _Group(click.Group):
    """Turns UserError (and a few environment errors) into one line on stderr, exit status 2."""

    def invoke(self, ctx):
        import warnings

        warnings.showwarning = _note
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


def _note(message, category, filename, lineno, file=None, line=None):
    """Library warnings (dropped duplicates, a damaged cache entry) as one `note:` line, printed
    above a running progress bar rather than into it."""
    from tqdm import tqdm

    tqdm.write(click.style(f"note: {message}", fg="yellow"), file=sys.stderr)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def main():
    """RefusaLLM toolkit: find the refusal direction of a chat model in MLX, then ablate it
    (the model stops refusing) or steer along it (the model refuses everything, coherently)."""
    import os

    if os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")) != "0":
        # under mlx.launch every rank runs this command; rank 0 alone reports (errors still show)
        import functools

        import tqdm

        sys.stdout = open(os.devnull, "w")
        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)


model_option = click.option(
    "--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
    help="Model: a preset name, a local mlx_lm folder, a .gguf file, or a Hugging Face repo id.",
)


def _progress(message: str) -> None:
    click.echo(f"  {message}", err=True)


@main.command()
@model_option
def info(model_spec):
    """Show a model's architecture, size, dtype, and where and how fast it will run."""
    import time

    from mlx_refusal.loading import load

    start = time.perf_counter()
    _, _, info = load(model_spec, progress=_progress)
    seconds = time.perf_counter() - start
    quant = info.quantization
    rows = [
        ("model", info.spec),
        ("path", str(info.path)),
        ("architecture", info.model_type),
        ("layers", str(info.num_layers)),
        ("hidden size", str(info.hidden_size)),
        ("parameters", f"{info.num_params / 1e6:,.1f}M ({info.num_params:,})"),
        ("dtype", f"{info.dtype} on disk, computing in {info.compute_dtype}"),
        ("quantization", f"{quant.get('bits')}-bit, group size {quant.get('group_size')}" if quant else "none"),
        ("device", info.device),
        ("fast BLAS", info.blas),
        ("fingerprint", info.fingerprint),
        ("chat template", f"yes ({len(info.chat_template)} chars)" if info.chat_template else "none"),
        ("loaded in", f"{seconds:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


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
    convert(gguf_file, out_dir, dtype=dtype, force=force, progress=_progress)
    click.echo(f"wrote {out_dir}")



harmful_option = click.option(
    "--harmful", default="harmful", show_default=True,
    help="Harmful prompts: 'harmful' (bundled set) or a .txt/.json/.jsonl/.csv file.")
harmless_option = click.option(
    "--harmless", default="harmless", show_default=True,
    help="Harmless prompts: 'harmless' (bundled set) or a .txt/.json/.jsonl/.csv file.")
_positions = click.option(
    "--positions", type=click.Choice(["last", "post-instruction"]), default="last", show_default=True,
    help="Token positions to read: the last prompt token, or every token the chat template puts "
         "after the user's text (averaged).")
# Stored on the click context (every command that captures shares it through _directions_for).
_direction_method = click.option(
    "--direction-method", type=click.Choice(["auto", "means", "filtered", "contrast"]), default="auto",
    show_default=True, expose_value=False, is_eager=False,
    callback=lambda ctx, _param, value: ctx.meta.__setitem__("direction_method", value),
    help="How the refusal direction is found. means: mean harmful minus mean harmless activation. filtered: the "
         "same over the harmful prompts the model refuses and the harmless ones it answers. contrast: the same "
         "prompts answered as a refusal minus as compliance (prefilled), read at the answer tokens; works when "
         "the model seldom refuses. auto: means if the model's first answer token refuses at least 20%% of the harmful prompts, else contrast.")


def positions_option(f):
    return _positions(_direction_method(f))


system_option = click.option("--system", default=None,
                             help="System prompt to render prompts with (default: the template's own).")
batch_option = click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 512),
                            help="Prompts per forward pass.")
gen_batch_option = click.option("--gen-batch-size", default=64, show_default=True, type=click.IntRange(1, 512),
                                help="Prompts generated together in the before/after report (CPU decoding is "
                                     "memory-bound: larger batches give more tokens/s).")
cache_option = click.option("--no-cache", is_flag=True,
                            help="Recompute activations instead of reusing the on-disk cache.")
directions_file_option = click.option(
    "--directions", "directions_file", type=click.Path(path_type=Path), default=None,
    help="A directions.safetensors (or its folder) written by `directions` for this same model, used "
         "instead of capturing the training prompts again.")


def _preflight(model_spec: str, harmful: str, harmless: str, out: Path | None, force: bool, *,
               what: str, layer: int | None = None, layers_text: str | None = None,
               directions_file: Path | None = None, system: str | None = None, out_kind: str = "model") -> Path:
    """Validate the options of a model command before the model is loaded; return the model folder."""
    from mlx_refusal import validate
    from mlx_refusal.loading import resolve, weight_fingerprint
    from mlx_refusal.prompts import is_bundled, resolve_prompts
    from mlx_refusal.save import is_model_folder

    out = out or _default_out(model_spec, what)
    validate.out_folder(out, force, *((is_model_folder, "a model folder") if out_kind == "model" else ()))
    sets = [resolve_prompts(spec, "all") for spec in (harmful, harmless)]
    validate.distinct_sets(harmful, harmless, *sets)
    folder = resolve(model_spec, progress=_progress)
    num_layers = validate.model_config(folder).get("num_hidden_layers")
    validate.layer("--layer", layer, num_layers)
    if layers_text and num_layers:
        validate.layer_range(layers_text, num_layers)
    files = [s for spec, s in zip((harmful, harmless), sets) if not is_bundled(spec)]
    if files:
        validate.prompts_fit(folder, files, system)
    if directions_file is not None:
        validate.directions_match(directions_file, weight_fingerprint(folder))
    return folder


tensor_parallel_option = click.option(
    "--tensor-parallel", is_flag=True,
    help="Under mlx.launch: split every block across the ranks with mlx_lm's shard(), for a model bigger "
         "than one host. Without it each rank holds the whole model and takes its share of the prompts.")


def _load_model(spec: str, tensor_parallel: bool = False):
    from mlx_refusal import distributed
    from mlx_refusal.loading import load

    if tensor_parallel and distributed.size() == 1:
        raise UserError("--tensor-parallel needs several ranks: start the command with mlx.launch -n N ...")
    click.echo(f"loading {spec}{' (tensor parallel)' if tensor_parallel else ''} ...", err=True)
    return load(spec, tensor_parallel=tensor_parallel)


def _is_writer() -> bool:
    """Under mlx.launch every rank computes the same result; rank 0 alone writes it."""
    from mlx_refusal import distributed

    return distributed.is_writer()


def _prompt_sets(harmful: str, harmless: str, split: str):
    from mlx_refusal.prompts import resolve_prompts

    return resolve_prompts(harmful, split), resolve_prompts(harmless, split)


def _default_out(spec: str, what: str) -> Path:
    name = Path(str(spec).rstrip("/")).name.replace(".gguf", "") or "model"
    return Path("runs") / name / what


def _report_method(m: dict) -> None:
    rate = m["base_refusal_rate"]
    click.echo(f"base model refuses {rate['harmful']:.0%} of harmful and {rate['harmless']:.0%} of harmless prompts "
               f"(first-token log-odds); direction method: {m['used']}"
               + (f" (kept {m['kept']['harmful']} harmful, {m['kept']['harmless']} harmless)" if "kept" in m else ""),
               err=True)
    from mlx_refusal.workflow import WEAK_REFUSAL

    if rate["harmful"] < WEAK_REFUSAL and m["used"] == "means":
        click.secho("warning: the model seldom refuses, so harmful minus harmless is mostly a 'harmful topic' "
                    "direction; --direction-method contrast finds refusal itself", fg="yellow", err=True)
    elif rate["harmful"] < WEAK_REFUSAL and m["asked"] == "auto":
        click.secho("note: the model seldom refuses; using the contrast method (prefilled refusal vs compliance)",
                    fg="yellow", err=True)


def _directions_for(model, tok, info, harmful, harmless, split, positions, system, batch_size, no_cache,
                    directions_file=None):
    from mlx_refusal.console import progress_bar
    from mlx_refusal.prompts import directions_split, resolve_prompts
    from mlx_refusal.workflow import compute_directions

    if directions_file is not None:
        from mlx_refusal.directions import load_directions

        d = load_directions(directions_file)
        used = d.metadata.get("prompts", {})
        click.echo(f"directions from {directions_file} ({used.get('harmful', {}).get('n', '?')} harmful and "
                   f"{used.get('harmless', {}).get('n', '?')} harmless prompts)", err=True)
        return d, {"cache_hits": {"harmful": True, "harmless": True}, "directions_file": str(directions_file)}
    hset = resolve_prompts(harmful, directions_split(harmful, split))
    lset = resolve_prompts(harmless, directions_split(harmless, split))
    click.echo(f"using {len(hset)} harmful prompts ({hset.name}) and {len(lset)} harmless prompts ({lset.name})",
               err=True)
    method = click.get_current_context().meta.get("direction_method", "auto")
    d, run = compute_directions(model, tok, info, hset, lset, positions, system, batch_size,
                                use_cache=not no_cache, progress=progress_bar, method=method)
    _report_method(d.metadata["method"])
    if d.degenerate:
        why = (" (with --positions last, row 0 is the embedding of the same template token in every prompt)"
               if d.degenerate == [0] else "")
        click.secho(f"note: the directions at rows {d.degenerate} are zero or not finite{why}; "
                    "they are never selected", fg="yellow", err=True)
    return d, run


def _held_back_separation(model, tok, info, d, harmful, harmless, split, system, batch_size, no_cache):
    """AUROC per layer on the validation split, when the directions came from the train split."""
    from mlx_refusal.console import progress_bar
    from mlx_refusal.workflow import held_back_separation

    if split != "train":
        return None
    hval, lval = _prompt_sets(harmful, harmless, "val")
    with progress_bar("separation (val)", 1) as update:
        auc = held_back_separation(model, tok, info, d, hval, lval, system, batch_size, use_cache=not no_cache)
        update(1, 0)
    return auc


@main.command()
@model_option
@harmful_option
@harmless_option
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default=None,
              help="Which split of the prompt sets to use, split deterministically [default: train for a bundled "
                   "set, so its val and test splits stay held out; all of a file you pass].")
@positions_option
@system_option
@batch_option
@cache_option
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: runs/<model>/directions].")
@click.option("--top", default=10, show_default=True, help="Rows of the ranking table to print.")
@tensor_parallel_option
def directions(model_spec, harmful, harmless, split, positions, system, batch_size, no_cache, out, top,
               tensor_parallel):
    """Capture residual activations for harmful and harmless prompts and write one candidate
    refusal direction per layer (directions.safetensors), ranked (ranking.json, ranking.png)."""
    import time

    from mlx_refusal.console import table
    from mlx_refusal.directions import save_directions
    from mlx_refusal.select import heuristic_scores, rank_heuristic, write_ranking
    from mlx_refusal.workflow import write_provenance

    t0 = time.perf_counter()
    _preflight(model_spec, harmful, harmless, out, True, what="directions", system=system, out_kind="directions")
    model, tok, info = _load_model(model_spec, tensor_parallel)
    d, run = _directions_for(model, tok, info, harmful, harmless, split, positions, system, batch_size, no_cache)
    out = out or _default_out(info.spec, "directions")
    scores = heuristic_scores(d)
    ranked = rank_heuristic(d)
    if not _is_writer():
        return
    path = save_directions(d, out)
    jpath, ppath = write_ranking(scores, ranked, out)
    from mlx_refusal.prompts import directions_split

    splits = {"harmful": directions_split(harmful, split), "harmless": directions_split(harmless, split)}
    # the val split is held back only when both sets were taken from their train split
    held_back = "train" if set(splits.values()) == {"train"} else "all"
    auc = _held_back_separation(model, tok, info, d, harmful, harmless, held_back, system, batch_size, no_cache)
    write_provenance(out, {**d.metadata, "split": splits, "run": run, "outputs": [path.name, jpath.name, ppath.name],
                           "separation_auroc_val": None if auc is None else [round(float(a), 4) for a in auc]})
    rows = [[r.layer, r.heuristic, r.diff_norm, r.relative_diff] + ([auc[r.layer]] if auc is not None else [])
            for r in ranked[:top]]
    click.echo(table(["layer", "heuristic", "|diff|", "|diff|/norm"] + (["AUROC (val)"] if auc is not None else []),
                     rows, title="Top layers (FailSpy heuristic)"))
    click.echo(f"wrote {path}, {jpath}, {ppath} in {time.perf_counter() - t0:.1f} s"
               + (" (activations from cache)" if all(run["cache_hits"].values()) else ""))


@main.command()
@click.argument("webdir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to bind; the default keeps the page reachable from this machine only.")
@click.option("--port", default=8000, show_default=True, type=int, help="TCP port (0 picks a free one).")
@click.option("--quiet", is_flag=True, help="Do not log each request.")
def serve(webdir, host, port, quiet):
    """Serve the web page with an exported bundle (WEBDIR, from `export-onnx --out`) and the
    page's JS runtime, fully offline, with the headers onnxruntime-web's wasm threads need.
    The first run installs the pinned runtime (npm ci from export/package-lock.json)."""
    from mlx_refusal.serve import is_loopback, serve as serve_page

    if not is_loopback(host):
        click.secho(f"warning: binding {host} makes the page reachable from other machines", fg="yellow", err=True)

    def ready(url):
        click.echo(f"serving {webdir} at {url} (Ctrl-C to stop)")

    log = None if quiet else (lambda line: click.echo(line, err=True))
    try:
        serve_page(webdir, host=host, port=port, log=log, on_ready=ready, progress=_progress)
    except KeyboardInterrupt:
        click.echo("stopped")


@main.command("export-onnx")
@click.option("--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
              help="The model folder to export (an edited folder from steer/ablate/project, or a preset).")
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder to write the transformers.js bundle (config, tokenizer, onnx/*.onnx) to.")
@click.option("--dtype", "dtypes", default="int8", show_default=True,
              help="Comma-separated subset of int8 (int8 weights and compute: the page's fast default), "
                   "fp32, q4 (4-bit MatMulNBits, for WebGPU), q8 (onnxruntime's dynamic int8, float embedding).")
@click.option("--layer", type=int, default=None,
              help="Layer whose resid_pre the graph also outputs (default: the steered layer, else the middle).")
@click.option("--force", is_flag=True, help="Replace an existing export in --out.")
@click.option("--with-page", is_flag=True, help="Also copy the web page (export/) into --out, ready for any static host.")
def export_onnx_cmd(model_spec, out_dir, dtypes, layer, force, with_page):
    """Export a model to ONNX for the browser: a KV-cache decoder graph with an activations output
    in each chosen dtype; for a steered model, standard onnx/model*.onnx files (steering fixed, for
    stock transformers.js) plus onnx/steerable*.onnx slider graphs sharing their weights."""
    import time

    from mlx_refusal.loading import resolve
    from mlx_refusal.onnx import export_onnx, parse_dtypes

    from mlx_refusal import validate

    parse_dtypes(dtypes)  # fail on a typo before loading anything
    validate.out_folder(out_dir, True)  # file / read-only; export_onnx refuses a folder that is not an export
    folder = resolve(model_spec, progress=_progress)
    validate.layer("--layer", layer, validate.model_config(folder).get("num_hidden_layers"))
    page = Path(__file__).resolve().parent / "export"
    if with_page and not (page / "index.html").is_file():
        raise UserError(f"--with-page: no page in {page} (index.html missing); build the page first")
    t0 = time.perf_counter()
    res = export_onnx(folder, out_dir, dtypes=dtypes, force=force, progress=_progress, layer=layer,
                      page_dir=page if with_page else None)
    click.echo(f"exported {folder} -> {res.out_dir} in {time.perf_counter() - t0:.1f} s "
               f"({res.model_type}, activations.layer{res.activations_layer}"
               f"{', steering_scale input' if res.steered else ''})")
    for rel, size in res.files.items():
        if rel.startswith("onnx/") or rel in ("config.json", "steering.json", "export.json"):
            click.echo(f"  {rel:32s} {size / 2**20:10.1f} MiB")


def _spread(pset, limit: int | None):
    """At most `limit` prompts, evenly spaced through the set so every category stays represented."""
    import dataclasses

    n = len(pset)
    if not limit or limit >= n:
        return pset
    keep = [round(i * n / limit) for i in range(limit)]
    return dataclasses.replace(pset, prompts=tuple(pset.prompts[i] for i in keep))


@main.command("eval")
@model_option
@click.option("--base", "base_spec", default=None,
              help="Unedited model to compare with: adds first-token KL(base || model) on harmless prompts.")
@harmful_option
@harmless_option
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True,
              help="Which split of the prompt sets to evaluate on.")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1, 4096),
              help="New tokens per answer (greedy).")
@click.option("--limit", default=None, type=click.IntRange(1), help="At most N prompts per set (evenly spread).")
@system_option
@batch_option
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the full report as JSON.")
@click.option("--markdown", "md_out", type=click.Path(path_type=Path), default=None,
              help="Write the report (tables and every answer) as Markdown.")
@click.option("--examples", default=3, show_default=True, help="Answers per set to print.")
@tensor_parallel_option
def eval_cmd(model_spec, base_spec, harmful, harmless, split, max_tokens, limit, system, batch_size,
             json_out, md_out, examples, tensor_parallel):
    """Generate greedy answers to harmful and harmless prompts and report refusal rates (per set
    and per category), coherence and, with --base, the first-token KL against the unedited model."""
    import json
    import time

    from mlx_refusal.console import progress_bar, table
    from mlx_refusal.evaluate import evaluate, report_json, report_markdown

    t0 = time.perf_counter()
    model, tok, info = _load_model(model_spec, tensor_parallel)
    base = None
    if base_spec:
        base_model, base_tok, base_info = _load_model(base_spec, tensor_parallel)
        base = (base_model, base_tok)
    hset, lset = _prompt_sets(harmful, harmless, split)
    hset, lset = _spread(hset, limit), _spread(lset, limit)
    if len(hset) == 0 or len(lset) == 0:
        raise UserError("a prompt set is empty after the split; use --split all or a larger prompt file")

    total = len(hset) + len(lset) + (2 * len(lset) if base else 0)
    with progress_bar("eval", total) as update:
        seen = {"done": 0}

        def progress(done, _total):
            update(done - seen["done"])
            seen["done"] = done

        report = evaluate(model, tok, hset, lset, base=base, max_tokens=max_tokens, batch_size=batch_size,
                          progress=progress, system=system)

    def pct(x):
        return f"{100 * x:.1f}%"

    rows = [[key, s.n, pct(s.refusal_rate), pct(s.coherence_rate), pct(s.explained_rate), round(s.variety, 3),
             round(s.mean_distinct3, 3)]
            for key, s in (("harmful", report.harmful), ("harmless", report.harmless))]
    click.echo(table(["set", "prompts", "refused", "coherent", "explained", "variety", "distinct-3"], rows,
                     title=f"Evaluation of {info.spec}"))
    click.echo()
    rows = [[key, cat, c.n, pct(c.refusal_rate), pct(c.coherence_rate)]
            for key, s in (("harmful", report.harmful), ("harmless", report.harmless))
            for cat, c in s.categories.items()]
    click.echo(table(["set", "category", "prompts", "refused", "coherent"], rows, title="By category"))
    if report.kl_mean is not None:
        click.echo(f"\nfirst-token KL(base || model) on harmless prompts: mean {report.kl_mean:.4f}, "
                   f"max {report.kl_max:.4f} nats (base: {base_info.spec})")
    for key in ("harmful", "harmless"):
        recs = [r for r in report.records if r.set == key][:examples]
        if recs:
            click.echo(click.style(f"\n{key} examples", bold=True))
        for r in recs:
            answer = " ".join(r.answer.split())
            verdict = "refused" if r.refused else "answered"
            click.echo(f"  > {r.prompt[:100]}\n    [{verdict}] {answer[:200]}")

    doc = report_json(report)
    doc["model"] = {"spec": str(info.spec), "fingerprint": info.fingerprint, "model_type": info.model_type}
    doc["base"] = None if not base_spec else {"spec": str(base_info.spec), "fingerprint": base_info.fingerprint}
    doc["prompts"] = {k: {"name": p.name, "split": split, "n": len(p), "sha256": p.sha256}
                      for k, p in (("harmful", hset), ("harmless", lset))}
    from mlx_refusal import distributed

    if distributed.describe(model):
        doc["distributed"] = distributed.describe(model)
    if json_out and _is_writer():
        write_text_atomic(json_out, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        click.echo(f"wrote {json_out}")
    if md_out and _is_writer():
        write_text_atomic(md_out, report_markdown(report, title=f"Evaluation of {info.spec}"))
        click.echo(f"wrote {md_out}")
    click.echo(f"done in {time.perf_counter() - t0:.1f} s")



# ---------------------------------------------------------------------------------------------
# Edits: steer, ablate, project.

edit_out_option = click.option("--out", type=click.Path(path_type=Path), default=None,
                               help="Output model folder [default: runs/<model>/<command>].")
force_option = click.option("--force", is_flag=True, help="Replace --out if it already exists.")
save_dtype_option = click.option("--save-dtype", type=click.Choice(["bfloat16", "float16", "float32"]),
                                 default="bfloat16", show_default=True,
                                 help="Dtype of the saved weights (the edit itself is computed in float32 on the CPU); "
                                      "bfloat16 halves the folder against float32.")
seed_option = click.option("--seed", default=0, show_default=True, help="Random seed (recorded in provenance).")
eval_limit_option = click.option("--eval-limit", default=None, type=click.IntRange(0),
                                 help="Prompts per set for the before/after report (default: the whole test "
                                      "split; 0 skips the report).")
max_tokens_option = click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1, 4096),
                                 help="New tokens per answer in the before/after report.")
# An edit that removes refusal can leave late ones ("Sure. ... However, I can't provide ..."):
# ablate and project judge longer answers than steer, whose refusals open the answer.
edit_max_tokens_option = click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1, 4096),
                                      help="New tokens per answer in the before/after report (long enough to "
                                           "catch refusals that come after a compliant start).")


def _seed(seed: int) -> None:
    import random

    import mlx.core as mx
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    mx.random.seed(seed)


def _evaluate_pair(model, tok, hset, lset, max_tokens, batch_size, system, base_logprobs=None, desc="eval",
                   cache_key=None):
    from mlx_refusal.console import progress_bar
    from mlx_refusal.evaluate import evaluate

    total = len(hset) + len(lset) + (len(lset) if base_logprobs is not None else 0)
    with progress_bar(desc, total) as update:
        seen = {"done": 0}

        def progress(done, _total):
            update(done - seen["done"])
            seen["done"] = done

        return evaluate(model, tok, hset, lset, base=base_logprobs, max_tokens=max_tokens,
                        batch_size=batch_size, progress=progress, system=system, cache_key=cache_key)


VOICE_PROMPTS = 48  # harmless train prompts the voice's response direction is read from
EXAMPLES = 5  # answers shown in the model card and README


def _before_after(before, after, examples: int = 3) -> str:
    from mlx_refusal.console import table

    def pct(x):
        return f"{100 * x:.1f}%"

    rows = [
        ["harmful refused", pct(before.harmful.refusal_rate), pct(after.harmful.refusal_rate)],
        ["harmless refused", pct(before.harmless.refusal_rate), pct(after.harmless.refusal_rate)],
        ["harmful degenerate", pct(before.harmful.degenerate_rate), pct(after.harmful.degenerate_rate)],
        ["harmless degenerate", pct(before.harmless.degenerate_rate), pct(after.harmless.degenerate_rate)],
        ["harmful coherent", pct(before.harmful.coherence_rate), pct(after.harmful.coherence_rate)],
        ["harmless coherent", pct(before.harmless.coherence_rate), pct(after.harmless.coherence_rate)],
        ["harmless explained", pct(before.harmless.explained_rate), pct(after.harmless.explained_rate)],
        ["harmful explained", pct(before.harmful.explained_rate), pct(after.harmful.explained_rate)],
        ["harmless variety", f"{before.harmless.variety:.3f}", f"{after.harmless.variety:.3f}"],
        ["harmless distinct-3", f"{before.harmless.mean_distinct3:.3f}", f"{after.harmless.mean_distinct3:.3f}"],
    ]
    if after.kl_mean is not None:
        rows.append(["first-token KL (harmless)", "0", f"{after.kl_mean:.4f}"])
    lines = [table(["metric", "before", "after"], rows,
                   title=f"Before / after on the test split ({before.harmful.n} harmful, {before.harmless.n} harmless)")]
    for key in ("harmful", "harmless"):
        pairs = [(b, a) for b, a in zip(before.records, after.records) if b.set == key][:examples]
        for b, a in pairs:
            lines.append(click.style(f"\n[{key}] {b.prompt[:100]}", bold=True))
            lines.append(f"  before: {' '.join(b.answer.split())[:160]}")
            lines.append(f"  after:  {' '.join(a.answer.split())[:160]}")
    return "\n".join(lines)


def _write_reports(report_dir: Path, before, after, extra: dict) -> None:
    import json

    from mlx_refusal.evaluate import report_json, report_markdown

    doc = {"before": report_json(before) if before else None, "after": report_json(after), **extra}
    write_text_atomic(report_dir / "report.json", json.dumps(doc, indent=2, ensure_ascii=False, default=str) + "\n")
    md = report_markdown(after, title="After the edit")
    if before:
        md = report_markdown(before, title="Before the edit") + "\n\n" + md
    write_text_atomic(report_dir / "report.md", md)


max_memory_option = click.option(
    "--max-memory", default=None, metavar="SIZE",
    help="Memory the edit may use, e.g. 1GB. If the in-memory edit needs more, the model's safetensors "
         "files are rewritten a few tensors at a time from --directions (bit-identical result, no "
         "before/after report). Without it this happens, given --directions, when the model does not fit "
         "in free memory.")


def _scale_out_options(f):
    for opt in (max_memory_option, tensor_parallel_option):
        f = opt(f)
    return f


def _streamed_folder(model_spec: str, directions_file: Path | None, max_memory: str | None) -> tuple | None:
    """(model folder, memory budget in bytes) if the edit is to be streamed, else None:
    --max-memory below what an in-memory edit needs, or, with --directions, less free memory."""
    from mlx_refusal import stream_edit as se
    from mlx_refusal.loading import resolve

    limit = se.parse_size(max_memory) if max_memory else None
    if limit is None and directions_file is None:
        return None
    folder = resolve(model_spec, progress=_progress)
    if not se.should_stream(folder, limit):
        return None
    limit = limit or se.free_memory()
    need = se.format_size(se.in_memory_bytes(folder))
    budget = f"--max-memory {max_memory}" if limit else f"free memory ({se.format_size(se.free_memory())})"
    if directions_file is None:
        raise UserError(f"editing {folder.name} in memory needs about {need}, more than {budget}; "
                        "pass --directions FILE (from `directions`) to rewrite its shards one at a time")
    click.secho(f"streaming the edit shard by shard: in memory it would need about {need}, more "
                f"than {budget}. No before/after report (the model is never loaded whole); evaluate the "
                "result with `eval --model OUT`.", fg="yellow", err=True)
    if 2 * se.largest_tensor_bytes(folder) > limit:
        click.secho(f"note: the largest tensor is {se.format_size(se.largest_tensor_bytes(folder))}; with its "
                    f"float32 edit the peak will exceed {se.format_size(limit)}", fg="yellow", err=True)
    return folder, limit


def _stream(streamed: tuple, out: Path, edit, record: dict, force: bool, save_dtype: str) -> None:
    from mlx_refusal.console import progress_bar
    from mlx_refusal.stream_edit import stream_edit

    if not _is_writer():
        return
    folder, limit = streamed
    with progress_bar("rewrite tensors", 0, unit="batch") as update:
        stream_edit(folder, out, edit, record, force, max_memory=limit, progress=lambda done, total: update(1),
                    dtype=save_dtype)
    click.secho(f"\nwrote {out} (streamed)", fg="green")


def _given_directions(directions_file: Path, info):
    from mlx_refusal.directions import load_directions

    d = load_directions(directions_file)
    if info is not None and d.directions.shape != (info.num_layers + 1, info.hidden_size):
        raise UserError(f"{directions_file} holds directions of shape {d.directions.shape}, not "
                        f"({info.num_layers + 1}, {info.hidden_size}) for {info.spec}; compute them for this model")
    return d


def _model_config(folder: Path) -> dict:
    import json

    return json.loads((folder / "config.json").read_text())


@main.command()
@model_option
@harmful_option
@harmless_option
@click.option("--layer", default=None, type=int,
              help="Steer at resid_pre of this layer (default: chosen by --select and alpha calibration).")
@click.option("--alpha", default=None, type=float, help="Absolute steering strength (skips calibration).")
@click.option("--alpha-multiple", default=None, type=float,
              help="Steering strength as a multiple of the mean residual norm at the layer (skips calibration).")
@click.option("--select", type=click.Choice(["evaluate", "heuristic"]), default="evaluate", show_default=True,
              help="How candidate layers are ranked before calibration: 'evaluate' = Arditi et al.'s induce "
                   "score (first-token refusal log-odds with the direction added), 'heuristic' = FailSpy's.")
@click.option("--candidates", default=3, show_default=True, type=click.IntRange(1, 64),
              help="Top-ranked layers at which alpha is calibrated; the best calibrated one is kept.")
@click.option("--target", default=0.95, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Fraction of harmless validation prompts that must be refused, coherently.")
@click.option("--margin", default=0.1, show_default=True, type=click.FloatRange(0.0, 2.0),
              help="After calibration, confirm alpha this fraction above the smallest passing one and keep it "
                   "if it still passes: the smallest passing alpha sits on the edge of --target by construction.")
@click.option("--calibration-prompts", default=32, show_default=True, type=click.IntRange(4),
              help="Harmless validation prompts generated per calibration trial.")
@click.option("--voice", type=click.Choice(["terse", "explain"]), default="terse", show_default=True,
              help="'terse': the refusal direction alone (\"I'm sorry, but I can't assist with that.\"). "
                   "'explain': a response direction (explaining minus terse refusals) is added alongside, and "
                   "candidates are compared on how many refusals name the request and give a reason. The "
                   "default stays terse: on the default model 'explain' does not reach its targets (README).")
@click.option("--voice-multiple", default=0.2, show_default=True, type=click.FloatRange(0.0, 4.0),
              help="With --voice explain: the voice term's strength as a multiple of the mean residual norm.")
@positions_option
@system_option
@batch_option
@cache_option
@directions_file_option
@edit_out_option
@force_option
@seed_option
@eval_limit_option
@max_tokens_option
@gen_batch_option
@save_dtype_option
@_scale_out_options
def steer(model_spec, harmful, harmless, layer, alpha, alpha_multiple, select, candidates, target, margin,
          calibration_prompts, voice, voice_multiple, positions, system, batch_size, no_cache, directions_file, out,
          force, seed, eval_limit, max_tokens, gen_batch_size, save_dtype, tensor_parallel, max_memory):
    """Make a RefusaLLM: add alpha x the refusal direction as a bias at one layer, so the model
    refuses every request, coherently. With no options: default model, cached directions, the
    layer and alpha calibrated on the validation split, a before/after report on the test split."""
    import time

    import numpy as np

    from mlx_refusal.console import progress_bar, table
    from mlx_refusal.edit import add_steering_bias
    from mlx_refusal.evaluate import first_token_logprobs
    from mlx_refusal.save import SteeringTerm, save_model
    from mlx_refusal.select import VoiceTarget, candidate_layers, plot_sweep
    from mlx_refusal.voice import response_direction
    from mlx_refusal.workflow import choose_steering

    from mlx_refusal import validate

    if alpha is not None and alpha_multiple is not None:
        raise UserError("--alpha and --alpha-multiple were both given; give only one of them")
    validate.finite("--alpha", alpha, positive=True)
    validate.finite("--alpha-multiple", alpha_multiple, positive=True, limit=validate.MAX_ALPHA_MULTIPLE)
    if voice == "explain" and tensor_parallel:
        # the sharded save rewrites one steering term from the source; the voice adds a second
        raise UserError("--voice explain cannot be combined with --tensor-parallel; drop one of them")
    _preflight(model_spec, harmful, harmless, out, force, what="steer", layer=layer,
               directions_file=directions_file, system=system)
    t0 = time.perf_counter()
    _seed(seed)
    streamed = _streamed_folder(model_spec, directions_file, max_memory)
    if streamed is not None:
        folder = streamed[0]
        from mlx_refusal.stream_edit import Steering

        if layer is None or (alpha is None and alpha_multiple is None):
            raise UserError("a streamed steer needs --layer and --alpha or --alpha-multiple "
                            "(choosing them runs the model)")
        d = _given_directions(directions_file, None)
        out = out or Path("runs") / folder.name / "steer"
        direction = np.asarray(d.direction(layer), np.float32)
        a = float(alpha) if alpha is not None else float(alpha_multiple) * float(d.mean_norm[layer])
        record = {"edit": "steer", "layer": layer, "alpha": a, "alpha_multiple": a / float(d.mean_norm[layer]),
                  "alpha_how": "given", "select": None, "scale": None, "seed": seed, "positions": positions,
                  "system": system, "model": d.metadata.get("model"), "prompts": d.metadata.get("prompts"),
                  "direction_sha256": d.sha256(layer), "metrics": None}
        return _stream(streamed, out, Steering(layer, direction, a), record, force, save_dtype)
    model, tok, info = _load_model(model_spec, tensor_parallel)
    out = out or _default_out(info.spec, "steer")
    validate.layer("--layer", layer, info.num_layers)
    d, run = _directions_for(model, tok, info, harmful, harmless, "train", positions, system, batch_size, no_cache,
                             directions_file)
    hval, lval = _prompt_sets(harmful, harmless, "val")
    voice_rows = None
    if voice == "explain":
        _, ltrain = _prompt_sets(harmful, harmless, "train")
        voice_rows = response_direction(model, tok, ltrain.texts[:VOICE_PROMPTS], system=system, batch_size=batch_size)

    trials_seen = []

    def on_trial(t):
        trials_seen.append(t)
        from tqdm import tqdm

        tqdm.write(f"  layer {t.layer:3d}  alpha {t.alpha:8.3f} ({t.multiple:.3f} x norm)  "
                   f"{'' if t.harmful_refusal_rate is None else 'confirm '}refused "
                   f"{100 * t.refusal_rate:5.1f}%  coherent {100 * t.coherence_rate:5.1f}%  explained "
                   f"{100 * t.explained_rate:5.1f}%  | {t.example[:60]!r}",
                   file=sys.stderr)

    n_candidates = len(candidate_layers(d.num_layers))
    need_scores = layer is None and select == "evaluate"
    with progress_bar("score layers", n_candidates if need_scores else 0, unit="layer") as update:
        choice = choose_steering(model, tok, d, hval.texts, lval.texts, layer=layer, alpha=alpha,
                                 multiple=alpha_multiple, select=select, candidates=candidates, target=target,
                                 calibration_prompts=calibration_prompts, margin=margin, batch_size=batch_size,
                                 system=system, on_layers=update, on_trial=on_trial,
                                 voice=VoiceTarget() if voice == "explain" else None, voice_rows=voice_rows,
                                 voice_multiple=voice_multiple, cache_key=None if no_cache else info.fingerprint)
    if choice.layer_evals:
        rows = [[e.layer, e.induce] for e in sorted(choice.layer_evals, key=lambda e: -e.induce)[:8]]
        click.echo(table(["layer", "induce score"], rows, title="Layers by induce score (validation, harmless)"))
    if choice.trials:
        rows = [[t.layer, t.multiple, t.alpha, f"{100 * t.refusal_rate:.1f}%",
                 "-" if t.harmful_refusal_rate is None else f"{100 * t.harmful_refusal_rate:.1f}%",
                 f"{100 * t.coherence_rate:.1f}%", f"{100 * t.explained_rate:.1f}%", round(t.variety, 3),
                 round(t.mean_distinct3, 3)] for t in choice.trials]
        click.echo(table(["layer", "x norm", "alpha", "harmless refused", "harmful refused", "coherent", "explained",
                          "variety", "distinct-3"],
                         rows, title="Alpha sweep (validation prompts; '-' = harmless only)"))
    click.secho(f"steering at layer {choice.layer} with alpha {choice.alpha:.3f} "
                f"({choice.multiple:.3f} x the mean residual norm, {choice.how})"
                + "".join(f" + {t.name} at layer {t.layer} ({t.multiple:.3f} x norm)" for t in choice.extra), bold=True)
    if not choice.voice_met:
        click.secho(f"note: no calibrated alpha explained >= {VoiceTarget().explained:.0%} of the refusals with "
                    f"variety >= {VoiceTarget().variety}; kept the one that explained most", fg="yellow", err=True)

    hset, lset = _prompt_sets(harmful, harmless, "test")
    hset, lset = _spread(hset, eval_limit), _spread(lset, eval_limit)
    do_eval = eval_limit != 0
    before = base_lp = None
    if do_eval:
        base_lp = first_token_logprobs(model, tok, lset.texts, batch_size, system)
        before = _evaluate_pair(model, tok, hset, lset, max_tokens, gen_batch_size, system, desc="eval before",
                                cache_key=None if no_cache else info.fingerprint)

    direction = np.asarray(d.directions[choice.layer], np.float32)
    terms = [SteeringTerm("refusal", choice.layer, direction, choice.alpha, choice.multiple), *choice.extra]
    site = add_steering_bias(model, choice.layer, terms[0].vector)
    for term in terms[1:]:
        add_steering_bias(model, term.layer, term.vector)  # a shared site: the vectors add
    from mlx_refusal.memo import array_sha256

    after_key = None if no_cache else {
        "weights": info.fingerprint,
        "bias": [{"layer": t.layer, "vector": array_sha256(np.asarray(t.vector, np.float32))} for t in terms]}
    after = _evaluate_pair(model, tok, hset, lset, max_tokens, gen_batch_size, system, base_lp, "eval after",
                           cache_key=after_key) if do_eval else None

    record = {
        "edit": "steer", "layer": choice.layer, "site": site, "alpha": choice.alpha,
        "alpha_multiple": choice.multiple, "alpha_how": choice.how, "select": select, "scale": None,
        "voice": voice, "seed": seed, "positions": positions, "system": system,
        "model": d.metadata.get("model"), "prompts": d.metadata.get("prompts"),
        "direction_sha256": d.sha256(choice.layer),
        "metrics": None if after is None else {
            "harmful_refusal": after.harmful.refusal_rate, "harmless_refusal": after.harmless.refusal_rate,
            "harmless_coherence": after.harmless.coherence_rate, "harmful_coherence": after.harmful.coherence_rate,
            "harmless_explained": after.harmless.explained_rate, "harmless_variety": after.harmless.variety,
            "before": {"harmful_refusal": before.harmful.refusal_rate,
                       "harmless_refusal": before.harmless.refusal_rate,
                       "harmless_explained": before.harmless.explained_rate,
                       "harmless_variety": before.harmless.variety}},
    }
    if after is not None:
        # A fixed rule, not a choice: the first harmless test prompts of the report.
        record["examples_rule"] = f"The first {EXAMPLES} harmless test prompts"
        record["examples"] = [{"prompt": r.prompt, "answer": r.answer}
                              for r in after.records if r.set == "harmless"][:EXAMPLES]
    from mlx_refusal import distributed

    record["distributed"] = distributed.describe(model)
    if not _is_writer():
        return
    click.echo(f"saving {out} ...", err=True)
    if distributed.is_tensor_parallel(model):
        # this rank holds a slice: the same edit is rewritten from the source, shard by shard
        from mlx_refusal.stream_edit import Steering, stream_edit

        stream_edit(info.path, out, Steering(choice.layer, direction, choice.alpha), record, force, dtype=save_dtype)
    else:
        save_model(model, info.path, out, record, steering=terms, force=force, dtype=save_dtype)
    report_dir = out / "report"
    if choice.trials:
        plot_sweep(choice.trials, _ensure(report_dir) / "alpha_sweep.png", target)
    if after is not None:
        _write_reports(report_dir, before, after, {"choice": {
            "layer": choice.layer, "alpha": choice.alpha, "multiple": choice.multiple, "how": choice.how,
            "voice": voice, "voice_met": choice.voice_met,
            "candidates": choice.candidates,
            "trials": [t.__dict__ for t in choice.trials],
            "layer_evals": [e.__dict__ for e in choice.layer_evals]}})
        click.echo(_before_after(before, after))
    click.secho(f"\nwrote {out} in {time.perf_counter() - t0:.0f} s; try: mlx_lm.generate --model {out} "
                f"--prompt 'What is the capital of France?'", fg="green")



def _layer_without_running(d, per_layer: bool, layer: int | None, select: str) -> tuple[bool, int | None]:
    """(decided, layer whose direction is used; None = each layer's own) when the choice needs no
    model run: --per-layer, --layer or --select heuristic. (False, None) for --select evaluate."""
    from mlx_refusal.select import candidate_layers, rank_heuristic

    if per_layer:
        return True, None
    if layer is not None:
        return True, layer
    if select == "heuristic":
        allowed = set(candidate_layers(d.num_layers))
        return True, next(s.layer for s in rank_heuristic(d) if s.layer in allowed)
    return False, None


def _orthogonal_edit(kind, model_spec, harmful, harmless, layer, select, scale, layers_text, per_layer,
                     norm_preserve, positions, system, batch_size, no_cache, out, force, seed, eval_limit, max_tokens,
                     gen_batch_size, max_kl, save_dtype, directions_file=None, tensor_parallel=False,
                     max_memory=None, search_trials=0, search_prompts=32):
    """ablate and project: the same edit with scale 1 or the given scale; ablate --search: the
    edit shape found by mlx_refusal.search."""
    import time

    from mlx_refusal.console import progress_bar, table
    from mlx_refusal.edit import ablate
    from mlx_refusal.evaluate import first_token_logprobs
    from mlx_refusal.save import save_model
    from mlx_refusal.select import candidate_layers, evaluate_layers, rank_evaluated

    from mlx_refusal import validate

    validate.finite("--scale", scale, limit=validate.MAX_SCALE)
    if search_trials and (layer is not None or per_layer or layers_text or norm_preserve or max_memory
                          or tensor_parallel):
        raise UserError("--search chooses the direction, the layers' weights, the projection and norm preservation "
                        "itself, in memory; drop --layer/--per-layer/--layers/--norm-preserve/--max-memory/"
                        "--tensor-parallel")
    _preflight(model_spec, harmful, harmless, out, force, what=kind, layer=layer, layers_text=layers_text,
               directions_file=directions_file, system=system)
    t0 = time.perf_counter()
    _seed(seed)
    streamed = _streamed_folder(model_spec, directions_file, max_memory)
    if streamed is not None:
        folder = streamed[0]
        from mlx_refusal.stream_edit import Projection

        d = _given_directions(directions_file, None)
        out = out or Path("runs") / folder.name / kind
        writer_layers = validate.layer_range(layers_text, int(_model_config(folder)["num_hidden_layers"]))
        decided, chosen = _layer_without_running(d, per_layer, layer, select)
        if not decided:
            raise UserError("a streamed edit needs --layer, --per-layer or --select heuristic "
                            "(--select evaluate runs the model)")
        record = {"edit": kind, "layer": chosen, "per_layer": per_layer, "site": "residual writers", "alpha": None,
                  "scale": scale, "norm_preserve": norm_preserve, "writer_layers": writer_layers, "select": select,
                  "seed": seed, "positions": positions, "system": system, "model": d.metadata.get("model"),
                  "prompts": d.metadata.get("prompts"), "direction_sha256": d.sha256(None if per_layer else chosen),
                  "summary": None, "metrics": None}
        edit = Projection(d.directions if per_layer else d.direction(chosen), scale,
                          None if writer_layers is None else tuple(writer_layers), norm_preserve)
        return _stream(streamed, out, edit, record, force, save_dtype)
    model, tok, info = _load_model(model_spec, tensor_parallel)
    out = out or _default_out(info.spec, kind)
    validate.layer("--layer", layer, info.num_layers)
    writer_layers = validate.layer_range(layers_text, info.num_layers)
    d, run = _directions_for(model, tok, info, harmful, harmless, "train", positions, system, batch_size, no_cache,
                             directions_file)

    evals, found = [], None
    if search_trials:
        found = _search(model, tok, info, d, harmful, harmless, search_trials, search_prompts, max_tokens,
                        gen_batch_size, system, seed, max_kl)
        decided, chosen = True, None  # the direction is the chosen shape's (recorded under "search")
    else:
        decided, chosen = _layer_without_running(d, per_layer, layer, select)
    if not decided:
        hval, lval = _prompt_sets(harmful, harmless, "val")
        layers = candidate_layers(d.num_layers)
        with progress_bar("score layers", len(layers), unit="layer") as update:
            evals = evaluate_layers(model, tok, d, hval.texts[:32], lval.texts[:32], layers, ("bypass", "kl"),
                                    batch_size, max_kl=max_kl, system=system, progress=update)
        ranked = rank_evaluated(evals, "bypass")
        rows = [[e.layer, e.bypass, e.kl, "yes" if e.kept else "no"] for e in sorted(evals, key=lambda e: e.bypass)[:8]]
        click.echo(table(["layer", "bypass score", "KL", "kept"], rows,
                         title="Layers by bypass score (validation; lower refuses less)"))
        if not ranked:
            raise UserError(f"every candidate layer's ablation moved the harmless first-token KL above {max_kl}; "
                            "pass --layer to choose one anyway, or raise --max-kl")
        chosen = ranked[0].layer
    if found is None:
        directions = d.directions if per_layer else d.direction(chosen)
        what = "each layer's own direction" if per_layer else f"the direction of layer {chosen}"
        click.secho(f"{kind}: scale {scale:g} along {what}, writers of "
                    f"{'all layers' if writer_layers is None else f'layers {writer_layers}'}", bold=True)

    hset, lset = _prompt_sets(harmful, harmless, "test")
    hset, lset = _spread(hset, eval_limit), _spread(lset, eval_limit)
    before = base_lp = None
    perplexity = {}
    if eval_limit != 0:
        base_lp = first_token_logprobs(model, tok, lset.texts, batch_size, system)
        before = _evaluate_pair(model, tok, hset, lset, max_tokens, gen_batch_size, system, desc="eval before",
                                cache_key=None if no_cache else info.fingerprint)
        perplexity["base"] = _capability(model, tok)
    if found is None:
        summary = ablate(model, directions, layers=writer_layers, scale=scale, norm_preserve=norm_preserve)
    else:
        from mlx_refusal.search import apply_shape

        summary = apply_shape(model, d, found.chosen.shape)
    after = None
    if eval_limit != 0:
        after = _evaluate_pair(model, tok, hset, lset, max_tokens, gen_batch_size, system, base_lp, "eval after")
        perplexity["edited"] = _capability(model, tok)
    record = {
        "edit": kind, "layer": chosen, "per_layer": per_layer, "site": "residual writers", "alpha": None,
        "scale": scale, "norm_preserve": norm_preserve, "writer_layers": writer_layers, "select": select,
        "seed": seed, "positions": positions, "system": system, "model": d.metadata.get("model"),
        "prompts": d.metadata.get("prompts"), "direction_sha256": d.sha256(None if per_layer else chosen),
        "summary": summary.as_record(),
        "metrics": None if after is None else {
            "harmful_refusal": after.harmful.refusal_rate, "harmless_refusal": after.harmless.refusal_rate,
            "kl_mean": after.kl_mean, "harmful_degenerate": after.harmful.degenerate_rate,
            "perplexity": perplexity, "before": {"harmful_refusal": before.harmful.refusal_rate,
                                                 "harmless_refusal": before.harmless.refusal_rate}},
    }
    if found is not None:
        record.update(layer=found.chosen.shape.direction_index, norm_preserve=found.chosen.shape.norm_preserve,
                      select="search", search=found.as_record())
    from mlx_refusal import distributed

    record["distributed"] = distributed.describe(model)
    if not _is_writer():
        return
    click.echo(f"saving {out} ...", err=True)
    if distributed.is_tensor_parallel(model):
        # this rank holds a slice: the same edit is rewritten from the source, shard by shard
        from mlx_refusal.stream_edit import Projection, stream_edit

        stream_edit(info.path, out, Projection(directions, scale, None if writer_layers is None else
                                               tuple(writer_layers), norm_preserve), record, force, dtype=save_dtype)
    else:
        save_model(model, info.path, out, record, force=force, dtype=save_dtype)
    if found is not None:
        from mlx_refusal.search import plot_front

        plot = plot_front(found, _ensure(out / "report") / "search_pareto.png", max_kl)
        click.echo(f"wrote {plot}")
    if after is not None:
        _write_reports(out / "report", before, after, {"layer_evals": [e.__dict__ for e in evals],
                                                       "perplexity": perplexity})
        click.echo(_before_after(before, after))
        click.echo(f"perplexity on {len(_capability_texts())} plain paragraphs (prompts/capability.txt): "
                   f"base {perplexity['base']:.3f}, edited {perplexity['edited']:.3f}")
    click.secho(f"\nwrote {out} in {time.perf_counter() - t0:.0f} s", fg="green")


def _orthogonal_options(f):
    for opt in reversed([
        model_option, harmful_option, harmless_option,
        click.option("--layer", default=None, type=int,
                     help="Use the direction of this layer (default: chosen by --select)."),
        click.option("--select", type=click.Choice(["evaluate", "heuristic"]), default="evaluate", show_default=True,
                     help="How the direction's layer is chosen: 'evaluate' = Arditi et al.'s bypass score (refusal "
                          "left on harmful prompts with the direction ablated; KL <= --max-kl on harmless, last 20% of "
                          "layers dropped), 'heuristic' = FailSpy's."),
        click.option("--layers", "layers_text", default=None,
                     help="Edit only the writers of these layers, e.g. 4:20 or 3,5,7 (default: all, and the embedding)."),
        click.option("--max-kl", default=0.2, show_default=True, type=click.FloatRange(0.0),
                     help="With --select evaluate, drop layers whose ablation moves the first-token KL on harmless "
                          "validation prompts above this (with --search: the bound of the chosen trial's KL). Arditi et al. use 0.1; on Qwen2.5-0.5B every layer whose "
                          "ablation removes refusal costs 0.12-0.25, so the default is the 0.2 the evaluation accepts."),
        click.option("--per-layer", is_flag=True, help="Each layer's writers use that layer's own direction."),
        click.option("--norm-preserve", is_flag=True,
                     help="Rescale every written vector back to its original norm after the projection."),
        positions_option, system_option, batch_option, cache_option, directions_file_option, edit_out_option,
        force_option, seed_option, eval_limit_option, edit_max_tokens_option, gen_batch_option, save_dtype_option,
        tensor_parallel_option, max_memory_option,
    ]):
        f = opt(f)
    return f


def _capability_texts():
    from mlx_refusal.prompts import capability_texts

    return capability_texts()


def _capability(model, tok) -> float:
    from mlx_refusal.evaluate import perplexity

    return perplexity(model, tok, _capability_texts())


def _search(model, tok, info, d, harmful, harmless, n_trials, n_prompts, max_tokens, batch_size, system, seed, max_kl):
    """ablate --search: the study on the validation split, its Pareto front and the choice, printed."""
    from mlx_refusal import memo
    from mlx_refusal.console import progress_bar, table
    from mlx_refusal.search import search, study_path

    hval, lval = (_spread(s, n_prompts) for s in _prompt_sets(harmful, harmless, "val"))
    storage, name = study_path({"weights": info.fingerprint, "directions": d.sha256(), "harmful": list(hval.texts),
                                "harmless": list(lval.texts), "max_tokens": max_tokens, "system": system,
                                "seed": seed})
    with progress_bar("search", n_trials, unit="trial") as update:
        seen = {"done": 0}

        def progress(done, _total):
            update(done - seen["done"])
            seen["done"] = done

        result = search(model, tok, d, hval.texts, lval.texts, n_trials, storage, name, max_kl, max_tokens,
                        batch_size, system, seed, progress)
    rows = [[t.number, f"{100 * t.refusal:.1f}%", f"{100 * t.degenerate:.1f}%", f"{t.kl:.4f}",
             f"{t.shape.direction_index:.2f}", t.shape.projection, "yes" if t.shape.norm_preserve else "no",
             f"{t.shape.kernel.attn_peak:.2f}@{t.shape.kernel.attn_position:.1f}±{t.shape.kernel.attn_width:.1f}",
             f"{t.shape.kernel.mlp_peak:.2f}@{t.shape.kernel.mlp_position:.1f}±{t.shape.kernel.mlp_width:.1f}",
             "*" if t is result.chosen else ""] for t in result.front]
    click.echo(table(["trial", "refused", "degenerate", "KL", "direction", "projection", "norm kept",
                      "attn peak@pos±width", "mlp peak@pos±width", "chosen"], rows,
                     title=f"Pareto front of {len(result.trials)} trials ({len(hval)} harmful, {len(lval)} harmless "
                           f"validation prompts, {max_tokens} tokens; {result.new_trials} new in "
                           f"{result.seconds:.0f} s; study {storage})"))
    click.secho(f"chosen: {result.reason}", bold=True)
    return result


@main.command()
@_orthogonal_options
@click.option("--search", "search_trials", default=0, show_default=True, type=click.IntRange(0),
              help="Search N edit shapes (direction site, attention/MLP layer kernels, projection, norm "
                   "preservation) with optuna TPE on the validation split, minimising harmful refusals and "
                   "harmless KL; the Pareto trial with the fewest refusals at KL <= --max-kl is applied. "
                   "Resumable: the study is kept in the cache. 0: the quick single-direction ablation.")
@click.option("--search-prompts", default=32, show_default=True, type=click.IntRange(2),
              help="Validation prompts per set that each search trial judges.")
def ablate(model_spec, harmful, harmless, layer, select, max_kl, layers_text, per_layer, norm_preserve, positions,
           system, batch_size, no_cache, directions_file, out, force, seed, eval_limit, max_tokens, gen_batch_size,
           save_dtype, tensor_parallel, max_memory, search_trials, search_prompts):
    """Abliterate: project the refusal direction out of every matrix that writes to the residual
    stream (embedding, attention output, MLP down projection), so the model stops refusing."""
    _orthogonal_edit("ablate", model_spec, harmful, harmless, layer, select, 1.0, layers_text, per_layer,
                     norm_preserve, positions, system, batch_size, no_cache, out, force, seed, eval_limit, max_tokens,
                     gen_batch_size, max_kl, save_dtype, directions_file, tensor_parallel, max_memory,
                     search_trials, search_prompts)


@main.command()
@_orthogonal_options
@click.option("--scale", required=True, type=float,
              help="Signed scale s in W <- W - s d d^T W: 1 ablates, 2 flips the sign of the direction, "
                   "-4 amplifies it 5x, 0 changes nothing.")
def project(model_spec, harmful, harmless, layer, select, max_kl, layers_text, per_layer, norm_preserve, positions,
            system, batch_size, no_cache, directions_file, out, force, seed, eval_limit, max_tokens, gen_batch_size,
            save_dtype, tensor_parallel, max_memory, scale):
    """Signed projection along the refusal direction, for study: the "flip the sign" (--scale 2)
    and "x5" (--scale -4) experiments."""
    _orthogonal_edit("project", model_spec, harmful, harmless, layer, select, scale, layers_text, per_layer,
                     norm_preserve, positions, system, batch_size, no_cache, out, force, seed, eval_limit, max_tokens,
                     gen_batch_size, max_kl, save_dtype, directions_file, tensor_parallel, max_memory)


def _ensure(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    main()

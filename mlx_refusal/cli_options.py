"""The command line's options, declared once and shared by the commands in cli.py."""
from __future__ import annotations

from pathlib import Path

import click

from .loading import DEFAULT_PRESET as DEFAULT_MODEL


def default_out(spec: str, what: str) -> Path:
    """--out when not given: runs/<model name>/<command>."""
    name = Path(str(spec).rstrip("/")).name.replace(".gguf", "") or "model"
    return Path("runs") / name / what


def _all(*options):
    def apply(f):
        for o in reversed(options):
            f = o(f)
        return f

    return apply


_model = click.option("--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
                      help="Model: a preset name, a local mlx_lm folder, a .gguf file, or a Hugging Face repo id.")
# Stored on the click context like --direction-method: cli._load and the pre-load checks read it
# (chat_template_file), so every command that loads a model takes it with --model (and export-onnx,
# whose bundle carries it).
_chat_template = click.option(
    "--chat-template", type=click.Path(path_type=Path, dir_okay=False), default=None, metavar="FILE",
    expose_value=False, callback=lambda ctx, _param, value: ctx.meta.__setitem__("chat_template", value),
    help="A Jinja chat template file to render prompts with instead of the model's own (needed for a model "
         "without one). An edit (steer, ablate, project) saves it into the edited folder, so stock mlx_lm "
         "renders with it too; export-onnx puts it into the bundle, for the page.")
model = _all(_model, _chat_template)


def chat_template_file() -> Path | None:
    """The running command's --chat-template FILE, if given."""
    return click.get_current_context().meta.get("chat_template")
harmful = click.option("--harmful", default="harmful", show_default=True,
                       help="Harmful prompts: 'harmful' (bundled set) or a .txt/.json/.jsonl/.csv file.")
harmless = click.option("--harmless", default="harmless", show_default=True,
                        help="Harmless prompts: 'harmless' (bundled set) or a .txt/.json/.jsonl/.csv file.")
_positions = click.option(
    "--positions", type=click.Choice(["last", "post-instruction"]), default="last", show_default=True,
    help="Token positions to read: the last prompt token, or every token the chat template puts "
         "after the user's text (averaged).")
# Stored on the click context (every command that captures reads it in cli._directions).
_direction_method = click.option(
    "--direction-method", type=click.Choice(["auto", "means", "filtered", "contrast"]), default="auto",
    show_default=True, expose_value=False, is_eager=False,
    callback=lambda ctx, _param, value: ctx.meta.__setitem__("direction_method", value),
    help="How the refusal direction is found. means: mean harmful minus mean harmless activation. filtered: the "
         "same over the harmful prompts the model refuses and the harmless ones it answers. contrast: the same "
         "prompts answered as a refusal minus as compliance (prefilled), read at the answer tokens; works when "
         "the model seldom refuses. auto: means if the model's first answer token refuses at least 20% of the "
         "harmful prompts, else contrast.")
positions = _all(_positions, _direction_method)
system = click.option("--system", default=None, help="System prompt to render prompts with (default: the template's own).")
batch = click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 512),
                     help="Prompts per forward pass.")
GEN_BATCH = 256
GEN_BATCH_WHY = (" (the default takes the bundled test split, 138 prompts, in one batch: larger batches give more "
                 "tokens/s, and the longest answers of each batch decode on alone, so fewer batches also mean fewer "
                 "such tails).")
gen_batch = click.option("--batch-size", default=GEN_BATCH, show_default=True, type=click.IntRange(1, 512),
                         help="Prompts generated together" + GEN_BATCH_WHY)
cache = click.option("--no-cache", is_flag=True, help="Recompute activations instead of reusing the on-disk cache.")
directions_file = click.option(
    "--directions", "directions_file", type=click.Path(path_type=Path), default=None,
    help="A directions.safetensors (or its folder) written by `directions` for this same model, used "
         "instead of capturing the training prompts again.")
tensor_parallel = click.option(
    "--tensor-parallel", is_flag=True,
    help="Under mlx.launch: split every block across the ranks with mlx_lm's shard(), for a model bigger "
         "than one host. Without it each rank holds the whole model and takes its share of the prompts.")
max_memory = click.option(
    "--max-memory", default=None, metavar="SIZE",
    help="Memory the edit may use, e.g. 1GB. If the in-memory edit needs more, the model's safetensors "
         "files are rewritten a few tensors at a time from --directions (bit-identical result, no "
         "before/after report). Without it this happens, given --directions, when the model does not fit "
         "in free memory.")
scale_out = _all(max_memory, tensor_parallel)


def _edit_outputs(max_tokens: int, why: str = ""):
    return _all(
        click.option("--out", type=click.Path(path_type=Path), default=None,
                     help="Output model folder [default: runs/<model>/<command>]."),
        click.option("--force", is_flag=True, help="Replace --out if it already exists."),
        click.option("--eval-limit", default=None, type=click.IntRange(0),
                     help="Prompts per set for the before/after report (default: the whole test split; 0 skips the "
                          "report)."),
        click.option("--max-tokens", default=max_tokens, show_default=True, type=click.IntRange(1, 4096),
                     help="New tokens per answer in the before/after report" + why + "."),
        click.option("--gen-batch-size", default=GEN_BATCH, show_default=True, type=click.IntRange(1, 512),
                     help="Prompts generated together in the before/after report" + GEN_BATCH_WHY),
        click.option("--save-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16",
                     show_default=True, help="Dtype of the saved weights (the edit itself is computed in float32 on "
                                             "the CPU); bfloat16 halves the folder against float32."),
    )


edit_outputs = _edit_outputs(64)
# An edit that removes refusal can leave late ones ("Sure. ... However, I can't provide ..."):
# ablate and project judge longer answers than steer, whose refusals open the answer.
long_edit_outputs = _edit_outputs(128, " (long enough to catch refusals that come after a compliant start)")

steer_options = _all(
    click.option("--layer", default=None, type=int,
                 help="Steer at resid_pre of this layer (default: chosen by --select and alpha calibration)."),
    click.option("--alpha", default=None, type=float, help="Absolute steering strength (skips calibration)."),
    click.option("--alpha-multiple", default=None, type=float,
                 help="Steering strength as a multiple of the mean residual norm at the layer (skips calibration)."),
    click.option("--select", type=click.Choice(["evaluate", "heuristic"]), default="evaluate", show_default=True,
                 help="How candidate layers are ranked before calibration: 'evaluate' = Arditi et al.'s induce "
                      "score (first-token refusal log-odds with the direction added), 'heuristic' = FailSpy's."),
    click.option("--candidates", default=3, show_default=True, type=click.IntRange(1, 64),
                 help="Top-ranked layers at which alpha is calibrated; the best calibrated one is kept."),
    click.option("--target", default=0.95, show_default=True, type=click.FloatRange(0.0, 1.0),
                 help="Fraction of harmless validation prompts that must be refused, coherently."),
    click.option("--margin", default=0.1, show_default=True, type=click.FloatRange(0.0, 2.0),
                 help="After calibration, confirm alpha this fraction above the smallest passing one and keep it "
                      "if it still passes: the smallest passing alpha sits on the edge of --target by construction."),
    click.option("--calibration-prompts", default=32, show_default=True, type=click.IntRange(4),
                 help="Harmless validation prompts generated per calibration trial."),
    click.option("--voice", type=click.Choice(["terse", "explain"]), default="terse", show_default=True,
                 help="'terse': the refusal direction alone (\"I'm sorry, but I can't assist with that.\"). "
                      "'explain': a response direction (explaining minus terse refusals) is added alongside, and "
                      "candidates are compared on how many refusals name the request and give a reason. The "
                      "default stays terse: on the default model 'explain' does not reach its targets (README)."),
    click.option("--voice-multiple", default=0.2, show_default=True, type=click.FloatRange(0.0, 4.0),
                 help="With --voice explain: the voice term's strength as a multiple of the mean residual norm."),
)

orthogonal_options = _all(
    model, harmful, harmless,
    click.option("--layer", default=None, type=int, help="Use the direction of this layer (default: chosen by --select)."),
    click.option("--select", type=click.Choice(["evaluate", "heuristic"]), default="evaluate", show_default=True,
                 help="How the direction's layer is chosen: 'evaluate' = Arditi et al.'s bypass score (refusal "
                      "left on harmful prompts with the direction ablated; KL <= --max-kl on harmless, last 20% of "
                      "layers dropped), 'heuristic' = FailSpy's."),
    click.option("--layers", "layers_text", default=None,
                 help="Edit only the writers of these layers, e.g. 4:20 or 3,5,7 (default: all, and the embedding)."),
    click.option("--max-kl", default=0.2, show_default=True, type=click.FloatRange(0.0),
                 help="With --select evaluate, drop layers whose ablation moves the first-token KL on harmless "
                      "validation prompts above this (with --search: the bound of the chosen trial's KL). Arditi "
                      "et al. use 0.1; on Qwen2.5-0.5B every layer whose ablation removes refusal costs 0.12-0.25, "
                      "so the default is the 0.2 the evaluation accepts."),
    click.option("--per-layer", is_flag=True, help="Each layer's writers use that layer's own direction."),
    click.option("--norm-preserve", is_flag=True,
                 help="Rescale every written vector back to its original norm after the projection."),
    positions, system, batch, cache, directions_file, long_edit_outputs, scale_out,
)

search = _all(
    click.option("--search", "search_trials", default=0, show_default=True, type=click.IntRange(0),
                 help="Search N edit shapes (direction site, attention/MLP layer kernels, projection, norm "
                      "preservation) with optuna TPE on the validation split, minimising harmful refusals and "
                      "harmless KL; the Pareto trial with the fewest refusals at KL <= --max-kl is applied. "
                      "Resumable: the study is kept in the cache. 0: the quick single-direction ablation."),
    click.option("--search-prompts", default=32, show_default=True, type=click.IntRange(2),
                 help="Validation prompts per set that each search trial judges."),
)

export_options = _all(
    click.option("--model", "model_spec", default=DEFAULT_MODEL, show_default=True,
                 help="The model folder to export (an edited folder from steer/ablate/project, or a preset)."),
    click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
                 help="Folder to write the transformers.js bundle (config, tokenizer, onnx/*.onnx) to."),
    click.option("--dtype", "dtypes", default="int8", show_default=True,
                 help="Comma-separated subset of int8 (int8 weights and compute: the page's fast default), "
                      "fp32, q4 (4-bit MatMulNBits, for WebGPU), q8 (onnxruntime's dynamic int8, float embedding)."),
    click.option("--layer", type=int, default=None,
                 help="Layer whose resid_pre the graph also outputs (default: the steered layer, else the middle)."),
    click.option("--force", is_flag=True, help="Replace an existing export in --out."),
    click.option("--with-page", is_flag=True, help="Also copy the web page (export/) into --out, ready for any static host."),
    click.option("--share-embedding", type=click.Choice(("auto", "always", "never")), default="auto", show_default=True,
                 help="int8, untied models: store ONE int8 matrix for the embedding lookup and the lm_head "
                      "(other dtypes keep both: fp32 stays the folder's model exactly). "
                      "auto: when the two are roundings of one matrix (a GGUF keeps them at different "
                      "precisions): relative RMS difference <= 0.1, every row's cosine >= 0.99, and no single "
                      "direction holding over 10% of the difference; the finer-grained copy is kept, and "
                      "never when the edit steers at layer 0 or ablated the embedding. always: share "
                      "regardless (an edit that made them differ is lost on one side). never: two matrices. "
                      "export.json records the choice and the measured difference."),
    _chat_template,
)

eval_options = _all(
    model,
    click.option("--base", "base_spec", default=None,
                 help="Unedited model to compare with: adds first-token KL(base || model) on harmless prompts."),
    harmful,
    harmless,
    click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test", show_default=True,
                 help="Which split of the prompt sets to evaluate on."),
    click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(1, 4096),
                 help="New tokens per answer (greedy)."),
    click.option("--limit", default=None, type=click.IntRange(1), help="At most N prompts per set (evenly spread)."),
    system,
    gen_batch,
    click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the full report as JSON."),
    click.option("--markdown", "md_out", type=click.Path(path_type=Path), default=None,
                 help="Write the report (tables and every answer) as Markdown."),
    click.option("--examples", default=3, show_default=True, help="Answers per set to print."),
    tensor_parallel,
)

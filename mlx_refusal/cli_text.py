"""What the command line prints: tables and lines built from the API's results (no logic here
decides anything; it only formats)."""
from __future__ import annotations

import sys

import click

from .console import table


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def model_info(info, seconds: float) -> str:
    quant = info.quantization
    rows = [
        ("model", info.spec), ("path", str(info.path)), ("architecture", info.model_type),
        ("layers", str(info.num_layers)), ("hidden size", str(info.hidden_size)),
        ("parameters", f"{info.num_params / 1e6:,.1f}M ({info.num_params:,})"),
        ("dtype", f"{info.dtype} on disk, computing in {info.compute_dtype}"),
        ("quantization", f"{quant.get('bits')}-bit, group size {quant.get('group_size')}" if quant else "none"),
        ("device", info.device), ("fast BLAS", info.blas), ("fingerprint", info.fingerprint),
        ("chat template", f"yes ({len(info.chat_template or '')} chars"
                          + (f", from {info.template_override.file})" if info.template_override else ")")),
        ("loaded in", f"{seconds:.1f} s"),
    ]
    from .backend import stock_env

    env = stock_env()
    if env:  # Linux: stock mlx_lm loads MLX's reference BLAS unless given this one
        prefix = " ".join(f'{k}="{v}"' for k, v in env.items())
        rows.append(("stock mlx_lm", f"{prefix} mlx_lm.generate --model {info.path}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def direction_notes(d) -> list[tuple[str, str | None]]:
    """(line, colour) about how the directions were found: the prompts, the base refusal rate,
    the method, and a warning where the method is a poor fit."""
    from .workflow import WEAK_REFUSAL

    p, m = d.metadata["prompts"], d.metadata["method"]
    rate = m["base_refusal_rate"]
    lines = [(f"using {p['harmful']['n']} harmful prompts ({p['harmful']['name']}) and {p['harmless']['n']} "
              f"harmless prompts ({p['harmless']['name']})", None),
             (f"base model refuses {rate['harmful']:.0%} of harmful and {rate['harmless']:.0%} of harmless prompts "
              f"(first-token log-odds); direction method: {m['used']}"
              + (f" (kept {m['kept']['harmful']} harmful, {m['kept']['harmless']} harmless)" if "kept" in m else ""),
              None)]
    if rate["harmful"] < WEAK_REFUSAL and m["used"] == "means":
        lines.append(("warning: the model seldom refuses, so harmful minus harmless is mostly a 'harmful topic' "
                      "direction; --direction-method contrast finds refusal itself", "yellow"))
    elif rate["harmful"] < WEAK_REFUSAL and m["asked"] == "auto":
        lines.append(("note: the model seldom refuses; using the contrast method (prefilled refusal vs compliance)",
                      "yellow"))
    if d.degenerate:
        why = (" (with --positions last, row 0 is the embedding of the same template token in every prompt)"
               if d.degenerate == [0] else "")
        lines.append((f"note: the directions at rows {d.degenerate} are zero or not finite{why}; "
                      "they are never selected", "yellow"))
    return lines


def ranking(d, auc, top: int) -> str:
    from .select import rank_heuristic

    rows = [[r.layer, r.heuristic, r.diff_norm, r.relative_diff] + ([auc[r.layer]] if auc is not None else [])
            for r in rank_heuristic(d)[:top]]
    return table(["layer", "heuristic", "|diff|", "|diff|/norm"] + (["AUROC (val)"] if auc is not None else []),
                 rows, title="Top layers (FailSpy heuristic)")


def evaluation(report, spec, base_spec, examples: int) -> str:
    rows = [[key, s.n, pct(s.refusal_rate), pct(s.coherence_rate), pct(s.explained_rate), round(s.variety, 3),
             round(s.mean_distinct3, 3)] for key, s in (("harmful", report.harmful), ("harmless", report.harmless))]
    out = [table(["set", "prompts", "refused", "coherent", "explained", "variety", "distinct-3"], rows,
                 title=f"Evaluation of {spec}"), ""]
    rows = [[key, cat, c.n, pct(c.refusal_rate), pct(c.coherence_rate)]
            for key, s in (("harmful", report.harmful), ("harmless", report.harmless)) for cat, c in s.categories.items()]
    out.append(table(["set", "category", "prompts", "refused", "coherent"], rows, title="By category"))
    if report.kl_mean is not None:
        out.append(f"\nfirst-token KL(base || model) on harmless prompts: mean {report.kl_mean:.4f}, "
                   f"max {report.kl_max:.4f} nats (base: {base_spec})")
    for key in ("harmful", "harmless"):
        recs = [r for r in report.records if r.set == key][:examples]
        if recs:
            out.append(click.style(f"\n{key} examples", bold=True))
        for r in recs:
            out.append(f"  > {r.prompt[:100]}\n    [{'refused' if r.refused else 'answered'}] "
                       f"{' '.join(r.answer.split())[:200]}")
    return "\n".join(out)


def before_after(before, after, ppl: dict | None = None, examples: int = 3) -> str:
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
    if ppl:
        rows.append(["perplexity (prompts/capability.txt)", f"{ppl['base']:.3f}", f"{ppl['edited']:.3f}"])
    lines = [table(["metric", "before", "after"], rows,
                   title=f"Before / after on the test split ({before.harmful.n} harmful, {before.harmless.n} harmless)")]
    for key in ("harmful", "harmless"):
        for b, a in [(b, a) for b, a in zip(before.records, after.records) if b.set == key][:examples]:
            lines.append(click.style(f"\n[{key}] {b.prompt[:100]}", bold=True))
            lines.append(f"  before: {' '.join(b.answer.split())[:160]}")
            lines.append(f"  after:  {' '.join(a.answer.split())[:160]}")
    return "\n".join(lines)


def print_trial(t) -> None:
    """One calibration trial, as it finishes (above the progress bar)."""
    from tqdm import tqdm

    tqdm.write(f"  layer {t.layer:3d}  alpha {t.alpha:8.3f} ({t.multiple:.3f} x norm)  "
               f"{'' if t.harmful_refusal_rate is None else 'confirm '}refused "
               f"{100 * t.refusal_rate:5.1f}%  coherent {100 * t.coherence_rate:5.1f}%  explained "
               f"{100 * t.explained_rate:5.1f}%  | {t.example[:60]!r}", file=sys.stderr)


def print_choice(choice) -> None:
    """The layer scores, the alpha sweep and the steering chosen."""
    from .select import VoiceTarget

    if choice.layer_evals:
        rows = [[e.layer, e.induce] for e in sorted(choice.layer_evals, key=lambda e: -e.induce)[:8]]
        click.echo(table(["layer", "induce score"], rows, title="Layers by induce score (validation, harmless)"))
    if choice.trials:
        rows = [[t.layer, t.multiple, t.alpha, pct(t.refusal_rate),
                 "-" if t.harmful_refusal_rate is None else pct(t.harmful_refusal_rate), pct(t.coherence_rate),
                 pct(t.explained_rate), round(t.variety, 3), round(t.mean_distinct3, 3)] for t in choice.trials]
        click.echo(table(["layer", "x norm", "alpha", "harmless refused", "harmful refused", "coherent", "explained",
                          "variety", "distinct-3"], rows, title="Alpha sweep (validation prompts; '-' = harmless only)"))
    click.secho(f"steering at layer {choice.layer} with alpha {choice.alpha:.3f} "
                f"({choice.multiple:.3f} x the mean residual norm, {choice.how})"
                + "".join(f" + {t.name} at layer {t.layer} ({t.multiple:.3f} x norm)" for t in choice.extra), bold=True)
    if not choice.voice_met:
        click.secho(f"note: no calibrated alpha explained >= {VoiceTarget().explained:.0%} of the refusals with "
                    f"variety >= {VoiceTarget().variety}; kept the one that explained most", fg="yellow", err=True)


def print_projection(edit, scale: float, writers, per_layer: bool) -> None:
    """How an ablate/project edit chose its direction (layer scores, search front), and the edit."""
    if edit.layer_evals:
        click.echo(layer_evals(edit.layer_evals))
    if edit.search:
        click.echo(search_front(edit.search))
        return
    what = "each layer's own direction" if per_layer else f"the direction of layer {edit.record['layer']}"
    click.secho(f"{edit.kind}: scale {scale:g} along {what}, writers of "
                f"{'all layers' if writers is None else f'layers {writers}'}", bold=True)


def layer_evals(evals) -> str:
    # KL is measured in bypass order until a layer is kept (select.ablation_layers): "-" after it
    rows = [[e.layer, e.bypass, "-" if e.kl is None else e.kl, "yes" if e.kept else "no"]
            for e in sorted(evals, key=lambda e: e.bypass)[:8]]
    return table(["layer", "bypass score", "KL", "kept"], rows,
                 title="Layers by bypass score (validation; lower refuses less; KL measured until one is kept)")


def search_front(result) -> str:
    """The Pareto front of an ablate --search, and which trial was chosen and why."""
    rows = [[t.number, pct(t.refusal), pct(t.degenerate), f"{t.kl:.4f}", f"{t.shape.direction_index:.2f}",
             t.shape.projection, "yes" if t.shape.norm_preserve else "no",
             f"{t.shape.kernel.attn_peak:.2f}@{t.shape.kernel.attn_position:.1f}±{t.shape.kernel.attn_width:.1f}",
             f"{t.shape.kernel.mlp_peak:.2f}@{t.shape.kernel.mlp_position:.1f}±{t.shape.kernel.mlp_width:.1f}",
             "*" if t is result.chosen else ""] for t in result.front]
    front = table(["trial", "refused", "degenerate", "KL", "direction", "projection", "norm kept",
                   "attn peak@pos±width", "mlp peak@pos±width", "chosen"], rows,
                  title=f"Pareto front of {len(result.trials)} trials ({result.new_trials} new in "
                        f"{result.seconds:.0f} s; study {result.storage})")
    if result.confirmed:
        rows = [[c.number, pct(next(t.refusal for t in result.front if t.number == c.number)), pct(c.held_out_refusal),
                 pct(c.refusal), f"{c.kl:.4f}", "*" if c.number == result.chosen.number else ""]
                for c in result.confirmed]
        front += "\n" + table(["trial", "refused (search)", "refused (held out)", "refused (all)", "KL (all)", "chosen"],
                              rows, title="The best of the front, judged again on held-out validation prompts")
    return front + "\n" + click.style(f"chosen: {result.reason}", bold=True)

"""Probe steering configurations for the RefusaLLM's voice (issue #11): runtime-equivalent edits
(vectors added at resid_pre of a layer through the intervention hooks), greedy, batched.

    python bench/voice_probe.py '[[["refusal",14,0.5]], [["refusal",12,0.6],["explain",10,0.3]]]' \
        --n 20 --tokens 96

Each configuration is a list of terms [direction, layer, multiple of the mean residual norm].
Directions: "refusal" (harmful minus harmless means), "explain" / "explain_named" (an explaining
refusal minus the terse one, over the response tokens), "explain-vs-comply" (the explaining refusal
minus a compliant opening: a refusal direction in the explaining voice), "lecture" (the model's own
explaining refusals: the harmful train prompts whose unedited answer is judged a named, reasoned
refusal, minus the harmless train mean, at the last prompt token), "persona", "eos".
"refusal@12-15" spreads one term over layers 12..15, each at the given multiple.
Prints one JSON line per configuration: refused / explained / coherent / variety / named / reason.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlx_refusal.evaluation import generate  # noqa: E402
from mlx_refusal.interventions import adding_at  # noqa: E402
from mlx_refusal.judge import coherence, is_refusal, variety, voice  # noqa: E402
from mlx_refusal.loading import load  # noqa: E402
from mlx_refusal.prompts import bundled  # noqa: E402
from mlx_refusal.voice import PERSONA, persona_direction, response_direction  # noqa: E402
from mlx_refusal.workflow import COMPLIANCE_PREFILL, compute_directions  # noqa: E402


def score(prompts, answers):
    refused = [is_refusal(a) for a in answers]
    coh = [coherence(a).coherent for a in answers]
    v = [voice(p, a, r, c) for p, a, r, c in zip(prompts, answers, refused, coh)]
    n = len(answers)
    return {"refused": sum(refused) / n, "explained": sum(x.explained for x in v) / n,
            "coherent": sum(coh) / n, "variety": variety(answers),
            "named": sum(x.names_request for x in v) / n, "reason": sum(bool(x.safety_reason) for x in v) / n}


def eos_direction(model, tok):
    """Rows [sites, hidden] all equal to the direction that lowers every end-of-turn logit most:
    -(unembedding row * final norm weight), summed over the eos ids."""
    import mlx.core as mx

    from mlx_refusal import arch
    from mlx_refusal.evaluation import eos_token_ids

    eye = mx.array(sorted(eos_token_ids(tok)))
    rows = mx.take(arch.decoder(model).embed_tokens.weight, eye, axis=0).astype(mx.float32) \
        if not hasattr(model, "lm_head") else mx.take(model.lm_head.weight, eye, axis=0).astype(mx.float32)
    g = arch.decoder(model).norm.weight.astype(mx.float32)
    v = -np.array((rows * g).sum(axis=0))
    v /= np.linalg.norm(v)
    return np.tile(v, (arch.num_layers(model) + 1, 1)).astype(np.float32)


def lecture_direction(model, tok, info, harmful, harmless):
    """mean(last-token residual | the unedited answer lectures) - mean(harmless): [sites, hidden]
    unit rows, and how many of `harmful` lectured. A lecture: refused, names the request, gives a
    safety reason, in the first 40 tokens (coherence and length are not asked for there)."""
    from mlx_refusal.capture import capture_residuals
    from mlx_refusal.directions import diff_in_means
    from mlx_refusal.evaluation import generate_cached

    answers, _ = generate_cached(model, tok, harmful, max_tokens=40, batch_size=64, system=None, progress=None,
                                 cache_key={"weights": info.fingerprint})
    def lectures(prompt, answer):
        refused = is_refusal(answer)
        v = voice(prompt, answer, refused, True)
        return refused and v.names_request and bool(v.safety_reason)

    picked = [p for p, a in zip(harmful, answers) if lectures(p, a)]
    if not picked:
        raise SystemExit("no harmful train prompt got a lecturing answer")
    rows, _ = diff_in_means(capture_residuals(model, tok, picked).mean, capture_residuals(model, tok, harmless).mean)
    return rows.astype(np.float32), len(picked)


def spread(name: str) -> tuple[str, list[int] | None]:
    """"refusal@12-15" -> ("refusal", [12, 13, 14, 15]); a plain name -> (name, None)."""
    if "@" not in name:
        return name, None
    base, span = name.split("@")
    lo, hi = (int(x) for x in span.split("-"))
    return base, list(range(lo, hi + 1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("configs")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--split", default="val")
    ap.add_argument("--harmful", type=int, default=0, help="also generate this many harmful prompts")
    ap.add_argument("--show", type=int, default=3)
    ap.add_argument("--system", default=None, help="'persona' for the SafetyBot system prompt")
    args = ap.parse_args()
    model, tok, info = load("qwen2.5-coder-0.5b")
    hset, lset = bundled("harmful", "train"), bundled("harmless", "train")
    d, _ = compute_directions(model, tok, info, hset, lset)
    dirs = {"refusal": d.directions}
    norms = d.mean_norm
    prompts = bundled("harmless", args.split).texts[: args.n]
    harmful = bundled("harmful", args.split).texts[: args.harmful]
    for cfg in json.loads(args.configs):
        t0 = time.perf_counter()
        with ExitStack() as stack:
            for term, layer, mult in cfg:
                name, layers = spread(term)
                if name not in dirs:
                    if name == "eos":
                        dirs[name] = eos_direction(model, tok)
                    elif name == "persona":
                        dirs[name] = persona_direction(model, tok, lset.texts[:48])
                    elif name == "lecture":
                        dirs[name], n = lecture_direction(model, tok, info, hset.texts, lset.texts)
                        print(json.dumps({"lecture_prompts": n, "of": len(hset.texts)}), flush=True)
                    elif name == "explain-vs-comply":
                        dirs[name] = response_direction(model, tok, lset.texts[:48], "explain",
                                                        against=COMPLIANCE_PREFILL)
                    else:
                        dirs[name] = response_direction(model, tok, lset.texts[:48], name)
                for lay in layers or [layer]:
                    vec = float(mult * norms[lay]) * np.asarray(dirs[name][lay], np.float32)
                    stack.enter_context(adding_at(model, lay, vec))
            answers = generate(model, tok, prompts + harmful, max_tokens=args.tokens, batch_size=64,
                               system=PERSONA if args.system == "persona" else args.system)
        out = score(prompts, answers[: len(prompts)])
        if harmful:
            out["harmful_refused"] = sum(map(is_refusal, answers[len(prompts):])) / len(harmful)
        out = {"config": cfg, **{k: round(v, 3) for k, v in out.items()}, "s": round(time.perf_counter() - t0)}
        out["examples"] = [" ".join(a.split())[:200] for a in answers[: args.show]]
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()

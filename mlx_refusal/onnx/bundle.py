"""`export_onnx`: an mlx_lm folder (plain or edited) -> a folder transformers.js / onnxruntime-web load.

    WEBDIR/
      config.json              HF-style config (the source family's model_type and HF architecture)
      generation_config.json
      tokenizer.json
      tokenizer_config.json    with the chat template (--chat-template's, else the edit's, else the folder's)
      onnx/model_int8.onnx     int8 weights AND int8 compute (MatMulInteger) everywhere, the embedding
                               included (tied models, and untied ones whose embedding and head are
                               two roundings of one matrix: one int8 matrix for the lookup and the head);
                               the page's default: onnxruntime-web's wasm build has fast int8 kernels
      onnx/model.onnx          float32 (+ model.onnx_data when over 2 GB)
      onnx/model_q4.onnx       4-bit MatMulNBits linears, float32 embedding: small, but the wasm
                               build dequantizes every 4-bit weight per call; fast on WebGPU only
      onnx/model_quantized.onnx  int8 dynamic quantization of the MatMuls (onnxruntime's tool),
                               float32 embedding
      onnx/steerable*.onnx     steered models: the same graphs with a `steering_scale` input (the
                               page's slider); the model*.onnx files have it fixed at 1, so stock
                               transformers.js runs them. Each pair shares one `model*.onnx_data`.
      refusal_edit.json        copied from an edited model
      steering.json            layer, site, alpha and the direction as a list (steered models)
      export.json              what was exported: files and sizes, layer, I/O names, provenance

The folder is written beside the target and renamed into place when complete.
"""
from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .. import __version__, families, validate
from ..atomic import atomic_directory, check_replaceable
from ..errors import UserError
from ..loading import weight_fingerprint
from ..record import TOOL, array_sha256, copy_record, utc_now
from ..serve import copy_page
from .files import check_onnx
from .graph import OPSET, STEERING_INPUT, GraphOptions, activations_name, write_decoder, write_fixed_twin
from .quantize import Q4_ACCURACY_LEVEL, Q4_BLOCK_SIZE, quantize_q4, quantize_q8
from .share import EmbeddingSharing, check_mode, decide_sharing
from .source import SourceModel, read_model

# transformers.js's file names for its dtypes (int8 -> "_int8", q8 -> "_quantized", q4 -> "_q4")
DTYPE_FILES = {"int8": "onnx/model_int8.onnx", "fp32": "onnx/model.onnx", "q4": "onnx/model_q4.onnx",
               "q8": "onnx/model_quantized.onnx"}
DTYPES = tuple(DTYPE_FILES)
EXPORT_RECORD = "export.json"
STEERING_RECORD = "steering.json"



@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, int] = field(default_factory=dict)  # path relative to out_dir -> bytes
    activations_layer: int = 0
    steered: bool = False
    model_type: str = ""


def parse_dtypes(dtypes: str | Iterable[str]) -> tuple[str, ...]:
    items = [d.strip() for d in (dtypes.split(",") if isinstance(dtypes, str) else dtypes) if d.strip()]
    bad = [d for d in items if d not in DTYPES]
    if bad or not items:
        raise UserError(f"unknown dtype {', '.join(bad) or '(none)'}; use a comma-separated subset of {','.join(DTYPES)}")
    return tuple(d for d in DTYPES if d in items)


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    dtypes: str | Iterable[str] = DTYPES,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
    *,
    layer: int | None = None,
    steering_input: str = "required",
    page_dir: str | Path | None = None,
    all_logits: bool = False,
    chat_template: str | None = None,
    share_embedding: str = "auto",
) -> ExportResult:
    """Export the mlx_lm model folder `model_dir` to `out_dir` (see the module docstring).

    layer: the layer whose resid_pre is the extra output `activations.layer{L}`; default the steered
      layer of a steered model, else the edit's layer, else the middle layer.
    steering_input: "required" (default; onnxruntime-web can only feed inputs it lists, and it does
      not list initializer-backed ones) or "optional" (an initializer default of 1.0 that
      onnxruntime's Python/C API may override).
    page_dir: copy this folder's static files (not node_modules) into the bundle too.
    all_logits: logits at every position (scoring); by default only the last position's, which is
      all generation reads and spares the prompt pass the lm_head over every prompt token.
    chat_template: the template text tokenizer_config.json carries (the page renders with it), in
      place of the folder's own; `api.export_onnx` checks it and finds an edit's recorded one.
    share_embedding: "auto", "always" or "never": whether an untied model's int8 graph stores one
      int8 matrix for the embedding lookup and the lm_head when they are two roundings of one
      (share.py). The other dtypes keep the folder's two matrices: fp32 stays its model exactly.
    """
    say = progress or (lambda _msg: None)
    dtypes = parse_dtypes(dtypes)
    check_mode(share_embedding)
    out_dir = Path(out_dir).absolute()
    check_replaceable(out_dir, force, _is_export, "an ONNX export")
    page = Path(page_dir) if page_dir is not None else None
    if page is not None and not page.is_dir():
        raise UserError(f"page folder {page} does not exist; build the page in export/ or drop --with-page")

    say(f"reading {model_dir}")
    src = read_model(model_dir)
    spec = src.spec
    act_layer = _activations_layer(src, layer)
    model_type = web_model_type(src)
    _check_tokenizer(src.path)  # before minutes of graph building, not after

    with atomic_directory(out_dir, force, _is_export, "an ONNX export", note=say) as tmp:
        (tmp / "onnx").mkdir()
        external: dict[str, int] = {}
        steered = src.steering is not None
        base = GraphOptions(activations_layer=act_layer, steering=src.steering, steering_input=steering_input,
                            logits="all" if all_logits else "last")

        def finish(dtype: str, written: list[Path]) -> None:
            path = tmp / DTYPE_FILES[dtype]
            if len(written) > 1:
                external[path.name] = 1
            if steered:
                write_fixed_twin(path, tmp / steerable_file(DTYPE_FILES[dtype]))
            check_onnx(path)

        # the int8-compute graphs first: built from the float32 weights, which the quantizers below do not need
        sharing = None
        if "int8" in dtypes:
            sharing = decide_sharing(src, share_embedding)
            say(f"int8 embedding and lm_head: {_sharing_note(sharing)}")
            say(f"building and writing {DTYPE_FILES['int8']} (int8 weights and compute, {spec.num_layers} layers)")
            int8 = replace(base, weights="int8", shared_embedding=sharing.matrix)
            finish("int8", write_decoder(spec, src.weights, int8, tmp / DTYPE_FILES["int8"],
                                         external=True if steered else None))
        fp32_path = tmp / DTYPE_FILES["fp32"]
        if "fp32" in dtypes:
            say(f"building and writing {DTYPE_FILES['fp32']} ({spec.num_layers} layers, activations at layer {act_layer})")
            finish("fp32", write_decoder(spec, src.weights, base, fp32_path, external=True if steered else None))

        quant = [d for d in dtypes if d in ("q4", "q8")]
        scratch = tmp / ".quant_source"
        if quant:
            # The quantizers need the lm_head as a MatMul with its own weight, and the slider input.
            if spec.tied_embeddings or "fp32" not in dtypes or steered:
                say("building the float32 source for quantization")
                scratch.mkdir()
                quant_src = scratch / "model.onnx"
                write_decoder(spec, src.weights, replace(base, tied_lm_head="separate"), quant_src, external=True)
            else:
                quant_src = fp32_path
            src.weights.clear()  # from here on only the ONNX files are needed
            gc.collect()
            quantizers = {"q4": (quantize_q4, f"4 bits (MatMulNBits, block {Q4_BLOCK_SIZE})"),
                          "q8": (quantize_q8, "8 bits (dynamic, MatMul only)")}
            for name in quant:
                quantize, how = quantizers[name]
                say(f"quantizing to {how} -> {DTYPE_FILES[name]}")
                finish(name, quantize(quant_src, tmp / DTYPE_FILES[name], external=True if steered else None))
            shutil.rmtree(scratch, ignore_errors=True)

        say("writing config, tokenizer and provenance")
        (tmp / "config.json").write_text(json.dumps(hf_config(src, model_type, external), indent=2) + "\n")
        _write_tokenizer(src.path, tmp, chat_template)
        _write_generation_config(src, tmp)
        if src.edit is not None:
            copy_record(src.path, tmp)
        if src.steering is not None:
            (tmp / STEERING_RECORD).write_text(json.dumps(steering_record(src, act_layer), indent=1) + "\n")
        if page is not None:
            say(f"copying the page from {page}")
            copy_page(tmp, page_dir=page, node_modules=page / "node_modules")

        files = {
            p.relative_to(tmp).as_posix(): p.stat().st_size
            for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        record = export_record(src, model_type, act_layer, dtypes, files, steering_input, all_logits, sharing)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        files[EXPORT_RECORD] = (tmp / EXPORT_RECORD).stat().st_size
        say(f"moving into place: {out_dir}")
    return ExportResult(out_dir=out_dir, files=files, activations_layer=act_layer,
                        steered=src.steering is not None, model_type=model_type)


# ---------------------------------------------------------------------------------------------

def steerable_file(standard: str) -> str:
    """The page's slider graph beside a standard file: onnx/model_int8.onnx -> onnx/steerable_int8.onnx.
    Not named model*.onnx, so no transformers.js dtype lookup ever picks it."""
    folder, _, name = standard.rpartition("/")
    return f"{folder}/steerable{name[len('model'):]}"


def _sharing_note(sharing: EmbeddingSharing) -> str:
    if sharing.rel_rms_difference is None:
        return sharing.reason
    how = f"one matrix ({sharing.matrix})" if sharing.shared else "two matrices"
    return f"{how}: {sharing.reason} (relative RMS difference {sharing.rel_rms_difference:.3g})"


def _is_export(folder: Path) -> bool:
    return (folder / EXPORT_RECORD).exists()


def _activations_layer(src: SourceModel, layer: int | None) -> int:
    n = src.spec.num_layers
    if layer is None:
        if src.steering is not None:
            return src.steering.layer
        edit_layer = src.edit.layer if src.edit is not None else None
        return edit_layer if isinstance(edit_layer, int) and 0 <= edit_layer <= n else n // 2
    validate.layer("--layer", layer, n, final_residual=True)
    return layer


def web_model_type(src: SourceModel) -> str:
    """The model_type transformers.js should see. A steered Qwen2 is saved for mlx_lm as `llama` with
    attention_bias; the graph carries every bias itself, so the page gets the source family back."""
    source_type = src.edit.source_model_type if src.edit is not None else None
    return source_type if source_type in families.SUPPORTED else src.spec.model_type


def hf_config(src: SourceModel, model_type: str, external: dict[str, int]) -> dict:
    spec, cfg = src.spec, src.config
    out = {
        "architectures": [families.get(model_type).hf_architecture(model_type)],
        "model_type": model_type,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "rms_norm_eps": spec.rms_norm_eps,
        "vocab_size": spec.vocab_size,
        "tie_word_embeddings": spec.tied_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    for key in ("rope_theta", "rope_scaling", "max_position_embeddings", "bos_token_id", "eos_token_id",
                "sliding_window", "use_sliding_window"):
        if key in cfg:
            out[key] = cfg[key]
    if external:
        out["transformers.js_config"] = {"use_external_data_format": dict(sorted(external.items()))}
    return out


def _check_tokenizer(model_dir: Path) -> None:
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir} has no tokenizer.json, which the browser tokenizer needs; "
                        "re-save the model with a fast tokenizer (mlx_lm.convert or `cli.py import-gguf`)")


def _write_tokenizer(model_dir: Path, out: Path, chat_template: str | None = None) -> None:
    shutil.copyfile(model_dir / "tokenizer.json", out / "tokenizer.json")
    tc_path = model_dir / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text()) if tc_path.is_file() else {"tokenizer_class": "PreTrainedTokenizerFast"}
    if chat_template is not None:
        # transformers.js reads the template from tokenizer_config.json alone
        tc["chat_template"] = chat_template
    elif not tc.get("chat_template"):
        # newer HF folders keep the template beside the config
        if (model_dir / "chat_template.jinja").is_file():
            tc["chat_template"] = (model_dir / "chat_template.jinja").read_text()
        elif (model_dir / "chat_template.json").is_file():
            tc["chat_template"] = json.loads((model_dir / "chat_template.json").read_text()).get("chat_template")
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def _write_generation_config(src: SourceModel, out: Path) -> None:
    f = src.path / "generation_config.json"
    if f.is_file():
        shutil.copyfile(f, out / "generation_config.json")
        return
    gen = {k: src.config[k] for k in ("bos_token_id", "eos_token_id") if src.config.get(k) is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def steering_record(src: SourceModel, act_layer: int) -> dict:
    st = src.steering
    return {
        "layer": st.layer,
        "site": st.site,
        "alpha": st.alpha,
        "hidden_size": src.spec.hidden_size,
        "input": STEERING_INPUT,
        "activations_output": activations_name(act_layer),
        "vector_norm": float(np.linalg.norm(st.vector)),
        "direction_sha256": array_sha256(st.direction),
        "direction": [float(x) for x in st.direction],
    }


def export_record(src: SourceModel, model_type: str, act_layer: int, dtypes, files: dict, steering_input: str,
                  all_logits: bool = False, sharing: EmbeddingSharing | None = None) -> dict:
    spec = src.spec
    inputs = ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(spec.num_layers) for kv in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kv}" for i in range(spec.num_layers) for kv in ("key", "value")]
    outputs.append(activations_name(act_layer))
    steering = None
    if src.steering is not None:
        steering = {"input": STEERING_INPUT, "required": steering_input == "required", "default": 1.0,
                    "layer": src.steering.layer, "site": src.steering.site, "alpha": src.steering.alpha,
                    "terms": [{"name": t.name, "layer": t.layer, "site": t.site, "alpha": t.alpha}
                              for t in src.steering.terms],
                    # the slider graphs (inputs + steering_scale); the dtypes' own files have it fixed at 1
                    "files": {d: steerable_file(DTYPE_FILES[d]) for d in dtypes}}
    return {
        "tool": TOOL,
        "tool_version": __version__,
        "date": utc_now(),
        "source": {"path": str(src.path.resolve()), "model_type": spec.model_type,
                   "weights_sha256": weight_fingerprint(src.path)},
        "edit": src.edit.kind if src.edit is not None else None,
        "model_type": model_type,
        "num_layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "layer": act_layer,
        "activations_output": activations_name(act_layer),
        "steering": steering,
        "opset": OPSET,
        "dtypes": {d: DTYPE_FILES[d] for d in dtypes},
        "logits": "every position" if all_logits else "last position only",
        "quantization": {
            **({"int8": {"tool": "mlx-refusal", "weights": "int8, symmetric, one scale per output channel",
                         "compute": "DynamicQuantizeLinear (uint8 activations) + MatMulInteger",
                         "embedding": "int8 per token" + (", shared with the lm_head" if sharing.shared else ""),
                         # the decision and the measured difference between the folder's two copies
                         "shared_embedding": sharing.record()}}
               if "int8" in dtypes else {}),
            **({"q4": {"tool": "onnxruntime MatMulNBitsQuantizer", "bits": 4, "block_size": Q4_BLOCK_SIZE,
                       "symmetric": False, "accuracy_level": Q4_ACCURACY_LEVEL,
                       "embedding": "float32 Gather (not quantized)"}} if "q4" in dtypes else {}),
            **({"q8": {"tool": "onnxruntime quantize_dynamic", "op_types": ["MatMul"], "weight_type": "int8",
                       "embedding": "float32 Gather (not quantized)"}} if "q8" in dtypes else {}),
        },
        "inputs": inputs,
        "outputs": outputs,
        "files": files,
    }

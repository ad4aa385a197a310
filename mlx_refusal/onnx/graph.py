"""The decoder as an ONNX graph, written op by op with `onnx.helper` from MLX weights.

Inputs and outputs follow transformers.js's names for decoder-only models with a KV cache:

    input_ids          int64 [batch, seq]
    attention_mask     int64 [batch, past + seq]      (0 = padding; left padding supported)
    position_ids       int64 [batch, seq]
    past_key_values.{i}.key|value  float [batch, kv_heads, past, head_dim]
    steering_scale     float []  (steered models' slider graphs only; 1 = as edited, 0 = original model;
                                  `fixed_steering` makes it a constant for stock clients)
  ->
    logits             float [batch, seq, vocab]          (or [batch, 1, vocab]: GraphOptions.logits)
    present.{i}.key|value          float [batch, kv_heads, past + seq, head_dim]
    activations.layer{L}           float [batch, seq, hidden]  (resid_pre of layer L; L = num_layers
                                                                 is the final residual, before the norm)

A steered model's vector sits where the edit put it (every embedding row for layer 0, else the
bias of block L-1's down_proj, or its o_proj in older folders): the graph stores that parameter
without the vector and adds steering_scale * vector at the same place, so 0 is exactly the
original model and 1 exactly the edited one.

Only standard ONNX ops (opset 18), so onnxruntime-web's wasm build runs every node.
The computation mirrors mlx_lm's Llama-style modules: pre-norm blocks, rotate-half RoPE,
grouped-query attention, a gated MLP, residual adds; the family (`spec.graph`, a
`families.GraphNeeds`) says which norm and gate activation, whether q/k heads are normed, and
which projections carry biases.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .. import validate
from ..errors import UserError
from .files import GRAPH_MARGIN, PROTOBUF_LIMIT, external_data_name
from .source import EMBEDDING_SITE, DecoderSpec, Steering

OPSET = 18
IR_VERSION = 10
STEERING_INPUT = "steering_scale"
# A finite "minus infinity" for masked scores: a row with every key masked (a left-pad query)
# then softmaxes to a uniform row instead of NaN.
MASK_MIN = float(np.finfo(np.float32).min)


def activations_name(layer: int) -> str:
    return f"activations.layer{layer}"


@dataclass(frozen=True)
class GraphOptions:
    activations_layer: int  # resid_pre of this layer is an extra output
    steering: Steering | None = None
    # "optional": steering_scale is an initializer that callers may override (ORT Python/C API);
    # "required": a plain graph input (onnxruntime-web can only feed names it lists as inputs).
    steering_input: str = "required"
    # A tied lm_head either shares the embedding through Gemm(transB=1) ("shared", smallest file)
    # or gets its own transposed copy as a MatMul weight ("separate"), which is what onnxruntime's
    # quantizers recognise.
    tied_lm_head: str = "shared"
    # "float32", or "int8": every projection, the lm_head and the embedding stored as per-channel
    # symmetric int8 and computed with MatMulInteger on dynamically quantized activations (the
    # kernels onnxruntime-web's wasm build has fast SIMD code for). A tied model keeps ONE int8
    # matrix for both the embedding lookup and the head.
    weights: str = "float32"
    # An untied int8 graph's one matrix for both the embedding lookup and the head: "lm_head.weight"
    # or "model.embed_tokens.weight" when the two are roundings of one matrix (share.py), or None
    # for a matrix each. float32 graphs ignore it: they stay the folder's model exactly.
    shared_embedding: str | None = None
    # "all": logits at every position; "last": only the last one ([batch, 1, vocab]), so a prompt
    # pass does not run the 150k-row head over every prompt token (what generation needs).
    logits: str = "all"


class _ExternalData:
    """Tensors streamed into one data file while the graph is built, so a 2.5 GB model never sits in
    memory as protobuf bytes (which would cost three copies). Large tensors start on 64 KiB
    boundaries, which lets onnxruntime map them from the file instead of copying."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        align = 65536 if array.nbytes >= 2**20 else 64
        pad = (-self.offset) % align
        self.file.write(b"\0" * pad)
        self.offset += pad
        self.file.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self.offset), ("length", array.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        self.offset += array.nbytes
        return t

    def close(self):
        self.file.close()


class _Builder:
    """Accumulates nodes and initializers; every op returns the name of its (first) output."""

    def __init__(self, external: _ExternalData | None = None):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.external = external
        self._consts: dict[tuple, str] = {}
        self._count = 0

    def weight(self, name: str, array: np.ndarray) -> str:
        # np.ascontiguousarray would turn a 0-d scalar into shape [1]; copy only what needs it
        array = np.asarray(array)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        if self.external is not None and array.nbytes >= 1024:
            self.initializers.append(self.external.add(name, array))
        else:
            self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        """A small shared constant (shapes, axes, scalars)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.weight(f"const.{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int | list[str] = 1, **attrs):
        self._count += 1
        base = name or f"{op_type.lower()}.{self._count}"
        out = outputs if isinstance(outputs, list) else [f"{base}.out{i}" if outputs > 1 else base for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), out, name=f"{base}.node", **attrs))
        return out if len(out) > 1 else out[0]


def transposed(*mats: np.ndarray) -> np.ndarray:
    """[m.T for m in mats] side by side: [in, sum(out)] from mlx's [out, in] Linear weights.
    Copied in row blocks, which is ~4x faster than numpy's strided transpose of a big matrix."""
    k = mats[0].shape[1]
    out = np.empty((k, sum(m.shape[0] for m in mats)), np.float32)
    col = 0
    for m in mats:
        for i in range(0, m.shape[0], 256):
            out[:, col + i:col + min(i + 256, m.shape[0])] = m[i:i + 256].T
        col += m.shape[0]
    return out


def quantize_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one float32 scale per column of w [K, N]: w ~= q * scale."""
    scale = np.abs(w).max(axis=0) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.empty(w.shape, np.int8)
    for i in range(0, w.shape[0], 256):  # in row blocks: no float temporary of the whole matrix
        np.clip(np.rint(w[i:i + 256] / scale), -127, 127, out=q[i:i + 256], casting="unsafe")
    return q, scale


def _nonzero(a: np.ndarray | None) -> bool:
    return a is not None and bool(np.any(a != 0))


def _rms_norm(b: _Builder, x: str, w: np.ndarray, tag: str, eps: float) -> str:
    mean_sq = b.op("ReduceMean", b.op("Mul", x, x), b.const([-1]), keepdims=1, name=f"{tag}.mean_sq")
    inv = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean_sq, b.const(eps, np.float32))), name=f"{tag}.inv_rms")
    return b.op("Mul", b.op("Mul", x, inv), b.weight(f"{tag}.weight", w), name=tag)


def _silu_gate(b: _Builder, gate: str, up: str, tag: str) -> str:
    return b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up, name=f"{tag}.swiglu")


def _gelu_tanh_gate(b: _Builder, gate: str, up: str, tag: str) -> str:
    """gelu(gate) * up with GELU's tanh form, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
    as mlx's gelu_approx computes it (opset 18 has no Gelu op)."""
    cube = b.op("Mul", b.op("Mul", gate, gate), gate, name=f"{tag}.gate_cubed")
    inner = b.op("Add", gate, b.op("Mul", cube, b.const(0.044715, np.float32)), name=f"{tag}.gelu_inner")
    t = b.op("Tanh", b.op("Mul", inner, b.const(float(np.sqrt(2 / np.pi)), np.float32)), name=f"{tag}.gelu_tanh")
    half = b.op("Mul", gate, b.const(0.5, np.float32), name=f"{tag}.gate_half")
    gelu = b.op("Mul", half, b.op("Add", t, b.const(1.0, np.float32)), name=f"{tag}.gelu")
    return b.op("Mul", gelu, up, name=f"{tag}.geglu")


# GraphNeeds.norm / .activation -> the nodes that compute it
_NORMS = {"rms": _rms_norm}
_ACTIVATIONS = {"silu": _silu_gate, "gelu_tanh": _gelu_tanh_gate}


def build_decoder(spec: DecoderSpec, weights: dict[str, np.ndarray], options: GraphOptions,
                  external_data: str | Path | None = None) -> onnx.ModelProto:
    """The whole decoder as one ModelProto. `weights` are mlx parameter names -> float32 arrays
    (Linear weights [out, in], as mlx stores them).

    external_data: stream every tensor of 1 KB or more into this file while building; the returned
    model refers to it by file name, so save the model in the same folder (see `write_decoder`).
    """
    validate.layer("activations layer", options.activations_layer, spec.num_layers, final_residual=True)
    if spec.graph.norm not in _NORMS or spec.graph.activation not in _ACTIVATIONS:
        raise UserError(f"cannot export {spec.model_type} to ONNX: the graph has no {spec.graph.norm!r} norm or "
                        f"{spec.graph.activation!r} activation (it has norms {', '.join(_NORMS)} and activations "
                        f"{', '.join(_ACTIVATIONS)})")
    external = _ExternalData(Path(external_data)) if external_data is not None else None
    try:
        return _build(spec, weights, options, _Builder(external))
    finally:
        if external is not None:
            external.close()


def write_decoder(spec: DecoderSpec, weights: dict[str, np.ndarray], options: GraphOptions, path: str | Path,
                  external: bool | None = None) -> list[Path]:
    """Build and save the decoder at `path`, its tensors in `<name>_data` beside it when the file
    would pass protobuf's 2 GB limit (or when `external` says so). Returns the files written."""
    path = Path(path)
    if external is None:
        external = estimated_bytes(spec, weights, options) + GRAPH_MARGIN > PROTOBUF_LIMIT
    data = path.parent / external_data_name(path) if external else None
    model = build_decoder(spec, weights, options, external_data=data)
    onnx.save_model(model, str(path))
    return [path] + ([data] if data else [])


def write_fixed_twin(steerable_src: Path, steerable_dst: Path, scale: float = 1.0) -> None:
    """Move the slider graph at `steerable_src` to `steerable_dst` and write in its place the same
    graph with steering_scale fixed (a constant, not an input), for clients that feed only the
    standard inputs. Both files refer to the same external data file, which is not touched."""
    model = onnx.load(str(steerable_src), load_external_data=False)
    onnx.save_model(model, str(steerable_dst))
    onnx.save_model(fixed_steering(model, scale), str(steerable_src))


def fixed_steering(model: onnx.ModelProto, scale: float = 1.0) -> onnx.ModelProto:
    """A copy of `model` whose steering_scale is the constant `scale` instead of a graph input."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    g = fixed.graph
    kept = [i for i in g.input if i.name != STEERING_INPUT]
    del g.input[:]
    g.input.extend(kept)
    kept_init = [t for t in g.initializer if t.name != STEERING_INPUT]
    del g.initializer[:]
    g.initializer.extend(kept_init)
    g.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), STEERING_INPUT))
    return fixed


def estimated_bytes(spec: DecoderSpec, weights: dict[str, np.ndarray], options: GraphOptions) -> int:
    total = sum(w.nbytes for w in weights.values())
    if spec.tied_embeddings and options.tied_lm_head == "separate":
        total += weights["model.embed_tokens.weight"].nbytes
    return total


def _build(spec: DecoderSpec, weights: dict[str, np.ndarray], options: GraphOptions, b: _Builder) -> onnx.ModelProto:
    H, nh, nkv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    steer = options.steering
    L = spec.num_layers

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    logits_len = "sequence_length" if options.logits == "all" else 1
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", logits_len, spec.vocab_size])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", nkv, "past_sequence_length", hd]))
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", nkv, "total_sequence_length", hd]))
    outputs.append(helper.make_tensor_value_info(
        activations_name(options.activations_layer), TensorProto.FLOAT, ["batch_size", "sequence_length", H]))

    # --- steering: each edited site holds (original + its terms' vectors); the graph holds
    # original + scale * vectors, one scale for every term
    site_vectors = steer.sites if steer is not None else {}
    scaled: dict[str, str] = {}  # site -> scale * (sum of the vectors stored there)
    if steer is not None:
        inputs.append(helper.make_tensor_value_info(STEERING_INPUT, TensorProto.FLOAT, []))
        if options.steering_input == "optional":
            b.weight(STEERING_INPUT, np.array(1.0, dtype=np.float32))
        elif options.steering_input != "required":
            raise ValueError(f"steering_input must be 'optional' or 'required', not {options.steering_input!r}")
        for i, (site, vector) in enumerate(site_vectors.items()):
            vec = b.weight("steering.vector" if i == 0 else f"steering.vector{i}", vector.astype(np.float32))
            scaled[site] = b.op("Mul", STEERING_INPUT, vec, name="steering.scaled_vector" if i == 0 else f"steering.scaled_vector{i}")
    if options.weights not in ("float32", "int8"):
        raise ValueError(f"weights must be 'float32' or 'int8', not {options.weights!r}")
    if options.logits not in ("all", "last"):
        raise ValueError(f"logits must be 'all' or 'last', not {options.logits!r}")
    int8 = options.weights == "int8"
    if options.shared_embedding not in (None, "lm_head.weight", EMBEDDING_SITE):
        raise ValueError(f"shared_embedding must be None, 'lm_head.weight' or {EMBEDDING_SITE!r}, "
                         f"not {options.shared_embedding!r}")

    def site_value(name: str) -> np.ndarray | None:
        """A parameter with the steering vectors taken out of it (the unedited value)."""
        w = weights.get(name)
        if w is not None and name in site_vectors:
            w = w - site_vectors[name]  # broadcasts over embedding rows
        return w

    # --- positions: shared by every layer
    past_len = b.op("Shape", "past_key_values.0.key", start=2, end=3, name="past_len")
    seq_len = b.op("Shape", "input_ids", start=1, end=2, name="seq_len")
    total_len = b.op("Add", past_len, seq_len, name="total_len")
    scalar = lambda x, n: b.op("Squeeze", x, b.const([0]), name=n)  # noqa: E731
    one = b.const(1)
    q_pos = b.op("Range", scalar(past_len, "past_len.scalar"), scalar(total_len, "total_len.scalar"), one, name="mask.q_pos")
    k_pos = b.op("Range", b.const(0), "total_len.scalar", one, name="mask.k_pos")
    causal = b.op("LessOrEqual", b.op("Unsqueeze", k_pos, b.const([0])), b.op("Unsqueeze", q_pos, b.const([1])),
                  name="mask.causal")  # [S, T]: key j visible from query i iff j <= past + i
    not_pad = b.op("Unsqueeze", b.op("Cast", "attention_mask", to=TensorProto.BOOL), b.const([1, 2, 3]),
                   name="mask.not_pad")  # [B, 1, 1, 1, T]
    allowed = b.op("And", causal, not_pad, name="mask.allowed")  # [B, 1, 1, S, T]
    masks: dict[int | None, str] = {
        None: b.op("Where", allowed, b.const(0.0, np.float32), b.const(MASK_MIN, np.float32), name="mask.bias")}

    def mask_bias(window: int | None) -> str:
        """The additive mask of a layer that sees `window` positions (itself included), or all."""
        if window not in masks:
            # cache indices, not position ids: left padding shifts a row's queries and keys alike
            age = b.op("Sub", b.op("Unsqueeze", q_pos, b.const([1])), b.op("Unsqueeze", k_pos, b.const([0])),
                       name=f"mask.age{window}")  # [S, T]
            seen = b.op("And", allowed, b.op("Less", age, b.const(window)), name=f"mask.window{window}")
            masks[window] = b.op("Where", seen, b.const(0.0, np.float32), b.const(MASK_MIN, np.float32),
                                 name=f"mask.bias.window{window}")
        return masks[window]

    # RoPE (rotate-half): x * cos + concat(x2, x1) * concat(-sin, sin), angles = position * inv_freq
    pos = b.op("Unsqueeze", b.op("Cast", "position_ids", to=TensorProto.FLOAT), b.const([-1]), name="rope.pos")
    tables: dict[bytes, tuple[str, str]] = {}

    def rope_table(inv_freq: np.ndarray) -> tuple[str, str]:
        """(cos, sin) [B, 1, S, hd] of one set of frequencies, built once for every layer using it."""
        key = inv_freq.astype(np.float32).tobytes()
        if key not in tables:
            t = "rope" if not tables else f"rope{len(tables)}"
            angles = b.op("Mul", pos, b.weight(f"{t}.inv_freq", inv_freq.astype(np.float32)), name=f"{t}.angles")
            cos, sin = b.op("Cos", angles, name=f"{t}.cos_half"), b.op("Sin", angles, name=f"{t}.sin_half")
            tables[key] = (b.op("Unsqueeze", b.op("Concat", cos, cos, axis=-1), b.const([1]), name=f"{t}.cos"),
                           b.op("Unsqueeze", b.op("Concat", b.op("Neg", sin), sin, axis=-1), b.const([1]),
                                name=f"{t}.sin"))
        return tables[key]

    rope_table(spec.rope_inv_freq)
    half = b.const([hd // 2, hd // 2])

    def rope(x: str, tag: str, table: tuple[str, str]) -> str:
        x1, x2 = b.op("Split", x, half, axis=-1, outputs=2, name=f"{tag}.split")
        swapped = b.op("Concat", x2, x1, axis=-1, name=f"{tag}.swap")
        return b.op("Add", b.op("Mul", x, table[0]), b.op("Mul", swapped, table[1]), name=f"{tag}.rope")

    def norm(x: str, w: np.ndarray, tag: str, eps: float) -> str:
        return _NORMS[spec.graph.norm](b, x, w, tag, eps)

    def int8_matmul(x: str, q_name: str, scale_name: str, tag: str) -> str:
        """x @ (q * scale) with q int8 [K, N] and one scale per column: x is quantized per call
        (DynamicQuantizeLinear, uint8), multiplied in integers, and the int32 result rescaled;
        the pattern quantize_dynamic writes, which onnxruntime fuses into one kernel."""
        xq, xs, xz = b.op("DynamicQuantizeLinear", x, outputs=3, name=f"{tag}.quant_x")
        acc = b.op("MatMulInteger", xq, q_name, xz, name=f"{tag}.matmul_int")
        scales = b.op("Mul", xs, scale_name, name=f"{tag}.scales")
        return b.op("Mul", b.op("Cast", acc, to=TensorProto.FLOAT, name=f"{tag}.acc"), scales, name=f"{tag}.matmul")

    def int8_weight(w_t: np.ndarray, tag: str) -> tuple[str, str]:
        q, scale = quantize_columns(w_t)
        return b.weight(f"{tag}.weight_T.int8", q), b.weight(f"{tag}.weight_T.scale", scale)

    def linear(x: str, w_t: np.ndarray, bias: np.ndarray | None, tag: str) -> str:
        if int8:
            y = int8_matmul(x, *int8_weight(w_t, tag), tag)
        else:
            y = b.op("MatMul", x, b.weight(f"{tag}.weight_T", w_t), name=f"{tag}.matmul")
        return b.op("Add", y, b.weight(f"{tag}.bias", bias), name=tag) if _nonzero(bias) else y

    def writer(x: str, module: str, layer: int) -> str:
        """A residual-writing projection (o_proj, down_proj), plus the steering term if it is the site."""
        tag = f"model.layers.{layer}.{module}"
        own_bias = site_value(f"{tag}.bias") if module.rpartition(".")[2] in spec.graph.biases else None
        y = linear(x, transposed(site_value(f"{tag}.weight")), own_bias, tag)
        if f"{tag}.bias" in scaled:
            y = b.op("Add", y, scaled[f"{tag}.bias"], name=f"{tag}.steered")
        return y

    # --- embedding
    embed = site_value(EMBEDDING_SITE)
    head_int8 = None  # (int8 [H, V], scale [V]) of the lm_head, when int8
    if int8:
        # int8 with one scale per token, stored transposed ([H, V], the head's layout) and looked up
        # by column; a tied model, or an untied one whose two matrices are roundings of one
        # (options.shared_embedding), stores that matrix once for both the lookup and the head
        tied = spec.tied_embeddings or options.shared_embedding is not None
        if not spec.tied_embeddings and options.shared_embedding == "lm_head.weight":
            embed = weights["lm_head.weight"]
        q, scale = int8_weight(transposed(embed), "lm_head" if tied else "model.embed_tokens")
        if tied:
            head_int8 = (q, scale)
        rows = b.op("Gather", q, "input_ids", axis=1, name="model.embed_tokens.int8")
        rows = b.op("Transpose", rows, perm=[1, 2, 0], name="model.embed_tokens.rows")  # [H, B, S] -> [B, S, H]
        row_scale = b.op("Unsqueeze", b.op("Gather", scale, "input_ids", axis=0), b.const([-1]), name="model.embed_tokens.scale")
        h = b.op("Mul", b.op("Cast", rows, to=TensorProto.FLOAT), row_scale, name="model.embed_tokens")
    else:
        h = b.op("Gather", b.weight(EMBEDDING_SITE, embed), "input_ids", axis=0, name="model.embed_tokens")
    if EMBEDDING_SITE in scaled:
        h = b.op("Add", h, scaled[EMBEDDING_SITE], name="model.embed_tokens.steered")
    if spec.embedding_scale != 1.0:
        h = b.op("Mul", h, b.const(spec.embedding_scale, np.float32), name="model.embed_tokens.scaled")

    q_dim, kv_dim = nh * hd, nkv * hd
    qkv_split = b.const([q_dim, kv_dim, kv_dim])
    for i in range(L):
        p = f"model.layers.{i}"
        if i == options.activations_layer:
            b.op("Identity", h, outputs=[activations_name(i)], name=f"{p}.resid_pre")
        w = lambda n: site_value(f"{p}.{n}")  # noqa: E731
        bias = lambda proj, module: w(f"{module}.{proj}.bias") if proj in spec.graph.biases else None  # noqa: E731

        # attention: one fused q|k|v projection; the softmax scale is folded into q's weights
        # (or into q_norm, whose output q is otherwise scale-free)
        q_scale = 1.0 if spec.graph.qk_norm else spec.attn_scale
        wq, wk, wv = w("self_attn.q_proj.weight") * q_scale, w("self_attn.k_proj.weight"), w("self_attn.v_proj.weight")
        biases = [bias(f"{n}_proj", "self_attn") for n in "qkv"]
        qkv_bias = None
        if any(_nonzero(x) for x in biases):
            qkv_bias = np.concatenate([
                x if x is not None else np.zeros(n, np.float32) for x, n in zip(biases, (q_dim, kv_dim, kv_dim))
            ])
            qkv_bias[:q_dim] *= q_scale
        x = norm(h, w("input_layernorm.weight"), f"{p}.input_layernorm", spec.rms_norm_eps)
        qkv = linear(x, transposed(wq, wk, wv), qkv_bias, f"{p}.self_attn.qkv_proj")
        q, k, v = b.op("Split", qkv, qkv_split, axis=-1, outputs=3, name=f"{p}.self_attn.qkv_split")
        q = b.op("Reshape", q, b.const([0, 0, nh, hd]), name=f"{p}.self_attn.q_heads")
        k = b.op("Reshape", k, b.const([0, 0, nkv, hd]), name=f"{p}.self_attn.k_heads")
        v = b.op("Reshape", v, b.const([0, 0, nkv, hd]), name=f"{p}.self_attn.v_heads")
        if spec.graph.qk_norm:
            q = norm(q, w("self_attn.q_norm.weight") * spec.attn_scale, f"{p}.self_attn.q_norm", spec.rms_norm_eps)
            k = norm(k, w("self_attn.k_norm.weight"), f"{p}.self_attn.k_norm", spec.rms_norm_eps)
        table = rope_table(spec.inv_freq(i))
        q = rope(b.op("Transpose", q, perm=[0, 2, 1, 3]), f"{p}.self_attn.q", table)  # [B, nh, S, hd]
        k = rope(b.op("Transpose", k, perm=[0, 2, 1, 3]), f"{p}.self_attn.k", table)  # [B, nkv, S, hd]
        v = b.op("Transpose", v, perm=[0, 2, 1, 3], name=f"{p}.self_attn.v")
        k_all = b.op("Concat", f"past_key_values.{i}.key", k, axis=2, outputs=[f"present.{i}.key"], name=f"{p}.cache.key")
        v_all = b.op("Concat", f"past_key_values.{i}.value", v, axis=2, outputs=[f"present.{i}.value"],
                     name=f"{p}.cache.value")
        # GQA without repeating K/V: group the query heads by the kv head they share,
        # [B, nkv, nh/nkv, S, hd] @ [B, nkv, 1, hd, T] broadcasts over the group axis.
        q5 = b.op("Reshape", q, b.const([0, nkv, nh // nkv, -1, hd]), name=f"{p}.self_attn.q_groups")
        k5 = b.op("Unsqueeze", b.op("Transpose", k_all, perm=[0, 1, 3, 2]), b.const([2]), name=f"{p}.self_attn.k_t")
        scores = b.op("Add", b.op("MatMul", q5, k5, name=f"{p}.self_attn.qk"), mask_bias(spec.window(i)),
                      name=f"{p}.self_attn.scores")
        probs = b.op("Softmax", scores, axis=-1, name=f"{p}.self_attn.probs")
        ctx = b.op("MatMul", probs, b.op("Unsqueeze", v_all, b.const([2])), name=f"{p}.self_attn.context")
        ctx = b.op("Reshape", ctx, b.const([0, nh, -1, hd]))
        ctx = b.op("Reshape", b.op("Transpose", ctx, perm=[0, 2, 1, 3]), b.const([0, 0, q_dim]),
                   name=f"{p}.self_attn.context_flat")
        o = writer(ctx, "self_attn.o_proj", i)
        if spec.graph.output_norms:
            o = norm(o, w("self_attn.o_norm.weight"), f"{p}.self_attn.o_norm", spec.rms_norm_eps)
        h = b.op("Add", h, o, name=f"{p}.resid_mid")

        # gated MLP (SwiGLU for silu), gate|up fused
        x = norm(h, w("post_attention_layernorm.weight"), f"{p}.post_attention_layernorm", spec.rms_norm_eps)
        wg, wu = w("mlp.gate_proj.weight"), w("mlp.up_proj.weight")
        bg, bu = bias("gate_proj", "mlp"), bias("up_proj", "mlp")
        gu_bias = np.concatenate([bg, bu]) if _nonzero(bg) or _nonzero(bu) else None
        gu = linear(x, transposed(wg, wu), gu_bias, f"{p}.mlp.gate_up_proj")
        gate, up = b.op("Split", gu, b.const([wg.shape[0], wu.shape[0]]), axis=-1, outputs=2, name=f"{p}.mlp.split")
        act = _ACTIVATIONS[spec.graph.activation](b, gate, up, f"{p}.mlp")
        down = writer(act, "mlp.down_proj", i)
        if spec.graph.output_norms:
            down = norm(down, w("mlp.down_norm.weight"), f"{p}.mlp.down_norm", spec.rms_norm_eps)
        h = b.op("Add", h, down, name=f"{p}.resid_post")

    if options.activations_layer == L:  # "layer L" = the final residual, before the last norm
        b.op("Identity", h, outputs=[activations_name(L)], name="model.resid_final")
    if options.logits == "last":
        h = b.op("Slice", h, b.const([-1]), b.const([2**62]), b.const([1]), name="model.last_position")
    x = norm(h, weights["model.norm.weight"], "model.norm", spec.rms_norm_eps)
    if int8:
        if head_int8 is None:
            head_int8 = int8_weight(transposed(weights["lm_head.weight"]), "lm_head")
        logits = int8_matmul(x, *head_int8, "lm_head")
    elif spec.tied_embeddings and options.tied_lm_head == "shared":
        # Gemm wants 2-D: [B*S, H] x E^T, then back to [B, S, V]
        flat = b.op("Reshape", x, b.const([-1, H]), name="lm_head.flatten")
        y = b.op("Gemm", flat, EMBEDDING_SITE, transB=1, name="lm_head.gemm")
        out_shape = b.op("Concat", b.op("Shape", x, start=0, end=2), b.const([spec.vocab_size]), axis=0)
        logits = b.op("Reshape", y, out_shape, name="lm_head")
    else:
        w_out = embed if spec.tied_embeddings else weights["lm_head.weight"]
        logits = b.op("MatMul", x, b.weight("lm_head.weight_T", transposed(w_out)), name="lm_head")
    if EMBEDDING_SITE in scaled and spec.tied_embeddings:
        # the edit also moved the tied output rows: logits += scale * (x . vector) for every token
        per_pos = b.op("MatMul", x, b.op("Unsqueeze", scaled[EMBEDDING_SITE], b.const([-1])), name="lm_head.steer_shift")
        logits = b.op("Add", logits, per_pos, name="lm_head.steered")
    b.op("Identity", logits, outputs=["logits"], name="logits")

    graph = helper.make_graph(b.nodes, "decoder", inputs, outputs, initializer=b.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="mlx-refusal",
        ir_version=IR_VERSION,
    )
    return model



"""Quantized copies of an exported decoder, made by onnxruntime's own tools.

q4: `MatMulNBitsQuantizer`, 4-bit blocks of 32 along K with zero points, on every MatMul with a
    constant weight (the projections and a separate lm_head). It leaves Gather alone, so the
    embedding stays float32. onnxruntime-web's wasm build has no 4-bit GEMM: it dequantizes each
    weight to float32 on every call, so this file is for WebGPU; the wasm default is the int8
    graph (graph.py, GraphOptions.weights="int8").
q8: `quantize_dynamic` on MatMul only: int8 weights, activations quantized on the fly
    (DynamicQuantizeLinear + MatMulInteger), the same recipe as transformers.js's "_quantized" files.

Both read a float32 model whose lm_head is a MatMul with its own weight (the quantizers do not
touch Gemm), see `GraphOptions.tied_lm_head`.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from .files import save_onnx

Q4_BLOCK_SIZE = 32
Q4_ACCURACY_LEVEL = 0  # 0: unset, the kernel's default float accumulation (brief: 0 or 1)


def quantize_q4(src: Path, dst: Path, block_size: int = Q4_BLOCK_SIZE,
                accuracy_level: int = Q4_ACCURACY_LEVEL, external: bool | None = None) -> list[Path]:
    """Write a 4-bit copy of the model at `src` to `dst`; returns the files written."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    with _quiet():
        quant = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            bits=4,
            block_size=block_size,
            is_symmetric=False,
            accuracy_level=accuracy_level,
            op_types_to_quantize=("MatMul",),
        )
        quant.process()
        quant.model.topological_sort()
        model = quant.model.model
    return save_onnx(model, dst, external)


def quantize_q8(src: Path, dst: Path, per_channel: bool = False, external: bool | None = None) -> list[Path]:
    """Write a dynamically quantized int8 copy of the model at `src` to `dst`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantize_dynamic names external data its own way; write to scratch, then re-save with ours.
    with tempfile.TemporaryDirectory(dir=dst.parent) as scratch, _quiet():
        out = Path(scratch) / "q8.onnx"
        quantize_dynamic(
            src, out,
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
        )
        model = onnx.load(str(out))
        return save_onnx(model, dst, external)


class _quiet:
    """onnxruntime's quantizers log every node at INFO/WARNING; keep library output silent."""

    def __enter__(self):
        self._saved = []
        for name in ("root", "onnxruntime", "onnxruntime.quantization"):
            logger = logging.getLogger(None if name == "root" else name)
            self._saved.append((logger, logger.level))
            logger.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for logger, level in self._saved:
            logger.setLevel(level)
        return False

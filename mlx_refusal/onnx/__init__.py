"""ONNX export for the web: the decoder graph (graph.py), quantized copies made with onnxruntime's
tools (quantize.py), the transformers.js folder layout (bundle.py) and a Python runner (runtime.py)."""
from .bundle import DTYPES, ExportResult, export_onnx, parse_dtypes
from .graph import STEERING_INPUT, GraphOptions, activations_name, build_decoder
from .runtime import OnnxDecoder, left_pad, position_ids_from_mask
from .source import DecoderSpec, SourceModel, Steering, SteeringTerm, read_model

__all__ = [
    "DTYPES", "ExportResult", "export_onnx", "parse_dtypes", "STEERING_INPUT", "GraphOptions",
    "activations_name", "build_decoder", "OnnxDecoder", "left_pad", "position_ids_from_mask",
    "DecoderSpec", "SourceModel", "Steering", "SteeringTerm", "read_model",
]

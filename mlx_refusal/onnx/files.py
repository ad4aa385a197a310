"""Saving ONNX files the way transformers.js looks for them."""
from __future__ import annotations

from pathlib import Path

import onnx

# protobuf cannot serialise a message of 2 GiB or more; leave room for the graph itself.
PROTOBUF_LIMIT = 2**31 - 1
GRAPH_MARGIN = 64 * 2**20


def external_data_name(onnx_file: Path) -> str:
    """transformers.js fetches `<file>.onnx_data` when config.json says the file uses external data."""
    return onnx_file.name + "_data"


def save_onnx(model: onnx.ModelProto, path: Path, external: bool | None = None) -> list[Path]:
    """Write `model` to `path`, with its tensors in one external data file beside it when the
    single file would pass protobuf's 2 GB limit (or when `external` says so). Returns the files.
    Tensors already external (loaded lazily) count against the limit too, as they would inline."""
    path = Path(path)
    if external is None:
        external = _total_bytes(model) + GRAPH_MARGIN > PROTOBUF_LIMIT
    if not external:
        onnx.save_model(model, str(path))
        return [path]
    data = path.parent / external_data_name(path)
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return [path, data]


def _total_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in t.external_data if e.key == "length"), 0))
        else:
            total += len(t.raw_data) or t.ByteSize()
    return total


def check_onnx(path: Path) -> None:
    """onnx.checker on the file (the path form also handles external data)."""
    onnx.checker.check_model(str(path), full_check=False)

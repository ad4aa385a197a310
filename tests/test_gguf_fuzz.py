"""Hostile or broken GGUF files: each gets a one-line UserError before any large allocation.

Every case starts from a valid GGUF of the tiny Qwen2 fixture and damages one thing in place, at
the byte offset the `gguf` package's own reader reports for that field.
"""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import gguf as gguf_pkg

from mlx_refusal import gguf as conv
from mlx_refusal.errors import UserError
from test_gguf import write_gguf

# Reading the tiny fixture's GGUF takes about 2 MB; a case that allocated what its header
# claims (10^9 array elements, 10^12-element tensors) would blow far past this.
MAX_ALLOCATED = 32 * 2**20


class _Blob(bytes):
    def __repr__(self):  # Hypothesis prints the arguments of a failing example
        return f"<{len(self)}-byte GGUF>"


@pytest.fixture(scope="module")
def valid_gguf(tiny_qwen2, tmp_path_factory):
    return _Blob(write_gguf(tiny_qwen2, tmp_path_factory.mktemp("fuzz") / "valid.gguf").read_bytes())


def _offset(reader, part) -> int:
    return part.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]


def _layout(path):
    """Byte offsets of the fields the cases damage."""
    r = gguf_pkg.GGUFReader(str(path))
    tokens = r.fields["tokenizer.ggml.tokens"]
    name = r.fields["general.name"]
    t0 = r.tensors[0].field  # parts: name length, name, n_dims, dims, type, offset
    return {
        "tensor_count": 8, "kv_count": 16,
        "tokens_count": _offset(r, tokens.parts[4]),
        "name_len": _offset(r, name.parts[3]), "name_value": _offset(r, name.parts[4]),
        "t0_ndims": _offset(r, t0.parts[2]), "t0_dim0": _offset(r, t0.parts[3]),
        "t0_type": _offset(r, t0.parts[4]), "t0_offset": _offset(r, t0.parts[5]),
        "data": r.data_offset, "t0_data": r.tensors[0].data_offset, "t0_name": r.tensors[0].name,
        "t0_type_value": int(r.tensors[0].tensor_type),
    }


def _patch(data: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into("<" + fmt, b, at, value)
    return bytes(b)


def _nan_weights(data, lay, value):
    assert lay["t0_type_value"] == 0  # F32: the first float of its data is a weight
    return _patch(data, lay["t0_data"], "f", value)


CASES = {
    "empty file": (lambda d, lay: b"", "is empty"),
    "truncated in the header": (lambda d, lay: d[:20], "less than a GGUF header"),
    "truncated in the metadata": (lambda d, lay: d[: lay["tokens_count"] + 100], "not a valid GGUF file"),
    "truncated in the tensor table": (lambda d, lay: d[: lay["t0_type"]], "not a valid GGUF file"),
    "truncated in the tensor data": (lambda d, lay: d[: len(d) - 1000], "past the end of the"),
    "wrong magic": (lambda d, lay: b"GGML" + d[4:], "not a GGUF file"),
    "unknown version 1": (lambda d, lay: _patch(d, 4, "I", 1), "version 1; only versions 2 and 3"),
    "unknown version 99": (lambda d, lay: _patch(d, 4, "I", 99), "version 99"),
    "absurd tensor count": (lambda d, lay: _patch(d, lay["tensor_count"], "Q", 2**40), "tensor count is"),
    "absurd metadata count": (lambda d, lay: _patch(d, lay["kv_count"], "Q", 10**12), "metadata key count is"),
    "1e9-element metadata array": (lambda d, lay: _patch(d, lay["tokens_count"], "Q", 10**9),
                                   "element count of metadata 'tokenizer.ggml.tokens' is 1,000,000,000"),
    "absurd string length": (lambda d, lay: _patch(d, lay["name_len"], "Q", 2**62), "length of metadata"),
    "NUL in a metadata string": (lambda d, lay: _patch(d, lay["name_value"], "B", 0), "contains a NUL byte"),
    "absurd dimension": (lambda d, lay: _patch(d, lay["t0_dim0"], "Q", 10**12), "past the end of the"),
    "zero dimension": (lambda d, lay: _patch(d, lay["t0_dim0"], "Q", 0), "must be a positive multiple"),
    "seven dimensions": (lambda d, lay: _patch(d, lay["t0_ndims"], "I", 7), "has 7 dimensions"),
    "unknown tensor type": (lambda d, lay: _patch(d, lay["t0_type"], "I", 250), "unknown type 250"),
    "offset past the end": (lambda d, lay: _patch(d, lay["t0_offset"], "Q", 2**40), "past the end of the"),
    "misaligned offset": (lambda d, lay: _patch(d, lay["t0_offset"], "Q", 3), "at offset 3"),
    "NaN weight": (lambda d, lay: _nan_weights(d, lay, float("nan")), "NaN or Inf values"),
    "Inf weight": (lambda d, lay: _nan_weights(d, lay, float("inf")), "NaN or Inf values"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_gguf_gets_one_line_error_before_large_allocations(case, valid_gguf, tmp_path):
    src = tmp_path / "valid.gguf"
    src.write_bytes(valid_gguf)
    damage, expected = CASES[case]
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(damage(valid_gguf, _layout(src)))
    tracemalloc.start()
    try:
        with pytest.raises(UserError) as err:
            conv.convert(bad, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert peak < MAX_ALLOCATED, f"{case}: {peak / 2**20:.0f} MB allocated before the error"
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_valid_gguf_passes_the_layout_check(valid_gguf, tmp_path):
    path = tmp_path / "valid.gguf"
    path.write_bytes(valid_gguf)
    conv.check_layout(path)
    conv.read(path)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_header_damage_is_read_or_refused_in_one_line(valid_gguf, tmp_path, data):
    """Any bytes of the header and tables overwritten, or the file cut anywhere: `read` either
    succeeds or raises a UserError, never another exception."""
    src = tmp_path / "valid.gguf"
    src.write_bytes(valid_gguf)
    header_end = _layout(src)["data"]
    blob = bytearray(valid_gguf)
    if data.draw(st.booleans(), label="truncate"):
        blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="cut")]
    else:
        for _ in range(data.draw(st.integers(1, 8), label="flips")):
            at = data.draw(st.integers(0, header_end - 1), label="at")
            blob[at] = data.draw(st.integers(0, 255), label="byte")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(blob))
    try:
        conv.read(bad)
    except UserError as exc:
        assert "\n" not in str(exc)


def test_nan_check_covers_quantized_tensors(tiny_qwen2, tmp_path):
    """A Q8_0 block whose scale is Inf dequantizes to Inf/NaN weights: refused too."""
    from gguf import GGMLQuantizationType as QT

    path = write_gguf(tiny_qwen2, tmp_path / "q8.gguf", qtypes={"ffn_down": QT.Q8_0})
    r = gguf_pkg.GGUFReader(str(path))
    t = next(t for t in r.tensors if t.tensor_type == QT.Q8_0)
    blob = bytearray(path.read_bytes())
    struct.pack_into("<e", blob, int(t.data_offset), np.float16(np.inf))  # the first block's f16 scale
    path.write_bytes(bytes(blob))
    with pytest.raises(UserError, match=f"tensor {t.name} holds .* NaN or Inf values"):
        conv.read(path)

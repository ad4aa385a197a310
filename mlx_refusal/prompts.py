"""Prompt sets: the bundled harmful / harmless sets, file loaders and deterministic splits.

A `PromptSet` is an ordered, duplicate-free tuple of `Prompt`s with a content hash, so
captures and caches can be keyed by what was asked rather than by where it came from.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import warnings
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

from .errors import UserError
from .resources import data_dir

BUNDLED_DIR = data_dir("prompts")
BUNDLED_NAMES = ("harmful", "harmless")
SPLITS = ("train", "val", "test")
SUPPORTED_SUFFIXES = (".txt", ".json", ".jsonl", ".csv")
MAX_PROMPT_CHARS = 100_000  # far beyond any chat request; a longer "prompt" is a wrong file


class DuplicatePromptsWarning(UserWarning):
    """A prompt file repeated some prompts; the repeats were dropped (the CLI prints this)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = ""


@dataclass(frozen=True)
class PromptSet:
    name: str
    prompts: tuple[Prompt, ...]

    def __post_init__(self):
        # Accept any sequence (and bare strings) but store an immutable tuple of Prompts.
        prompts = tuple(p if isinstance(p, Prompt) else Prompt(str(p)) for p in self.prompts)
        object.__setattr__(self, "prompts", prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    @property
    def categories(self) -> list[str]:
        return [p.category for p in self.prompts]

    @property
    def sha256(self) -> str:
        # Canonical JSON of (text, category) pairs in order: independent of the file format
        # the prompts came from, and of Python's hash seed.
        pairs = [[p.text, p.category] for p in self.prompts]
        blob = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)


# ---------------------------------------------------------------------------------------------
# Splits


def _rank_key(text: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).hexdigest()


def split_of(prompt_set: PromptSet, split: str, seed: int = 0,
             fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> PromptSet:
    """The `split` ("train", "val", "test" or "all") part of `prompt_set`.

    Stratified: within each category, prompts are ranked by sha256(seed, text) and the first
    round(n * f_train) go to train, the next up to round(n * (f_train + f_val)) to val, the rest
    to test. A prompt's split therefore depends only on the set of prompts in its category,
    never on file order. The returned prompts keep their original order.
    """
    if split == "all":
        return prompt_set
    if split not in SPLITS:
        raise UserError(f"unknown split '{split}'; use one of: all, {', '.join(SPLITS)}")
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"split fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}")

    by_category: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompt_set.prompts):
        by_category[p.category].append(i)
    part = SPLITS.index(split)
    chosen: set[int] = set()
    for indices in by_category.values():
        ranked = sorted(indices, key=lambda i: _rank_key(prompt_set.prompts[i].text, seed))
        n = len(ranked)
        bounds = (0, round(n * fractions[0]), round(n * (fractions[0] + fractions[1])), n)
        chosen.update(ranked[bounds[part]:bounds[part + 1]])
    kept = tuple(p for i, p in enumerate(prompt_set.prompts) if i in chosen)
    return PromptSet(f"{prompt_set.name}:{split}", kept)


# ---------------------------------------------------------------------------------------------
# Loaders


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"prompt file {path} is not a regular file; pass a .txt, .json, .jsonl or .csv file")
    try:
        return path.read_bytes().decode("utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {exc.start}); re-save it as UTF-8") from None


def _from_item(item, path: Path, where: str, field: str, category_field: str) -> Prompt:
    """One JSON value (a string, or an object holding `field`) as a Prompt."""
    if isinstance(item, str):
        return Prompt(item.strip())
    if not isinstance(item, dict):
        raise UserError(f"{path}: {where} is a {type(item).__name__}; expected a string or an object with field '{field}'")
    if field not in item:
        available = ", ".join(repr(k) for k in item) or "none"
        raise UserError(f"{path}: {where} has no field '{field}' (fields: {available}); choose the prompt field with the field option")
    text = item[field]
    if not isinstance(text, str):
        raise UserError(f"{path}: {where} field '{field}' is a {type(text).__name__}, not a string; fix the file")
    category = item.get(category_field)
    return Prompt(text.strip(), "" if category is None else str(category).strip())


def _parse_txt(text: str, path: Path) -> list[Prompt]:
    lines = (line.strip() for line in text.splitlines())
    return [Prompt(line) for line in lines if line and not line.startswith("#")]


def _parse_json(text: str, path: Path, field: str, category_field: str) -> list[Prompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno} ({exc.msg}); fix the file") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of strings or objects, got a {type(data).__name__}; wrap the prompts in [...]")
    return [_from_item(item, path, f"item {i}", field, category_field) for i, item in enumerate(data)]


def _parse_jsonl(text: str, path: Path, field: str, category_field: str) -> list[Prompt]:
    prompts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: malformed JSON on line {lineno} ({exc.msg}); each line must be one JSON object or string") from None
        prompts.append(_from_item(item, path, f"line {lineno}", field, category_field))
    return prompts


def _parse_csv(text: str, path: Path, column: str, category_field: str) -> list[Prompt]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    try:
        header = reader.fieldnames
        if not header:
            return []
        if column not in header:
            available = ", ".join(repr(h) for h in header)
            raise UserError(f"{path}: no column '{column}' (columns: {available}); choose the prompt column with the column option")
        return [Prompt((row[column] or "").strip(), (row.get(category_field) or "").strip()) for row in reader]
    except csv.Error as exc:
        # line_num counts the lines of completed records, so the bad record starts on the next one
        raise UserError(f"{path}: malformed CSV in the record starting on line {reader.line_num + 1} ({exc}); fix the file") from None


def load_prompts(path, field: str = "prompt", column: str = "prompt",
                 category_field: str = "category") -> PromptSet:
    """Read prompts from a .txt (one per line; blank lines and # comments skipped), .json (a list
    of strings or of objects with `field`), .jsonl (one object with `field`, or one string, per
    line) or .csv (column `column`) file. `category_field` names an optional category field or
    column. Blank prompts are skipped; repeats are dropped with a DuplicatePromptsWarning.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"prompt file not found: {path}; check the path")
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UserError(f"unsupported prompt file type '{suffix or path.name}' for {path}; use .txt, .json, .jsonl or .csv")
    text = _read_text(path)
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise UserError(f"{path} contains a NUL byte (line {line}); it is binary or corrupt, pass a text prompt file")
    if suffix == ".txt":
        prompts = _parse_txt(text, path)
    elif suffix == ".json":
        prompts = _parse_json(text, path, field, category_field)
    elif suffix == ".jsonl":
        prompts = _parse_jsonl(text, path, field, category_field)
    else:
        prompts = _parse_csv(text, path, column, category_field)

    for i, p in enumerate(prompts):
        if len(p.text) > MAX_PROMPT_CHARS:
            raise UserError(f"{path}: prompt {i + 1} is {len(p.text):,} characters (the limit is {MAX_PROMPT_CHARS:,}); "
                            "split the file into one prompt per line or shorten it")
    seen: set[str] = set()
    unique = []
    for p in prompts:
        if p.text and p.text not in seen:
            seen.add(p.text)
            unique.append(p)
    if not unique:
        raise UserError(f"{path} contains no prompts; add at least one non-blank prompt")
    dropped = sum(1 for p in prompts if p.text) - len(unique)
    if dropped:
        warnings.warn(f"{path}: dropped {dropped} duplicate prompt{'s' if dropped != 1 else ''} (kept the first of each)",
                      DuplicatePromptsWarning, stacklevel=2)
    return PromptSet(path.stem, tuple(unique))


# ---------------------------------------------------------------------------------------------
# Bundled sets and the CLI entry point


@lru_cache(maxsize=None)
def _bundled_all(name: str) -> PromptSet:
    path = BUNDLED_DIR / f"{name}.jsonl"
    if not path.is_file():
        raise UserError(f"bundled prompt set missing: {path}; reinstall mlx-refusal (pip install -e . in a checkout)")
    return load_prompts(path)


def bundled(name: str, split: str = "all") -> PromptSet:
    """Our bundled "harmful" or "harmless" set, or its deterministic train / val / test split."""
    if name not in BUNDLED_NAMES:
        raise UserError(f"no bundled prompt set '{name}'; use one of: {', '.join(BUNDLED_NAMES)}")
    return split_of(_bundled_all(name), split)


def is_bundled(spec_or_path) -> bool:
    return isinstance(spec_or_path, str) and spec_or_path in BUNDLED_NAMES


def directions_split(spec_or_path, split: str | None) -> str:
    """The split `directions` uses for a set: the one asked for; else the train split of a bundled
    set (its val and test splits stay held out for steer/ablate) and all of a user's own file."""
    if split is not None:
        return split
    return "train" if is_bundled(spec_or_path) else "all"


def resolve_prompts(spec_or_path, split: str = "all") -> PromptSet:
    """A CLI `--harmful` / `--harmless` value: a bundled set name, or a prompt file (split the
    same deterministic way as the bundled sets). To load a file literally named "harmful",
    pass "./harmful"."""
    if is_bundled(spec_or_path):
        return bundled(spec_or_path, split)
    path = Path(spec_or_path)
    if not path.exists():
        raise UserError(f"prompt set '{spec_or_path}' is neither a bundled set ({', '.join(BUNDLED_NAMES)}) "
                        f"nor an existing file; pass one of those or a .txt/.json/.jsonl/.csv path")
    return split_of(load_prompts(path), split)


CAPABILITY_FILE = BUNDLED_DIR / "capability.txt"


def capability_texts() -> list[str]:
    """The bundled harmless paragraphs (prompts/capability.txt, blank-line separated) whose
    perplexity tells whether an edit hurt plain language modelling."""
    return [" ".join(p.split()) for p in _read_text(CAPABILITY_FILE).split("\n\n") if p.strip()]

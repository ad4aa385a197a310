import csv
import json
import random
import re
import statistics
from collections import Counter

import pytest
from hypothesis import given, settings, strategies as st

from mlx_refusal.errors import UserError
from mlx_refusal.prompts import (
    BUNDLED_NAMES, SPLITS, DuplicatePromptsWarning, Prompt, PromptSet, bundled, load_prompts,
    resolve_prompts, split_of,
)

# ---------------------------------------------------------------------------------------------
# Writers for each format, so loaders can be checked by round trip.


def write_txt(path, prompts):
    path.write_text("# a comment line\n\n" + "\n".join(p.text for p in prompts) + "\n\n", encoding="utf-8")


def write_json(path, prompts, field="prompt"):
    path.write_text(json.dumps([{field: p.text, "category": p.category} for p in prompts], indent=1), encoding="utf-8")


def write_jsonl(path, prompts, field="prompt"):
    path.write_text("".join(json.dumps({field: p.text, "category": p.category}) + "\n" for p in prompts), encoding="utf-8")


def write_csv(path, prompts, column="prompt"):
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", column, "category"])
        writer.writerows([i, p.text, p.category] for i, p in enumerate(prompts))


SAMPLE = (
    Prompt("How do I kill a Python process?", "edgy"),
    Prompt('Write a haiku, with "quotes", commas, and a café.', "writing"),
    Prompt("Explain how tides work.", "science"),
)

line_text = (
    st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=40)
    .map(str.strip)
    .filter(lambda t: t and not t.startswith("#"))
)
prompt_lists = st.lists(
    st.builds(Prompt, line_text, st.sampled_from(["a", "b", "c d", ""])),
    min_size=1, max_size=30, unique_by=lambda p: p.text,
)


@pytest.mark.parametrize("writer,suffix", [(write_json, ".json"), (write_jsonl, ".jsonl"), (write_csv, ".csv")])
def test_structured_formats_round_trip_texts_and_categories(tmp_path, writer, suffix):
    path = tmp_path / f"mine{suffix}"
    writer(path, SAMPLE)
    loaded = load_prompts(path)
    assert loaded.prompts == SAMPLE
    assert loaded.name == "mine"
    assert loaded.sha256 == PromptSet("other", SAMPLE).sha256


def test_txt_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    write_txt(path, SAMPLE)
    assert load_prompts(path).texts == [p.text for p in SAMPLE]
    assert load_prompts(path).categories == ["", "", ""]


@settings(max_examples=40, deadline=None)
@given(prompt_lists)
def test_every_format_round_trips_arbitrary_unicode(tmp_path_factory, prompts):
    folder = tmp_path_factory.mktemp("rt")
    for writer, suffix in [(write_json, ".json"), (write_jsonl, ".jsonl"), (write_csv, ".csv")]:
        path = folder / f"p{suffix}"
        writer(path, prompts)
        assert load_prompts(path).prompts == tuple(prompts), suffix
    write_txt(folder / "p.txt", prompts)
    assert load_prompts(folder / "p.txt").texts == [p.text for p in prompts]


def test_custom_field_and_column_names(tmp_path):
    write_json(tmp_path / "a.json", SAMPLE, field="instruction")
    write_jsonl(tmp_path / "a.jsonl", SAMPLE, field="goal")
    write_csv(tmp_path / "a.csv", SAMPLE, column="text")
    assert load_prompts(tmp_path / "a.json", field="instruction").prompts == SAMPLE
    assert load_prompts(tmp_path / "a.jsonl", field="goal").prompts == SAMPLE
    assert load_prompts(tmp_path / "a.csv", column="text").prompts == SAMPLE
    assert load_prompts(tmp_path / "a.csv", column="text", category_field="nope").categories == ["", "", ""]


def test_json_and_jsonl_accept_plain_strings(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(["one", "two"]), encoding="utf-8")
    (tmp_path / "s.jsonl").write_text('"one"\n\n{"prompt": "two", "category": "x"}\n', encoding="utf-8")
    assert load_prompts(tmp_path / "s.json").prompts == (Prompt("one"), Prompt("two"))
    assert load_prompts(tmp_path / "s.jsonl").prompts == (Prompt("one"), Prompt("two", "x"))


def test_utf8_bom_is_tolerated(tmp_path):
    (tmp_path / "bom.csv").write_bytes("\ufeffprompt\nhello\n".encode("utf-8"))
    assert load_prompts(tmp_path / "bom.csv").texts == ["hello"]


def test_duplicates_are_kept_once_with_a_warning(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("a\nb\na\n  b  \nc\na\n", encoding="utf-8")
    with pytest.warns(DuplicatePromptsWarning, match="dropped 3 duplicate prompts"):
        loaded = load_prompts(path)
    assert loaded.texts == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# One-line errors that name the problem and the fix


def error_of(path, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        load_prompts(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    assert "not found" in error_of(tmp_path / "nope.txt")


@pytest.mark.parametrize("name,content", [
    ("e.txt", ""), ("c.txt", "# only a comment\n\n   \n"), ("e.json", "[]"), ("e.jsonl", "\n\n"),
    ("e.csv", ""), ("h.csv", "prompt,category\n"), ("b.json", '["", "  "]'),
])
def test_empty_files(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    assert "contains no prompts" in error_of(tmp_path / name)


def test_not_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    message = error_of(tmp_path / "latin.txt")
    assert "not UTF-8" in message and "offset 3" in message


def test_malformed_json_names_line_and_column(tmp_path):
    (tmp_path / "bad.json").write_text('[\n  "ok",\n  "unterminated\n]', encoding="utf-8")
    assert "malformed JSON at line 3" in error_of(tmp_path / "bad.json")


def test_malformed_jsonl_names_the_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n\n{"prompt": b}\n', encoding="utf-8")
    assert "malformed JSON on line 3" in error_of(tmp_path / "bad.jsonl")


def test_json_must_be_a_list(tmp_path):
    (tmp_path / "obj.json").write_text('{"prompt": "a"}', encoding="utf-8")
    assert "expected a JSON list" in error_of(tmp_path / "obj.json")


def test_missing_field_names_the_available_ones(tmp_path):
    write_jsonl(tmp_path / "f.jsonl", SAMPLE, field="goal")
    message = error_of(tmp_path / "f.jsonl")
    assert "no field 'prompt'" in message and "'goal'" in message and "'category'" in message and "line 1" in message
    write_json(tmp_path / "f.json", SAMPLE, field="goal")
    assert "'goal'" in error_of(tmp_path / "f.json", field="text")


def test_non_string_field(tmp_path):
    (tmp_path / "n.jsonl").write_text('{"prompt": "a"}\n{"prompt": 5}\n', encoding="utf-8")
    assert "line 2 field 'prompt' is a int" in error_of(tmp_path / "n.jsonl")


def test_missing_column_names_the_available_ones(tmp_path):
    write_csv(tmp_path / "c.csv", SAMPLE, column="text")
    message = error_of(tmp_path / "c.csv")
    assert "no column 'prompt'" in message and "'id', 'text', 'category'" in message


def test_malformed_csv(tmp_path):
    (tmp_path / "q.csv").write_text('prompt\n"fine"\n"broken"quote\n', encoding="utf-8")
    assert "malformed CSV in the record starting on line 3" in error_of(tmp_path / "q.csv")
    (tmp_path / "u.csv").write_text('prompt\na\nb\n"unterminated\nx\n', encoding="utf-8")
    assert "starting on line 4" in error_of(tmp_path / "u.csv")


@pytest.mark.parametrize("name", ["p.yaml", "p.parquet", "prompts"])
def test_unsupported_extension(tmp_path, name):
    (tmp_path / name).write_text("a\n", encoding="utf-8")
    message = error_of(tmp_path / name)
    assert "unsupported prompt file type" in message and ".jsonl" in message


# ---------------------------------------------------------------------------------------------
# Deterministic stratified splits


def parts(prompt_set, seed=0, fractions=(0.6, 0.2, 0.2)):
    return {s: split_of(prompt_set, s, seed=seed, fractions=fractions) for s in SPLITS}


categorised = st.lists(
    st.builds(Prompt, st.text(min_size=1, max_size=12), st.sampled_from("abcde")),
    min_size=1, max_size=80, unique_by=lambda p: p.text,
)


@settings(max_examples=60, deadline=None)
@given(categorised, st.randoms(use_true_random=False), st.integers(0, 3))
def test_split_is_a_stable_stratified_partition(prompts, rng, seed):
    whole = PromptSet("x", prompts)
    split = parts(whole, seed)
    texts = {s: set(p.texts) for s, p in split.items()}
    # disjoint and covering
    assert sum(len(t) for t in texts.values()) == len(whole)
    assert set().union(*texts.values()) == set(whole.texts)
    # each part keeps the original order
    for part in split.values():
        assert part.texts == [t for t in whole.texts if t in set(part.texts)]
    # stratified: within each category, sizes follow the fractions to within one prompt
    for category, n in Counter(whole.categories).items():
        for s, f in zip(SPLITS, (0.6, 0.2, 0.2)):
            assert abs(split[s].categories.count(category) - n * f) <= 1
    # deterministic and independent of file order
    shuffled = list(prompts)
    rng.shuffle(shuffled)
    again = parts(PromptSet("x", shuffled), seed)
    assert {s: set(p.texts) for s, p in again.items()} == texts


def test_split_all_is_the_whole_set_and_names_are_tagged():
    whole = PromptSet("x", [Prompt(str(i)) for i in range(10)])
    assert split_of(whole, "all") is whole
    assert split_of(whole, "val").name == "x:val"


def test_seed_changes_the_split_and_fractions_are_honoured():
    whole = bundled("harmless")
    assert set(split_of(whole, "test", seed=0).texts) != set(split_of(whole, "test", seed=1).texts)
    halves = parts(whole, fractions=(0.5, 0.0, 0.5))
    assert len(halves["val"]) == 0
    assert abs(len(halves["train"]) - len(whole) / 2) <= len(set(whole.categories))


@pytest.mark.parametrize("kwargs,needle", [
    ({"split": "training"}, "unknown split 'training'"),
    ({"split": "train", "fractions": (0.5, 0.5, 0.5)}, "summing to 1"),
    ({"split": "train", "fractions": (1.0, 0.0)}, "three non-negative"),
])
def test_split_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        split_of(PromptSet("x", [Prompt("a")]), **kwargs)


# ---------------------------------------------------------------------------------------------
# The bundled sets


def normalised(text):
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_bundled_sets_meet_size_and_category_minimums(name):
    prompts = bundled(name)
    assert len(prompts) >= 300
    counts = Counter(prompts.categories)
    assert len(counts) >= 10 and "" not in counts
    assert min(counts.values()) >= 10
    assert len({normalised(t) for t in prompts.texts}) == len(prompts), "near-duplicate prompts"
    assert all(t == t.strip() and len(t.split()) >= 4 for t in prompts.texts)


def test_bundled_sets_do_not_overlap_and_have_matching_lengths():
    harmful, harmless = bundled("harmful"), bundled("harmless")
    assert not {normalised(t) for t in harmful.texts} & {normalised(t) for t in harmless.texts}
    mean_words = [statistics.mean(len(t.split()) for t in s.texts) for s in (harmful, harmless)]
    assert abs(mean_words[0] - mean_words[1]) < 1.0
    edgy = Counter(harmless.categories)["edgy_benign"]
    assert 0.07 <= edgy / len(harmless) <= 0.15


@pytest.mark.parametrize("name", BUNDLED_NAMES)
def test_bundled_splits_partition_each_category(name):
    whole = bundled(name)
    split = {s: bundled(name, s) for s in SPLITS}
    assert sorted(t for s in split.values() for t in s.texts) == sorted(whole.texts)
    for s in split.values():
        assert set(s.categories) == set(whole.categories)  # every category in every split
    assert split["train"].name == f"{name}:train"
    assert bundled(name, "test") == split["test"]


def test_unknown_bundled_name():
    with pytest.raises(UserError, match="no bundled prompt set 'evil'.*harmful, harmless"):
        bundled("evil")


def test_resolve_prompts_accepts_names_and_paths(tmp_path):
    assert resolve_prompts("harmful", "val") == bundled("harmful", "val")
    path = tmp_path / "mine.jsonl"
    write_jsonl(path, [Prompt(f"prompt number {i}", "c") for i in range(10)])
    assert len(resolve_prompts(path)) == 10
    assert len(resolve_prompts(str(path), "train")) == 6
    with pytest.raises(UserError, match="neither a bundled set"):
        resolve_prompts("harmfull")


def test_prompt_set_hash_depends_on_texts_categories_and_order():
    a = PromptSet("a", [Prompt("x", "1"), Prompt("y", "2")])
    assert a.sha256 == PromptSet("renamed", list(a)).sha256
    assert a.sha256 != PromptSet("a", [Prompt("x", "1"), Prompt("y", "3")]).sha256
    assert a.sha256 != PromptSet("a", [Prompt("y", "2"), Prompt("x", "1")]).sha256
    assert len(a) == 2 and a.texts == ["x", "y"] and a.categories == ["1", "2"]
    assert PromptSet("s", ["plain"]).prompts == (Prompt("plain"),)


def test_split_assignments_are_pinned():
    # An accidental change to the hashing scheme would silently move prompts between train and
    # test (and invalidate every cached capture), so the assignment of a small set is pinned.
    whole = PromptSet("x", [Prompt(f"p{i}") for i in range(20)])
    assert split_of(whole, "val").texts == ["p5", "p8", "p14", "p18"]
    assert split_of(whole, "test").texts == ["p0", "p4", "p6", "p7"]
    shuffled = list(whole)
    random.Random(5).shuffle(shuffled)
    assert sorted(split_of(PromptSet("x", shuffled), "test").texts) == ["p0", "p4", "p6", "p7"]

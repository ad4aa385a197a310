"""The edit record (record.py): refusal_edit.json and steering.safetensors written and read back,
the record's fields, the content hashes and the timestamps."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx)

import datetime
import hashlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mlx_refusal import families
from mlx_refusal import record as rec
from mlx_refusal.errors import UserError

HIDDEN = 8


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(HIDDEN).astype(np.float32)
    return v / np.linalg.norm(v)


def verb_fields(**extra) -> dict:
    """What an edit verb records (api._provenance): named fields, details, model and prompts."""
    return {"edit": "steer", "layer": 2, "alpha": 3.5, "alpha_how": "calibrated", "select": "evaluate",
            "scale": None, "metrics": {"harmless_refusal": 1.0}, "model": {"spec": "tiny", "fingerprint": "ab" * 32,
                                                                           "model_type": "qwen2"},
            "prompts": {"harmful": {"name": "harmful", "n": 4, "sha256": "cd" * 32}}, **extra}


def test_a_verbs_fields_land_in_named_fields_and_details_in_order():
    r = rec.EditRecord.from_json(verb_fields(examples=[{"prompt": "p", "answer": "a"}]))
    assert (r.kind, r.layer, r.alpha, r.scale, r.site) == ("steer", 2, 3.5, None, None)
    assert r.model["model_type"] == "qwen2" == r.source_model_type and r.prompts["harmful"]["n"] == 4
    assert list(r.details) == ["alpha_how", "select", "metrics", "examples"]
    assert r.tool == "mlx-refusal" and r.tool_version == mlx_refusal.__version__ and r.saved == {}
    assert rec.EditRecord().source_model_type is None


def test_the_json_document_has_every_reader_key_and_round_trips():
    r = rec.EditRecord.from_json(verb_fields())
    r.date, r.saved = "2026-01-01T00:00:00+00:00", {"dtype": "bfloat16"}
    doc = r.to_json()
    for key in ("edit", "layer", "site", "alpha", "scale", "direction_sha256", "tool", "tool_version", "date",
                "saved", "model", "prompts", "alpha_how", "metrics"):
        assert key in doc, key
    assert doc["edit"] == "steer" and "kind" not in doc and "details" not in doc
    assert rec.EditRecord.from_json(doc) == r
    assert rec.EditRecord.from_json(json.loads(json.dumps(doc))) == r
    # a record with nothing known says so with nulls, and leaves out what it never had
    bare = rec.EditRecord().to_json()
    assert bare["edit"] is None and bare["layer"] is None and bare["direction_sha256"] is None
    assert "model" not in bare and "prompts" not in bare and "steering" not in bare


def test_write_then_read_gives_the_same_record(tmp_path):
    r = rec.EditRecord.from_json(verb_fields(direction=np.float32(0.5), path=tmp_path, vec=np.arange(3)))
    rec.write_record(tmp_path, r)
    back = rec.read_record(tmp_path)
    assert back.kind == "steer" and back.layer == 2 and back.alpha == 3.5
    # numpy scalars and arrays, and paths, are written as plain JSON values
    assert back.details["direction"] == 0.5 and back.details["path"] == str(tmp_path)
    assert back.details["vec"] == [0, 1, 2]
    assert json.loads((tmp_path / rec.EDIT_RECORD).read_text())["edit"] == "steer"
    copy = tmp_path / "bundle"
    copy.mkdir()
    rec.copy_record(tmp_path, copy)
    assert (copy / rec.EDIT_RECORD).read_bytes() == (tmp_path / rec.EDIT_RECORD).read_bytes()


def test_a_folder_without_a_record_and_damaged_records(tmp_path):
    assert rec.read_record(tmp_path) is None
    (tmp_path / rec.EDIT_RECORD).write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        rec.read_record(tmp_path)
    (tmp_path / rec.EDIT_RECORD).write_text("[1, 2]")
    with pytest.raises(UserError, match="not an object"):
        rec.read_record(tmp_path)
    with pytest.raises(TypeError, match="cannot record"):
        rec.write_record(tmp_path, rec.EditRecord(details={"bad": object()}))


def test_steering_terms_round_trip_through_the_steering_file(tmp_path):
    terms = [rec.SteeringTerm("refusal", 2, unit(1), 6.0, 0.5), rec.SteeringTerm("voice", 1, 3.0 * unit(2), -1.5)]
    arrays_, listed = rec.steering_contents(terms, families.get("qwen2"))
    r = rec.with_steering(rec.EditRecord.from_json({"edit": "steer"}), listed)
    # the primary term fills the record's layer, site, alpha and direction hash
    assert (r.layer, r.alpha, r.site) == (2, 6.0, listed[0]["site"]) and r.steering == listed
    assert r.direction_sha256 == rec.array_sha256(unit(1))
    assert [(t["name"], t["layer"], t["multiple"]) for t in listed] == [("refusal", 2, 0.5), ("voice", 1, None)]
    # a direction is made unit before it is stored and hashed
    np.testing.assert_allclose(np.asarray(arrays_["term1.direction"]), unit(2), atol=1e-6)
    assert listed[1]["direction_sha256"] == rec.array_sha256(arrays_["term1.direction"])
    rec.write_steering(tmp_path, arrays_, r)
    stored = rec.read_steering(tmp_path, r)
    assert [s.entry["name"] for s in stored] == ["refusal", "voice"]
    for s, t in zip(stored, terms):
        np.testing.assert_allclose(s.vector, t.vector, atol=1e-6)
        np.testing.assert_allclose(s.direction, t.vector / t.alpha, atol=1e-6)
    # an edit's own values are kept over the primary term's
    kept = rec.with_steering(rec.EditRecord(kind="steer", layer=2, site="given"), listed)
    assert kept.site == "given"


def test_a_single_term_folder_is_read_from_its_vector(tmp_path):
    from safetensors.numpy import save_file

    v = 2.0 * unit(3)
    save_file({"vector": v}, str(tmp_path / rec.STEERING_FILE))
    old = rec.EditRecord(kind="steer", layer=1, site="model.layers.0.mlp.down_proj.bias", alpha=2.0)
    (term,) = rec.read_steering(tmp_path, old)
    assert term.entry == {"name": "refusal", "layer": 1, "site": old.site, "alpha": 2.0}
    assert term.direction is None and np.array_equal(term.vector, v)
    save_file({"direction": v}, str(tmp_path / rec.STEERING_FILE))
    with pytest.raises(UserError, match="no 'vector' tensor"):
        rec.read_steering(tmp_path, old)
    with pytest.raises(UserError, match="not a non-empty list"):
        rec.read_steering(tmp_path, rec.EditRecord(kind="steer", steering=[]))
    with pytest.raises(UserError, match="'term0.vector'"):
        rec.read_steering(tmp_path, rec.EditRecord(kind="steer", steering=[{"name": "refusal"}]))
    with pytest.raises(UserError, match="has no steering.safetensors"):
        rec.read_steering(tmp_path / "nowhere", old)


def test_a_tuple_is_one_refusal_term_and_bad_terms_are_user_errors():
    d = unit(4)
    (t,) = rec.steering_terms((3, d, 2.5 * d))
    assert (t.name, t.layer) == ("refusal", 3) and t.alpha == pytest.approx(2.5)
    with pytest.raises(UserError, match="two vectors of one size"):
        rec.steering_terms((3, d, np.ones(3)))
    with pytest.raises(UserError, match="at least one steering term"):
        rec.steering_terms([])
    with pytest.raises(UserError, match="every term needs one vector"):
        rec.steering_contents([rec.SteeringTerm("refusal", 1, d, 1.0), rec.SteeringTerm("voice", 1, np.ones(3), 1.0)], families.get("qwen2"))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.integers(1, 16), elements=st.floats(-1e6, 1e6, width=32)))
def test_array_hash_is_of_the_float32_bytes_whatever_the_input_type(values):
    import mlx.core as mx

    expected = hashlib.sha256(values.astype(np.float32).tobytes()).hexdigest()
    assert rec.array_sha256(values) == expected
    assert rec.array_sha256(values.astype(np.float32)[::-1][::-1]) == expected
    assert rec.array_sha256(values.tolist()) == expected
    assert rec.array_sha256(mx.array(values.astype(np.float32))) == expected


def test_text_and_file_hashes_are_sha256sum(tmp_path):
    assert rec.text_sha256("héllo") == hashlib.sha256("héllo".encode()).hexdigest()
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 10_000)
    b.write_bytes(b"yz")
    assert rec.files_sha256([a]) == hashlib.sha256(b"x" * 10_000).hexdigest()
    # several files hash as their concatenation, whatever the block size
    assert rec.files_sha256([a, b], block=7) == hashlib.sha256(b"x" * 10_000 + b"yz").hexdigest()


def test_timestamps_are_utc_to_the_second():
    stamp = datetime.datetime.fromisoformat(rec.utc_now())
    assert stamp.utcoffset() == datetime.timedelta(0) and stamp.microsecond == 0
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 5


def test_the_model_card_describes_the_record():
    r = rec.EditRecord.from_json(verb_fields(examples_rule="The first 2 prompts",
                                             examples=[{"prompt": "Bake | bread?", "answer": "I'm sorry."}]))
    r.site, r.date, r.saved = "model.layers.1.mlp.down_proj.bias", "2026-01-01", {"model_type": "llama", "dtype": "bf16"}
    card = rec.model_card(r, "refusallm")
    assert "# refusallm: tiny, steer edit" in card and "alpha = 3.5" in card and "`llama` in `bf16`" in card
    assert "| base weights sha256 | `" + "ab" * 32 + "` |" in card and "| prompts: harmful | `" + "cd" * 32 in card
    assert "The first 2 prompts (greedy decoding)" in card and "Bake \\| bread?" in card
    assert rec.STEERING_FILE in card and rec.EDIT_RECORD in card
    ablated = rec.model_card(rec.EditRecord(kind="ablate", scale=1.0), "x")
    assert "projected out of every matrix" in ablated and rec.STEERING_FILE not in ablated
    assert "signed scale 2.0" in rec.model_card(rec.EditRecord(kind="project", scale=2.0))

"""Chat templates from the model or from --chat-template FILE: a model without one, a base
(non-chat) model and a bad template file each stop in one `error:` line that names the fix, with
nothing written; a template given with --chat-template renders every prompt, is recorded, and
travels into an edited folder so that stock mlx_lm renders exactly the same text."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli
from fixtures import CHATML_TEMPLATE
from mlx_refusal.errors import UserError
from test_bad_input import _snapshot

# A ChatML template with its own system prompt, so a render with it differs from the fixture's own.
OWN_TEMPLATE = CHATML_TEMPLATE.replace("You are a tiny test model.", "You answer in one short line.")
QUESTION = "How do I bake bread?"


def _variant(src: Path, dst: Path, tokenizer_config=None, config=None, generation_config=None) -> Path:
    """A copy of a tiny model with some keys of its config files replaced (None: key removed)."""
    shutil.copytree(src, dst)
    for name, changes in (("tokenizer_config.json", tokenizer_config), ("config.json", config),
                          ("generation_config.json", generation_config)):
        if changes:
            data = json.loads((dst / name).read_text())
            data.update(changes)
            (dst / name).write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    return dst


@pytest.fixture(scope="module")
def models(tiny_qwen2, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_models")
    # A base model as Qwen2.5's base models are: the ChatML template and tokens, but generation
    # stops only at the document end <|endoftext|> (id 0), never at the turn end <|im_end|>.
    base = {"tokenizer_config": {"eos_token": "<|endoftext|>"}, "config": {"eos_token_id": 0},
            "generation_config": {"eos_token_id": 0}}
    files = {
        "chat": tiny_qwen2,
        "no_template": _variant(tiny_qwen2, root / "no_template", tokenizer_config={"chat_template": None}),
        "base": _variant(tiny_qwen2, root / "base", **base),
    }
    for name, text in {
        "own.jinja": OWN_TEMPLATE,
        "empty.jinja": "  \n",
        "syntax.jinja": "{% for m in messages %}{{ m['content'] }",
        "drops_user.jinja": "<|im_start|>assistant\n",
        "no_stop.jinja": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}",
        "evil.jinja": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        # a plain-text format that ends every turn with the document end: base-model chat
        "plain_eos.jinja": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>{% endfor %}"
                           "{% if add_generation_prompt %}assistant:{% endif %}",
        "config.json": json.dumps({"chat_template": OWN_TEMPLATE}),
    }.items():
        (root / name).write_text(text)
        files[name] = root / name
    (root / "latin1.jinja").write_bytes("{{ 'caf\xe9' }}".encode("latin-1"))
    files["latin1.jinja"] = root / "latin1.jinja"
    return files


def _run(args, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    before = _snapshot(work)
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result, work, before


def _one_error(result, work, before, expected: str) -> str:
    lines = [line for line in result.output.splitlines() if line.strip() and not line.startswith("  ")]
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert expected in errors[0], errors[0]
    assert _snapshot(work) == before, "something was written"
    return errors[0]


# (command, model, --chat-template file or None, words the error must contain)
ERRORS = {
    "directions, no template": ("directions", "no_template", None, "has no chat template"),
    "steer, no template": ("steer", "no_template", None, "has no chat template"),
    "ablate, no template": ("ablate", "no_template", None, "has no chat template"),
    "eval, no template": ("eval", "no_template", None, "has no chat template"),
    "info, no template": ("info", "no_template", None, "has no chat template"),
    "steer, base model": ("steer", "base", None, "looks like a base (non-chat) model"),
    "eval, base model": ("eval", "base", None, "looks like a base (non-chat) model"),
    "missing template file": ("steer", "no_template", "missing.jinja", "no such file"),
    "empty template file": ("steer", "no_template", "empty.jinja", "is empty"),
    "non-UTF-8 template file": ("steer", "no_template", "latin1.jinja", "is not UTF-8 text"),
    "template syntax error": ("directions", "no_template", "syntax.jinja", "failed to render"),
    "template without the user's text": ("steer", "no_template", "drops_user.jinja", "does not put the user's message"),
    "template whose turns end in no stop token": ("steer", "no_template", "no_stop.jinja", "base (non-chat) model"),
    "template reaching for Python internals": ("eval", "no_template", "evil.jinja", "stopped by the sandbox"),
    # the page renders every prompt with the bundle's template: export-onnx checks it alike
    "export-onnx, no template": ("export-onnx", "no_template", None, "has no chat template"),
    "export-onnx, base model": ("export-onnx", "base", None, "looks like a base (non-chat) model"),
    "export-onnx, missing template file": ("export-onnx", "chat", "missing.jinja", "no such file"),
    "export-onnx, template syntax error": ("export-onnx", "no_template", "syntax.jinja", "failed to render"),
    "export-onnx, template whose turns end in no stop token": ("export-onnx", "chat", "no_stop.jinja",
                                                               "base (non-chat) model"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_chat_template_is_one_line_and_writes_nothing(case, models, tmp_path, monkeypatch):
    command, model, template, expected = ERRORS[case]
    args = [command, "--model", models[model]]
    if template:
        args += ["--chat-template", models.get(template, tmp_path / template)]
    if command in ("directions", "steer", "ablate", "export-onnx"):
        args += ["--out", tmp_path / "work" / "out"]
    line = _one_error(*_run(args, tmp_path, monkeypatch), expected)
    assert "--chat-template FILE" in line or template and "; " in line, line
    assert not (tmp_path / "cache" / "activations").exists()  # it stopped before any capture


def test_base_model_error_names_both_fixes(models, tmp_path, monkeypatch):
    line = _one_error(*_run(["directions", "--model", models["base"], "--out", tmp_path / "work" / "d"],
                            tmp_path, monkeypatch), "base (non-chat)")
    assert "'<|im_end|>'" in line and "'<|endoftext|>'" in line  # what the turn ends with, what stops
    assert "use the chat (instruct) version of the model" in line and "--chat-template FILE" in line


def test_the_python_api_refuses_a_model_without_a_template(models):
    from mlx_refusal import api

    with pytest.raises(UserError, match=r"has no chat template.*--chat-template FILE"):
        api.load(str(models["no_template"]))


def test_a_base_model_is_usable_with_a_template_whose_turns_end_where_it_stops(models):
    from mlx_refusal import api
    from mlx_refusal.template import render

    m = api.load(str(models["base"]), chat_template=models["plain_eos.jinja"])
    assert render(m.tokenizer, QUESTION) == f"user: {QUESTION}<|endoftext|>assistant:"


def test_the_chat_template_json_form_is_read(models):
    from mlx_refusal import api
    from mlx_refusal.template import render

    m = api.load(str(models["no_template"]), chat_template=models["config.json"])
    assert "You answer in one short line." in render(m.tokenizer, QUESTION)


def test_directions_render_with_the_given_template_and_record_it(models, tmp_path, monkeypatch):
    from mlx_refusal import api
    from mlx_refusal.capture import capture_key
    from mlx_refusal.template import render

    m = api.load(str(models["chat"]), chat_template=models["own.jinja"])
    assert render(m.tokenizer, QUESTION).startswith("<|im_start|>system\nYou answer in one short line.")
    assert m.info.chat_template == OWN_TEMPLATE and m.info.template_override.file == str(models["own.jinja"])
    # the activation cache tells the two templates apart
    assert capture_key(m.info.fingerprint, [QUESTION], OWN_TEMPLATE, None, "last", "float32") != \
        capture_key(m.info.fingerprint, [QUESTION], CHATML_TEMPLATE, None, "last", "float32")

    out = tmp_path / "d"
    result, _, _ = _run(["directions", "--model", models["chat"], "--chat-template", models["own.jinja"],
                         "--out", out, "--batch-size", "8"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "provenance.json").read_text())["chat_template"]
    assert recorded == {"file": str(models["own.jinja"]), "sha256": hashlib.sha256(OWN_TEMPLATE.encode()).hexdigest()}


@pytest.mark.parametrize("streamed", [False, True], ids=["in memory", "streamed"])
def test_an_edited_folder_carries_the_template_to_stock_mlx_lm(streamed, models, tmp_path, monkeypatch):
    import mlx_lm

    from mlx_refusal import api
    from mlx_refusal.template import render

    args = ["steer", "--model", models["no_template"], "--chat-template", models["own.jinja"],
            "--layer", "1", "--alpha-multiple", "0.5", "--eval-limit", "0", "--out", tmp_path / "out"]
    if streamed:
        d = tmp_path / "d"
        result, _, _ = _run(["directions", "--model", models["no_template"], "--chat-template", models["own.jinja"],
                             "--out", d, "--batch-size", "8"], tmp_path, monkeypatch)
        assert result.exit_code == 0, result.output
        args += ["--directions", d, "--max-memory", "1KB"]
    result, _, _ = _run(args, tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    record = json.loads((out / "refusal_edit.json").read_text())
    assert record.get("streamed", False) is streamed
    assert record["chat_template"]["file"] == str(models["own.jinja"])
    assert (out / "chat_template.jinja").read_text() == OWN_TEMPLATE
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == OWN_TEMPLATE

    _, stock = mlx_lm.load(str(out))
    messages = [{"role": "user", "content": QUESTION}]
    expected = render(api.load(str(models["no_template"]), chat_template=models["own.jinja"]).tokenizer, QUESTION)
    assert stock.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == expected
    # and our own load of the edited folder needs no --chat-template any more
    assert render(api.load(str(out)).tokenizer, QUESTION) == expected


def _bundle_template(web: Path) -> str:
    """The template the page renders with: transformers.js reads tokenizer_config.json's."""
    return json.loads((web / "tokenizer_config.json").read_text())["chat_template"]


def test_export_onnx_puts_the_given_template_into_the_bundle(models, tmp_path, monkeypatch):
    web = tmp_path / "work" / "web"
    result, _, _ = _run(["export-onnx", "--model", models["no_template"], "--chat-template", models["own.jinja"],
                         "--dtype", "fp32", "--out", web], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert _bundle_template(web) == OWN_TEMPLATE
    # the model's own template (ChatML, another system prompt) gives way to it
    result, _, _ = _run(["export-onnx", "--model", models["chat"], "--chat-template", models["config.json"],
                         "--dtype", "fp32", "--out", web, "--force"], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert _bundle_template(web) == OWN_TEMPLATE


def _edited_under(src: Path, dst: Path, template_file: Path) -> Path:
    """A copy of `src` whose edit record says it was made under --chat-template `template_file`
    (OWN_TEMPLATE), with that template in chat_template.jinja, as `save` writes it, while its
    tokenizer_config.json keeps the model's own template (a tokenizer file copied in later)."""
    from mlx_refusal.record import EditRecord, write_record
    from mlx_refusal.template import ChatTemplate, template_provenance

    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(OWN_TEMPLATE)
    used = template_provenance(OWN_TEMPLATE, ChatTemplate(OWN_TEMPLATE, str(template_file)))
    write_record(dst, EditRecord(kind="ablate", scale=1.0, details={"chat_template": used}))
    return dst


def test_export_onnx_of_an_edit_defaults_to_the_template_the_edit_was_made_under(models, tmp_path, monkeypatch):
    gone = tmp_path / "gone.jinja"  # the recorded file, since deleted
    edited = _edited_under(models["chat"], tmp_path / "edited", gone)
    assert json.loads((edited / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    web = tmp_path / "work" / "web"
    result, _, _ = _run(["export-onnx", "--model", edited, "--dtype", "fp32", "--out", web], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert _bundle_template(web) == OWN_TEMPLATE

    # with the template gone from the folder too, nothing holds it: one line, nothing written
    (edited / "chat_template.jinja").unlink()
    shutil.rmtree(web)
    line = _one_error(*_run(["export-onnx", "--model", edited, "--dtype", "fp32", "--out", web], tmp_path,
                            monkeypatch), f"was edited under --chat-template {gone}")
    assert line.endswith("as --chat-template FILE")
    # ... and --chat-template says which one to ship
    result, _, _ = _run(["export-onnx", "--model", edited, "--chat-template", models["own.jinja"], "--dtype", "fp32",
                         "--out", web], tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output
    assert _bundle_template(web) == OWN_TEMPLATE


def _directions_file(folder: Path, out: Path, template: str | None, template_file: Path | None = None) -> Path:
    """A directions file for `folder`'s weights that records being computed under `template`
    (from `template_file`, else the model's own); None: written before the template was recorded."""
    import numpy as np

    from mlx_refusal.directions import Directions, save_directions
    from mlx_refusal.loading import weight_fingerprint
    from mlx_refusal.template import ChatTemplate, template_provenance

    rows = np.eye(5, 64, dtype=np.float32)  # the tiny models: 4 layers + the final residual, hidden 64
    meta = {"model": {"spec": str(folder), "fingerprint": weight_fingerprint(folder), "model_type": "qwen2"}}
    if template is not None:
        meta["chat_template"] = template_provenance(
            template, ChatTemplate(template, str(template_file)) if template_file else None)
    save_directions(Directions(rows, rows, 0 * rows, np.ones(5, np.float32), [], meta), out)
    return out


def _steer_with(models, directions: Path, out: Path, template: str | None = None) -> list:
    args = ["steer", "--model", models["chat"], "--directions", directions, "--layer", "1",
            "--alpha-multiple", "0.5", "--eval-limit", "0", "--out", out]
    return args + (["--chat-template", models[template]] if template else [])


@pytest.mark.parametrize("made, run, fix", [
    ("own.jinja", None, "pass --chat-template {own}"),
    (None, "own.jinja", "drop --chat-template"),
    ("own.jinja", "config.json", None),  # another file, the same text: accepted
], ids=["file then own", "own then file", "two files, one text"])
def test_directions_under_another_template_are_refused_in_one_line(made, run, fix, models, tmp_path, monkeypatch):
    d = _directions_file(models["chat"], tmp_path / "d", OWN_TEMPLATE if made else CHATML_TEMPLATE,
                         models[made] if made else None)
    out = tmp_path / "work" / "out"
    result, work, before = _run(_steer_with(models, d, out, run), tmp_path, monkeypatch)
    if fix is None:
        assert result.exit_code == 0, result.output
        assert json.loads((out / "refusal_edit.json").read_text())["chat_template"]["file"] == str(models[run])
        return
    line = _one_error(result, work, before, f"--directions {d}: computed under ")
    assert fix.format(own=models["own.jinja"]) in line and "run `directions` again" in line, line
    assert "sha256 " in line


def test_directions_under_the_same_template_or_from_before_it_was_recorded_are_used(models, tmp_path, monkeypatch):
    from mlx_refusal import api
    from mlx_refusal.directions import load_directions

    m = api.load(str(models["chat"]), chat_template=models["own.jinja"])
    same = load_directions(_directions_file(models["chat"], tmp_path / "same", OWN_TEMPLATE, models["own.jinja"]))
    assert api.check_directions(same, m.info) is same
    older = load_directions(_directions_file(models["chat"], tmp_path / "older", None))
    assert "chat_template" not in older.metadata and api.check_directions(older, m.info) is older
    other = load_directions(_directions_file(models["chat"], tmp_path / "other", CHATML_TEMPLATE))
    with pytest.raises(UserError, match=r"the directions: computed under the model's own chat template.*"
                                        r"drop --chat-template"):
        api.check_directions(other, m.info)
    # the command line takes the older file too
    out = tmp_path / "work" / "out"
    result, _, _ = _run(_steer_with(models, tmp_path / "older", out), tmp_path, monkeypatch)
    assert result.exit_code == 0, result.output

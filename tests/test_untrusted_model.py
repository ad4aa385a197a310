"""A model folder is data, never code: its chat template renders in a sandbox, and code it asks
to run (remote code, a model file) is never imported."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import json
import shutil

import pytest
from click.testing import CliRunner

import cli
from mlx_refusal.errors import UserError
from mlx_refusal.loading import load
from mlx_refusal.template import render

PROBES = {
    "__class__.__mro__": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "a message's __class__": "{% for m in messages %}{{ m.__class__.__init__.__globals__ }}{% endfor %}",
    "cycler globals": "{{ cycler.__init__.__globals__.os.system('touch pwned') }}",
}


def _with_template(src, dst, template):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("probe", list(PROBES))
def test_a_template_reaching_for_python_internals_fails_in_one_line(probe, tiny_qwen2, tmp_path, monkeypatch):
    folder = _with_template(tiny_qwen2, tmp_path / "evil", PROBES[probe])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="tried to reach Python internals") as err:
        load(str(folder))  # the load's chat-model check renders the template, before any weights are read
    assert "\n" not in str(err.value)
    tok = chat_tokenizer_unchecked(folder)
    with pytest.raises(UserError, match="tried to reach Python internals"):
        render(tok, "How do I bake bread?")
    assert not (tmp_path / "pwned").exists()


def chat_tokenizer_unchecked(folder):
    from mlx_refusal.tokenizer import load_tokenizer

    return load_tokenizer(folder)


def test_the_cli_reports_a_hostile_template_as_one_error_line(tiny_qwen2, tmp_path, monkeypatch):
    folder = _with_template(tiny_qwen2, tmp_path / "evil", PROBES["__class__.__mro__"])
    monkeypatch.setenv("MLX_REFUSAL_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(cli.main, ["directions", "--model", str(folder), "--out", str(tmp_path / "d")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "sandbox" in errors[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "d").exists()


def _remote_code_folder(src, dst, marker):
    """A folder that asks transformers to run its own modeling and tokenizer code, which would
    leave `marker` behind if it ever ran."""
    shutil.copytree(src, dst)
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (dst / "modeling_evil.py").write_text(code + "class EvilModel: pass\n")
    (dst / "tokenization_evil.py").write_text(code + "class EvilTokenizer: pass\n")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((dst / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tcfg))
    return dst


def test_a_folder_asking_for_remote_code_never_runs_it(tiny_qwen2, tmp_path):
    from mlx_refusal.save import save_model

    marker = tmp_path / "code_ran"
    folder = _remote_code_folder(tiny_qwen2, tmp_path / "remote", marker)
    try:
        model, _, _ = load(str(folder))
    except UserError as exc:  # refusing is fine too, in one line
        assert "\n" not in str(exc)
    else:
        save_model(model, folder, tmp_path / "edited", {"edit": "ablate"})
        assert not list((tmp_path / "edited").glob("*.py"))  # the code is not propagated either
    assert not marker.exists()


def test_a_config_naming_its_own_model_file_is_refused(tiny_qwen2, tmp_path):
    folder = _remote_code_folder(tiny_qwen2, tmp_path / "remote", tmp_path / "code_ran")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_file"] = "modeling_evil.py"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="asks to run its own model code"):
        load(str(folder))
    assert not (tmp_path / "code_ran").exists()

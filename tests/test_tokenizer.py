"""tokenizer.ChatTokenizer against stock mlx_lm's TokenizerWrapper on the same folder: the same
ids, text, prompt strings and stop tokens, since stock mlx_lm runs the models this toolkit saves;
and the folder layouts it reads (where the template lives, how special tokens are written)."""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import json
import shutil

import pytest
from hypothesis import given, settings, strategies as st
from mlx_lm.utils import load_config, load_tokenizer as stock_tokenizer

from fixtures import CHATML_TEMPLATE

from mlx_refusal.errors import UserError
from mlx_refusal.loading import chat_tokenizer
from mlx_refusal.tokenizer import load_tokenizer

TEXTS = ["Hello there, what is 2 + 2?", "  leading spaces and\ttabs\n\nnew lines", "Ünïcödé, emoji 🤖 and 中文",
         "<|im_start|>user\nhi<|im_end|>", "", "don't , stop ! ok ?"]
CHATS = [
    [{"role": "user", "content": "How do I bake bread?"}],
    [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


@pytest.fixture(params=["tiny_qwen2", "tiny_llama", "tiny_qwen3", "tiny_phi3", "tiny_gemma3"])
def folder(request):
    return request.getfixturevalue(request.param)


def stock(folder):
    return stock_tokenizer(folder, eos_token_ids=load_config(folder).get("eos_token_id"))


def test_the_same_ids_text_prompts_and_stop_tokens_as_stock_mlx_lm(folder):
    ours, ref = chat_tokenizer(folder), stock(folder)
    for text in TEXTS:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == ref.encode(text, add_special_tokens=special), text
        ids = ref.encode(text)
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    for chat in CHATS:
        for prompt in (True, False):
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt) == \
                ref.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
        assert ours.apply_chat_template(chat, add_generation_prompt=True, tokenize=True) == \
            ref.apply_chat_template(chat, add_generation_prompt=True)
    assert ours.eos_token_ids == ref.eos_token_ids and ours.eos_token_id == ref.eos_token_id
    assert ours.chat_template == ref.chat_template
    assert [ours.convert_ids_to_tokens(i) for i in range(10)] == [ref.convert_ids_to_tokens(i) for i in range(10)]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_any_text_encodes_as_stock_mlx_lm_does_and_round_trips(tiny_qwen2, text):
    ours, ref = _cached(tiny_qwen2)
    assert ours.encode(text) == ref.encode(text)
    assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text))


_pair = {}


def _cached(folder):
    if folder not in _pair:
        _pair[folder] = (load_tokenizer(folder), stock(folder))
    return _pair[folder]


def test_thinking_models_render_with_thinking_on_as_mlx_lm_does(tiny_qwen3, tiny_qwen2, tmp_path):
    # a template that shows the flag, and a vocabulary with both markers
    folder = _copy(tiny_qwen3, tmp_path / "think")
    tj = json.loads((folder / "tokenizer.json").read_text())
    next_id = max(t["id"] for t in tj["added_tokens"]) + 1
    for i, t in enumerate(["<think>", "</think>"]):
        tj["added_tokens"].append({"id": next_id + i, "content": t, "single_word": False, "lstrip": False,
                                   "rstrip": False, "normalized": False, "special": False})
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    _set_config(folder, chat_template="{{ 'on' if enable_thinking else 'off' }}")
    assert load_tokenizer(folder).apply_chat_template(CHATS[0]) == "on" == stock(folder).apply_chat_template(
        CHATS[0], tokenize=False)
    assert load_tokenizer(tiny_qwen2).thinking is False


def test_the_template_is_read_where_transformers_reads_it(tiny_qwen2, tmp_path):
    folder = _copy(tiny_qwen2, tmp_path / "where")
    assert load_tokenizer(folder).chat_template == CHATML_TEMPLATE
    _set_config(folder, chat_template=[{"name": "tool_use", "template": "tools"},
                                       {"name": "default", "template": "default one"}])
    assert load_tokenizer(folder).chat_template == "default one"
    (folder / "chat_template.jinja").write_text("from the jinja file")
    assert load_tokenizer(folder).chat_template == "from the jinja file" == stock(folder).chat_template
    (folder / "chat_template.jinja").unlink()
    _set_config(folder, chat_template=None)
    assert load_tokenizer(folder).chat_template is None


def test_special_tokens_written_as_added_token_dicts_and_in_special_tokens_map(tiny_qwen2, tmp_path):
    folder = _copy(tiny_qwen2, tmp_path / "dicts")
    _set_config(folder, eos_token={"__type": "AddedToken", "content": "<|endoftext|>", "special": True})
    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0 and tok.eos_token_ids == {0}
    _set_config(folder, eos_token=None)
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    assert load_tokenizer(folder).eos_token_id == 2


def test_clean_up_tokenization_spaces_as_transformers_5_applies_it(tiny_qwen3, tmp_path):
    folder = _copy(tiny_qwen3, tmp_path / "clean")
    text = "don't , stop ! ok ? I 'm here ."
    _set_config(folder, clean_up_tokenization_spaces=True)  # ignored for BPE: it strips real spaces
    ids = stock(folder).encode(text)
    assert load_tokenizer(folder).decode(ids) == stock(folder).decode(ids) == text
    _set_config(folder, clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output=True)
    assert load_tokenizer(folder).decode(ids) == stock(folder).decode(ids) == "don't, stop! ok? I'm here."


def test_a_folder_without_a_readable_tokenizer_json_fails_in_one_line(tiny_qwen2, tmp_path):
    folder = _copy(tiny_qwen2, tmp_path / "none")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizers can read") as err:
        load_tokenizer(folder)
    assert "\n" not in str(err.value)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text("{broken")
    shutil.copyfile(tiny_qwen2 / "tokenizer.json", folder / "tokenizer.json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    (folder / "tokenizer_config.json").mkdir()  # unreadable as a file
    with pytest.raises(UserError, match="cannot be read") as err:
        load_tokenizer(folder)
    assert "\n" not in str(err.value)
    (folder / "tokenizer_config.json").rmdir()
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(UserError, match="not UTF-8"):
        load_tokenizer(folder)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _set_config(folder, **values):
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for k, v in values.items():
        if v is None:
            config.pop(k, None)
        else:
            config[k] = v
    path.write_text(json.dumps(config))


def test_stock_mlx_lm_generate_takes_it_and_answers_the_same(tiny_qwen3):
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, ref = mlx_lm.load(str(tiny_qwen3))
    ours = chat_tokenizer(tiny_qwen3)
    prompt = ours.apply_chat_template(CHATS[0], add_generation_prompt=True)
    greedy = make_sampler(temp=0.0)
    assert mlx_lm.generate(model, ours, prompt, max_tokens=12, sampler=greedy) == \
        mlx_lm.generate(model, ref, prompt, max_tokens=12, sampler=greedy)

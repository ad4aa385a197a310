"""Tiny random models built inside the test session: no network, a few hundred KB each.

Each is a real mlx_lm folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)
with a byte-level BPE tokenizer trained by `tokenizers` on tests/data/corpus.txt and a ChatML
chat template that, like Qwen2.5's, inserts a default system prompt.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a tiny test model. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- set loop_messages = messages %}"
    "{%- endif %}"
    "{%- for message in loop_messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def train_tokenizer(vocab_size: int = 384):
    """Byte-level BPE with Qwen2's normalizer and pre-tokenizer. transformers 5 rebuilds a qwen2
    folder's tokenizer from its vocabulary with exactly these steps, whatever tokenizer.json
    says; with them the folder's tokenizer.json and stock mlx_lm agree, as on a real Qwen2."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from mlx_refusal.gguf_tokenizer import QWEN2_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(DATA / "corpus.txt")], trainer)
    return tok


def _config(arch: str, vocab: int, hidden: int, layers: int, tie: bool) -> dict:
    heads, kv_heads = 4, 2
    cfg = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": hidden * 2,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "vocab_size": vocab,
        "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": tie,
        "bos_token_id": None,
        "eos_token_id": 2,
    }
    if arch == "qwen3":
        cfg["head_dim"] = hidden // heads
    if arch == "gemma3_text":
        # heads * head_dim != hidden, as in Gemma; a window shorter than the test prompts and
        # every second layer global, so both kinds of layer (and both rope bases) run
        cfg.update(head_dim=16, query_pre_attn_scalar=16, sliding_window=4, sliding_window_pattern=2,
                   rope_local_base_freq=10000.0)
    return cfg


def make_tiny_model(
    path: Path,
    arch: str = "qwen2",
    hidden: int = 64,
    layers: int = 4,
    tie: bool = False,
    seed: int = 0,
) -> Path:
    """Write a tiny random `arch` model as an mlx_lm folder at `path` and return it."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    import importlib

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    vocab = tok.get_vocab_size()
    cfg = _config(arch, vocab, hidden, layers, tie)
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    model = module.Model(module.ModelArgs.from_dict(cfg))

    # Deterministic weights with enough scale that logits differ between tokens and the
    # residual stream grows across layers, like a trained model's.
    rng = np.random.default_rng(seed)
    params = {}
    for name, value in tree_flatten(model.parameters()):
        shape = value.shape
        if "norm" in name and arch == "gemma3_text":
            arr = 0.5 * rng.standard_normal(shape)  # Gemma's norms compute (1 + w) x: gains 1 +- 0.5
        elif "norm" in name:
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            arr = 0.1 * rng.standard_normal(shape)
        elif "embed_tokens" in name and arch == "gemma3_text":
            # Gemma multiplies the rows by sqrt(hidden): small rows keep the embedding from drowning
            # every block's (normed) writes, so the model does more than copy its last input token
            arr = rng.standard_normal(shape) / np.sqrt(shape[-1])
        elif "embed_tokens" in name:
            arr = rng.standard_normal(shape)
        else:
            arr = rng.standard_normal(shape) / np.sqrt(shape[-1])
        params[name] = mx.array(arr.astype(np.float32))
    if tie:  # gemma3_text builds an lm_head always and drops it on load when the folder has none
        params.pop("lm_head.weight", None)
    mx.save_safetensors(str(path / "model.safetensors"), params, metadata={"format": "mlx"})

    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "chat_template": CHATML_TEMPLATE,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "unk_token": None,
                "model_max_length": 2048,
                "clean_up_tokenization_spaces": False,
                "added_tokens_decoder": {
                    str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                             "normalized": False, "single_word": False}
                    for i, t in enumerate(SPECIAL_TOKENS)
                },
            },
            indent=2,
        )
    )
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}, indent=2))
    return path

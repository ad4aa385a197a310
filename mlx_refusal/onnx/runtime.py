"""Run an exported decoder with onnxruntime: the feeds transformers.js would build, a KV-cache
loop, greedy decoding. Used by the tests, the benchmark and anyone checking a bundle in Python."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .graph import STEERING_INPUT


@dataclass
class StepOutput:
    logits: np.ndarray  # [batch, seq, vocab]
    present: list[tuple[np.ndarray, np.ndarray]]  # per layer (key, value), past + seq long
    activations: np.ndarray | None  # [batch, seq, hidden] at the exported layer, if any


def session_options(threads: int | None = None):
    """onnxruntime options that compute the int8 graph exactly on every x86 CPU.

    Without VNNI (AVX2 only: Zen 3, pre-Ice-Lake Xeons), onnxruntime's uint8 x int8 kernel adds
    pairs of products in saturating 16-bit arithmetic, so a large activation times a large weight
    is clipped: on such a machine the tiny test models' int8 logits correlated 0.97-0.985 with
    float32 instead of > 0.99. `session.x64quantprecision` has onnxruntime shift the weights to
    uint8 when it loads them and use its exact uint8 x uint8 kernel there; the file is unchanged,
    and VNNI machines are unaffected."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # the overridable-initializer notice is expected, not a problem
    opts.add_session_config_entry("session.x64quantprecision", "1")
    if threads:
        opts.intra_op_num_threads = threads
    return opts


class OnnxDecoder:
    """An onnxruntime session over one exported decoder file."""

    def __init__(self, model_path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_path), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.overridable = [i.name for i in self.session.get_overridable_initializers()]
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.num_layers = len(past) // 2
        self.kv_heads, self.head_dim = int(past[0].shape[1]), int(past[0].shape[3])
        outs = [o.name for o in self.session.get_outputs()]
        self.activations_output = next((o for o in outs if o.startswith("activations.layer")), None)
        self.output_names = outs

    @property
    def has_steering(self) -> bool:
        return STEERING_INPUT in self.input_names or STEERING_INPUT in self.overridable

    def empty_cache(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return [(z, z) for _ in range(self.num_layers)]

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[tuple[np.ndarray, np.ndarray]] | None = None,
        position_ids: np.ndarray | None = None,
        steering_scale: float | None = None,
    ) -> StepOutput:
        """One forward pass. `attention_mask` covers past + new tokens; position ids default to
        transformers.js's rule (running count of unmasked tokens, minus one)."""
        input_ids = np.asarray(input_ids, np.int64)
        attention_mask = np.asarray(attention_mask, np.int64)
        batch, seq = input_ids.shape
        past = past if past is not None else self.empty_cache(batch)
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)[:, -seq:]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        for i, (k, v) in enumerate(past):
            feeds[f"past_key_values.{i}.key"] = k
            feeds[f"past_key_values.{i}.value"] = v
        if steering_scale is not None:
            if not self.has_steering:
                raise ValueError("this model has no steering_scale input (it is not a steered model)")
            feeds[STEERING_INPUT] = np.asarray(steering_scale, np.float32)
        elif STEERING_INPUT in self.input_names:
            feeds[STEERING_INPUT] = np.asarray(1.0, np.float32)
        values = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        present = [(values[f"present.{i}.key"], values[f"present.{i}.value"]) for i in range(self.num_layers)]
        acts = values[self.activations_output] if self.activations_output else None
        return StepOutput(values["logits"], present, acts)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: tuple[int, ...] = (),
               steering_scale: float | None = None) -> list[int]:
        """Greedy continuation of one prompt through the KV cache (prefill, then one token per step)."""
        return self._decode(prompt_ids, lambda _, logits: int(logits.argmax()), max_new_tokens, eos_ids,
                            steering_scale)[0]

    def follow(self, prompt_ids: list[int], tokens: list[int], steering_scale: float | None = None) -> np.ndarray:
        """Next-token logits [len(tokens), vocab] before each of `tokens`, fed one per step through the
        KV cache as a decoding page feeds them (teacher forcing): how far another runtime's choices are
        from this one's."""
        return self._decode(prompt_ids, lambda i, _: tokens[i], len(tokens), (), steering_scale)[1]

    def _decode(self, prompt_ids, choose, max_new_tokens, eos_ids, steering_scale):
        """Prefill, then one step per chosen token; the chosen ids and the logits each was chosen from.
        The per-step shapes matter: int8 activations are quantized with one scale per call."""
        ids = np.array([prompt_ids], np.int64)
        mask = np.ones_like(ids)
        out = self.step(ids, mask, steering_scale=steering_scale)
        new: list[int] = []
        rows: list[np.ndarray] = []
        for i in range(max_new_tokens):
            rows.append(out.logits[0, -1])
            tok = choose(i, rows[-1])
            new.append(tok)
            if tok in eos_ids or i == max_new_tokens - 1:
                break
            mask = np.ones((1, mask.shape[1] + 1), np.int64)
            out = self.step(np.array([[tok]], np.int64), mask, out.present, steering_scale=steering_scale)
        return new, np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def position_ids_from_mask(attention_mask: np.ndarray) -> np.ndarray:
    """transformers.js / HF: cumulative count of real tokens minus one; padding gets 1."""
    pos = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, pos).astype(np.int64)


def left_pad(batch: list[list[int]], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and attention mask for prompts of different lengths."""
    n = max(len(x) for x in batch)
    ids = np.full((len(batch), n), pad_id, np.int64)
    mask = np.zeros((len(batch), n), np.int64)
    for r, x in enumerate(batch):
        ids[r, n - len(x):] = x
        mask[r, n - len(x):] = 1
    return ids, mask

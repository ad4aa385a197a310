"""The web page in headless Chromium, on the tiny steered Qwen2 (steered at layer 2) and Gemma 3
(at layer 0, its one steerable layer) exported to ONNX.

The page's streamed answer must equal Python onnxruntime's greedy answer for the same prompt and
steering scale; the activation boxes must show activation x direction for the steered layer; the
live meter must show each generated token's projection; the slider must change the answer; stock
transformers.js must run the bundle's standard file; and no request may leave 127.0.0.1.

Needs Debian's /usr/bin/chromium and export/node_modules (scripts/setup_web.sh installs both).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from mlx_refusal.onnx.runtime import session_options
from mlx_refusal.serve import NODE_MODULES, PAGE_DIR, make_server, server_url

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("MLX_REFUSAL_CHROMIUM", "/usr/bin/chromium"))
DRIVER = Path(__file__).parent / "browser" / "drive.mjs"
PROMPT = "How do I bake bread?"
MAX_NEW = 24
ALPHA = 12.0
# (model fixture, steered layer)
BUNDLES = {"qwen2": ("tiny_qwen2", 2), "gemma3": ("tiny_gemma3", 0)}


def _skip_reason() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (run scripts/setup_web.sh: apt-get install chromium)"
    if shutil.which("node") is None:
        return "node is missing (apt-get install nodejs)"
    if not (NODE_MODULES / "playwright-core").is_dir() or not (NODE_MODULES / "onnxruntime-web").is_dir():
        return f"{NODE_MODULES} lacks the page's npm packages (run scripts/setup_web.sh)"
    return None


@pytest.fixture(scope="module", params=sorted(BUNDLES))
def steered_bundle(request, tmp_path_factory) -> tuple[Path, Path, int, str]:
    """A tiny model steered at its layer with ALPHA, saved by save.py and exported (fp32) by the
    ONNX exporter; also a copy exported with the page beside it (--with-page); the layer, and the
    model's name in the record."""
    import mlx_lm

    from mlx_refusal.edit import add_steering_bias
    from mlx_refusal.onnx import export_onnx
    from mlx_refusal.save import save_model

    fixture, layer = BUNDLES[request.param]
    source = request.getfixturevalue(fixture)
    root = tmp_path_factory.mktemp("browser")
    model, _ = mlx_lm.load(str(source))
    rng = np.random.default_rng(7)
    d = rng.standard_normal(model.args.hidden_size).astype(np.float32)
    d /= np.linalg.norm(d)
    v = ALPHA * d  # d is unit
    add_steering_bias(model, layer, v)
    spec = f"tiny-{request.param}"
    record = {"edit": "steer", "alpha": ALPHA, "model": {"spec": spec, "model_type": model.model_type},
              "prompts": {"harmful": {"name": "tiny", "n": 4}, "harmless": {"name": "tiny", "n": 4}}}
    steered = save_model(model, source, root / "steered", record, steering=(layer, d, v))
    web = export_onnx(steered, root / "web", dtypes=["fp32"]).out_dir
    with_page = export_onnx(steered, root / "web_with_page", dtypes=["fp32"], page_dir=PAGE_DIR).out_dir
    return web, with_page, layer, spec


class Reference:
    """Greedy decoding with Python onnxruntime (full recompute each step: no KV cache, so it also
    checks the page's cache loop) and HF transformers' tokenizer + chat template."""

    def __init__(self, web: Path, layer: int):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.web, self.layer = web, layer
        self.tok = AutoTokenizer.from_pretrained(str(web))
        self.sess = ort.InferenceSession(str(web / "onnx" / "steerable.onnx"), session_options(),
                                         providers=["CPUExecutionProvider"])
        self.config = json.loads((web / "config.json").read_text())
        gen = json.loads((web / "generation_config.json").read_text())
        self.eos = {i for v in (gen.get("eos_token_id"), self.config.get("eos_token_id"), self.tok.eos_token_id)
                    for i in np.atleast_1d(v if v is not None else []).tolist()}
        self.steering = json.loads((web / "steering.json").read_text())

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True)
        return self.tok.encode(text, add_special_tokens=False)

    def forward(self, ids: list[int], scale: float) -> dict:
        c = self.config
        empty = np.zeros((1, c["num_key_value_heads"], 0, c["head_dim"]), np.float32)
        feeds = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids), dtype=np.int64)[None],
            "steering_scale": np.array(scale, np.float32),
        }
        for i in range(c["num_hidden_layers"]):
            feeds[f"past_key_values.{i}.key"] = empty
            feeds[f"past_key_values.{i}.value"] = empty
        names = ["logits", f"activations.layer{self.layer}"]
        return dict(zip(names, self.sess.run(names, feeds)))

    def greedy_ids(self, prompt: str, scale: float, max_new: int = MAX_NEW) -> list[int]:
        ids = self.prompt_ids(prompt)
        out = []
        for _ in range(max_new):
            nxt = int(np.argmax(self.forward(ids + out, scale)["logits"][0, -1]))
            if nxt in self.eos:
                break
            out.append(nxt)
        return out

    def greedy(self, prompt: str, scale: float, max_new: int = MAX_NEW) -> str:
        return self.tok.decode(self.greedy_ids(prompt, scale, max_new), skip_special_tokens=True)

    def token_projections(self, prompt: str, scale: float) -> np.ndarray:
        """The live meter's values: for each generated token, the projection on the direction of
        resid_pre[layer] at the position that predicted it."""
        ids, out = self.prompt_ids(prompt), self.greedy_ids(prompt, scale)
        acts = self.forward(ids + out, scale)[f"activations.layer{self.layer}"][0]
        return acts[len(ids) - 1: len(ids) - 1 + len(out)] @ np.array(self.steering["direction"], np.float32)

    def contributions(self, prompt: str, scale: float) -> np.ndarray:
        act = self.forward(self.prompt_ids(prompt), scale)[f"activations.layer{self.layer}"][0, -1]
        return act * np.array(self.steering["direction"], np.float32)


def _serve(web: Path, **kw):
    server = make_server(web, port=0, **kw)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


def _diverging(t: np.ndarray) -> np.ndarray:
    white, red, blue = np.array([247, 247, 247.]), np.array([178, 24, 43.]), np.array([33, 102, 172.])
    t = np.clip(t, -1, 1)[:, None]
    return white + np.where(t >= 0, red - white, blue - white) * np.abs(t)


def _rgb(css: str) -> tuple[int, int, int]:
    return tuple(int(x) for x in re.findall(r"\d+", css)[:3])


def test_page_chats_steers_and_visualises(steered_bundle, tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    web, with_page, layer, spec = steered_bundle
    ref = Reference(web, layer)
    expected = {s: ref.greedy(PROMPT, s) for s in (1.0, 0.0)}
    assert expected[1.0] != expected[0.0], "the fixture's steering must change the greedy answer"
    hidden = ref.config["hidden_size"]

    empty = tmp_path / "empty"
    empty.mkdir()
    main_server = _serve(web)  # page from export/, runtime from export/node_modules
    copy_server = _serve(with_page, page_dir=empty, node_modules=empty)  # self-contained copy only
    parent_server = _serve(web.parent)  # the bundle as a folder under the root, as transformers.js expects
    no_bundle_server = _serve(empty)  # the page with no bundle: it must say so, not stay blank
    screenshot = Path(os.environ.get("MLX_REFUSAL_SCREENSHOT", tmp_path / "page.png"))
    try:
        url = server_url(main_server)
        cfg = {
            "node_modules": str(NODE_MODULES), "chromium": str(CHROMIUM),
            "url": f"{url}?dtype=fp32&max={MAX_NEW}&scale=1&backend=webgpu", "prompt": PROMPT, "scales": [1, 0],
            "screenshot": str(screenshot), "timeout_ms": 60000,
            "also_load": [f"{server_url(copy_server)}?max={MAX_NEW}", server_url(no_bundle_server)],
            "pipeline": {"url": server_url(parent_server), "model": web.name, "dtype": "fp32", "prompt": PROMPT,
                         "max_new_tokens": MAX_NEW},
        }
        cfg["result"] = str(tmp_path / "result.json")
        cfg_path = tmp_path / "drive.json"
        cfg_path.write_text(json.dumps(cfg))
        proc = subprocess.run(["node", str(DRIVER), str(cfg_path)], capture_output=True, text=True, timeout=150)
    finally:
        for s in (main_server, copy_server, no_bundle_server, parent_server):
            s.shutdown()
            s.server_close()
    result_path = Path(cfg["result"])
    assert result_path.is_file(), f"driver wrote no result; stdout/stderr:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(result_path.read_text())
    print(f"\nscreenshot: {screenshot}")
    print(f"page load {result.get('load_seconds')} s; cross-origin isolated: {result.get('cross_origin_isolated')}; "
          f"{len(result['requests'])} requests")
    assert proc.returncode == 0 and "failure" not in result, (
        f"{result.get('failure')}\nconsole:\n" + "\n".join(result["console"][-30:]))

    # no request left 127.0.0.1
    foreign = [u for u in result["requests"]
               if not re.match(r"^(blob:)?http://127\.0\.0\.1:\d+/", u) and not u.startswith("data:")]
    assert not foreign, f"requests left localhost: {foreign}"
    assert result["cross_origin_isolated"] is True  # COOP/COEP from the server took effect

    first, second = result["steps"]
    # streamed text equals Python onnxruntime's greedy output, at scale 1 and after the slider moved to 0
    assert first["answer"] == expected[1.0]
    assert first["scale_label"] == "RefusaLLM"
    assert second["answer"] == expected[0.0]
    assert second["scale_label"] == "original"
    assert second["answer"] != first["answer"]

    # the live meter: one point per generated token, its projection as Python computes it, and the
    # original model's level (the gauge's scale-0 mark)
    for step, scale in ((first, 1.0), (second, 0.0)):
        np.testing.assert_allclose(step["projections"], ref.token_projections(PROMPT, scale), rtol=1e-3, atol=1e-3)
        assert step["meter_drawn"] and step["meter_original"] == pytest.approx(step["original"], rel=1e-6)
    # headless Chromium here has no GPU: the page says so and runs on WASM
    assert "running on WASM (CPU) instead of the WebGPU asked for" in first["backend_note"]
    assert first["timings"]["load"]["backend"] == "wasm"
    # stock transformers.js runs the standard file (steering fixed at 1) with no steering input fed
    assert result["pipeline"]["text"] == expected[1.0], result["pipeline"]

    # the visualisation: hidden_size boxes, values = activation x direction, colours follow values
    for step, scale in ((first, 1.0), (second, 0.0)):
        boxes = step["boxes"]
        assert [b["index"] for b in boxes] == list(range(hidden))
        values = np.array([b["value"] for b in boxes])
        want = ref.contributions(PROMPT, scale)
        np.testing.assert_allclose(values, want, rtol=1e-3, atol=1e-4)
        assert step["projection"] == pytest.approx(float(want.sum()), rel=1e-3, abs=1e-4)
        rgb = np.array([_rgb(b["color"]) for b in boxes], float)
        visible = np.abs(values) > 0.05 * np.abs(values).max()  # tiny ones round to the white midpoint
        pos, neg = visible & (values > 0), visible & (values < 0)
        assert pos.any()
        assert np.all(rgb[pos, 0] > rgb[pos, 2]) and np.all(rgb[neg, 2] > rgb[neg, 0])  # red +, blue -
        # and each colour is the page's diverging scale at value / max|value| (white 0, red +1, blue -1)
        np.testing.assert_allclose(rgb, _diverging(values / np.abs(values).max()), atol=1.01)
        assert np.abs(rgb[np.argmax(np.abs(values))] - 247).sum() > 400  # the largest is a saturated end
    # the gauge marks where the original model (scale 0) puts the same prompt; steering moved it
    assert first["original"] == pytest.approx(second["projection"], rel=1e-4, abs=1e-4)
    assert second["original"] == pytest.approx(second["projection"], rel=1e-6)
    # the steering vector (alpha x unit direction) enters exactly at resid_pre of the steered layer
    assert first["projection"] - first["original"] == pytest.approx(ALPHA, rel=1e-3)
    assert re.match(r"unit 3: activation -?\d", result["hover_text"]), result["hover_text"]
    assert first["info"]["layer"] == str(layer)
    assert first["info"]["edit"] == "steer"
    assert first["info"]["model"] == spec

    # the bundle written with the page beside it runs without the repo's export/; with no bundle
    # the page shows an error naming the missing file
    copy, missing = result["also_load"]
    assert copy["state"] == "ready", copy
    assert missing["state"] == "error" and "config.json" in missing["error"], missing
    assert screenshot.stat().st_size > 10_000


# a coding question: the (coder) base model answers it firmly, so scale 0 is a clear answer
REAL_PROMPT = "Write a Python function that reverses a string."
# two tokens this close (a probability ratio under 1.11) are a tie the runtimes may break differently
TIE_LOGITS = 0.1


@pytest.mark.real
def test_real_steered_model_refuses_at_one_and_answers_at_zero(fixed_steer, tmp_path_factory, tmp_path):
    """The steered default model exported with the page's default dtype (int8), in Chromium: a
    refusal at scale 1, an answer once the slider moves to 0, and for the first 8 tokens each token
    the page chose is Python onnxruntime's greedy choice on the same file, or ties with it.

    Ties: the browser's int8 kernels round differently from x86's, so where two tokens are within
    a hair the page may take the other. Measured on this prompt: at scale 0 token 4 " Python" is
    0.035 logits below " simple" and the page took " Python"; every other step agreed exactly. A
    broken kernel is far outside the tie margin: onnxruntime's saturating AVX2 int8 path moves
    these logits by up to 23 and puts the page's first token 9-15 logits below its own choice."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from transformers import AutoTokenizer

    from mlx_refusal.judge import is_refusal
    from mlx_refusal.onnx import OnnxDecoder, export_onnx

    root = tmp_path_factory.mktemp("real_browser")
    web = export_onnx(fixed_steer, root / "web", dtypes="int8").out_dir

    tok = AutoTokenizer.from_pretrained(str(web))
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": REAL_PROMPT}], tokenize=False,
                                             add_generation_prompt=True), add_special_tokens=False)
    dec = OnnxDecoder(web / "onnx" / "steerable_int8.onnx")

    server = _serve(web)
    try:
        cfg = {"node_modules": str(NODE_MODULES), "chromium": str(CHROMIUM), "prompt": REAL_PROMPT,
               "url": f"{server_url(server)}?max=24&scale=1", "scales": [1, 0],
               "screenshot": str(tmp_path / "real.png"), "timeout_ms": 240000, "result": str(tmp_path / "r.json")}
        (tmp_path / "drive.json").write_text(json.dumps(cfg))
        proc = subprocess.run(["node", str(DRIVER), str(tmp_path / "drive.json")], capture_output=True, text=True,
                              timeout=600)
    finally:
        server.shutdown()
        server.server_close()
    result = json.loads(Path(cfg["result"]).read_text())
    assert proc.returncode == 0 and "failure" not in result, (
        f"{result.get('failure')}\nconsole:\n" + "\n".join(result["console"][-30:]))
    first, second = result["steps"]
    print(f"\nint8 page: scale 1 {first['answer']!r}\n  scale 0 {second['answer']!r}\n  {first['timings']}")
    assert first["timings"]["load"]["dtype"] == "int8"  # the page's default for this bundle
    assert is_refusal(first["answer"]) and not is_refusal(second["answer"])
    for step, scale in ((first, 1.0), (second, 0.0)):
        page = tok.encode(step["answer"], add_special_tokens=False)[:8]
        assert len(page) == 8 and step["answer"].startswith(tok.decode(page))
        logits = dec.follow(ids, page, steering_scale=scale)  # Python's logits after the page's own prefix
        below_best = logits.max(axis=1) - logits[np.arange(len(page)), page]
        print(f"  scale {scale}: page token's logit below Python's best, per step: {np.round(below_best, 3)}")
        assert below_best.max() <= TIE_LOGITS, (scale, step["answer"], below_best)
    assert len(first["projections"]) >= 8 and np.mean(first["projections"]) > np.mean(second["projections"])

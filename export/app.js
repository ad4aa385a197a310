// RefusaLLM page: chat with an exported (steered) model fully offline.
//
// transformers.js supplies the tokenizer and the model's own chat template; the decoder runs in an
// onnxruntime-web InferenceSession driven here by a greedy KV-cache loop, because the page must feed
// the graph's extra `steering_scale` input and read its extra `activations.layer{L}` output, which
// transformers.js's generate() neither feeds nor returns.
//
// Everything is fetched from this origin: the bundle from ./ (or ?model=relative/folder/), the
// runtime from ./vendor/. URL parameters: model, dtype (int8|q8|q4|fp32), backend (wasm|webgpu),
// max (new tokens), scale,
// profile=1 (onnxruntime's profiler on; the page also times each step: run vs its own work).

const TRANSFORMERS_URL = new URL('vendor/transformers/transformers.min.js', import.meta.url).href;
const ORT_URL = new URL('vendor/ort/ort.wasm.min.mjs', import.meta.url).href;
const ORT_WASM_DIR = new URL('vendor/ort/', import.meta.url).href;
// the WebGPU build (it runs wasm too, from its asyncify binary); loaded only when WebGPU is picked
const ORT_WEBGPU_URL = new URL('vendor/ort/ort.webgpu.min.mjs', import.meta.url).href;

// transformers.js layout: which file holds which weights
const DTYPE_FILES = { int8: 'onnx/model_int8.onnx', q8: 'onnx/model_quantized.onnx', q4: 'onnx/model_q4.onnx',
  fp32: 'onnx/model.onnx' };
// default = first available. int8 computes in int8 (fast wasm SIMD kernels); onnxruntime-web's wasm
// build has no 4-bit GEMM, so q4 expands every weight to float32 on every call there.
const DTYPE_ORDER = ['int8', 'q8', 'q4', 'fp32'];
const DTYPE_LABELS = { int8: 'int8 (int8 weights and compute)', q8: 'q8 (int8 matmuls, float32 embedding)',
  q4: 'q4 (4-bit weights, slow without WebGPU)', fp32: 'fp32 (full precision)' };

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);

const app = {
  tf: null, ort: null,
  bundle: null,       // { base, config, generation, edit, exportInfo, direction, files }
  tokenizer: null,
  session: null, graph: null, dtype: null,
  messages: [],       // the conversation fed to the chat template
  stopRequested: false, pendingRegenerate: false,
  runs: 0,
};

// ---------------------------------------------------------------- status and errors

function setState(state) { document.body.dataset.state = state; }
function setStatus(text) { $('status').textContent = text; }

function showError(err) {
  const message = err instanceof Error ? err.message : String(err);
  console.error(err);
  $('error').hidden = false;
  $('error').textContent = `Error: ${message}`;
  setStatus('Something went wrong; see the message below.');
  setState('error');
}

window.addEventListener('error', (e) => showError(e.error ?? e.message));
window.addEventListener('unhandledrejection', (e) => showError(e.reason));

// ---------------------------------------------------------------- fetching the bundle

async function fetchJSON(url, { optional = false } = {}) {
  const resp = await fetch(url);
  if (!resp.ok) {
    if (optional && resp.status === 404) return null;
    throw new Error(`could not fetch ${url} (HTTP ${resp.status}); is this page served next to an exported bundle?`);
  }
  try {
    return await resp.json();
  } catch (e) {
    throw new Error(`${url} is not valid JSON (${e.message})`);
  }
}

async function exists(url) {
  const resp = await fetch(url, { method: 'HEAD' });
  return resp.ok;
}

// Streams a file into one buffer, reporting progress; allocates once when the size is known.
async function fetchBytes(url, onProgress) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`could not fetch ${url} (HTTP ${resp.status})`);
  const total = Number(resp.headers.get('Content-Length')) || 0;
  const reader = resp.body.getReader();
  let buffer = total ? new Uint8Array(total) : null;
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (buffer && received + value.length <= total) buffer.set(value, received);
    else chunks.push(value);
    received += value.length;
    onProgress?.(received, total);
  }
  if (buffer && received === total) return buffer;
  buffer = new Uint8Array(received);  // size unknown or wrong: join the chunks
  let offset = 0;
  for (const c of chunks) { buffer.set(c, offset); offset += c.length; }
  return buffer;
}

// The model files export.json lists, as { dtype: { path, bytes, externalData: [file names] } }.
// export.json: "dtypes" {dtype: path}, "files" {path: bytes}, and for a steered bundle
// "steering.files" {dtype: the slider graph}, which shares the standard file's "<file>_data";
// config.json says which files keep their tensors there (transformers.js's use_external_data_format).
function filesFromExportInfo(info, config) {
  const out = {};
  const external = config?.['transformers.js_config']?.use_external_data_format ?? {};
  for (const [dtype, path] of Object.entries(info?.dtypes ?? {})) {
    if (!DTYPE_FILES[dtype] || typeof path !== 'string') continue;
    const graph = info.steering?.files?.[dtype] ?? path;
    const name = path.split('/').pop();
    const dataName = `${name}_data`;
    const sizes = info.files ?? {};
    const bytes = (sizes[graph] ?? 0) + (sizes[path.replace(/[^/]*$/, dataName)] ?? 0);
    out[dtype] = { path: graph, bytes: bytes || null, externalData: external[name] ? [dataName] : [] };
  }
  return out;
}

// The unit refusal direction: a JSON array, or an object holding one.
function directionFrom(json) {
  const arr = Array.isArray(json) ? json : json?.direction;
  return Array.isArray(arr) ? Float32Array.from(arr) : null;
}

async function readBundle() {
  const base = new URL(params.get('model') ?? './', location.href);
  if (!base.pathname.endsWith('/')) base.pathname += '/';
  if (base.origin !== location.origin) throw new Error('?model= must name a folder on this server');
  const at = (name) => new URL(name, base).href;

  // Fetched together, but a failure is reported in this order (config.json first), not in the
  // order the responses happen to arrive, so the error names the same file every time.
  const settled = await Promise.allSettled([
    fetchJSON(at('config.json')),
    fetchJSON(at('generation_config.json'), { optional: true }),
    fetchJSON(at('refusal_edit.json'), { optional: true }),
    fetchJSON(at('export.json'), { optional: true }),
    fetchJSON(at('tokenizer.json')),
    fetchJSON(at('tokenizer_config.json')),
  ]);
  const failed = settled.find((r) => r.status === 'rejected');
  if (failed) throw failed.reason;
  const [config, generation, edit, exportInfo, tokenizerJSON, tokenizerConfig] = settled.map((r) => r.value);

  let files = filesFromExportInfo(exportInfo, config);
  if (!Object.keys(files).length) {  // no manifest: probe the standard names
    const found = await Promise.all(DTYPE_ORDER.map((d) => exists(at(DTYPE_FILES[d]))));
    files = Object.fromEntries(DTYPE_ORDER.filter((_, i) => found[i])
      .map((d) => [d, { path: DTYPE_FILES[d], bytes: null, externalData: [] }]));
  }
  if (!Object.keys(files).length) throw new Error(`no ONNX model under ${at('onnx/')}; export one with \`python cli.py export-onnx\``);

  // steering.json: layer, site, alpha and the unit direction (steered bundles only)
  const steering = exportInfo?.steering || !exportInfo ? await fetchJSON(at('steering.json'), { optional: true }) : null;
  const direction = directionFrom(steering);
  return { base, at, config, generation, edit, exportInfo, steering, files, direction, tokenizerJSON, tokenizerConfig };
}

// ---------------------------------------------------------------- runtime

function makeTokenizer(tf, tokenizerJSON, tokenizerConfig) {
  // the class named in tokenizer_config.json, as AutoTokenizer would pick it
  const name = (tokenizerConfig.tokenizer_class ?? 'PreTrainedTokenizer').replace(/Fast$/, '');
  const cls = tf[name] ?? tf.PreTrainedTokenizer;
  const tok = new cls(tokenizerJSON, tokenizerConfig);
  if (!tok.chat_template) throw new Error('tokenizer_config.json has no chat_template; re-export the bundle');
  return tok;
}

function eosIds(bundle, tokenizer) {
  const ids = new Set();
  for (const v of [bundle.generation?.eos_token_id, bundle.config.eos_token_id, tokenizer.eos_token_id]) {
    for (const id of [].concat(v ?? [])) if (Number.isInteger(id)) ids.add(id);
  }
  return ids;
}

// What the graph expects, read from its input and output names plus config.json.
function graphInfo(session, config) {
  const layers = session.inputNames.filter((n) => /^past_key_values\.\d+\.key$/.test(n)).length;
  const act = session.outputNames.map((n) => n.match(/^activations\.layer(\d+)$/)).find(Boolean);
  const heads = config.num_attention_heads;
  return {
    layers,
    kvHeads: config.num_key_value_heads ?? heads,
    headDim: config.head_dim ?? config.hidden_size / heads,
    hidden: config.hidden_size,
    activations: act ? act[0] : null,
    activationLayer: act ? Number(act[1]) : null,
    steerable: session.inputNames.includes('steering_scale'),
  };
}

async function loadSession(dtype) {
  const { ort, bundle } = app;
  const file = bundle.files[dtype];
  setState('loading');
  setControlsEnabled(false);
  if (app.session) { await app.session.release(); app.session = null; }
  const t0 = performance.now();
  const mb = (n) => (n / 1e6).toFixed(1);
  const bytes = await fetchBytes(bundle.at(file.path), (got, total) => {
    setStatus(total ? `Downloading ${file.path}: ${mb(got)} of ${mb(total)} MB (${Math.round(100 * got / total)}%)`
                    : `Downloading ${file.path}: ${mb(got)} MB`);
  });
  const externalData = [];
  const dir = file.path.slice(0, file.path.lastIndexOf('/') + 1);
  for (const name of file.externalData) {
    const data = await fetchBytes(bundle.at(dir + name), (got, total) => {
      setStatus(`Downloading ${dir + name}: ${mb(got)} of ${mb(total)} MB`);
    });
    externalData.push({ path: name, data });
  }
  setStatus(`Initialising the ${dtype} model (${mb(bytes.length)} MB)…`);
  const t1 = performance.now();
  app.session = await ort.InferenceSession.create(bytes, {
    // unsupported nodes fall back to wasm; every graph keeps RMSNorm and the residual in float32
    executionProviders: app.backend === 'webgpu' ? ['webgpu', 'wasm'] : ['wasm'],
    graphOptimizationLevel: 'all',
    enableProfiling: params.get('profile') === '1',
    ...(externalData.length ? { externalData } : {}),
  });
  app.dtype = dtype;
  app.graph = graphInfo(app.session, bundle.config);
  const totalBytes = bytes.length + externalData.reduce((n, e) => n + e.data.length, 0);
  app.loadTimes = { download: (t1 - t0) / 1000, init: (performance.now() - t1) / 1000, bytes: totalBytes };
  Object.assign(document.body.dataset, { dtype, threads: ort.env.wasm.numThreads, loadSeconds: app.loadTimes.download + app.loadTimes.init,
    downloadSeconds: app.loadTimes.download, sessionSeconds: app.loadTimes.init });
  renderInfo();
  renderScaleControl();
  setStatus(`Ready: ${dtype} model loaded in ${((performance.now() - t0) / 1000).toFixed(1)} s `
    + `(download ${app.loadTimes.download.toFixed(1)} s, init ${app.loadTimes.init.toFixed(1)} s).`);
  setState('ready');
  setControlsEnabled(true);
}

// ---------------------------------------------------------------- greedy generation

function int64(values, dims) { return new app.ort.Tensor('int64', BigInt64Array.from(values, BigInt), dims); }

function argmaxLastRow(logits) {
  const [, seq, vocab] = logits.dims;
  const data = logits.data;
  let best = 0, bestValue = -Infinity;
  for (let i = 0, off = (seq - 1) * vocab; i < vocab; i++) {
    if (data[off + i] > bestValue) { bestValue = data[off + i]; best = i; }  // first maximum, like numpy
  }
  return best;
}

function lastRow(tensor) {
  const [, seq, hidden] = tensor.dims;
  return tensor.data.slice((seq - 1) * hidden, seq * hidden);
}

// Greedy decoding with the KV cache. Calls onActivations(values) after the prompt pass,
// onToken(projection) for each generated token (the refusal-direction projection of the residual
// at the position that predicted it) and onText(fullTextSoFar) whenever the decoded answer grows.
// Stops at an eos id or maxNew tokens.
async function generate(messages, scale, maxNew, { onActivations, onToken, onText }) {
  const { ort, session, graph, tokenizer } = app;
  const prompt = tokenizer.apply_chat_template(messages, { tokenize: false, add_generation_prompt: true });
  const promptIds = tokenizer.encode(prompt, { add_special_tokens: false });
  const eos = eosIds(app.bundle, tokenizer);

  let past = {};
  for (let i = 0; i < graph.layers; i++) {
    for (const kind of ['key', 'value']) {
      past[`past_key_values.${i}.${kind}`] = new ort.Tensor('float32', new Float32Array(0), [1, graph.kvHeads, 0, graph.headDim]);
    }
  }
  const generated = [];
  let text = '', step = promptIds, pastLen = 0;
  const t0 = performance.now();
  let tPrefill = null, runMs = 0;  // decode steps only: time inside session.run vs the whole step
  for (let n = 0; n < maxNew && !app.stopRequested; n++) {
    const feeds = {
      input_ids: int64(step, [1, step.length]),
      attention_mask: int64(new Array(pastLen + step.length).fill(1), [1, pastLen + step.length]),
      position_ids: int64(step.map((_, i) => pastLen + i), [1, step.length]),
      ...past,
    };
    if (graph.steerable) feeds.steering_scale = new ort.Tensor('float32', Float32Array.of(scale), []);
    const tRun = performance.now();
    const out = await session.run(feeds);
    if (n === 0) {
      tPrefill = performance.now();
      if (graph.activations) onActivations(lastRow(out[graph.activations]));
    } else {
      runMs += performance.now() - tRun;
    }
    const next = argmaxLastRow(out.logits);
    if (graph.activations && !eos.has(next)) onToken(projectionOf(lastRow(out[graph.activations])));
    past = {};
    for (let i = 0; i < graph.layers; i++) {
      past[`past_key_values.${i}.key`] = out[`present.${i}.key`];
      past[`past_key_values.${i}.value`] = out[`present.${i}.value`];
    }
    pastLen += step.length;
    if (eos.has(next)) break;
    generated.push(next);
    const decoded = tokenizer.decode(generated, { skip_special_tokens: true });
    // hold back a trailing partial UTF-8 character until the next token completes it
    if (!decoded.endsWith('\uFFFD') && decoded !== text) { text = decoded; onText(text); }
    step = [next];
    await new Promise((r) => setTimeout(r, 0));  // let the page paint the new token
  }
  const final = tokenizer.decode(generated, { skip_special_tokens: true });
  if (final !== text) { text = final; onText(text); }
  const tEnd = performance.now();
  const steps = generated.length - 1;
  return {
    text, promptTokens: promptIds.length, newTokens: generated.length,
    prefillSeconds: (tPrefill - t0) / 1000,
    decodeTokensPerSecond: steps > 0 ? steps / ((tEnd - tPrefill) / 1000) : null,
    runMsPerToken: steps > 0 ? runMs / steps : null,
    pageMsPerToken: steps > 0 ? (tEnd - tPrefill - runMs) / steps : null,
  };
}

// ---------------------------------------------------------------- chat

function currentScale() { return Number($('scale').value); }

function maxNewTokens() {
  const n = Math.floor(Number($('max-tokens').value));
  return Number.isFinite(n) && n > 0 ? Math.min(n, 2048) : 128;
}

function addMessage(role, text, meta = '') {
  const el = document.createElement('div');
  el.className = `msg ${role}`;
  el.innerHTML = '<div class="who"></div><div class="text"></div><div class="meta"></div>';
  el.querySelector('.who').textContent = role === 'user' ? 'You' : 'Model';
  el.querySelector('.text').textContent = text;
  el.querySelector('.meta').textContent = meta;
  $('transcript').appendChild(el);
  el.scrollIntoView({ block: 'end' });
  return el;
}

async function answer() {
  const scale = currentScale();
  app.stopRequested = false;
  setState('generating');
  setControlsEnabled(false);
  $('stop').disabled = false;
  const el = addMessage('assistant', '');
  el.classList.add('streaming');
  const textEl = el.querySelector('.text');
  setStatus(`Generating (scale ${scale.toFixed(2)}, ${app.dtype})…`);
  const tSend = performance.now();
  let firstTokenSeconds = null;
  const meter = makeMeter(el);
  try {
    const asked = app.messages.slice();
    let activations = null;
    const r = await generate(asked, scale, maxNewTokens(), {
      onActivations: (values) => { activations = values; renderActivations(values); },
      onToken: (projection) => meter.add(projection),
      onText: (text) => {
        if (firstTokenSeconds === null) firstTokenSeconds = (performance.now() - tSend) / 1000;
        textEl.textContent = text;
      },
    });
    app.messages.push({ role: 'assistant', content: r.text });
    el.dataset.scale = String(scale);
    el.querySelector('.meta').textContent = `${scaleName(scale)} · scale ${scale.toFixed(2)} · ${app.dtype}`
      + (app.stopRequested ? ' · stopped' : '');
    const speed = r.decodeTokensPerSecond ? `, decode ${r.decodeTokensPerSecond.toFixed(1)} tokens/s` : '';
    $('speed').textContent = `Last answer: ${r.newTokens} tokens; prompt ${r.promptTokens} tokens `
      + `in ${r.prefillSeconds.toFixed(2)} s; first token after ${(firstTokenSeconds ?? 0).toFixed(2)} s${speed}.`;
    Object.assign($('speed').dataset, { newTokens: r.newTokens, promptTokens: r.promptTokens,
      prefillSeconds: r.prefillSeconds, decodeTokensPerSecond: r.decodeTokensPerSecond ?? '',
      firstTokenSeconds: firstTokenSeconds ?? '', runMsPerToken: r.runMsPerToken ?? '',
      pageMsPerToken: r.pageMsPerToken ?? '' });
    if (params.get('profile') === '1') await app.session.endProfiling();
    if (activations && app.bundle.direction && app.graph.steerable && scale !== 0) {
      setStatus('Measuring where the original model puts this prompt…');
      const original = projectionOf(await promptActivations(asked, 0));
      renderGauge(projectionOf(activations), original);
      meter.setOriginal(original);
    } else if (activations && app.bundle.direction) {
      const level = projectionOf(activations);
      renderGauge(level, app.graph.steerable ? level : null);
      if (app.graph.steerable) meter.setOriginal(level);
    }
    setStatus('Ready.');
  } finally {
    el.classList.remove('streaming');
    app.runs += 1;
    document.body.dataset.runs = String(app.runs);
    $('stop').disabled = true;
    setControlsEnabled(true);
    setState('ready');
  }
  if (app.pendingRegenerate) { app.pendingRegenerate = false; await regenerate(); }
}

async function send(text) {
  if (!text.trim() || document.body.dataset.state !== 'ready') return;
  app.messages.push({ role: 'user', content: text });
  addMessage('user', text);
  $('prompt').value = '';
  await answer();
}

// Re-answer the last user turn (the slider moved).
async function regenerate() {
  if (document.body.dataset.state === 'generating') {
    app.pendingRegenerate = true;
    app.stopRequested = true;
    return;
  }
  if (!app.messages.length || document.body.dataset.state !== 'ready') return;
  if (app.messages.at(-1).role === 'assistant') {
    app.messages.pop();
    $('transcript').lastElementChild?.remove();
  }
  await answer();
}

function setControlsEnabled(on) {
  for (const id of ['prompt', 'send', 'dtype', 'backend', 'clear']) $(id).disabled = !on;
}

// ---------------------------------------------------------------- steering control

function scaleName(s) {
  if (s === 0) return 'original';
  if (s === 1) return 'RefusaLLM';
  return s < 1 ? 'partly steered' : 'over-steered';
}

function renderScaleControl() {
  const s = currentScale();
  $('scale-value').textContent = s.toFixed(2);
  const label = $('scale-label');
  if (app.graph && !app.graph.steerable) {
    $('scale').disabled = true;
    label.textContent = 'not steerable';
    label.className = 'badge';
    return;
  }
  label.textContent = scaleName(s);
  label.className = `badge ${s === 0 ? 'original' : 'refusal'}`;
  const row = $('info').querySelector('[data-key="scale"] dd');
  if (row) row.textContent = `${s.toFixed(2)} (${scaleName(s)})`;
}

// ---------------------------------------------------------------- visualisation

// Diverging scale: blue (negative) - near white (0) - red (positive), t in [-1, 1].
const NEG = [33, 102, 172], MID = [247, 247, 247], POS = [178, 24, 43];
function divergingColor(t) {
  const c = Math.max(-1, Math.min(1, t));
  const [from, to, u] = c < 0 ? [MID, NEG, -c] : [MID, POS, c];
  const rgb = from.map((v, i) => Math.round(v + (to[i] - v) * u));
  return `rgb(${rgb[0]}, ${rgb[1]}, ${rgb[2]})`;
}

function ensureUnitBoxes(n) {
  const grid = $('units');
  if (grid.childElementCount === n) return grid.children;
  grid.replaceChildren(...Array.from({ length: n }, (_, i) => {
    const box = document.createElement('div');
    box.className = 'unit';
    box.dataset.index = String(i);
    return box;
  }));
  return grid.children;
}

function projectionOf(activations) {
  const dir = app.bundle.direction;
  if (!dir || dir.length !== activations.length) return null;
  let p = 0;
  for (let i = 0; i < dir.length; i++) p += activations[i] * dir[i];
  return p;
}

function renderActivations(activations) {
  const dir = app.bundle.direction && app.bundle.direction.length === activations.length ? app.bundle.direction : null;
  const contrib = dir ? activations.map((a, i) => a * dir[i]) : Float32Array.from(activations);
  let maxAbs = 0;
  for (const c of contrib) maxAbs = Math.max(maxAbs, Math.abs(c));
  const boxes = ensureUnitBoxes(contrib.length);
  for (let i = 0; i < contrib.length; i++) {
    const box = boxes[i];
    box.dataset.value = String(contrib[i]);
    box.dataset.activation = String(activations[i]);
    box.style.background = divergingColor(maxAbs ? contrib[i] / maxAbs : 0);
  }
  app.lastViz = { activations, contrib, dir };
  $('legend-min').textContent = (-maxAbs).toPrecision(3);
  $('legend-max').textContent = `+${maxAbs.toPrecision(3)}`;
  $('viz-layer').textContent = String(app.graph.activationLayer);
  if (!dir) {
    $('gauge-value').textContent = 'n/a';
    $('gauge-detail').textContent = 'this bundle carries no direction; boxes show raw activations';
    return;
  }
  renderGauge(projectionOf(activations), null);
}

// The projection on the (unit) refusal direction, and where the original model (scale 0) puts
// the same prompt. The steering vector enters inside block L-1, before its MLP, so the original
// position is measured with a second prompt pass rather than computed as projection - scale * alpha.
function renderGauge(projection, original) {
  // a range that holds the steering vector's full length keeps bars comparable across scales
  const alpha = Number(app.bundle.steering?.alpha ?? app.bundle.edit?.alpha) || 0;
  const range = 1.15 * Math.max(Math.abs(projection), Math.abs(original ?? 0), Math.abs(alpha), 1e-6);
  const pct = (v) => 50 + 50 * v / range;
  const fill = $('gauge-fill');
  fill.style.left = `${Math.min(50, pct(projection))}%`;
  fill.style.width = `${Math.abs(pct(projection) - 50)}%`;
  fill.style.background = divergingColor(projection >= 0 ? 0.85 : -0.85);
  $('gauge-value').textContent = projection.toFixed(3);
  const gauge = $('gauge');
  gauge.dataset.projection = String(projection);
  const mark = $('gauge-orig');
  mark.hidden = original == null;
  if (original != null) {
    gauge.dataset.original = String(original);
    mark.style.left = `${pct(original)}%`;
    $('gauge-detail').textContent = projection === original ? '(the original model)'
      : `(original model: ${original.toFixed(3)}, blue mark; steering moved it by ${(projection - original).toFixed(3)})`;
  } else {
    delete gauge.dataset.original;
    $('gauge-detail').textContent = '';
  }
}

// resid_pre of the steered layer at the last prompt token, for one prompt pass at `scale`.
async function promptActivations(messages, scale) {
  const { ort, session, graph, tokenizer } = app;
  const prompt = tokenizer.apply_chat_template(messages, { tokenize: false, add_generation_prompt: true });
  const ids = tokenizer.encode(prompt, { add_special_tokens: false });
  const feeds = {
    input_ids: int64(ids, [1, ids.length]),
    attention_mask: int64(new Array(ids.length).fill(1), [1, ids.length]),
    position_ids: int64(ids.map((_, i) => i), [1, ids.length]),
    steering_scale: new ort.Tensor('float32', Float32Array.of(scale), []),
  };
  for (let i = 0; i < graph.layers; i++) {
    for (const kind of ['key', 'value']) {
      feeds[`past_key_values.${i}.${kind}`] = new ort.Tensor('float32', new Float32Array(0), [1, graph.kvHeads, 0, graph.headDim]);
    }
  }
  const out = await session.run(feeds);
  return lastRow(out[graph.activations]);
}

function describeUnit(target) {
  const box = target.closest?.('.unit');
  if (!box || box.dataset.value === undefined) return;
  const i = Number(box.dataset.index);
  const v = Number(box.dataset.value);
  const a = Number(box.dataset.activation);
  const dir = app.lastViz?.dir;
  $('unit-tip').textContent = dir
    ? `unit ${i}: activation ${a.toFixed(4)} × direction ${dir[i].toFixed(4)} = ${v.toFixed(5)}`
    : `unit ${i}: activation ${a.toFixed(4)}`;
}

// The live refusal meter under an answer: one point per generated token, its residual's projection
// on the refusal direction at the steered layer, with zero and the original model's level (the
// last prompt token at scale 0) marked. The values are also kept in el.dataset.projections.
const SVG = 'http://www.w3.org/2000/svg';
function makeMeter(el) {
  const values = [];
  let original = null;
  if (!app.bundle.direction || !app.graph.activations) return { add() {}, setOriginal() {} };
  const box = document.createElement('div');
  box.className = 'meter';
  box.innerHTML = '<svg viewBox="0 0 300 48" preserveAspectRatio="none" role="img" '
    + 'aria-label="Refusal projection per generated token"><line class="zero"/><line class="orig"/>'
    + '<polyline class="trace"/></svg><div class="meter-text hint"></div>';
  el.appendChild(box);
  const svg = box.querySelector('svg');
  const draw = () => {
    const all = values.concat(original ?? [], 0);
    const lo = Math.min(...all), hi = Math.max(...all);
    const y = (v) => (44 - 40 * (v - lo) / ((hi - lo) || 1)).toFixed(1);
    const x = (i) => (values.length > 1 ? (296 * i) / (values.length - 1) + 2 : 150).toFixed(1);
    svg.querySelector('.trace').setAttribute('points', values.map((v, i) => `${x(i)},${y(v)}`).join(' '));
    const line = (cls, v) => {
      const l = svg.querySelector(cls);
      for (const [k, val] of [['x1', 0], ['x2', 300], ['y1', y(v)], ['y2', y(v)]]) l.setAttribute(k, val);
      l.style.display = v === null ? 'none' : '';
    };
    line('.zero', 0);
    line('.orig', original);
    const last = values.at(-1);
    box.querySelector('.meter-text').textContent = `refusal projection per token: now ${last?.toFixed(2) ?? '–'}`
      + (original === null ? '' : `; dashed line = the original model (${original.toFixed(2)})`);
    el.dataset.projections = JSON.stringify(values);
    if (original !== null) el.dataset.original = String(original);
  };
  return {
    add(v) { if (v !== null) { values.push(v); draw(); } },
    setOriginal(v) { original = v; draw(); },
  };
}

// ---------------------------------------------------------------- info panel

function renderInfo() {
  const { config, edit, exportInfo } = app.bundle;
  const rows = [];
  const add = (key, label, value) => { if (value !== undefined && value !== null && value !== '') rows.push([key, label, String(value)]); };
  const model = edit?.model ?? {};
  add('model', 'Model', model.spec ?? model.name ?? exportInfo?.model ?? config._name_or_path ?? app.bundle.base.pathname);
  add('arch', 'Architecture', `${model.model_type ?? config.model_type}, ${app.graph.layers} layers × ${config.hidden_size}`);
  add('edit', 'Edit', edit ? edit.edit : 'none (unedited model)');
  add('layer', 'Steered layer', edit?.layer ?? app.graph.activationLayer);
  add('site', 'Added at', edit?.site);
  add('alpha', 'α', typeof edit?.alpha === 'number' ? edit.alpha.toFixed(4) : edit?.alpha);
  add('scale', 'Scale now', app.graph.steerable ? `${currentScale().toFixed(2)} (${scaleName(currentScale())})` : 'n/a');
  add('direction', 'Direction sha256', edit?.direction_sha256 && String(edit.direction_sha256).slice(0, 16) + '…');
  if (edit?.prompts) add('prompts', 'Prompts', summarise(edit.prompts));
  if (model.fingerprint) add('fingerprint', 'Weights sha256', String(model.fingerprint).slice(0, 16) + '…');
  add('date', 'Edited', edit?.date);
  const file = app.bundle.files[app.dtype];
  add('file', 'Weights file', `${file.path} (${(app.loadTimes.bytes / 1e6).toFixed(1)} MB)`);
  add('load', 'Load time', `${(app.loadTimes.download + app.loadTimes.init).toFixed(1)} s `
    + `(download ${app.loadTimes.download.toFixed(1)} s, session ${app.loadTimes.init.toFixed(1)} s)`);
  add('runtime', 'Runtime', `onnxruntime-web ${app.ort.env.versions?.web ?? ''}, wasm, `
    + `${app.ort.env.wasm.numThreads} thread(s)${self.crossOriginIsolated ? '' : ' (not cross-origin isolated)'}`
    + (app.backend === 'webgpu' ? ', WebGPU' : ''));
  $('info').replaceChildren(...rows.map(([key, label, value]) => {
    const div = document.createElement('div');
    div.dataset.key = key;
    div.innerHTML = '<dt></dt><dd></dd>';
    div.querySelector('dt').textContent = label;
    div.querySelector('dd').textContent = value;
    return div;
  }));
}

// One line for a provenance object such as {"harmful": {"name":..,"n":..,"sha256":..}, ...}.
function summarise(obj) {
  if (typeof obj !== 'object' || obj === null) return String(obj);
  return Object.entries(obj).map(([k, v]) => {
    if (typeof v !== 'object' || v === null) return `${k}: ${String(v).length > 20 ? String(v).slice(0, 12) + '…' : v}`;
    const parts = ['name', 'n', 'count', 'split'].filter((f) => v[f] !== undefined).map((f) => v[f]);
    return `${k}: ${parts.join(' ') || JSON.stringify(v).slice(0, 40)}`;
  }).join('; ');
}

// ---------------------------------------------------------------- start-up

// WebGPU where the browser gives an adapter; otherwise WASM, with a note that says why.
async function webgpuStatus() {
  if (!navigator.gpu) return { ok: false, why: 'this browser has no WebGPU (navigator.gpu is missing)' };
  try {
    const adapter = await navigator.gpu.requestAdapter();
    return adapter ? { ok: true } : { ok: false, why: 'WebGPU found no GPU adapter (GPU disabled or unsupported)' };
  } catch (e) {
    return { ok: false, why: `WebGPU failed (${e.message})` };
  }
}

function configureOrt(ort) {
  ort.env.wasm.wasmPaths = ORT_WASM_DIR;
  // 2+ threads need SharedArrayBuffer, which needs cross-origin isolation (serve.py's COOP/COEP)
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1)) : 1;
}

async function useBackend(name) {
  if (name === 'webgpu') {
    if (!app.ortWebgpu) { app.ortWebgpu = await import(ORT_WEBGPU_URL); configureOrt(app.ortWebgpu); }
    app.ort = app.ortWebgpu;
  } else {
    app.ort = app.ortWasm;
  }
  app.backend = name;
  document.body.dataset.backend = name;
}

function fillBackendPicker(gpu) {
  const wanted = params.get('backend') ?? 'wasm';
  const select = $('backend');
  select.replaceChildren(new Option('WASM (CPU)', 'wasm'), ...(gpu.ok ? [new Option('WebGPU', 'webgpu')] : []));
  select.value = wanted === 'webgpu' && gpu.ok ? 'webgpu' : 'wasm';
  $('backend-note').textContent = gpu.ok
    ? 'WebGPU is available: pick it to run the q4 file on the GPU.'
    : `${gpu.why}; running on WASM (CPU)${wanted === 'webgpu' ? ' instead of the WebGPU asked for' : ''}.`;
  return select.value;
}

// q4 (MatMulNBits) is the small, fast file on WebGPU; on wasm the int8 file is.
function defaultDtype(available) {
  return app.backend === 'webgpu' && available.includes('q4') ? 'q4' : available[0];
}

function fillDtypePicker() {
  const available = DTYPE_ORDER.filter((d) => app.bundle.files[d]);
  const wanted = params.get('dtype');
  if (wanted && !available.includes(wanted)) {
    throw new Error(`?dtype=${wanted} is not in this bundle (available: ${available.join(', ')})`);
  }
  const select = $('dtype');
  select.replaceChildren(...available.map((d) => {
    const bytes = app.bundle.files[d].bytes;
    return new Option(DTYPE_LABELS[d] + (bytes ? `, ${(bytes / 1e6).toFixed(0)} MB` : ''), d);
  }));
  select.value = wanted ?? defaultDtype(available);
  return select.value;
}

async function main() {
  setStatus('Loading the runtime (transformers.js, onnxruntime-web)…');
  const [tf, ort] = await Promise.all([import(TRANSFORMERS_URL), import(ORT_URL)]).catch((e) => {
    throw new Error(`could not load the JS runtime from ./vendor/ (${e.message}); `
      + 'run scripts/setup_web.sh, or re-export with --with-page');
  });
  app.tf = tf;
  app.ortWasm = ort;
  // Offline: never reach for the model hub or a CDN.
  tf.env.allowRemoteModels = false;
  tf.env.allowLocalModels = true;
  tf.env.useBrowserCache = false;
  if (tf.env.backends?.onnx?.wasm) tf.env.backends.onnx.wasm.wasmPaths = ORT_WASM_DIR;
  configureOrt(ort);
  await useBackend(fillBackendPicker(await webgpuStatus()));

  setStatus('Reading the bundle…');
  app.bundle = await readBundle();
  app.tokenizer = makeTokenizer(tf, app.bundle.tokenizerJSON, app.bundle.tokenizerConfig);
  if (params.has('max')) $('max-tokens').value = params.get('max');
  if (params.has('scale')) $('scale').value = params.get('scale');
  const dtype = fillDtypePicker();
  await loadSession(dtype);
  $('prompt').focus();
}

$('composer').addEventListener('submit', (e) => { e.preventDefault(); send($('prompt').value).catch(showError); });
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); send($('prompt').value).catch(showError); }
});
$('stop').addEventListener('click', () => { app.stopRequested = true; });
$('clear').addEventListener('click', () => { app.messages = []; $('transcript').replaceChildren(); });
$('scale').addEventListener('input', renderScaleControl);
$('scale').addEventListener('change', () => { renderScaleControl(); regenerate().catch(showError); });
$('dtype').addEventListener('change', () => loadSession($('dtype').value).catch(showError));
$('backend').addEventListener('change', () => (async () => {
  await useBackend($('backend').value);
  const available = DTYPE_ORDER.filter((d) => app.bundle.files[d]);
  $('dtype').value = defaultDtype(available);
  await loadSession($('dtype').value);
})().catch(showError));
$('units').addEventListener('mouseover', (e) => describeUnit(e.target));

main().catch(showError);

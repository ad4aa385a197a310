// Drives the RefusaLLM page in Debian's headless Chromium with playwright-core, for
// tests/test_browser.py and bench/browser_page.py. Usage: node drive.mjs CONFIG.json
// (writes the JSON result to CONFIG.result).
//
// CONFIG: { node_modules, chromium, result, url, prompt, scales: [first, second], screenshot,
//           screenshot_second?, timeout_ms, also_load: [url, ...],
//           pipeline?: { url, model, dtype, prompt, max_new_tokens } }
// `pipeline` runs stock transformers.js (`pipeline('text-generation')`, greedy) on the bundle folder
// `model` under `url`, as any transformers.js user would, and records the answer.
// The first scale is set through the URL (?scale=), the second by moving the slider, which makes
// the page re-answer the same prompt. Every request the browser makes is recorded; any that is not
// for 127.0.0.1 is aborted (and still reported, so the test can fail on it).
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createRequire } from 'node:module';

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const require = createRequire(path.join(cfg.node_modules, 'noop.js'));
const { chromium } = require('playwright-core');

const FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];
const timeout = cfg.timeout_ms ?? 60000;
const result = { requests: [], console: [], steps: [], also_load: [] };
const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'refusallm-chromium-'));

function isLocal(url) {
  if (url.startsWith('data:')) return true;
  const inner = url.startsWith('blob:') ? url.slice(5) : url;
  try { return new URL(inner).hostname === '127.0.0.1'; } catch { return false; }
}

async function waitState(page, states) {
  await page.waitForFunction((s) => s.includes(document.body.dataset.state), states, { timeout });
  return page.evaluate(() => document.body.dataset.state);
}

async function waitRuns(page, n) {
  await page.waitForFunction((k) => Number(document.body.dataset.runs || 0) >= k
    && document.body.dataset.state !== 'generating', n, { timeout });
}

// What the page shows after an answer: the text, the scale label, the boxes and the gauge.
async function snapshot(page) {
  return page.evaluate(() => {
    const answers = [...document.querySelectorAll('.msg.assistant .text')];
    const boxes = [...document.querySelectorAll('#units .unit')];
    return {
      answer: answers.at(-1)?.textContent ?? null,
      projections: JSON.parse(document.querySelector('.msg.assistant:last-of-type')?.dataset.projections ?? 'null'),
      meter_original: Number(document.querySelector('.msg.assistant:last-of-type')?.dataset.original ?? NaN),
      meter_drawn: Boolean(document.querySelector('.msg.assistant:last-of-type .meter polyline')?.getAttribute('points')),
      backend_note: document.getElementById('backend-note')?.textContent ?? null,
      answers: answers.length,
      scale_value: document.getElementById('scale-value').textContent,
      scale_label: document.getElementById('scale-label').textContent,
      boxes: boxes.map((b) => ({ index: Number(b.dataset.index), value: Number(b.dataset.value),
                                 color: getComputedStyle(b).backgroundColor })),
      projection: Number(document.getElementById('gauge').dataset.projection),
      original: document.getElementById('gauge').dataset.original === undefined ? null
        : Number(document.getElementById('gauge').dataset.original),
      gauge_text: document.getElementById('gauge-value').textContent,
      legend: [document.getElementById('legend-min').textContent, document.getElementById('legend-max').textContent],
      info: Object.fromEntries([...document.querySelectorAll('#info [data-key]')]
        .map((d) => [d.dataset.key, d.querySelector('dd').textContent])),
      status: document.getElementById('status').textContent,
      speed: document.getElementById('speed').textContent,
      timings: { ...document.getElementById('speed').dataset, load: { ...document.body.dataset } },
      error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
    };
  });
}

let context;
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: cfg.chromium, headless: true, args: FLAGS, viewport: { width: 1280, height: 960 },
  });
  context.on('request', (r) => result.requests.push(r.url()));
  await context.route('**/*', (route) => (isLocal(route.request().url()) ? route.continue() : route.abort()));

  const page = await context.newPage();
  page.on('console', (m) => result.console.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => result.console.push(`pageerror: ${e.message}`));

  const t0 = Date.now();
  await page.goto(cfg.url);
  result.load_state = await waitState(page, ['ready', 'error']);
  result.load_seconds = (Date.now() - t0) / 1000;
  result.cross_origin_isolated = await page.evaluate(() => self.crossOriginIsolated);
  if (result.load_state !== 'ready') {
    result.error = (await snapshot(page)).error;
    throw new Error(`page did not load: ${result.error}`);
  }

  // 1. a prompt at the first scale (set through the URL)
  await page.fill('#prompt', cfg.prompt);
  await page.click('#send');
  await waitRuns(page, 1);
  result.steps.push(await snapshot(page));
  const box = page.locator('#units .unit').nth(cfg.hover_index ?? 3);
  await box.hover();
  result.hover_text = await page.textContent('#unit-tip');
  fs.mkdirSync(path.dirname(cfg.screenshot), { recursive: true });
  await page.screenshot({ path: cfg.screenshot, fullPage: true });

  // 2. move the slider: the page re-answers the same prompt at the new scale
  await page.locator('#scale').fill(String(cfg.scales[1]));
  await waitRuns(page, 2);
  result.steps.push(await snapshot(page));
  if (cfg.screenshot_second) await page.screenshot({ path: cfg.screenshot_second, fullPage: true });

  // 3. stock transformers.js on the bundle's standard files
  if (cfg.pipeline) {
    const p = await context.newPage();
    p.on('console', (m) => result.console.push(`pipeline ${m.type()}: ${m.text()}`));
    await p.goto(new URL('vendor/transformers/LICENSE', cfg.pipeline.url).href);
    result.pipeline = await p.evaluate(async (c) => {
      const tf = await import(new URL('vendor/transformers/transformers.min.js', c.url).href);
      Object.assign(tf.env, { allowRemoteModels: false, allowLocalModels: true, useBrowserCache: false,
                              localModelPath: new URL('./', c.url).pathname });  // a path: a URL here reads as remote
      tf.env.backends.onnx.wasm.wasmPaths = new URL('vendor/ort/', c.url).href;
      const generator = await tf.pipeline('text-generation', c.model, { dtype: c.dtype, device: 'wasm' });
      const out = await generator([{ role: 'user', content: c.prompt }], { max_new_tokens: c.max_new_tokens, do_sample: false });
      return { text: out[0].generated_text.at(-1).content };
    }, cfg.pipeline);
    await p.close();
  }

  // 4. other copies of the page (e.g. the bundle written with --with-page) must load too
  for (const url of cfg.also_load ?? []) {
    const p = await context.newPage();
    const t = Date.now();
    await p.goto(url);
    const state = await waitState(p, ['ready', 'error']);
    result.also_load.push({ url, state, seconds: (Date.now() - t) / 1000,
                            error: state === 'ready' ? null : (await snapshot(p)).error });
    await p.close();
  }
} catch (e) {
  result.failure = String(e?.stack ?? e);
} finally {
  await context?.close().catch(() => {});
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
// A synchronous file write: process.exit() may cut off a large write to a pipe.
fs.writeFileSync(cfg.result, JSON.stringify(result));
process.stdout.write(result.failure ? `failed: ${result.failure}\n` : 'ok\n');
process.exit(result.failure ? 1 : 0);

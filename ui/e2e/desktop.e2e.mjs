// Desktop smoke test: the Tauri app (src-tauri) in a real window under Xvfb, driven through
// WebDriver (tauri-driver + Debian's WebKitWebDriver): the window opens, the runs list
// renders the recorded runs, and one navigation works. Run under `xvfb-run`.
// Needs TUNEBENCH_APP (the app binary), TUNEBENCH_BIN (the CLI, to record runs) and
// tauri-driver on PATH.
import { execFileSync, spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { check, root, tunebenchBinary } from "./lib.mjs";

const app = process.env.TUNEBENCH_APP;
if (!app || !existsSync(app)) throw new Error(`set TUNEBENCH_APP to the desktop app binary (got ${app})`);
const artifacts = join(root, "ui", "e2e", "artifacts");
mkdirSync(artifacts, { recursive: true });

const home = mkdtempSync(join(tmpdir(), "tunebench-desktop-"));
execFileSync(tunebenchBinary(), ["bench-seed-runs", "--home", home, "--runs", "3", "--points", "20"]);

const port = 4444 + Math.floor(Math.random() * 1000);
const driver = spawn("tauri-driver", ["--port", String(port)], {
  env: { ...process.env, TUNEBENCH_HOME: home, TUNEBENCH_BIN: tunebenchBinary() },
  stdio: ["ignore", "inherit", "inherit"],
});
const base = `http://127.0.0.1:${port}`;
const ELEMENT = "element-6066-11e4-a52e-4f735466cecf";

async function wd(method, path, body) {
  const r = await fetch(base + path, { method, headers: { "Content-Type": "application/json" }, body: body ? JSON.stringify(body) : undefined });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${JSON.stringify(j).slice(0, 300)}`);
  return j.value;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function waitFor(sid, css, timeout = 30000) {
  const end = Date.now() + timeout;
  for (;;) {
    const found = await wd("POST", `/session/${sid}/elements`, { using: "css selector", value: css });
    if (found.length) return found;
    if (Date.now() > end) throw new Error(`no element ${css} within ${timeout} ms`);
    await sleep(200);
  }
}
async function shot(sid, name) {
  // Two animation frames first: a screenshot right after a click can show the old frame.
  await wd("POST", `/session/${sid}/execute/async`, { script: "const done = arguments[0]; requestAnimationFrame(() => requestAnimationFrame(done));", args: [] });
  writeFileSync(join(artifacts, `desktop-${name}.png`), Buffer.from(await wd("GET", `/session/${sid}/screenshot`), "base64"));
}

let failed = false;
let sid = null;
try {
  const end = Date.now() + 30000;
  for (;;) {
    try {
      await wd("GET", "/status");
      break;
    } catch {
      if (Date.now() > end) throw new Error("tauri-driver did not start");
      await sleep(200);
    }
  }
  const t0 = Date.now();
  const session = await wd("POST", "/session", { capabilities: { alwaysMatch: { "tauri:options": { application: app } } } });
  sid = session.sessionId;
  const rows = await waitFor(sid, "tr[data-run]");
  check(rows.length === 3, `the window opened and the runs list shows the 3 recorded runs (${Date.now() - t0} ms)`);
  const title = await wd("GET", `/session/${sid}/title`);
  check(title === "Tunebench", `window title ${title}`);
  await shot(sid, "runs");
  const [nav] = await waitFor(sid, '[data-nav="datasets"]');
  await wd("POST", `/session/${sid}/element/${nav[ELEMENT]}/click`, {});
  await waitFor(sid, '[data-testid="dropzone"]');
  check(true, "navigation to Datasets works");
  // A run's page: the engine's chart arrives through the Tauri command.
  const [link] = await waitFor(sid, '[data-nav="runs"]');
  await wd("POST", `/session/${sid}/element/${link[ELEMENT]}/click`, {});
  const [runLink] = await waitFor(sid, "tr[data-run] a");
  await wd("POST", `/session/${sid}/element/${runLink[ELEMENT]}/click`, {});
  await waitFor(sid, '[data-testid="run-chart"] svg');
  check(true, "a run's chart renders in the desktop window");
  await shot(sid, "run");
} catch (e) {
  failed = true;
  console.error(e);
} finally {
  if (sid) await wd("DELETE", `/session/${sid}`).catch(() => {});
  driver.kill("SIGTERM");
  // tauri-driver leaves its WebKitWebDriver child running.
  try {
    execFileSync("pkill", ["-f", "WebKitWebDriver"]);
  } catch {}
}
process.exit(failed ? 1 : 0);

// Helpers for the browser tests: start `tunebench serve` on a temporary app data folder with
// the real default model, and Debian's chromium through playwright-core.
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { copyFileSync, existsSync, linkSync, mkdirSync, mkdtempSync, readFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join, resolve, basename } from "node:path";
import { createInterface } from "node:readline";
import { chromium } from "playwright-core";

export const root = resolve(import.meta.dirname, "..", "..");

export function tunebenchBinary() {
  const bin = process.env.TUNEBENCH_BIN;
  if (!bin || !existsSync(bin)) throw new Error(`set TUNEBENCH_BIN to the tunebench binary (got ${bin})`);
  return bin;
}

export function defaultModel() {
  const home = process.env.TUNEBENCH_MODEL_HOME ?? join(process.env.HOME, ".local/share/tunebench");
  const m = join(home, "models", "SmolLM2-135M-Instruct.Q4_1.gguf");
  if (!existsSync(m)) throw new Error(`the default model is missing at ${m}: run scripts/setup`);
  return m;
}

/** Starts the server (extra environment in `env`); resolves with {url, port, home, proc, stop}. */
export async function startServer(env = {}) {
  const home = mkdtempSync(join(tmpdir(), "tunebench-e2e-"));
  mkdirSync(join(home, "models"));
  const model = defaultModel();
  // A hard link or a copy: the server's path policy resolves symbolic links, and the model's
  // real place is outside this app data folder.
  const dest = join(home, "models", basename(model));
  try {
    linkSync(model, dest);
  } catch {
    copyFileSync(model, dest);
  }
  const proc = spawn(tunebenchBinary(), ["serve", "--addr", "127.0.0.1:0", "--ui", join(root, "ui", "dist")], {
    env: { ...process.env, TUNEBENCH_HOME: home, TUNEBENCH_TOKEN: "", ...env },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  proc.stderr.on("data", (d) => (stderr += d));
  const url = await new Promise((res, rej) => {
    const rl = createInterface({ input: proc.stdout });
    rl.once("line", (l) => res(l.trim()));
    proc.once("exit", (c) => rej(new Error(`serve exited with ${c}: ${stderr}`)));
    setTimeout(() => rej(new Error(`serve printed no URL in 30 s: ${stderr}`)), 30000);
  });
  const port = Number(new URL(url).port);
  const stop = () =>
    new Promise((res) => {
      if (proc.exitCode !== null) return res();
      proc.once("exit", res);
      proc.kill("SIGINT");
      setTimeout(() => proc.kill("SIGKILL"), 5000);
    });
  return { url, port, home, proc, stop, stderr: () => stderr };
}

export async function launchBrowser() {
  const executablePath = process.env.CHROMIUM ?? "/usr/bin/chromium";
  if (!existsSync(executablePath)) throw new Error(`chromium is missing at ${executablePath} (apt-get install chromium)`);
  return chromium.launch({ executablePath, headless: true, args: ["--no-sandbox", "--disable-gpu"] });
}

export function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
  console.log(`  ok  ${what}`);
}

/**
 * A local stand-in for the model hub (what `HF_ENDPOINT` points a real install at for a
 * mirror): the model API and `resolve` URLs for `repos` ({"org/name": {file: Buffer}}), files
 * sent at about 40 MB/s so that a download shows progress. Resolves with {url, close}.
 */
export async function startHub(repos) {
  const server = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, "http://x").pathname);
    const api = path.match(/^\/api\/models\/([^/]+\/[^/]+)\/revision\/(.+)$/);
    const resolveUrl = path.match(/^\/([^/]+\/[^/]+)\/resolve\/[^/]+\/(.+)$/);
    const json = (status, v) => {
      res.writeHead(status, { "content-type": "application/json" });
      res.end(JSON.stringify(v));
    };
    if (api && repos[api[1]]) {
      const siblings = Object.entries(repos[api[1]]).map(([rfilename, b]) => ({
        rfilename,
        size: b.length,
        lfs: { sha256: createHash("sha256").update(b).digest("hex"), size: b.length, pointerSize: 134 },
      }));
      return json(200, { id: api[1], sha: "e2e0000000000000000000000000000000000000", siblings });
    }
    const body = resolveUrl && repos[resolveUrl[1]]?.[resolveUrl[2]];
    if (!body) return json(404, { error: "Repository not found" });
    res.writeHead(200, { "content-length": body.length, "accept-ranges": "bytes" });
    let at = 0;
    const step = () => {
      if (at >= body.length) return res.end();
      const end = Math.min(body.length, at + (1 << 20));
      res.write(body.subarray(at, end));
      at = end;
      setTimeout(step, 25);
    };
    step();
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${server.address().port}`, close: () => server.close() };
}

/** The English UI strings that have a different Chinese text (from the UI's dictionary). */
export function englishOnlyStrings() {
  const src = readFileSync(join(root, "ui", "src", "lib", "i18n.svelte.ts"), "utf8");
  const block = (name) => {
    const m = src.match(new RegExp(`const ${name}[^{]*\\{([\\s\\S]*?)\\n\\};`));
    if (!m) throw new Error(`no ${name} dictionary in i18n.svelte.ts`);
    return Object.fromEntries([...m[1].matchAll(/^\s+(\w+): "((?:[^"\\\\]|\\\\.)*)",?$/gm)].map((x) => [x[1], x[2]]));
  };
  const en = block("en");
  const zh = block("zh");
  if (Object.keys(en).length < 100 || Object.keys(zh).length !== Object.keys(en).length) throw new Error("could not read the dictionaries");
  return Object.keys(en).filter((k) => en[k] !== zh[k] && !en[k].includes("{")).map((k) => en[k]);
}

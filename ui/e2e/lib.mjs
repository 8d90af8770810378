// Helpers for the browser tests: start `tunebench serve` on a temporary app data folder with
// the real default model, and Debian's chromium through playwright-core.
import { spawn } from "node:child_process";
import { copyFileSync, existsSync, linkSync, mkdirSync, mkdtempSync } from "node:fs";
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

/** Starts the server; resolves with {url, port, home, proc, stop}. */
export async function startServer() {
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
    env: { ...process.env, TUNEBENCH_HOME: home, TUNEBENCH_TOKEN: "" },
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

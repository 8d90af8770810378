"""Shared helpers of the bench/ reference scripts: finding the model and the tunebench binary,
running it with its own peak-RSS measurement, loading the GGUF in transformers."""
from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings

# Everything is local: never let huggingface_hub / PEFT try the network for the GGUF's "repo".
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF dequantization progress bar
for _msg in (r".*is_gradient_checkpointing.*", r".*Unable to fetch remote file.*", r".*Could not find a config file.*"):
    warnings.filterwarnings("ignore", message=_msg)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model() -> str:
    home = os.environ.get("TUNEBENCH_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "tunebench"
    )
    return os.path.join(home, "models", MODEL_FILE)


def default_binary() -> str:
    return os.environ.get("TUNEBENCH_BIN") or os.path.join(ROOT, "target", "release", "tunebench")


def die(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def require_file(path: str, what: str, hint: str) -> str:
    if not os.path.isfile(path):
        die(f"{what} not found: {path} ({hint})")
    return path


def binary_argv(path: str) -> list[str]:
    """argv prefix that runs the tunebench binary (a .py stand-in runs under this python)."""
    if not os.path.isfile(path):
        die(f"tunebench binary not found: {path} (build it with `cargo build --release`, "
            "or pass --tunebench PATH / set TUNEBENCH_BIN)")
    if path.endswith(".py"):
        return [sys.executable, path]
    if not os.access(path, os.X_OK):
        die(f"tunebench binary is not executable: {path}")
    return [path]


class Result:
    def __init__(self, argv, returncode, stdout, stderr, seconds, peak_rss_bytes):
        self.argv, self.returncode, self.stdout, self.stderr = argv, returncode, stdout, stderr
        self.seconds, self.peak_rss_bytes = seconds, peak_rss_bytes

    def check(self, what: str) -> "Result":
        if self.returncode != 0:
            tail = "\n".join(self.stderr.strip().splitlines()[-25:])
            die(f"{what} failed (exit {self.returncode}): {shlex.join(self.argv)}\n{tail}", 1)
        return self


# Linux starts a child's peak-RSS counter (ru_maxrss) at its parent's RSS at fork time, so a
# child forked straight from this (possibly large) Python process could never report less than
# it. The measured command is therefore forked from a fresh, small Python process instead.
_LAUNCHER = r"""
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"code": os.waitstatus_to_exitcode(status), "maxrss_kb": ru.ru_maxrss}, f)
"""


def run_measured(argv: list[str], stream_stderr: bool = False, env: dict | None = None,
                 timeout: float | None = None) -> Result:
    """Run argv as a child process and return its output and its own peak RSS (ru_maxrss of
    exactly that child, forked from a fresh launcher so the parent's size does not leak in).
    Past `timeout` seconds the child and everything it started are killed; the result's return
    code is then 124 (as timeout(1) gives) and its stderr says so."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, \
            tempfile.NamedTemporaryFile(suffix=".json") as meta:
        t0 = time.perf_counter()
        p = subprocess.Popen([sys.executable, "-c", _LAUNCHER, meta.name] + list(argv), stdout=out,
                             stderr=None if stream_stderr else err, env=env, start_new_session=True)
        try:
            p.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            timed_out = True
        secs = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        try:
            with open(meta.name) as f:
                m = json.load(f)
        except (OSError, ValueError):
            m = {"code": p.returncode or 1, "maxrss_kb": 0}
        rss = m["maxrss_kb"] * (1024 if sys.platform != "darwin" else 1)
        stderr = err.read().decode("utf-8", "replace")
        if timed_out:
            m["code"], stderr = 124, stderr + f"\nkilled after {timeout:g} s (timeout)\n"
        return Result(argv, m["code"], out.read().decode("utf-8", "replace"), stderr, secs, rss)


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_hf(model_path: str, attn: str = "sdpa"):
    """(model, tokenizer) with transformers reading the GGUF: float32, q/k un-permuted, lm_head tied."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    model_dir, name = os.path.split(os.path.abspath(model_path))
    tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation=attn)
    return model, tok


def self_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1024 if sys.platform != "darwin" else 1)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "gguf", "safetensors", "tokenizers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def parse_json_line(text: str, what: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    die(f"{what} printed no JSON line; its stdout was:\n{text[-2000:]}", 1)


def machine() -> dict:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": model, "nproc": os.cpu_count(), "load_avg": os.getloadavg(),
            "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1)}


def tunebench_version(exe: list[str]) -> str | None:
    try:
        r = subprocess.run(exe + ["--version"], capture_output=True, text=True, timeout=30)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def git_rev() -> str | None:
    """The checkout's commit; TUNEBENCH_GIT_REV names the one a carried binary was built from
    (bench/gpu_session.sh sets it on the GPU machine, whose copy of the tree may not say)."""
    if os.environ.get("TUNEBENCH_GIT_REV"):
        return os.environ["TUNEBENCH_GIT_REV"]
    try:
        r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return r.stdout.strip() or None
    except OSError:
        return None


def section_head(title: str, mach: dict, command: str) -> list[str]:
    """The first lines of a dated bench/RESULTS.md section: its title, the machine (as `machine()`
    found it before the run) and the command that made it."""
    import datetime

    now = datetime.datetime.now().astimezone()
    return [
        f"\n## {now:%Y-%m-%d %H:%M %Z} — {title}",
        "",
        f"- machine: {mach['cpu']}, {mach['nproc']} cores (nproc), {mach['mem_gib']} GiB; "
        f"load average before the run {mach['load_avg'][0]:.2f}",
        f"- command: `{command}`",
    ]

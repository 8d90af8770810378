//! Models from the Hugging Face hub by repo id: look a repo up (which of its files Tunebench
//! can load: the safetensors weights with their config and tokenizer, or one GGUF file), then
//! download them with progress, resuming partial files and checking sizes and SHA-256 sums.
//!
//! The endpoint is `$HF_ENDPOINT` (a mirror) or the public hub; `$HF_TOKEN` (or the token file
//! the `huggingface-cli login` writes) is sent for gated and private repos; proxies come from
//! `HTTPS_PROXY`/`ALL_PROXY`/`NO_PROXY`. Network failures are explained in words a user can act
//! on (no connection, unknown repo, gated repo, rate limit, server error).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The public hub, used when `$HF_ENDPOINT` is not set.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The hub to talk to: `$HF_ENDPOINT` without a trailing slash, else [`DEFAULT_ENDPOINT`].
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .map(|e| e.trim().trim_end_matches('/').to_string())
        .filter(|e| !e.is_empty())
        .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
}

/// The access token: `$HF_TOKEN`, else the file `huggingface-cli login` writes
/// (`$HF_HOME/token`, default `~/.cache/huggingface/token`).
pub fn token() -> Option<String> {
    if let Some(t) = std::env::var("HF_TOKEN").ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
        return Some(t);
    }
    let hf_home = std::env::var_os("HF_HOME").map(PathBuf::from).or_else(|| {
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("huggingface"))
    })?;
    let t = std::fs::read_to_string(hf_home.join("token")).ok()?;
    Some(t.trim().to_string()).filter(|t| !t.is_empty())
}

/// A file of a hub repo.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct HubFile {
    /// Path inside the repo.
    pub path: String,
    /// Size in bytes, when the hub reports it.
    pub size: Option<u64>,
    /// SHA-256 of the content (large files stored in LFS), checked after download.
    pub sha256: Option<String>,
}

/// What can be downloaded from a repo as one loadable model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct HubChoice {
    /// `hf` (safetensors weights + config + tokenizer, a folder) or `gguf` (one file).
    pub kind: String,
    /// For `gguf`: the file; for `hf`: None.
    pub file: Option<String>,
    /// The files to download.
    pub files: Vec<String>,
    /// Their total size in bytes.
    pub size: u64,
}

/// A repo as looked up on the hub.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct HubRepo {
    /// `owner/name`.
    pub repo: String,
    /// The commit the lookup resolved (downloads fetch exactly it).
    pub commit: String,
    /// Every file of the repo.
    pub files: Vec<HubFile>,
    /// What Tunebench can load from it (the HF folder first, then each GGUF file).
    pub choices: Vec<HubChoice>,
    /// Why nothing is loadable, when `choices` is empty.
    pub note: Option<String>,
}

/// Download progress.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ts_rs::TS)]
pub struct Progress {
    /// The file being downloaded.
    pub file: String,
    /// Bytes of all files done.
    pub done: u64,
    /// Bytes of all files.
    pub total: u64,
    /// Recent speed in bytes per second.
    pub bytes_per_sec: f64,
}

/// Checks a repo id: `owner/name`, letters, digits, `-`, `_`, `.`.
pub fn check_repo_id(repo: &str) -> Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && !p.starts_with('.')
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    match repo.split_once('/') {
        Some((owner, name)) if ok_part(owner) && ok_part(name) => Ok(()),
        _ => Err(Error::config(
            "repo",
            format!("`{repo}` is not a hub repo id: expected `owner/name` (letters, digits, `-`, `_`, `.`)"),
        )),
    }
}

fn check_revision(rev: &str) -> Result<()> {
    let ok = !rev.is_empty()
        && rev.len() <= 128
        && !rev.contains("..")
        && rev.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'));
    if ok {
        Ok(())
    } else {
        Err(Error::config("revision", format!("`{rev}` is not a branch, tag or commit name")))
    }
}

/// A path inside a repo that is safe to join onto a local folder.
fn check_repo_path(path: &str) -> Result<()> {
    let ok = !path.is_empty()
        && !path.starts_with('/')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.contains('\\');
    if ok {
        Ok(())
    } else {
        Err(Error::Msg(format!("the hub listed an unsafe file name `{path}`; refusing to download it")))
    }
}

fn encode_path(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    for b in p.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn agent() -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_connect(Some(Duration::from_secs(20)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        // A stalled transfer fails (and is retried from where it stopped) instead of hanging.
        .timeout_per_read(Some(Duration::from_secs(60)))
        .max_redirects(10)
        // The token follows a redirect on the hub itself (a renamed repo), never to a CDN.
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
        .user_agent(concat!("tunebench/", env!("CARGO_PKG_VERSION")))
        .build();
    ureq::Agent::new_with_config(config)
}

/// Explains a transport failure.
fn network_error(url: &str, e: ureq::Error) -> Error {
    let host = url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or(url).to_string();
    let reason = match &e {
        ureq::Error::HostNotFound => format!(
            "cannot resolve the host `{host}`: check the internet connection (or set HF_ENDPOINT to a reachable mirror)"
        ),
        ureq::Error::ConnectionFailed => {
            format!("cannot connect to `{host}`: check the internet connection, a proxy (HTTPS_PROXY) or HF_ENDPOINT")
        }
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            format!("`{host}` refused the connection: is HF_ENDPOINT right, or a proxy (HTTPS_PROXY) needed?")
        }
        ureq::Error::Timeout(_) => format!("`{host}` did not answer in time (network down or very slow); try again"),
        ureq::Error::Tls(_) | ureq::Error::Rustls(_) => {
            format!("secure connection to `{host}` failed ({e}): a proxy intercepting TLS, or a wrong system clock?")
        }
        ureq::Error::TooManyRedirects => format!("`{host}` redirected too many times"),
        ureq::Error::ConnectProxyFailed(m) => format!("the proxy refused the connection: {m}"),
        _ => format!("network error talking to `{host}`: {e}"),
    };
    Error::Network { url: url.to_string(), reason }
}

/// Explains an HTTP error status from the hub.
fn status_error(url: &str, repo: &str, status: u16, hub_message: Option<String>) -> Error {
    let said = hub_message.filter(|m| !m.trim().is_empty()).map(|m| format!(" (the hub said: {})", m.trim())).unwrap_or_default();
    let reason = match status {
        401 | 403 if token().is_none() => format!(
            "`{repo}` is gated or private: accept its license on the hub, then set HF_TOKEN to an access token{said}"
        ),
        401 | 403 => format!("the access token (HF_TOKEN) is not allowed to read `{repo}`; accept its license on the hub{said}"),
        404 => format!("no repo `{repo}` (or no such revision or file) on the hub: check the id's spelling{said}"),
        416 => "the server refused to resume the download".to_string(),
        429 => format!("the hub is rate-limiting requests: wait a few minutes and try again{said}"),
        s if s >= 500 => format!("the hub failed with HTTP {s}: try again later{said}"),
        s => format!("the hub answered HTTP {s}{said}"),
    };
    Error::Network { url: url.to_string(), reason }
}

fn get(agent: &ureq::Agent, url: &str, range_from: u64) -> Result<ureq::http::Response<ureq::Body>> {
    let mut req = agent.get(url);
    if let Some(t) = token() {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    if range_from > 0 {
        req = req.header("Range", &format!("bytes={range_from}-"));
    }
    req.call().map_err(|e| network_error(url, e))
}

fn hub_message(resp: &mut ureq::http::Response<ureq::Body>) -> Option<String> {
    let text = resp.body_mut().with_config().limit(64 * 1024).read_to_string().ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("error").and_then(|e| e.as_str()).map(str::to_string)
}

/// Looks `repo` up at `revision` (default `main`): its files and what Tunebench can load.
pub fn lookup(repo: &str, revision: Option<&str>) -> Result<HubRepo> {
    check_repo_id(repo)?;
    let revision = revision.map(str::trim).filter(|r| !r.is_empty()).unwrap_or("main");
    check_revision(revision)?;
    let url = format!("{}/api/models/{}/revision/{}?blobs=true", endpoint(), repo, encode_path(revision).replace('/', "%2F"));
    let mut resp = get(&agent(), &url, 0)?;
    let status = resp.status().as_u16();
    if status != 200 {
        let msg = hub_message(&mut resp);
        return Err(status_error(&url, repo, status, msg));
    }
    let text = resp
        .body_mut()
        .with_config()
        .limit(32 * 1024 * 1024)
        .read_to_string()
        .map_err(|e| network_error(&url, e))?;
    parse_repo(repo, revision, &text).map_err(|reason| Error::Network { url, reason })
}

#[derive(Deserialize)]
struct ApiRepo {
    sha: Option<String>,
    #[serde(default)]
    siblings: Vec<ApiSibling>,
}

#[derive(Deserialize)]
struct ApiSibling {
    rfilename: String,
    size: Option<u64>,
    lfs: Option<ApiLfs>,
}

#[derive(Deserialize)]
struct ApiLfs {
    sha256: Option<String>,
    size: Option<u64>,
}

/// Parses the hub's answer for a repo revision.
fn parse_repo(repo: &str, revision: &str, json: &str) -> std::result::Result<HubRepo, String> {
    let api: ApiRepo = serde_json::from_str(json).map_err(|e| format!("the hub's answer is not a model description: {e}"))?;
    let files: Vec<HubFile> = api
        .siblings
        .into_iter()
        .map(|s| HubFile {
            size: s.size.or(s.lfs.as_ref().and_then(|l| l.size)),
            sha256: s.lfs.and_then(|l| l.sha256).filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit())),
            path: s.rfilename,
        })
        .collect();
    let (choices, note) = choices(&files);
    Ok(HubRepo { repo: repo.to_string(), commit: api.sha.unwrap_or_else(|| revision.to_string()), files, choices, note })
}

/// Files of an HF model folder Tunebench reads besides the weights.
const HF_SIDE_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
];

/// What can be loaded from a repo's files, and why nothing can when the list is empty.
fn choices(files: &[HubFile]) -> (Vec<HubChoice>, Option<String>) {
    let size_of = |names: &[String]| -> u64 {
        names.iter().filter_map(|n| files.iter().find(|f| &f.path == n).and_then(|f| f.size)).sum()
    };
    let root = |f: &&HubFile| !f.path.contains('/');
    let mut out = Vec::new();
    let has = |name: &str| files.iter().any(|f| f.path == name);
    let weights: Vec<String> = files.iter().filter(root).filter(|f| f.path.ends_with(".safetensors")).map(|f| f.path.clone()).collect();
    if has("config.json") && has("tokenizer.json") && !weights.is_empty() {
        let mut names: Vec<String> = HF_SIDE_FILES.iter().filter(|n| has(n)).map(|n| n.to_string()).collect();
        names.extend(weights);
        out.push(HubChoice { kind: "hf".into(), file: None, size: size_of(&names), files: names });
    }
    let is_split = |p: &str| {
        // `name-00001-of-00003.gguf`: split files need all parts merged; not loadable one by one.
        p.trim_end_matches(".gguf").rsplit_once("-of-").is_some_and(|(a, b)| {
            b.len() == 5 && b.chars().all(|c| c.is_ascii_digit()) && a.len() > 6 && a[a.len() - 6..].starts_with('-')
        })
    };
    let mut split = 0;
    for f in files.iter().filter(|f| f.path.to_ascii_lowercase().ends_with(".gguf")) {
        if is_split(&f.path) {
            split += 1;
            continue;
        }
        let names = vec![f.path.clone()];
        out.push(HubChoice { kind: "gguf".into(), file: Some(f.path.clone()), size: size_of(&names), files: names });
    }
    let note = if !out.is_empty() {
        None
    } else if split > 0 {
        Some("this repo has only split GGUF files (name-00001-of-0000N.gguf); Tunebench loads single-file GGUFs".into())
    } else if files.iter().any(|f| f.path.ends_with(".bin") || f.path.ends_with(".pt")) {
        Some("this repo has only PyTorch .bin weights; Tunebench loads safetensors or GGUF models".into())
    } else if !has("config.json") || !has("tokenizer.json") {
        Some("no GGUF file and no config.json + tokenizer.json + *.safetensors: not a model Tunebench can load".into())
    } else {
        Some("no weights Tunebench can load (safetensors or GGUF)".into())
    };
    (out, note)
}

/// Where a repo's download goes under the models folder: `<models>/hub/<owner>--<name>`.
pub fn local_dir(models_dir: &Path, repo: &str) -> PathBuf {
    models_dir.join("hub").join(repo.replace('/', "--"))
}

/// Downloads `choice` of `repo` into `dir` (created): every file resumes from its `.part` when
/// one is there, is retried up to three times when the connection drops, and is checked
/// against the hub's size and SHA-256 before it takes its final name. Files already complete
/// are kept. Returns what to register as the model: the folder (`hf`) or the GGUF file.
pub fn download(
    repo: &HubRepo,
    choice: &HubChoice,
    dir: &Path,
    cancel: &AtomicBool,
    progress: &mut dyn FnMut(&Progress),
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let agent = agent();
    let specs: Vec<HubFile> = choice
        .files
        .iter()
        .map(|n| {
            check_repo_path(n)?;
            Ok(repo.files.iter().find(|f| &f.path == n).cloned().unwrap_or(HubFile { path: n.clone(), size: None, sha256: None }))
        })
        .collect::<Result<_>>()?;
    let total: u64 = specs.iter().filter_map(|f| f.size).sum();
    let now = Instant::now();
    let mut meter = Meter { done: 0, total, last: now.checked_sub(Duration::from_secs(1)).unwrap_or(now), window: (now, 0) };
    for spec in &specs {
        let target = dir.join(&spec.path);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        if complete(&target, spec)? {
            meter.done += spec.size.unwrap_or(0);
            meter.tick(&spec.path, progress, true);
            continue;
        }
        let url = format!("{}/{}/resolve/{}/{}", endpoint(), repo.repo, encode_path(&repo.commit).replace('/', "%2F"), encode_path(&spec.path));
        let start = meter.done;
        let mut attempt = 0;
        loop {
            match fetch(&agent, &url, &repo.repo, spec, &target, cancel, &mut |n| {
                meter.done = start + n;
                meter.tick(&spec.path, progress, false);
            }) {
                Ok(()) => break,
                Err(Fetch::Fatal(e)) => return Err(e),
                Err(Fetch::Retry(e)) => {
                    attempt += 1;
                    if attempt > 3 || cancel.load(Ordering::Relaxed) {
                        return Err(e);
                    }
                    tracing::warn!("{}: {e}; retrying ({attempt}/3)", spec.path);
                    std::thread::sleep(Duration::from_millis(500 << attempt));
                }
            }
        }
        meter.done = start + spec.size.unwrap_or_else(|| target.metadata().map(|m| m.len()).unwrap_or(0));
        meter.tick(&spec.path, progress, true);
    }
    Ok(match &choice.file {
        Some(f) if choice.kind == "gguf" => dir.join(f),
        _ => dir.to_path_buf(),
    })
}

struct Meter {
    done: u64,
    total: u64,
    last: Instant,
    window: (Instant, u64),
}

impl Meter {
    fn tick(&mut self, file: &str, progress: &mut dyn FnMut(&Progress), force: bool) {
        let now = Instant::now();
        if !force && now.duration_since(self.last) < Duration::from_millis(200) {
            return;
        }
        self.last = now;
        let secs = now.duration_since(self.window.0).as_secs_f64();
        let bytes_per_sec = if secs > 0.0 { self.done.saturating_sub(self.window.1) as f64 / secs } else { 0.0 };
        if secs > 3.0 {
            self.window = (now, self.done);
        }
        progress(&Progress { file: file.to_string(), done: self.done, total: self.total.max(self.done), bytes_per_sec });
    }
}

/// Whether `target` is already the complete file (size and, when known, SHA-256 match).
fn complete(target: &Path, spec: &HubFile) -> Result<bool> {
    let Ok(meta) = target.metadata() else { return Ok(false) };
    if spec.size.is_some_and(|s| s != meta.len()) {
        return Ok(false);
    }
    match &spec.sha256 {
        Some(want) => Ok(&sha256_file(target)? == want),
        None => Ok(spec.size.is_some()),
    }
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

enum Fetch {
    /// Worth another try (the connection dropped, a server error).
    Retry(Error),
    /// Not (cancelled, not found, gated, a bad file, a local disk error).
    Fatal(Error),
}

/// Downloads one file into `<target>.part` (resuming it), checks it, renames it to `target`.
/// `on_bytes` gets the bytes of this file done so far.
fn fetch(
    agent: &ureq::Agent,
    url: &str,
    repo: &str,
    spec: &HubFile,
    target: &Path,
    cancel: &AtomicBool,
    on_bytes: &mut dyn FnMut(u64),
) -> std::result::Result<(), Fetch> {
    let part = PathBuf::from(format!("{}.part", target.display()));
    let mut have = part.metadata().map(|m| m.len()).unwrap_or(0);
    if spec.size.is_some_and(|s| have > s) {
        have = 0;
    }
    let mut resp = get(agent, url, have).map_err(Fetch::Retry)?;
    let status = resp.status().as_u16();
    let append = match status {
        206 if have > 0 => true,
        200 => false,
        416 if have > 0 => {
            // The part is as long as the file (or the server cannot resume): start over.
            let _ = std::fs::remove_file(&part);
            return Err(Fetch::Retry(Error::Network { url: url.into(), reason: "resume refused; restarting the file".into() }));
        }
        s => {
            let msg = hub_message(&mut resp);
            let e = status_error(url, repo, s, msg);
            return Err(if s >= 500 || s == 429 { Fetch::Retry(e) } else { Fetch::Fatal(e) });
        }
    };
    let io = |e: std::io::Error| Fetch::Fatal(Error::io(&part, e));
    let mut hasher = Sha256::new();
    let mut file = if append {
        // Hash what is already there, then continue after it.
        let mut f = std::fs::File::open(&part).map_err(io)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        std::fs::OpenOptions::new().append(true).open(&part).map_err(io)?
    } else {
        have = 0;
        std::fs::File::create(&part).map_err(io)?
    };
    on_bytes(have);
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if cancel.load(Ordering::Relaxed) {
            let _ = file.flush();
            return Err(Fetch::Fatal(Error::Msg("download cancelled (the partial file is kept; downloading again resumes it)".into())));
        }
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                let _ = file.flush();
                return Err(Fetch::Retry(Error::Network { url: url.into(), reason: format!("the connection dropped: {e}") }));
            }
        };
        file.write_all(&buf[..n]).map_err(io)?;
        hasher.update(&buf[..n]);
        have += n as u64;
        on_bytes(have);
    }
    file.sync_all().map_err(io)?;
    drop(file);
    if let Some(size) = spec.size {
        if have != size {
            let e = Error::Network { url: url.into(), reason: format!("got {have} of {size} bytes of {}", spec.path) };
            return Err(if have < size { Fetch::Retry(e) } else { Fetch::Fatal(e) });
        }
    }
    if let Some(want) = &spec.sha256 {
        let got = hex(&hasher.finalize());
        if &got != want {
            let _ = std::fs::remove_file(&part);
            return Err(Fetch::Retry(Error::Network {
                url: url.into(),
                reason: format!("{}: SHA-256 {got} does not match the hub's {want}; the file was discarded", spec.path),
            }));
        }
    }
    std::fs::rename(&part, target).map_err(|e| Fetch::Fatal(Error::io(target, e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> HubFile {
        HubFile { path: path.into(), size: Some(size), sha256: None }
    }

    #[test]
    fn repo_ids_and_paths_are_checked() {
        assert!(check_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct").is_ok());
        for bad in ["", "noslash", "a/b/c", "../x", "a/..", "a/b c", "a/.hidden", "/a"] {
            assert!(check_repo_id(bad).is_err(), "{bad}");
        }
        assert!(check_revision("refs/pr/1").is_ok());
        assert!(check_revision("../../x").is_err());
        assert!(check_repo_path("onnx/model.gguf").is_ok());
        for bad in ["../x", "/etc/passwd", "a/../../b", "a//b", "a\\b"] {
            assert!(check_repo_path(bad).is_err(), "{bad}");
        }
        assert_eq!(encode_path("a b/ü.gguf"), "a%20b/%C3%BC.gguf");
    }

    #[test]
    fn choices_pick_loadable_files() {
        let files = vec![
            file("config.json", 10),
            file("tokenizer.json", 20),
            file("model.safetensors", 1000),
            file("pytorch_model.bin", 1000),
            file("onnx/model.safetensors", 5),
            file("model-Q4_K_M.gguf", 300),
            file("big-00001-of-00002.gguf", 300),
            file("README.md", 1),
        ];
        let (c, note) = choices(&files);
        assert_eq!(note, None);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].kind, "hf");
        assert_eq!(c[0].files, vec!["config.json", "tokenizer.json", "model.safetensors"]);
        assert_eq!(c[0].size, 1030);
        assert_eq!(c[1].file.as_deref(), Some("model-Q4_K_M.gguf"));
        assert_eq!(c[1].size, 300);

        let (c, note) = choices(&[file("config.json", 1), file("tokenizer.json", 1), file("pytorch_model.bin", 9)]);
        assert!(c.is_empty());
        assert!(note.unwrap().contains(".bin"), "note names the reason");
        let (c, note) = choices(&[file("x-00001-of-00003.gguf", 1)]);
        assert!(c.is_empty() && note.unwrap().contains("split"));
    }

    #[test]
    fn parses_the_hub_answer() {
        let json = r#"{"id":"o/n","sha":"abc123","siblings":[
            {"rfilename":"config.json","size":12},
            {"rfilename":"m.gguf","size":99,"lfs":{"sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855","size":99,"pointerSize":130}}]}"#;
        let r = parse_repo("o/n", "main", json).unwrap();
        assert_eq!(r.commit, "abc123");
        assert_eq!(r.files[1].sha256.as_deref().map(str::len), Some(64));
        assert_eq!(r.choices.len(), 1);
        assert!(parse_repo("o/n", "main", "<html>").unwrap_err().contains("not a model description"));
    }
}

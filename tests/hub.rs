//! Model downloads from the hub, against a local server that answers like the hub does (the
//! model API, `resolve` URLs redirecting large files to a CDN path, byte ranges, gated repos,
//! errors as JSON) — `HF_ENDPOINT` is the hub's own switch for mirrors. The files are real:
//! the default model's GGUF and a sharded HF folder, loaded after download.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tunebench::api::downloads::{DownloadJob, DownloadRequest, DownloadState};
use tunebench::api::{ApiEvent, Workbench, WorkbenchOptions};
use tunebench::hub;

struct File {
    bytes: Bytes,
    lfs: bool,
}

#[derive(Default)]
struct Hub {
    repos: BTreeMap<String, BTreeMap<String, File>>,
    /// Requests seen: "GET path [range] [auth]".
    log: Mutex<Vec<String>>,
    /// Files of `test/flaky` already cut off once.
    cut: Mutex<HashSet<String>>,
    /// The "CDN": this server under another host name (`localhost` instead of 127.0.0.1).
    cdn: std::sync::OnceLock<String>,
}

const TOKEN: &str = "sekrit-token";

fn sha(b: &[u8]) -> String {
    Sha256::digest(b).iter().map(|x| format!("{x:02x}")).collect()
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder().status(status).header(header::CONTENT_TYPE, "application/json").body(Body::from(v.to_string())).unwrap()
}

fn not_found() -> Response<Body> {
    json(StatusCode::NOT_FOUND, serde_json::json!({"error": "Repository not found"}))
}

async fn handle(hub: Arc<Hub>, req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let auth = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_string);
    hub.log.lock().unwrap().push(format!("GET {path} {} {}", range.clone().unwrap_or_default(), auth.clone().unwrap_or_default()));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let authorized = auth.as_deref() == Some(&format!("Bearer {TOKEN}"));
    match parts.as_slice() {
        ["api", "models", o, n, "revision", _rev] => {
            let repo = format!("{o}/{n}");
            let Some(files) = hub.repos.get(&repo) else { return not_found() };
            if o.starts_with("gated") && !authorized {
                return json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": "Access to this model is restricted"}));
            }
            let siblings: Vec<_> = files
                .iter()
                .map(|(name, f)| {
                    let mut sha256 = sha(&f.bytes);
                    if repo == "test/corrupt" {
                        sha256 = sha(b"something else");
                    }
                    if f.lfs {
                        serde_json::json!({"rfilename": name, "size": f.bytes.len(), "lfs": {"sha256": sha256, "size": f.bytes.len(), "pointerSize": 134}})
                    } else {
                        serde_json::json!({"rfilename": name, "size": f.bytes.len()})
                    }
                })
                .collect();
            json(StatusCode::OK, serde_json::json!({"id": repo, "sha": "0123456789abcdef0123456789abcdef01234567", "siblings": siblings}))
        }
        [o, n, "resolve", _rev, rest @ ..] => {
            let repo = format!("{o}/{n}");
            let name = rest.join("/");
            let Some(f) = hub.repos.get(&repo).and_then(|r| r.get(&name)) else { return not_found() };
            if o.starts_with("gated") && !authorized {
                return json(StatusCode::UNAUTHORIZED, serde_json::json!({"error": "Access to this model is restricted"}));
            }
            if f.lfs {
                // Large files live on a CDN; the hub redirects there.
                return Response::builder().status(StatusCode::FOUND).header(header::LOCATION, format!("{}/cdn/{repo}/{name}", hub.cdn.get().unwrap())).body(Body::empty()).unwrap();
            }
            serve_bytes(&hub, &repo, &name, f.bytes.clone(), range.as_deref())
        }
        ["cdn", o, n, rest @ ..] => {
            let repo = format!("{o}/{n}");
            let name = rest.join("/");
            let Some(f) = hub.repos.get(&repo).and_then(|r| r.get(&name)) else { return not_found() };
            serve_bytes(&hub, &repo, &name, f.bytes.clone(), range.as_deref())
        }
        _ => not_found(),
    }
}

fn serve_bytes(hub: &Hub, repo: &str, name: &str, bytes: Bytes, range: Option<&str>) -> Response<Body> {
    let total = bytes.len();
    let start = range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.trim_end_matches('-').parse::<usize>().ok()).unwrap_or(0);
    if start >= total && total > 0 {
        return Response::builder().status(StatusCode::RANGE_NOT_SATISFIABLE).body(Body::empty()).unwrap();
    }
    let body = bytes.slice(start..);
    let len = body.len();
    let mut resp = Response::builder().header(header::CONTENT_LENGTH, len).header(header::ACCEPT_RANGES, "bytes");
    if start > 0 {
        resp = resp.status(StatusCode::PARTIAL_CONTENT).header(header::CONTENT_RANGE, format!("bytes {start}-{}/{total}", total - 1));
    }
    let body = if repo == "test/flaky" && hub.cut.lock().unwrap().insert(name.to_string()) {
        // The connection drops after 40% of the file.
        let head = body.slice(..len * 2 / 5);
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(head), Err(std::io::Error::other("cut"))];
        Body::from_stream(futures_util::stream::iter(chunks))
    } else if repo == "test/slow" {
        // 64 KiB every 20 ms: slow enough to cancel.
        let stream = futures_util::stream::unfold(0usize, move |at| {
            let body = body.clone();
            async move {
                if at >= body.len() {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                let end = (at + 65536).min(body.len());
                Some((Ok::<_, std::io::Error>(body.slice(at..end)), end))
            }
        });
        Body::from_stream(stream)
    } else {
        Body::from(body)
    };
    resp.body(body).unwrap()
}

fn start_hub(hub: Hub) -> (String, Arc<Hub>) {
    let hub = Arc::new(hub);
    let (tx, rx) = std::sync::mpsc::channel();
    let h = hub.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            h.cdn.set(format!("http://localhost:{}", addr.port())).unwrap();
            tx.send(addr).unwrap();
            let app = axum::Router::new().fallback(move |req: Request<Body>| handle(h.clone(), req));
            axum::serve(listener, app).await.unwrap();
        });
    });
    (format!("http://{}", rx.recv().unwrap()), hub)
}

fn files(list: Vec<(&str, Vec<u8>, bool)>) -> BTreeMap<String, File> {
    list.into_iter().map(|(n, b, lfs)| (n.to_string(), File { bytes: Bytes::from(b), lfs })).collect()
}

fn folder_files(dir: &Path) -> Vec<(String, Vec<u8>, bool)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let lfs = name.ends_with(".safetensors");
        v.push((name, std::fs::read(&p).unwrap(), lfs));
    }
    v
}

/// Waits for the download's final event.
async fn finish(events: &mut tokio::sync::broadcast::Receiver<ApiEvent>, id: i64, seen_progress: &mut usize) -> DownloadJob {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(120), events.recv()).await.expect("no download event for 2 minutes");
        if let Ok(ApiEvent::Download { job }) = ev {
            if job.id != id {
                continue;
            }
            if job.progress.as_ref().is_some_and(|p| p.done > 0 && p.done < p.total) {
                *seen_progress += 1;
            }
            if job.state != DownloadState::Running {
                return job;
            }
        }
    }
}

#[test]
fn hub_downloads_end_to_end() {
    // The real default model as a GGUF repo; a sharded HF folder; repos that misbehave.
    let gguf = std::fs::read(common::default_model()).unwrap();
    let tok = tunebench::data::testing::tiny_tokenizer();
    let cfg = tunebench::model::LlamaConfig { tie_word_embeddings: true, ..tunebench::model::LlamaConfig::tiny(tok.get_vocab_size(true)) };
    let reference = tunebench::model::Llama::random(cfg.clone(), 3, &candle_core::Device::Cpu).unwrap();
    let folder = tempfile::tempdir().unwrap();
    common::write_folder(folder.path(), &cfg, &reference, true);
    let mut hf = folder_files(folder.path());
    hf.push(("README.md".into(), b"# tiny".to_vec(), false));
    hf.push(("pytorch_model.bin".into(), vec![0u8; 10], true));
    let blob: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();

    let mut h = Hub::default();
    h.repos.insert(
        "test/smol-gguf".into(),
        files(vec![
            ("SmolLM2-135M-Instruct.Q4_1.gguf", gguf.clone(), true),
            ("big-00001-of-00002.gguf", vec![1, 2, 3], true),
            ("README.md", b"# gguf".to_vec(), false),
        ]),
    );
    h.repos.insert("test/tiny-hf".into(), files(hf.iter().map(|(n, b, l)| (n.as_str(), b.clone(), *l)).collect()));
    h.repos.insert("test/flaky".into(), files(vec![("blob.gguf", blob.clone(), true)]));
    h.repos.insert("test/corrupt".into(), files(vec![("blob.gguf", blob.clone(), true)]));
    h.repos.insert("test/slow".into(), files(vec![("blob.gguf", blob.clone(), true)]));
    h.repos.insert("gated-org/model".into(), files(vec![("blob.gguf", blob.clone(), true)]));
    h.repos.insert("test/pytorch-only".into(), files(vec![("config.json", b"{}".to_vec(), false), ("tokenizer.json", b"{}".to_vec(), false), ("pytorch_model.bin", vec![0; 9], true)]));
    let (url, hub_state) = start_hub(h);

    let hf_home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HOME", hf_home.path()); // no token file from this machine's user
    std::env::remove_var("HF_TOKEN");
    std::env::set_var("HF_ENDPOINT", format!("{url}/"));
    for v in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"] {
        std::env::remove_var(v);
    }

    // Lookup: what can be loaded, and why not when nothing can.
    let r = hub::lookup("test/smol-gguf", None).unwrap();
    assert_eq!(r.commit.len(), 40);
    assert_eq!(r.choices.len(), 1, "split GGUFs are not offered: {:?}", r.choices);
    assert_eq!(r.choices[0].file.as_deref(), Some("SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert_eq!(r.choices[0].size, gguf.len() as u64);
    let r = hub::lookup("test/tiny-hf", Some("main")).unwrap();
    assert_eq!(r.choices.len(), 1);
    let hf_choice = &r.choices[0];
    assert_eq!(hf_choice.kind, "hf");
    assert!(hf_choice.files.contains(&"model.safetensors.index.json".to_string()) && hf_choice.files.contains(&"tokenizer_config.json".to_string()));
    assert!(!hf_choice.files.iter().any(|f| f.ends_with(".bin") || f == "README.md"), "{:?}", hf_choice.files);
    let r = hub::lookup("test/pytorch-only", None).unwrap();
    assert!(r.choices.is_empty() && r.note.as_deref().unwrap().contains(".bin"));

    // Errors a user can act on.
    let e = hub::lookup("test/nope", None).unwrap_err().to_string();
    assert!(e.contains("no repo `test/nope`") && e.contains("Repository not found"), "{e}");
    let e = hub::lookup("gated-org/model", None).unwrap_err().to_string();
    assert!(e.contains("gated or private") && e.contains("HF_TOKEN"), "{e}");
    let e = hub::lookup("not a repo", None).unwrap_err().to_string();
    assert!(e.contains("owner/name"), "{e}");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let home = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let wb = Workbench::open(WorkbenchOptions::new(home.path())).await.unwrap();
        let mut events = wb.subscribe();
        let mut progress = 0;

        // The default model's GGUF: downloaded byte for byte, registered, loadable.
        let job = wb
            .download_model(&DownloadRequest { repo: "test/smol-gguf".into(), revision: None, file: Some("SmolLM2-135M-Instruct.Q4_1.gguf".into()) })
            .await
            .unwrap();
        let done = finish(&mut events, job.id, &mut progress).await;
        assert_eq!(done.state, DownloadState::Done, "{:?}", done.error);
        let local = home.path().join("models/hub/test--smol-gguf/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert_eq!(sha(&std::fs::read(&local).unwrap()), sha(&gguf));
        let models = wb.models().await.unwrap();
        let m = models.iter().find(|m| Some(m.id) == done.model_id).unwrap();
        assert_eq!(m.kind, "gguf");
        assert!(m.params.unwrap_or(0) > 100_000_000, "{m:?}");
        // Large files came through the CDN redirect, without the token leaking there.
        assert!(hub_state.log.lock().unwrap().iter().any(|l| l.starts_with("GET /cdn/test/smol-gguf/")));

        // A sharded HF folder: every file of the choice, nothing else; loads as the model it was.
        let job = wb.download_model(&DownloadRequest { repo: "test/tiny-hf".into(), revision: None, file: None }).await.unwrap();
        let done = finish(&mut events, job.id, &mut progress).await;
        assert_eq!(done.state, DownloadState::Done, "{:?}", done.error);
        let dir = home.path().join("models/hub/test--tiny-hf");
        assert!(!dir.join("pytorch_model.bin").exists() && !dir.join("README.md").exists());
        let loaded = tunebench::model::load(&dir, &candle_core::Device::Cpu).unwrap();
        assert_eq!(loaded.model.config().num_hidden_layers, cfg.num_hidden_layers);
        assert_eq!(wb.models().await.unwrap().iter().find(|m| Some(m.id) == done.model_id).unwrap().name, "test--tiny-hf");

        // A dropped connection: retried from where it stopped (a Range request), then complete.
        let job = wb.download_model(&DownloadRequest { repo: "test/flaky".into(), revision: None, file: Some("blob.gguf".into()) }).await.unwrap();
        let done = finish(&mut events, job.id, &mut progress).await;
        // blob.gguf is not a model: the download completes, registering it fails, by name.
        assert_eq!(done.state, DownloadState::Failed);
        let flaky = home.path().join("models/hub/test--flaky/blob.gguf");
        assert_eq!(std::fs::read(&flaky).unwrap(), blob, "resumed file is byte-identical");
        let log = hub_state.log.lock().unwrap().clone();
        let resumed = log.iter().find(|l| l.starts_with("GET /cdn/test/flaky/blob.gguf bytes=")).expect("a resumed request");
        let from: usize = resumed.split("bytes=").nth(1).unwrap().split('-').next().unwrap().parse().unwrap();
        assert!(from > 0 && from <= blob.len() * 2 / 5, "resumed at {from}");
        assert!(done.error.as_deref().unwrap().contains("blob.gguf"), "{:?}", done.error);

        // A file whose SHA-256 differs from the hub's: retried, then refused; nothing kept.
        let job = wb.download_model(&DownloadRequest { repo: "test/corrupt".into(), revision: None, file: Some("blob.gguf".into()) }).await.unwrap();
        let done = finish(&mut events, job.id, &mut progress).await;
        assert_eq!(done.state, DownloadState::Failed);
        assert!(done.error.as_deref().unwrap().contains("SHA-256"), "{:?}", done.error);
        let corrupt = home.path().join("models/hub/test--corrupt");
        assert!(!corrupt.join("blob.gguf").exists() && !corrupt.join("blob.gguf.part").exists());

        // Cancel keeps the partial file; the next download resumes it.
        let job = wb.download_model(&DownloadRequest { repo: "test/slow".into(), revision: None, file: Some("blob.gguf".into()) }).await.unwrap();
        let again = wb.download_model(&DownloadRequest { repo: "test/slow".into(), revision: None, file: Some("blob.gguf".into()) }).await.unwrap();
        assert_eq!(again.id, job.id, "the same download is not started twice");
        tokio::time::sleep(Duration::from_millis(400)).await;
        wb.cancel_download(job.id).unwrap();
        let done = finish(&mut events, job.id, &mut progress).await;
        assert_eq!(done.state, DownloadState::Cancelled, "{:?}", done.error);
        let part = home.path().join("models/hub/test--slow/blob.gguf.part");
        let kept = std::fs::metadata(&part).unwrap().len();
        assert!(kept > 0 && (kept as usize) < blob.len(), "kept {kept}");
        let job = wb.download_model(&DownloadRequest { repo: "test/slow".into(), revision: None, file: Some("blob.gguf".into()) }).await.unwrap();
        let done = finish(&mut events, job.id, &mut progress).await;
        assert_eq!(done.state, DownloadState::Failed, "not a model, but complete");
        assert_eq!(std::fs::read(home.path().join("models/hub/test--slow/blob.gguf")).unwrap(), blob);
        assert!(hub_state.log.lock().unwrap().iter().any(|l| l.starts_with(&format!("GET /cdn/test/slow/blob.gguf bytes={kept}-"))));
        assert_eq!(wb.downloads().len(), 6);
        // Progress arrives between 0 and 100% (at least the throttled `test/slow` downloads take
        // long enough; over loopback the others may finish inside one 200 ms report interval).
        assert!(progress > 0, "progress events between 0 and 100%");

        // A choice the repo does not offer is named, with what it does offer.
        let e = wb.download_model(&DownloadRequest { repo: "test/smol-gguf".into(), revision: None, file: None }).await.unwrap_err().to_string();
        assert!(e.contains("has no HF folder") && e.contains("offers: SmolLM2-135M-Instruct.Q4_1.gguf"), "{e}");
    });

    // Gated: with the token it works; the token goes to the hub but not to the CDN.
    std::env::set_var("HF_TOKEN", TOKEN);
    let r = hub::lookup("gated-org/model", None).unwrap();
    let d = tempfile::tempdir().unwrap();
    let got = hub::download(&r, &r.choices[0], d.path(), &AtomicBool::new(false), &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(got).unwrap(), blob);
    let log = hub_state.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l.starts_with("GET /gated-org/model/resolve/") && l.ends_with(&format!("Bearer {TOKEN}"))));
    assert!(log.iter().filter(|l| l.starts_with("GET /cdn/gated-org/")).all(|l| !l.contains("Bearer")), "{log:?}");
    std::env::remove_var("HF_TOKEN");

    // No server there: the message says what to check.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    std::env::set_var("HF_ENDPOINT", &dead);
    let e = hub::lookup("test/smol-gguf", None).unwrap_err().to_string();
    assert!(e.contains("HF_ENDPOINT") && (e.contains("refused") || e.contains("cannot connect")), "{e}");

    // The CLI: `model hub` lists, `model download` fetches (the only GGUF without --file),
    // prints the path and registers the model.
    let cli_home = tempfile::tempdir().unwrap();
    let tb = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tunebench"))
            .args(args)
            .env("TUNEBENCH_HOME", cli_home.path())
            .env("HF_ENDPOINT", &url)
            .env("HF_HOME", hf_home.path())
            .env_remove("HF_TOKEN")
            .output()
            .unwrap()
    };
    let o = tb(&["model", "hub", "test/smol-gguf"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && out.contains("SmolLM2-135M-Instruct.Q4_1.gguf") && out.contains("MiB"), "{out}");
    let o = tb(&["model", "download", "test/smol-gguf"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let path = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(path.ends_with("models/hub/test--smol-gguf/SmolLM2-135M-Instruct.Q4_1.gguf"), "{path}");
    assert!(Path::new(&path).is_file());
    let o = tb(&["model", "download", "test/nope"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no repo `test/nope`"));
}

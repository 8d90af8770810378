//! `tunebench serve` as a browser meets it: the real binary on a free loopback port, a
//! temporary app data folder with the real default model, plain HTTP/1.1 over TCP. Checks
//! the token, Host and Origin guards, the path policy on every command that names a file,
//! uploads and imports, the UI file server, and the non-loopback bind rule.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::{json, Value};

struct Server {
    child: Child,
    port: u16,
    token: String,
    home: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> Server {
    let model = common::default_model();
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("models")).unwrap();
    // A hard link (or a copy): a symbolic link out of the app data folder would be refused by
    // the path policy, which resolves links.
    let dest = home.path().join("models").join(model.file_name().unwrap());
    if std::fs::hard_link(&model, &dest).is_err() {
        std::fs::copy(&model, &dest).unwrap();
    }
    let ui = home.path().join("ui");
    std::fs::create_dir_all(ui.join("assets")).unwrap();
    std::fs::write(ui.join("index.html"), "<!doctype html><title>tunebench test ui</title>").unwrap();
    std::fs::write(ui.join("assets/app.js"), "console.log(1)").unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tunebench"))
        .args(["serve", "--addr", "127.0.0.1:0", "--ui"])
        .arg(&ui)
        .args(extra)
        .env("TUNEBENCH_HOME", home.path())
        .env_remove("TUNEBENCH_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim();
    let rest = url.strip_prefix("http://127.0.0.1:").unwrap_or_else(|| panic!("unexpected URL line {url:?}"));
    let (port, token) = rest.split_once("/?token=").unwrap();
    Server { child, port: port.parse().unwrap(), token: token.to_string(), home }
}

struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request; `headers` are extra header lines.
fn raw(port: u16, method: &str, target: &str, headers: &[String], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let mut req = format!("{method} {target} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("host:")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Resp { status, head: head.to_string(), body: body.to_string() }
}

fn auth(s: &Server) -> String {
    format!("Authorization: Bearer {}", s.token)
}

fn call(s: &Server, cmd: Value) -> Resp {
    raw(s.port, "POST", "/api/call", &[auth(s), "Content-Type: application/json".into()], cmd.to_string().as_bytes())
}

fn sample() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/assets/datasets/persona/train.jsonl").to_string()
}

#[test]
fn token_host_and_origin_are_required() {
    let s = start(&[]);
    let runs = json!({"command": "runs"}).to_string();
    for target in ["/api/call", "/", "/assets/app.js"] {
        let method = if target == "/api/call" { "POST" } else { "GET" };
        let r = raw(s.port, method, target, &[], runs.as_bytes());
        assert_eq!(r.status, 401, "{target} without the token: {}", r.body);
        assert_eq!(r.json()["code"], "unauthorized");
    }
    assert_eq!(raw(s.port, "GET", "/api/events", &[], b"").status, 401);
    let wrong = raw(s.port, "POST", "/api/call", &["Authorization: Bearer 0123".into()], runs.as_bytes());
    assert_eq!(wrong.status, 401);
    let wrong_cookie = raw(s.port, "GET", "/", &["Cookie: tunebench_token=nope".into()], b"");
    assert_eq!(wrong_cookie.status, 401);

    let ok = call(&s, json!({"command": "runs"}));
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json(), json!([]));

    let origin = format!("http://127.0.0.1:{}", s.port);
    let same_origin = raw(s.port, "POST", "/api/call", &[auth(&s), format!("Origin: {origin}")], runs.as_bytes());
    assert_eq!(same_origin.status, 200);
    for bad in ["http://evil.example", "null", &format!("http://127.0.0.1:{}", s.port + 1)] {
        let r = raw(s.port, "POST", "/api/call", &[auth(&s), format!("Origin: {bad}")], runs.as_bytes());
        assert_eq!(r.status, 403, "Origin {bad}: {}", r.body);
        assert_eq!(r.json()["code"], "forbidden");
    }
    // DNS rebinding: a foreign name resolving to 127.0.0.1 still fails on Host.
    let r = raw(s.port, "POST", "/api/call", &[auth(&s), format!("Host: attacker.example:{}", s.port)], runs.as_bytes());
    assert_eq!(r.status, 403);

    // The printed URL: sets an HttpOnly same-site cookie, drops the token from the address.
    let first = raw(s.port, "GET", &format!("/?token={}", s.token), &[], b"");
    assert_eq!(first.status, 303);
    let head = first.head.to_ascii_lowercase();
    assert!(head.contains("location: /\r\n"), "{}", first.head);
    assert!(head.contains(&format!("set-cookie: tunebench_token={}; httponly; samesite=strict", s.token)), "{}", first.head);
    let page = raw(s.port, "GET", "/runs/3", &[format!("Cookie: tunebench_token={}", s.token)], b"");
    assert_eq!(page.status, 200);
    assert!(page.body.contains("tunebench test ui"), "client routes get index.html");
    // Traversal out of the UI folder is impossible: `..` segments are dropped.
    for t in ["/../../../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/assets/../../../etc/passwd"] {
        let r = raw(s.port, "GET", t, &[auth(&s)], b"");
        assert!(!r.body.contains("root:"), "{t} served a file outside the UI folder");
    }
}

#[test]
fn paths_outside_allowed_folders_are_refused() {
    let s = start(&[]);
    let outside = tempfile::tempdir().unwrap();
    let data = outside.path().join("data.jsonl");
    std::fs::copy(sample(), &data).unwrap();
    let d = data.display().to_string();
    let inside_model = s.home.path().join("models").join(common::default_model().file_name().unwrap()).display().to_string();
    let escape = s.home.path().join("runs/../../").join(outside.path().file_name().unwrap()).join("data.jsonl").display().to_string();
    let config = |data: &str, model: &str| json!({"name": "x", "model": {"path": model}, "data": {"path": data}});
    let refused = [
        json!({"command": "import_dataset", "args": {"path": d, "format": "auto", "max_len": 64, "name": null, "model": null}}),
        json!({"command": "import_dataset", "args": {"path": "/etc/passwd"}}),
        json!({"command": "import_dataset", "args": {"path": escape}}),
        json!({"command": "import_dataset", "args": {"path": sample(), "model": "/etc/hostname"}}),
        json!({"command": "preview_dataset", "args": {"path": d}}),
        json!({"command": "add_model", "args": {"path": "/etc"}}),
        json!({"command": "estimate", "args": {"config": config(&d, &inside_model)}}),
        json!({"command": "create_run", "args": {"config": config(&d, &inside_model)}}),
        json!({"command": "create_run", "args": {"config": config(&sample(), "/usr/share/model.gguf")}}),
        json!({"command": "create_run", "args": {"config": {"name": "x", "data": {"path": sample()}, "output": {"dir": "/tmp/elsewhere"}}}}),
        json!({"command": "create_chat", "args": {"model_path": "/usr/lib"}}),
        json!({"command": "create_chat", "args": {"adapters": [{"name": "a", "path": outside.path()}]}}),
    ];
    for cmd in refused {
        let r = call(&s, cmd.clone());
        assert_eq!(r.status, 403, "{cmd}: {}", r.body);
        assert_eq!(r.json()["code"], "path_not_allowed", "{cmd}");
    }
    // Nothing was recorded by the refused requests.
    assert_eq!(call(&s, json!({"command": "runs"})).json(), json!([]));
    assert_eq!(call(&s, json!({"command": "datasets"})).json(), json!([]));
    // The bundled sample and the app data folder are allowed.
    let r = call(&s, json!({"command": "import_dataset", "args": {"path": sample(), "max_len": 64}}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["rows"].as_i64().unwrap() > 10);
    drop(s);

    // --allow-dir adds a folder.
    let s = start(&["--allow-dir", outside.path().to_str().unwrap()]);
    let r = call(&s, json!({"command": "import_dataset", "args": {"path": d, "max_len": 64}}));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn uploads_import_and_errors_are_coded() {
    let s = start(&[]);
    let body = std::fs::read(sample()).unwrap();
    let up = raw(s.port, "POST", "/api/upload?name=my%20data.jsonl", &[auth(&s)], &body);
    assert_eq!(up.status, 200, "{}", up.body);
    let path = up.json()["path"].as_str().unwrap().to_string();
    assert!(Path::new(&path).starts_with(s.home.path().join("uploads")), "{path}");
    assert_eq!(std::fs::read(&path).unwrap(), body);
    // A second upload of the same name never overwrites the first.
    let again = raw(s.port, "POST", "/api/upload?name=my%20data.jsonl", &[auth(&s)], b"{}");
    assert_ne!(again.json()["path"], up.json()["path"]);
    assert_eq!(std::fs::read(&path).unwrap(), body);
    let sneaky = raw(s.port, "POST", "/api/upload?name=../../evil.jsonl", &[auth(&s)], b"{}");
    let p = sneaky.json()["path"].as_str().map(String::from).unwrap_or_default();
    assert!(sneaky.status != 200 || Path::new(&p).starts_with(s.home.path().join("uploads")), "{}", sneaky.body);

    let r = call(&s, json!({"command": "import_dataset", "args": {"path": path, "max_len": 64}}));
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["id"].as_i64().unwrap();
    let p = call(&s, json!({"command": "preview_dataset", "args": {"dataset_id": id, "n": 2}}));
    assert_eq!(p.status, 200, "{}", p.body);
    let spans = &p.json()["examples"][0]["spans"];
    let trained: Vec<bool> = spans.as_array().unwrap().iter().map(|s| s["trained"].as_bool().unwrap()).collect();
    assert!(trained.contains(&true) && trained.contains(&false), "masked and trained text: {spans}");

    // A broken dataset: the error names the file and the line.
    let bad = raw(s.port, "POST", "/api/upload?name=bad.jsonl", &[auth(&s)], b"{\"instruction\": \"hi\", \"output\": \"yo\"}\n{not json\n");
    let bad_path = bad.json()["path"].as_str().unwrap().to_string();
    let r = call(&s, json!({"command": "preview_dataset", "args": {"path": bad_path}}));
    assert_eq!(r.status, 200, "{}", r.body);
    let issues = r.json()["issues"].clone();
    assert_eq!(issues.as_array().map(Vec::len), Some(1), "{issues}");
    assert_eq!(issues[0]["line"], 2, "{issues}");

    // Unknown command, malformed args, missing run: coded errors, not crashes.
    let r = call(&s, json!({"command": "format_disk"}));
    assert_eq!((r.status, r.json()["code"].as_str().unwrap()), (400, "bad_request"));
    let r = call(&s, json!({"command": "run_detail", "args": {"id": 999}}));
    assert_eq!((r.status, r.json()["code"].as_str().unwrap()), (404, "not_found"));
    assert!(r.json()["message"].as_str().unwrap().contains("999"));
    let r = call(&s, json!({"command": "validate_config", "args": {"config": {"data": {"path": "x"}, "train": {"lr": -1}}}}));
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().contains("train.lr"), "{}", r.body);
    let r = raw(s.port, "POST", "/api/call", &[auth(&s)], b"not json");
    assert_eq!(r.status, 400);
    // The default model is registered on first start.
    let models = call(&s, json!({"command": "models"})).json();
    assert_eq!(models.as_array().unwrap().len(), 1, "{models}");
}

#[test]
fn listening_beyond_loopback_needs_a_flag_and_warns() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tunebench")).args(["serve", "--addr", "0.0.0.0:0"]).env("TUNEBENCH_HOME", home.path()).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-remote"), "{}", String::from_utf8_lossy(&out.stderr));

    let mut child = Command::new(env!("CARGO_BIN_EXE_tunebench"))
        .args(["serve", "--addr", "0.0.0.0:0", "--allow-remote"])
        .env("TUNEBENCH_HOME", home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(line.starts_with("warning:") && line.contains("other machines"), "{line}");
}

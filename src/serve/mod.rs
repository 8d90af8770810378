//! `tunebench serve`: the app's API over HTTP with live events as Server-Sent Events, serving
//! the built UI (`ui/dist`), for a GPU box used from a laptop's browser.
//!
//! - `POST /api/call` with `{command, args}` runs one [`Command`] (the same set the desktop
//!   app invokes); the answer is the result as JSON, or `{code, message}` with a 4xx/5xx.
//! - `GET /api/events`: every [`crate::api::ApiEvent`] as an SSE `message` with JSON data.
//! - `POST /api/upload?name=FILE`: the body is saved under `<app data>/uploads/` and its path
//!   returned (the browser's file picker and drag-and-drop import through it).
//! - Anything else is a file of the UI folder (`index.html` for unknown paths).
//!
//! Security: the server binds 127.0.0.1 unless told otherwise with an explicit flag (it then
//! prints a warning); every request must carry the random token printed in the URL (as
//! `?token=`, which sets an HttpOnly same-site cookie and redirects, or as
//! `Authorization: Bearer`), else 401; a request whose `Host` is not the server's own
//! loopback name (DNS rebinding) or whose `Origin` is another site's is refused with 403; a
//! command naming a path outside the allowed folders is refused with 403 before anything
//! reads it ([`PathPolicy`]).
//!
//! [`Command`]: crate::api::commands::Command

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;

use crate::api::commands::{Api, ApiError};
use crate::{Error, Result};

/// The cookie that carries the token after the first visit.
pub const COOKIE: &str = "tunebench_token";

/// Largest upload accepted.
pub const MAX_UPLOAD: usize = 1 << 30;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Where to listen (port 0 = any free port).
    pub addr: SocketAddr,
    /// Required to listen on anything but loopback.
    pub allow_remote: bool,
    /// The built UI (`index.html` and its assets).
    pub ui_dir: PathBuf,
    /// The access token (random when None).
    pub token: Option<String>,
}

/// A bound server, not yet answering.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<Shared>,
    /// The address listened on.
    pub addr: SocketAddr,
    /// The ready-to-open URL (with the token).
    pub url: String,
}

struct Shared {
    api: Arc<Api>,
    token: String,
    port: u16,
    allow_remote: bool,
    ui_dir: PathBuf,
}

/// A random 128-bit token, hex.
pub fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Binds the address (refusing a non-loopback one unless `allow_remote`).
pub async fn bind(api: Arc<Api>, opts: ServeOptions) -> Result<Server> {
    if !opts.addr.ip().is_loopback() && !opts.allow_remote {
        return Err(Error::Msg(format!(
            "refusing to listen on {}: it is reachable from other machines; pass --allow-remote to do so on purpose",
            opts.addr
        )));
    }
    let listener = tokio::net::TcpListener::bind(opts.addr).await.map_err(|e| Error::Msg(format!("cannot listen on {}: {e}", opts.addr)))?;
    let addr = listener.local_addr().map_err(|e| Error::Msg(e.to_string()))?;
    let token = opts.token.unwrap_or_else(new_token);
    let host = if addr.ip().is_loopback() || addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
    let url = format!("http://{host}:{}/?token={token}", addr.port());
    let state = Arc::new(Shared { api, token, port: addr.port(), allow_remote: opts.allow_remote, ui_dir: opts.ui_dir });
    Ok(Server { listener, state, addr, url })
}

impl Server {
    /// Answers requests until `shutdown` resolves.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
        let app = router(self.state);
        axum::serve(self.listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| Error::Msg(format!("server: {e}")))
    }
}

fn router(state: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/call", post(call))
        .route("/api/events", get(events))
        .route("/api/upload", post(upload))
        .fallback(get(static_file))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_UPLOAD))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(ApiError::new(code, message))).into_response()
}

fn status_of(e: &ApiError) -> StatusCode {
    match e.code.as_str() {
        "bad_request" | "bad_input" | "config" => StatusCode::BAD_REQUEST,
        "not_found" => StatusCode::NOT_FOUND,
        "path_not_allowed" | "forbidden" => StatusCode::FORBIDDEN,
        "unauthorized" => StatusCode::UNAUTHORIZED,
        // The hub (or the network to it) failed, not this server.
        "network" => StatusCode::BAD_GATEWAY,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The token a request carries (header, cookie or query), if any.
fn presented_token<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    if let Some(v) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        return v.strip_prefix("Bearer ").map(str::trim);
    }
    for c in headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()) {
        for part in c.split(';') {
            if let Some(t) = part.trim().strip_prefix(COOKIE).and_then(|r| r.strip_prefix('=')) {
                return Some(t);
            }
        }
    }
    query_token(query)
}

fn query_token(query: Option<&str>) -> Option<&str> {
    query?.split('&').find_map(|kv| kv.strip_prefix("token="))
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Host, Origin and token checks for every request.
async fn guard(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
    let own = [format!("127.0.0.1:{}", s.port), format!("localhost:{}", s.port), format!("[::1]:{}", s.port)];
    if !s.allow_remote && !own.iter().any(|o| o.eq_ignore_ascii_case(host)) {
        return error(StatusCode::FORBIDDEN, "forbidden", format!("Host `{host}` is not this server's address"));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origin.eq_ignore_ascii_case(&format!("http://{host}")) {
            return error(StatusCode::FORBIDDEN, "forbidden", format!("requests from `{origin}` are not allowed"));
        }
    }
    let query = req.uri().query();
    let Some(token) = presented_token(headers, query) else {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "this server needs its access token: open the URL it printed");
    };
    if !same(token, &s.token) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized", "wrong access token");
    }
    // First visit through the printed URL: keep the token in a cookie and drop it from the
    // address bar.
    if req.method() == Method::GET && query_token(query).is_some() && !req.uri().path().starts_with("/api/") {
        let rest: Vec<&str> = query.unwrap_or("").split('&').filter(|kv| !kv.starts_with("token=")).collect();
        let location = if rest.is_empty() { req.uri().path().to_string() } else { format!("{}?{}", req.uri().path(), rest.join("&")) };
        let cookie = format!("{COOKIE}={}; HttpOnly; SameSite=Strict; Path=/", s.token);
        let mut resp = StatusCode::SEE_OTHER.into_response();
        let h = resp.headers_mut();
        h.insert(header::LOCATION, HeaderValue::from_str(&location).unwrap_or(HeaderValue::from_static("/")));
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            h.insert(header::SET_COOKIE, v);
        }
        return resp;
    }
    next.run(req).await
}

async fn call(State(s): State<Arc<Shared>>, body: Bytes) -> Response {
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", format!("the request is not JSON: {e}")),
    };
    match s.api.call_json(request).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => (status_of(&e), Json(e)).into_response(),
    }
}

async fn events(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let rx = s.api.workbench().subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        match rx.recv().await {
            Ok(ev) => {
                let data = serde_json::to_string(&ev).unwrap_or_default();
                Some((Ok::<_, std::convert::Infallible>(Event::default().data(data)), rx))
            }
            // A slow client missed events: tell it to reload what it shows.
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => Some((Ok(Event::default().event("lagged").data("{}")), rx)),
            Err(tokio::sync::broadcast::error::RecvError::Closed) => None,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

#[derive(Deserialize)]
struct UploadQuery {
    name: String,
}

async fn upload(State(s): State<Arc<Shared>>, Query(q): Query<UploadQuery>, body: Bytes) -> Response {
    let api = s.api.clone();
    let saved = tokio::task::spawn_blocking(move || api.save_upload(&q.name, &body)).await;
    match saved {
        Ok(Ok(path)) => Json(serde_json::json!({ "path": path.display().to_string() })).into_response(),
        Ok(Err(e)) => (status_of(&e), Json(e)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()),
    }
}

/// A UI file: the request path made relative (no `..`, no root), under the UI folder;
/// `index.html` for paths that are not files (client-side routes).
async fn static_file(State(s): State<Arc<Shared>>, req: Request) -> Response {
    let rel: PathBuf = Path::new(req.uri().path().trim_start_matches('/')).components().filter(|c| matches!(c, Component::Normal(_))).collect();
    let mut path = s.ui_dir.join(&rel);
    if rel.as_os_str().is_empty() || !path.is_file() {
        if rel.starts_with("api") || rel.starts_with("assets") {
            return error(StatusCode::NOT_FOUND, "not_found", format!("no such file: /{}", rel.display()));
        }
        path = s.ui_dir.join("index.html");
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let mime = match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
                "html" => "text/html; charset=utf-8",
                "js" | "mjs" => "text/javascript; charset=utf-8",
                "css" => "text/css; charset=utf-8",
                "svg" => "image/svg+xml",
                "png" => "image/png",
                "json" => "application/json",
                "woff2" => "font/woff2",
                "ico" => "image/x-icon",
                _ => "application/octet-stream",
            };
            let mut resp = Response::new(Body::from(bytes));
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
            resp.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            resp.headers_mut().insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
            resp
        }
        Err(_) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the UI is not built: {} is missing (run `npm --prefix ui run build`)", s.ui_dir.join("index.html").display()),
        ),
    }
}

/// The UI folder to serve by default: `$TUNEBENCH_UI`, else `ui/dist` beside the binary's
/// source tree (development builds), else `ui` beside the executable (installed).
pub fn default_ui_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TUNEBENCH_UI").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ui").join("dist");
    if src.join("index.html").exists() {
        return src;
    }
    std::env::current_exe().ok().and_then(|e| e.parent().map(|p| p.join("ui"))).unwrap_or(src)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_found_in_header_cookie_or_query() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h, Some("a=1&token=abc")), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("x=1; tunebench_token=def"));
        assert_eq!(presented_token(&h, None), Some("def"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer ghi"));
        assert_eq!(presented_token(&h, None), Some("ghi"));
        assert!(same("abc", "abc") && !same("abc", "abd") && !same("abc", "ab"));
        assert_eq!(new_token().len(), 32);
        assert_ne!(new_token(), new_token());
    }
}

// The one seam between the UI and the engine. The desktop app (Tauri) and the browser
// (`tunebench serve`) speak the same protocol: a `Command` in, its result or an `ApiError`
// out, and a stream of `ApiEvent`s.
import type { ApiError } from "../bindings/ApiError";
import type { ApiEvent } from "../bindings/ApiEvent";
import type { Command } from "../bindings/Command";

export class BackendError extends Error {
  code: string;
  constructor(e: ApiError) {
    super(e.message);
    this.code = e.code;
  }
}

export interface Backend {
  /** Runs one command. Rejects with a `BackendError`. */
  call<T>(cmd: Command): Promise<T>;
  /** Calls `on` for every event until the returned function is called; `onLag` when events
   * were missed (reload what is shown). */
  events(on: (e: ApiEvent) => void, onLag?: () => void): () => void;
  /** Makes a picked or dropped file readable by the engine; returns its path. */
  upload(file: File): Promise<string>;
  /** Which implementation. */
  readonly kind: "http" | "tauri";
}

function asError(e: unknown): BackendError {
  if (e instanceof BackendError) return e;
  if (e && typeof e === "object" && "code" in e && "message" in e) return new BackendError(e as ApiError);
  return new BackendError({ code: "network", message: String(e instanceof Error ? e.message : e) });
}

/** `tunebench serve`: POST /api/call, SSE /api/events, POST /api/upload (cookie auth). */
export class HttpBackend implements Backend {
  readonly kind = "http";
  constructor(private base = "") {}

  async call<T>(cmd: Command): Promise<T> {
    let resp: Response;
    try {
      resp = await fetch(`${this.base}/api/call`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(cmd),
        credentials: "same-origin",
      });
    } catch (e) {
      throw new BackendError({ code: "network", message: `cannot reach the server: ${e instanceof Error ? e.message : e}` });
    }
    const text = await resp.text();
    let body: unknown = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      throw new BackendError({ code: "bad_response", message: `the server answered ${resp.status}: ${text.slice(0, 200)}` });
    }
    if (!resp.ok) throw asError(body);
    return body as T;
  }

  events(on: (e: ApiEvent) => void, onLag?: () => void): () => void {
    const src = new EventSource(`${this.base}/api/events`, { withCredentials: true });
    src.onmessage = (m) => {
      try {
        on(JSON.parse(m.data) as ApiEvent);
      } catch {
        /* a malformed event is dropped */
      }
    };
    src.addEventListener("lagged", () => onLag?.());
    // EventSource reconnects by itself; after a reconnect, state may have moved on.
    src.onopen = () => onLag?.();
    return () => src.close();
  }

  async upload(file: File): Promise<string> {
    const resp = await fetch(`${this.base}/api/upload?name=${encodeURIComponent(file.name)}`, {
      method: "POST",
      body: file,
      credentials: "same-origin",
    }).catch((e) => {
      throw new BackendError({ code: "network", message: `upload failed: ${e}` });
    });
    const body = await resp.json().catch(() => null);
    if (!resp.ok) throw asError(body);
    return (body as { path: string }).path;
  }
}

type TauriGlobal = {
  core: { invoke<T>(cmd: string, args?: Record<string, unknown>): Promise<T> };
  event: { listen<T>(name: string, cb: (e: { payload: T }) => void): Promise<() => void> };
};

/** The desktop app: `invoke("call", {request})`, events on `api-event`; files are read
 * where they are (the desktop user owns them), so upload asks the shell for the path. */
export class TauriBackend implements Backend {
  readonly kind = "tauri";
  constructor(private t: TauriGlobal) {}

  async call<T>(cmd: Command): Promise<T> {
    try {
      return await this.t.core.invoke<T>("call", { request: cmd });
    } catch (e) {
      throw asError(e);
    }
  }

  events(on: (e: ApiEvent) => void, onLag?: () => void): () => void {
    let stop: (() => void) | null = null;
    let closed = false;
    this.t.event.listen<ApiEvent>("api-event", (e) => on(e.payload)).then((u) => (closed ? u() : (stop = u)));
    this.t.event.listen<null>("api-lagged", () => onLag?.()).catch(() => {});
    return () => {
      closed = true;
      stop?.();
    };
  }

  async upload(file: File): Promise<string> {
    const bytes = Array.from(new Uint8Array(await file.arrayBuffer()));
    try {
      return await this.t.core.invoke<string>("upload", { name: file.name, bytes });
    } catch (e) {
      throw asError(e);
    }
  }
}

export function pickBackend(): Backend {
  const t = (window as unknown as { __TAURI__?: TauriGlobal }).__TAURI__;
  return t ? new TauriBackend(t) : new HttpBackend();
}

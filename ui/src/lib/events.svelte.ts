// One event stream for the whole UI; screens subscribe while mounted.
import type { ApiEvent } from "../bindings/ApiEvent";
import { backend } from "./api";

type Listener = (e: ApiEvent | null) => void; // null: events were missed, reload
const listeners = new Set<Listener>();
let started = false;

export const live = $state({ connected: false, lastEventAt: 0 });

export function onEvent(l: Listener): () => void {
  if (!started) {
    started = true;
    backend.events(
      (e) => {
        live.lastEventAt = performance.now();
        for (const f of listeners) f(e);
      },
      () => {
        live.connected = true;
        for (const f of listeners) f(null);
      },
    );
  }
  listeners.add(l);
  return () => listeners.delete(l);
}

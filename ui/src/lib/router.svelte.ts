// Hash routes: #/runs, #/run/3, #/new?dataset=2, #/datasets, #/models, #/compare?ids=1,2, #/chat?id=4
export type Route = { screen: string; id: number | null; query: URLSearchParams };

function parse(): Route {
  const h = location.hash.replace(/^#\/?/, "");
  const [path, q = ""] = h.split("?");
  const [screen = "runs", id] = path.split("/");
  return { screen: screen || "runs", id: id ? Number(id) : null, query: new URLSearchParams(q) };
}

export const router = $state({ route: parse() });

window.addEventListener("hashchange", () => (router.route = parse()));

export function go(path: string) {
  location.hash = `#/${path}`;
}

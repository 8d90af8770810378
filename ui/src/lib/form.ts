// Turning schema fields into inputs and back; the same checks the engine's schema makes.
import type { Field } from "../bindings/Field";

export function fieldError(f: Field, v: unknown): string | null {
  const k = f.kind.type;
  if (v === null && f.default === null) return null;
  if (k === "int" && !(typeof v === "number" && Number.isInteger(v))) return "must be a whole number";
  if (k === "float" && !(typeof v === "number" && isFinite(v))) return "must be a number";
  if (typeof v === "number") {
    if (f.min != null && v < f.min) return `must be at least ${f.min}`;
    if (f.max != null && (v > f.max || (f.max_exclusive && v === f.max))) return `must be ${f.max_exclusive ? "below" : "at most"} ${f.max}`;
  }
  return null;
}

export function toText(f: Field, v: unknown): string {
  if (v === null || v === undefined) return "";
  switch (f.kind.type) {
    case "modules":
      return Array.isArray(v) ? v.join(", ") : String(v);
    case "number_map":
      return Object.entries(v as Record<string, number>).map(([k, x]) => `${k}=${x}`).join(", ");
    default:
      return String(v);
  }
}

export function fromText(f: Field, raw: string): { value?: unknown; error?: string } {
  const s = raw.trim();
  switch (f.kind.type) {
    case "int":
    case "float": {
      if (s === "" && f.default === null) return { value: null };
      const x = Number(s);
      if (s === "" || !isFinite(x)) return { error: "must be a number" };
      return { value: x };
    }
    case "modules": {
      const names = s.split(/[\s,]+/).filter(Boolean);
      if (names.length === 1 && names[0] === "all-linear") return { value: "all-linear" };
      if (!names.length) return { error: "name at least one module, or all-linear" };
      return { value: names };
    }
    case "number_map": {
      const out: Record<string, number> = {};
      for (const part of s.split(",").map((p) => p.trim()).filter(Boolean)) {
        const [k, x] = part.split("=").map((q) => q.trim());
        if (!k || x === undefined || !isFinite(Number(x))) return { error: `"${part}": write module=number` };
        out[k] = Number(x);
      }
      return { value: out };
    }
    default:
      return { value: raw };
  }
}

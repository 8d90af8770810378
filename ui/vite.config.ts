import { defineConfig } from "vite";
import { svelte } from "@sveltejs/vite-plugin-svelte";

// Relative asset paths: the same build is served by `tunebench serve` and bundled by Tauri.
export default defineConfig({
  base: "./",
  plugins: [svelte()],
  build: { target: "es2022", outDir: "dist", emptyOutDir: true, chunkSizeWarningLimit: 800 },
  clearScreen: false,
});

// Light or dark, following the OS.
const mq = window.matchMedia("(prefers-color-scheme: dark)");
export const theme = $state({ dark: mq.matches });
mq.addEventListener("change", (e) => (theme.dark = e.matches));

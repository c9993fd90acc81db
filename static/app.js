// nopf dashboard: copy buttons, and a bound on the live event log. Everything else is plain
// HTML and htmx attributes.
"use strict";

function copyFallback(text) {
  // Clipboard API needs a secure context; http://<LAN address> is not one.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.appendChild(area);
  area.select();
  try {
    return document.execCommand("copy");
  } finally {
    area.remove();
  }
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const text = button.dataset.copy;
  const done = (ok) => {
    button.textContent = ok ? "Copied" : "Select and copy";
    setTimeout(() => { button.textContent = button.dataset.label || "Copy"; }, 1500);
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(text).then(() => done(true), () => done(copyFallback(text)));
  } else {
    done(copyFallback(text));
  }
});

// A live session page puts each new event-log line on top (server-sent event "line",
// see templates/_session_parts.html): keep the newest 100, as many as the page shows.
document.addEventListener("htmx:sseMessage", (event) => {
  const log = event.target;
  if (!(log instanceof Element) || !log.matches("ol.log")) return;
  while (log.children.length > 100) log.lastElementChild.remove();
});

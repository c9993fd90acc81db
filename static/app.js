// nopf dashboard: copy buttons. Everything else is plain HTML and htmx attributes.
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

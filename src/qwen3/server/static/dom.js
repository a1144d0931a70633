// DOM helpers. Text always goes in through textContent / text nodes, never innerHTML: model output and
// stored conversations are untrusted, so no string is ever parsed as markup.

/** An element with attributes (strings; `class` and `data-*` included) and children (nodes or text). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === false || value === null || value === undefined) continue;
    node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Put text on the clipboard; the fallback covers pages served over plain http on another host. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el("textarea", { class: "offscreen", readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

/** A small button that copies what `getText()` returns and says so for a moment. */
export function copyButton(getText, label = "Copy") {
  const button = el("button", { type: "button", class: "small copy", title: "Copy to the clipboard" }, label);
  button.addEventListener("click", async () => {
    try {
      await copyText(getText());
      button.textContent = "Copied";
    } catch {
      button.textContent = "Copy failed";
    }
    setTimeout(() => (button.textContent = label), 1200);
  });
  return button;
}

// A small Markdown renderer that builds DOM nodes directly (never HTML strings), for untrusted model
// output: headings, paragraphs, lists, block quotes, rules, fenced code (with a copy button), inline code,
// bold, italic and http(s) links. Anything else stays literal text. It renders half-written text too
// (an unclosed fence is a code block), because replies are re-rendered as they stream.
import { copyButton, el } from "./dom.js";

const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)\s*$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const BULLET = /^\s*[-*+]\s+(.*)$/;
const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
// Inline spans, in priority order: code, link, bold, italic.
const INLINE = /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)|\*\*(?=\S)([\s\S]*?\S)\*\*|__(?=\S)([\s\S]*?\S)__|\*(?=[^\s*])([^*]*?[^\s*])\*|\b_(?=[^\s_])([^_]*?[^\s_])_\b/g;

/** Replace `container`'s children with the rendering of `text`. */
export function renderMarkdown(text, container) {
  container.replaceChildren(...blocks(text.split("\n")));
}

function blocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (!line.trim()) {
      i += 1;
    } else if ((match = FENCE.exec(line))) {
      const body = [];
      i += 1;
      while (i < lines.length && !(lines[i].trim().startsWith(match[1]) && !lines[i].trim().slice(3).trim())) {
        body.push(lines[i]);
        i += 1;
      }
      i += 1; // the closing fence (or the end of a reply still streaming)
      out.push(codeBlock(body.join("\n"), match[2]));
    } else if ((match = HEADING.exec(line))) {
      out.push(el(`h${Math.min(match[1].length + 2, 6)}`, {}, ...inline(match[2])));
      i += 1;
    } else if (RULE.test(line)) {
      out.push(el("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && (match = QUOTE.exec(lines[i]))) {
        body.push(match[1]);
        i += 1;
      }
      out.push(el("blockquote", {}, ...blocks(body)));
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = !BULLET.test(line);
      const pattern = ordered ? NUMBERED : BULLET;
      const list = el(ordered ? "ol" : "ul");
      if (ordered) list.setAttribute("start", NUMBERED.exec(line)[1]);
      while (i < lines.length && (match = pattern.exec(lines[i]))) {
        list.append(el("li", {}, ...inline(ordered ? match[2] : match[1])));
        i += 1;
      }
      out.push(list);
    } else {
      const body = [];
      while (i < lines.length && lines[i].trim() && !startsBlock(lines[i])) {
        body.push(lines[i]);
        i += 1;
      }
      const paragraph = el("p");
      body.forEach((text, k) => {
        if (k) paragraph.append(el("br"));
        paragraph.append(...inline(text));
      });
      out.push(paragraph);
    }
  }
  return out;
}

function startsBlock(line) {
  return [FENCE, HEADING, BULLET, NUMBERED, QUOTE, RULE].some((pattern) => pattern.test(line));
}

function codeBlock(code, language) {
  const header = el("div", { class: "code-header" }, el("span", {}, language || "code"), copyButton(() => code));
  return el("div", { class: "code-block" }, header, el("pre", {}, el("code", {}, code)));
}

function inline(text) {
  const nodes = [];
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) nodes.push(text.slice(last, match.index));
    const [, ticks, code, linkText, href, bold1, bold2, em1, em2] = match;
    if (ticks) nodes.push(el("code", {}, code));
    else if (href) nodes.push(el("a", { href, target: "_blank", rel: "noopener noreferrer nofollow" }, linkText));
    else if (bold1 !== undefined || bold2 !== undefined) nodes.push(el("strong", {}, ...inline(bold1 ?? bold2)));
    else nodes.push(el("em", {}, ...inline(em1 ?? em2)));
    last = match.index + match[0].length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

// The chat page: conversations, the composer and per-conversation settings, streaming replies with their
// reasoning, and the calculator round trip. Everything the model wrote enters the DOM as text (dom.js,
// markdown.js); the server is reached only through api.js.
import { apiKey, listModels, streamChat } from "./api.js";
import { CALCULATOR_TOOL, runCalculator } from "./calculator.js";
import { copyButton, el } from "./dom.js";
import { renderMarkdown } from "./markdown.js";
import { RECOMMENDED, current, loadAll, newConversation, saveAll } from "./store.js";

const $ = (id) => document.getElementById(id);
const MAX_TOOL_ROUNDS = 5; // model turns per message when it keeps calling tools
const SAMPLING_FIELDS = ["temperature", "top_p", "top_k", "min_p"];
const SUGGESTIONS = [
  "What is 347 + 589?",
  "How many r's are in strawberry?",
  "Which is larger, 9.11 or 9.9? /no_think",
  "Sort 5, 2, 9, 1.",
];

const state = {
  conversations: loadAll(),
  conv: null,
  model: null,
  controller: null, // the AbortController of the reply being generated
};

// ------------------------------------------------------------------------------------------ persistence

function persist() {
  state.conversations.sort((a, b) => b.updated - a.updated);
  saveAll(state.conversations.filter((c) => c.messages.length));
  renderList();
}

function touch(conv) {
  conv.updated = Date.now();
  if (!state.conversations.includes(conv)) state.conversations.unshift(conv);
}

function select(conv) {
  stop();
  state.conv = conv;
  current.set(conv.id);
  renderSettings();
  renderConversation();
  renderList();
  closeSidebar();
}

// ------------------------------------------------------------------------------------------------ theme

const THEMES = ["auto", "light", "dark"];
const darkQuery = window.matchMedia("(prefers-color-scheme: dark)");

function applyTheme() {
  const choice = localStorage.getItem("qwen3.theme") || "auto";
  const dark = choice === "dark" || (choice === "auto" && darkQuery.matches);
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("theme").textContent = `Theme: ${choice}`;
}

// ------------------------------------------------------------------------------------------ the sidebar

function renderList() {
  const list = $("conversations");
  list.replaceChildren(
    ...state.conversations
      .filter((c) => c.messages.length)
      .map((conv) => {
        const open = el("button", { type: "button", class: "open-conversation", title: conv.title }, conv.title);
        open.addEventListener("click", () => select(conv));
        const remove = el("button", { type: "button", class: "small delete", title: "Delete", "aria-label": "Delete" }, "×");
        remove.addEventListener("click", () => {
          if (conv === state.conv) stop();
          state.conversations = state.conversations.filter((c) => c !== conv);
          persist();
          if (conv === state.conv) select(newConversation());
        });
        return el("li", { class: conv === state.conv ? "active" : null, "data-id": conv.id }, open, remove);
      }),
  );
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
}

// ----------------------------------------------------------------------------------------- the settings

function mode(settings) {
  return settings.thinking ? "thinking" : "nonThinking";
}

function renderSettings() {
  const s = state.conv.settings;
  $("thinking").checked = s.thinking;
  $("budget").value = s.budget ?? "";
  $("budget").disabled = !s.thinking;
  $("tools").checked = s.tools;
  $("system").value = s.system;
  $("max-tokens").value = s.maxTokens ?? "";
  $("seed").value = s.seed ?? "";
  $("extra").value = s.extra;
  renderSampling();
}

function renderSampling() {
  const s = state.conv.settings;
  const values = s.sampling || RECOMMENDED[mode(s)];
  for (const name of SAMPLING_FIELDS) $(name).value = values[name];
  $("sampling-note").textContent = s.sampling
    ? "Custom values for this conversation."
    : `Qwen3's recommended values for ${s.thinking ? "thinking" : "non-thinking"} mode.`;
  $("reset-sampling").disabled = !s.sampling;
}

/** An optional number input's value: null when empty or not a number. */
function optionalNumber(input) {
  const value = input.value.trim() === "" ? NaN : Number(input.value);
  return Number.isFinite(value) ? value : null;
}

function extraFields(text) {
  if (!text.trim()) return {};
  const value = JSON.parse(text);
  if (!value || typeof value !== "object" || Array.isArray(value)) throw new Error("must be a JSON object");
  return value;
}

function bindSettings() {
  const settings = () => state.conv.settings;
  $("thinking").addEventListener("change", (event) => {
    settings().thinking = event.target.checked;
    $("budget").disabled = !event.target.checked;
    renderSampling();
  });
  $("budget").addEventListener("input", (event) => {
    const budget = optionalNumber(event.target);
    settings().budget = budget === null ? null : Math.max(0, Math.round(budget));
  });
  $("tools").addEventListener("change", (event) => (settings().tools = event.target.checked));
  $("system").addEventListener("input", (event) => (settings().system = event.target.value));
  $("max-tokens").addEventListener("input", (event) => (settings().maxTokens = optionalNumber(event.target)));
  $("seed").addEventListener("input", (event) => (settings().seed = optionalNumber(event.target)));
  $("extra").addEventListener("input", (event) => {
    settings().extra = event.target.value;
    let problem = "";
    try {
      extraFields(event.target.value);
    } catch (error) {
      problem = `Not used: ${error.message}`;
    }
    $("extra-error").textContent = problem;
  });
  for (const name of SAMPLING_FIELDS) {
    $(name).addEventListener("input", () => {
      const base = settings().sampling || RECOMMENDED[mode(settings())];
      settings().sampling = Object.fromEntries(
        SAMPLING_FIELDS.map((field) => [field, optionalNumber($(field)) ?? base[field]]),
      );
      $("sampling-note").textContent = "Custom values for this conversation.";
      $("reset-sampling").disabled = false;
    });
  }
  $("reset-sampling").addEventListener("click", () => {
    settings().sampling = null;
    renderSampling();
    persist();
  });
  for (const id of ["settings", "composer"]) $(id).addEventListener("change", persist); // keep them
}

// ------------------------------------------------------------------------------------ the conversation

function renderConversation() {
  const box = $("messages");
  const conv = state.conv;
  if (!conv.messages.length) {
    const buttons = SUGGESTIONS.map((text) => {
      const button = el("button", { type: "button", class: "suggestion" }, text);
      button.addEventListener("click", () => submit(text));
      return button;
    });
    box.replaceChildren(
      el("div", { class: "welcome" },
        el("h2", {}, "Watch Qwen3 think"),
        el("p", {}, "Its reasoning streams into a block of its own. Switch thinking off, give it a budget, or type /think and /no_think in a message."),
        el("div", { class: "suggestions" }, ...buttons)),
    ); // prettier-ignore
    return;
  }
  const lastReply = conv.messages.map((m) => m.role).lastIndexOf("assistant");
  box.replaceChildren(
    ...conv.messages.flatMap((message, index) => {
      if (message.role === "user") return [userView(message, index)];
      if (message.role === "assistant") return [new AssistantView(message, conv, index === lastReply).node];
      return []; // tool results are shown inside the call they answer
    }),
  );
  box.scrollTop = box.scrollHeight;
}

function userView(message, index) {
  const text = el("div", { class: "bubble" }, message.content);
  const edit = el("button", { type: "button", class: "small edit", title: "Edit and resend" }, "Edit");
  const node = el("div", { class: "msg user" }, text, el("div", { class: "actions" }, edit, copyButton(() => message.content)));
  edit.addEventListener("click", () => {
    const area = el("textarea", { class: "edit-box", rows: 3 });
    area.value = message.content;
    const save = el("button", { type: "button", class: "primary small save" }, "Send");
    const cancel = el("button", { type: "button", class: "small" }, "Cancel");
    const editor = el("div", { class: "editor" }, area, el("div", { class: "actions" }, save, cancel));
    node.replaceWith(editor);
    area.focus();
    cancel.addEventListener("click", () => editor.replaceWith(node));
    const resend = () => {
      if (!area.value.trim() || isBusy()) return;
      state.conv.messages.splice(index, Infinity, { role: "user", content: area.value });
      touch(state.conv);
      renderConversation();
      generate(state.conv);
    };
    save.addEventListener("click", resend);
    area.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        resend();
      } else if (event.key === "Escape") {
        editor.replaceWith(node);
      }
    });
  });
  return node;
}

/** One assistant message: reasoning block, answer, tool calls with their results, and its numbers. */
class AssistantView {
  constructor(message, conv, isLastTurn, live = null) {
    this.message = message;
    this.conv = conv;
    this.live = live; // while streaming: {reasoningDeltas, started, thinkSeconds}
    this.summary = el("summary");
    this.reasoningText = el("div", { class: "reasoning-text" });
    this.reasoning = el("details", { class: "reasoning" }, this.summary, this.reasoningText);
    this.content = el("div", { class: "content markdown" });
    this.calls = el("div", { class: "calls" });
    this.error = el("div", { class: "error", role: "alert" });
    this.stats = el("span", { class: "stats" });
    const actions = el("div", { class: "actions" }, copyButton(() => this.message.content));
    if (isLastTurn) {
      const regenerate = el("button", { type: "button", class: "small regenerate", title: "Answer again" }, "Regenerate");
      regenerate.addEventListener("click", () => regenerateLast());
      actions.append(regenerate);
    }
    this.node = el("div", { class: "msg assistant" }, this.reasoning, this.content, this.calls, this.error,
      el("div", { class: "meta" }, this.stats, actions)); // prettier-ignore
    this.folded = !live; // a stored reply starts folded; a live one folds when the answer starts
    this.pending = false;
    this.update();
  }

  /** Re-render at most once per frame: replies can stream faster than the screen refreshes. */
  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.update();
    });
  }

  update() {
    const m = this.message;
    const streaming = Boolean(this.live) && !m.state;
    this.node.dataset.state = m.state || "streaming";
    this.reasoning.hidden = !m.reasoning;
    if (m.reasoning) {
      const tokens = m.stats?.reasoningTokens ?? this.live?.reasoningDeltas ?? 0;
      const seconds = m.stats?.thinkSeconds ?? this.live?.thinkSeconds;
      const answering = Boolean(m.content || m.tool_calls?.length);
      this.reasoning.dataset.tokens = tokens;
      this.summary.textContent =
        streaming && !answering
          ? `Thinking… ${tokens} tokens`
          : `Thought for ${seconds === undefined ? "?" : seconds.toFixed(1)} s · ${tokens} tokens`;
      this.reasoningText.textContent = m.reasoning;
      if (!this.folded && answering) this.folded = true;
      const open = !this.folded;
      if (streaming && this.reasoning.open !== open) this.reasoning.open = open;
    }
    renderMarkdown(m.content || "", this.content);
    this.calls.replaceChildren(...(m.tool_calls || []).map((call) => this.callView(call)));
    this.error.hidden = !m.error;
    this.error.textContent = m.error || "";
    this.stats.textContent = statsText(m);
    const box = $("messages");
    if (streaming && box.scrollHeight - box.scrollTop - box.clientHeight < 120) box.scrollTop = box.scrollHeight;
  }

  callView(call) {
    const result = this.conv.messages.find((m) => m.role === "tool" && m.tool_call_id === call.id);
    let args = call.function.arguments;
    try {
      args = JSON.stringify(JSON.parse(args), null, 1);
    } catch {
      // shown as the model wrote it
    }
    return el("div", { class: "tool-call" },
      el("div", { class: "tool-name" }, "Tool call: ", el("code", {}, call.function.name)),
      el("div", { class: "tool-label" }, "arguments"), el("pre", { class: "tool-arguments" }, args),
      el("div", { class: "tool-label" }, "result"),
      el("pre", { class: "tool-result" }, result ? result.content : "(not run: turn the calculator tool on to run it)")); // prettier-ignore
  }
}

function statsText(m) {
  const s = m.stats || {};
  const parts = [];
  if (s.completionTokens !== undefined) parts.push(`${s.completionTokens} tokens`);
  if (s.tokensPerSecond) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
  if (s.seconds !== undefined) parts.push(`${s.seconds.toFixed(1)} s`);
  if (s.promptTokens !== undefined) parts.push(`prompt ${s.promptTokens}`);
  if (m.state === "stopped") parts.push("stopped");
  else if (m.finish && m.finish !== "stop" && m.finish !== "tool_calls") parts.push(`finish: ${m.finish}`);
  return parts.join(" · ");
}

// -------------------------------------------------------------------------------------------- generation

function isBusy() {
  return state.controller !== null;
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function stop() {
  state.controller?.abort();
}

/** The request body for the conversation as it stands: its messages and its settings. */
function requestBody(conv) {
  const s = conv.settings;
  const messages = s.system.trim() ? [{ role: "system", content: s.system }] : [];
  for (const m of conv.messages) {
    if (m.role === "user") messages.push({ role: "user", content: m.content });
    else if (m.role === "tool") messages.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });
    else if (m.content || m.tool_calls?.length) {
      const out = { role: "assistant", content: m.content || (m.tool_calls?.length ? null : "") };
      if (m.reasoning) out.reasoning_content = m.reasoning; // the template keeps it within a tool round
      if (m.tool_calls?.length) out.tool_calls = m.tool_calls;
      messages.push(out);
    }
  }
  const body = {
    messages,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: s.thinking }, // the hard switch
  };
  if (state.model) body.model = state.model;
  if (s.thinking && s.budget !== null) body.thinking_budget = s.budget;
  if (s.sampling) Object.assign(body, s.sampling); // else the server applies the mode's recommended values
  if (s.maxTokens !== null) body.max_tokens = s.maxTokens;
  if (s.seed !== null) body.seed = s.seed;
  if (s.tools) body.tools = [CALCULATOR_TOOL];
  return Object.assign(body, extraFields(s.extra));
}

/** Generate the assistant's turn: one reply, or several while it calls the calculator tool. */
async function generate(conv) {
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    for (let round = 0; round < MAX_TOOL_ROUNDS && !controller.signal.aborted; round += 1) {
      const message = await reply(conv, controller.signal);
      if (message.finish !== "tool_calls" || !conv.settings.tools) break;
      for (const call of message.tool_calls) {
        const known = call.function.name === CALCULATOR_TOOL.function.name;
        const content = known ? runCalculator(call.function.arguments) : `Error: no tool named ${call.function.name}`;
        conv.messages.push({ role: "tool", tool_call_id: call.id, name: call.function.name, content });
      }
      touch(conv);
      persist();
      if (conv === state.conv) renderConversation();
    }
  } finally {
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
    persist();
    if (conv === state.conv) renderConversation();
  }
}

/** Stream one reply into a new assistant message; resolves when it ends, however it ends. */
async function reply(conv, signal) {
  const message = { role: "assistant", content: "", reasoning: "", tool_calls: [], stats: {}, finish: null, state: null };
  let body;
  try {
    body = requestBody(conv);
  } catch (error) {
    message.error = `Extra request fields: ${error.message}`;
  }
  const live = { reasoningDeltas: 0, thinkSeconds: undefined };
  conv.messages.push(message);
  touch(conv);
  const view = new AssistantView(message, conv, true, live);
  if (conv === state.conv) {
    $("messages").querySelector(".welcome")?.remove();
    $("messages").append(view.node);
  }
  const started = performance.now();
  let firstToken = null;
  let completionDeltas = 0;
  const seconds = (since) => (performance.now() - since) / 1000;
  try {
    if (message.error) throw new Error(message.error);
    for await (const chunk of streamChat(body, signal)) {
      if (chunk.usage) {
        const u = chunk.usage;
        message.stats.promptTokens = u.prompt_tokens;
        message.stats.completionTokens = u.completion_tokens;
        message.stats.reasoningTokens = u.completion_tokens_details?.reasoning_tokens ?? live.reasoningDeltas;
      }
      for (const choice of chunk.choices) {
        const delta = choice.delta || {};
        if (delta.reasoning_content || delta.content || delta.tool_calls) {
          firstToken ??= performance.now();
          completionDeltas += 1;
        }
        if (delta.reasoning_content) {
          message.reasoning += delta.reasoning_content;
          live.reasoningDeltas += 1;
        }
        if ((delta.content || delta.tool_calls) && message.reasoning && live.thinkSeconds === undefined) {
          live.thinkSeconds = seconds(started);
        }
        if (delta.content) message.content += delta.content;
        for (const call of delta.tool_calls || []) {
          const known = message.tool_calls[call.index];
          if (known) known.function.arguments += call.function.arguments || "";
          else message.tool_calls[call.index] = { id: call.id, type: "function", function: { ...call.function } };
        }
        if (choice.finish_reason) message.finish = choice.finish_reason;
      }
      view.schedule();
    }
    message.state = "done";
  } catch (error) {
    if (error.name === "AbortError") {
      message.state = "stopped";
    } else {
      message.state = "error";
      message.error = error.message;
      if (error.status === 401) askForKey("The server refused the key.");
    }
  }
  const s = message.stats;
  s.seconds = seconds(started);
  s.completionTokens ??= completionDeltas || undefined;
  if (message.reasoning) {
    s.reasoningTokens ??= live.reasoningDeltas;
    s.thinkSeconds = live.thinkSeconds ?? s.seconds;
  }
  if (firstToken !== null && s.completionTokens > 1) {
    const decoding = seconds(firstToken);
    if (decoding > 0) s.tokensPerSecond = (s.completionTokens - 1) / decoding;
  }
  if (!message.tool_calls.length) delete message.tool_calls;
  view.update();
  return message;
}

function submit(text) {
  if (!text.trim() || isBusy()) return;
  const conv = state.conv;
  conv.messages.push({ role: "user", content: text });
  if (conv.title === "New chat") conv.title = text.trim().slice(0, 60);
  touch(conv);
  persist();
  renderConversation();
  generate(conv);
}

function regenerateLast() {
  if (isBusy()) return;
  const conv = state.conv;
  const lastUser = conv.messages.map((m) => m.role).lastIndexOf("user");
  if (lastUser < 0) return;
  conv.messages.splice(lastUser + 1);
  touch(conv);
  renderConversation();
  generate(conv);
}

// ----------------------------------------------------------------------------------------- the API key

function askForKey(problem = "") {
  const dialog = $("key-dialog");
  $("key-error").textContent = problem;
  $("key-error").hidden = !problem;
  $("api-key").value = apiKey.get();
  if (!dialog.open) dialog.showModal();
  $("api-key").focus();
}

async function loadModel() {
  try {
    const models = await listModels();
    state.model = models[0] || null;
    $("model-name").textContent = state.model || "";
    document.title = state.model ? `${state.model} · qwen3` : "qwen3";
    return true;
  } catch (error) {
    if (error.status === 401) askForKey(apiKey.get() ? "The server refused this key." : "");
    else $("model-name").textContent = `(server unreachable: ${error.message})`;
    return false;
  }
}

function bindKeyDialog() {
  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    apiKey.set($("api-key").value.trim());
    if (await loadModel()) $("key-dialog").close();
  });
}

// ----------------------------------------------------------------------------------------------- start

function bindComposer() {
  const prompt = $("prompt");
  const grow = () => {
    prompt.style.height = "auto";
    prompt.style.height = `${Math.min(prompt.scrollHeight, 240)}px`;
  };
  prompt.addEventListener("input", grow);
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    if (isBusy() || !prompt.value.trim()) return;
    const text = prompt.value;
    prompt.value = "";
    grow();
    submit(text);
  });
  $("stop").addEventListener("click", stop);
  document.addEventListener("keydown", (event) => {
    if (event.key !== "Escape") return;
    if (isBusy()) stop();
    else closeSidebar();
  });
}

function start() {
  applyTheme();
  darkQuery.addEventListener("change", applyTheme);
  $("theme").addEventListener("click", () => {
    const choice = localStorage.getItem("qwen3.theme") || "auto";
    localStorage.setItem("qwen3.theme", THEMES[(THEMES.indexOf(choice) + 1) % THEMES.length]);
    applyTheme();
  });
  $("new-chat").addEventListener("click", () => {
    select(newConversation());
    $("prompt").focus();
  });
  $("toggle-sidebar").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  $("scrim").addEventListener("click", closeSidebar);
  $("open-settings").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("open-settings").setAttribute("aria-expanded", String(!panel.hidden));
  });
  bindSettings();
  bindComposer();
  bindKeyDialog();
  const saved = state.conversations.find((c) => c.id === current.get());
  select(saved || newConversation());
  loadModel();
  $("prompt").focus();
}

start();

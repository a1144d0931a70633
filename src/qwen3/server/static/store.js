// Conversations, kept in the browser's localStorage (nothing is stored on the server).

const STORAGE = "qwen3.conversations.v1";
const CURRENT = "qwen3.current";

// Qwen3's recommended sampling per mode (the model card's "Best Practices").
export const RECOMMENDED = {
  thinking: { temperature: 0.6, top_p: 0.95, top_k: 20, min_p: 0 },
  nonThinking: { temperature: 0.7, top_p: 0.8, top_k: 20, min_p: 0 },
};

/** A conversation's settings when it starts: thinking on, no budget, recommended sampling. */
export function defaultSettings() {
  return {
    thinking: true,
    budget: null, // thinking tokens before the engine closes the reasoning; null = no limit
    tools: false, // offer the in-browser calculator tool
    system: "",
    sampling: null, // null: Qwen3's recommended values for the mode, chosen by the server
    maxTokens: null,
    seed: null,
    extra: "", // a JSON object merged into the request body (any field the server accepts)
  };
}

export function newConversation() {
  return {
    id: `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`,
    title: "New chat",
    updated: Date.now(),
    settings: defaultSettings(),
    messages: [],
  };
}

/** Every stored conversation, newest first (an unreadable store counts as empty). */
export function loadAll() {
  try {
    const list = JSON.parse(localStorage.getItem(STORAGE) || "[]");
    if (!Array.isArray(list)) return [];
    return list
      .filter((c) => c && typeof c.id === "string" && Array.isArray(c.messages))
      .map((c) => ({ ...c, settings: { ...defaultSettings(), ...c.settings } }))
      .sort((a, b) => b.updated - a.updated);
  } catch {
    return [];
  }
}

export function saveAll(conversations) {
  localStorage.setItem(STORAGE, JSON.stringify(conversations));
}

export const current = {
  get: () => localStorage.getItem(CURRENT),
  set: (id) => localStorage.setItem(CURRENT, id),
};

"use strict";
// The alignloop chat page. It speaks only the server's public HTTP API (the same one the openai
// client and scripts use), so whatever the page records a script could record too: chat
// completions streamed as server-sent events, and feedback attached to each answer's
// `completion_id`. Plain JS with no build step and nothing fetched from outside the server;
// common.js, loaded first, holds the API calls and the login both pages share.

const FEEDBACK_RETRIES = 3; // network failures only; the Idempotency-Key makes a retry safe

const state = {
  models: [], // GET /v1/models data
  conversationId: null,
  turns: [], // {role, content}; an assistant turn's content follows a saved correction
  classifiers: [], // the served classifiers: /v1/models entries whose task is classification or ner
  chatBusy: false, // one answer streams at a time in the chat
  chatAbort: null, // aborts the answer streaming now when "New chat" is pressed
  compareBusy: false,
};

/** A random UUID. crypto.randomUUID exists only in secure contexts (https, localhost), and the
 * page may be opened over plain http on a LAN address, so fall back to getRandomValues. */
function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Yields the `data:` payload of each server-sent event of a streaming response. */
async function* readSse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const boundary = /\r\n\r\n|\n\n|\r\r/;
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let match;
    while ((match = boundary.exec(buffer))) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const data = block
        .split(/\r\n|\n|\r/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
  }
}

/** POST /v1/chat/completions with stream:true. Calls onDelta(index, choice) as tokens arrive and
 * returns the choices, each {text, completionId, finishReason, model}, once `[DONE]` comes. */
async function streamChat(request, onDelta, signal) {
  const response = await apiFetch("/v1/chat/completions", { method: "POST", body: { ...request, stream: true }, signal });
  const choices = [];
  for await (const data of readSse(response)) {
    if (data === "[DONE]") return choices;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new ApiError(500, chunk.error.message || "the stream failed", chunk.error.param);
    for (const delta of chunk.choices || []) {
      const choice = (choices[delta.index] ??= { text: "", completionId: null, finishReason: null, model: chunk.model });
      if (delta.completion_id) choice.completionId = delta.completion_id;
      if (delta.delta && delta.delta.content) choice.text += delta.delta.content;
      if (delta.finish_reason) choice.finishReason = delta.finish_reason;
      onDelta(delta.index, choice);
    }
  }
  throw new Error("The connection closed before the answer finished.");
}

/** POST /v1/feedback under one Idempotency-Key, retried on network failures: a retry of a write
 * the server already committed is answered "replayed" instead of being stored twice. */
async function postFeedback(body) {
  const idempotencyKey = newId();
  for (let attempt = 1; ; attempt++) {
    try {
      return await api("/v1/feedback", { method: "POST", body, headers: { "Idempotency-Key": idempotencyKey } });
    } catch (error) {
      if (error instanceof ApiError || attempt >= FEEDBACK_RETRIES) throw error;
      await sleep(300 * 2 ** attempt);
    }
  }
}

function savedText(outcome, what) {
  if (outcome === "replaced") return `Saved ${what} (replaces your earlier vote).`;
  if (outcome === "replayed") return `Already saved: ${what}.`;
  return `Saved ${what}.`;
}

function sampling() {
  const request = {};
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(temperature)) request.temperature = temperature;
  if (Number.isFinite(maxTokens)) request.max_tokens = maxTokens;
  return request;
}

// ---- login ----

/** The app for user `me`; `reopen`: the id of a chat to open (the one open before a reload). */
async function enterApp(me, reopen = null) {
  showAccount(me);
  $("admin-link").hidden = !me.admin;
  await loadModels();
  if (!state.models.length && state.classifiers.length) {
    selectTab("classify");
    $("classify-input").focus();
    return;
  }
  $("chat-input").focus();
  await loadConversations();
  if (reopen) await openConversation(reopen);
}

// ---- models ----

const CLASSIFIER_TASKS = new Set(["classification", "ner"]);

async function loadModels() {
  const { data: all } = await api("/v1/models");
  // A classifier cannot chat and a chat model cannot classify: each view lists its own.
  const data = all.filter((model) => !CLASSIFIER_TASKS.has(model.task));
  state.models = data;
  state.classifiers = all.filter((model) => CLASSIFIER_TASKS.has(model.task));
  loadClassifiers();
  const previous = $("model").value;
  $("model").replaceChildren(...data.map((model) => {
    const option = new Option(model.id, model.id);
    option.title = `version ${model.version || "unknown"}`;
    return option;
  }));
  if (data.some((model) => model.id === previous)) $("model").value = previous;
  loadOpponents();
  if (data.length === 0) {
    setStatus($("chat-error"), state.classifiers.length ? "The server serves classifiers only: see Classify." : "The server serves no model.", false);
  }
}

/** Compare has one model picker, the page's "Model" (chat and compare share it); "Against"
 * says what answers beside it: a second sample of the same model, or another served model
 * (offered only when the server serves several). */
function loadOpponents() {
  const select = $("compare-against");
  const previous = select.value;
  const model = $("model").value;
  const others = state.models.filter((entry) => entry.id !== model);
  select.replaceChildren(new Option("a second sample of the same model", ""), ...others.map((entry) => new Option(entry.id, entry.id)));
  if (others.some((entry) => entry.id === previous)) select.value = previous;
  else if (others.length) select.value = others[0].id; // several models: comparing two is why they are served
  $("compare-models").hidden = others.length === 0;
  describeCompare();
}

function describeCompare() {
  const against = $("compare-against").value;
  $("compare-mode").textContent = against
    ? `${$("model").value} and ${against} answer the same prompt; their places are shuffled. Pick the better one.`
    : `${$("model").value} answers twice (two samples); their places are shuffled. Pick the better one.`;
}

// ---- tabs ----

const TABS = ["chat", "compare", "classify", "history"];

function selectTab(name) {
  for (const tab of TABS) {
    const selected = tab === name;
    $(`tab-${tab}`).setAttribute("aria-selected", String(selected));
    $(`tab-${tab}`).tabIndex = selected ? 0 : -1;
    $(`view-${tab}`).hidden = !selected;
  }
  $("settings").hidden = name === "history" || name === "classify"; // classify picks its own model
  $("new-chat").hidden = name !== "chat";
  $("chats-toggle").hidden = name !== "chat";
  setDrawer(false);
  if (name === "history") loadHistory();
}

function tabKeys(event) {
  const index = TABS.indexOf(event.target.id.replace("tab-", ""));
  const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
  if (index < 0 || !step) return;
  const next = TABS[(index + step + TABS.length) % TABS.length];
  selectTab(next);
  $(`tab-${next}`).focus();
}

// ---- markdown ----

// Answers are rendered as a small Markdown subset: code fences, inline code, bold, italic,
// lists, headings, paragraphs and http(s) links. The renderer builds DOM nodes and puts every
// piece of text in as a text node (the escaping): no string of the model's ever reaches
// innerHTML, so a model that writes <script> or onerror= shows them as text. Anything it does
// not recognise stays literal text. No library: the page's CSP loads nothing from elsewhere.

const FENCE = /^\s*```\s*([\w+#.-]*)\s*$/;
const FENCE_END = /^\s*```\s*$/;
const LIST_ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const HEADING = /^(#{1,6})\s+(.+)$/;
const BLANK = /^\s*$/;
const INLINE = /`([^`]+)`|\*\*(.+?)\*\*|__(.+?)__|\*([^*\s](?:[^*]*[^*\s])?)\*|(?<!\w)_([^_\s](?:[^_]*[^_\s])?)_(?!\w)|\[([^\]]+)\]\(([^)\s]+)\)/g;
const SAFE_LINK = /^https?:\/\//i;

function element(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** Appends `text` to `parent` with its inline marks as elements and everything else as text. */
function appendInline(parent, text) {
  let at = 0;
  for (const match of text.matchAll(INLINE)) {
    parent.append(text.slice(at, match.index));
    at = match.index + match[0].length;
    const [whole, code, bold, boldToo, italic, italicToo, linkText, url] = match;
    if (code !== undefined) {
      const node = element("code");
      node.textContent = code;
      parent.append(node);
    } else if (bold !== undefined || boldToo !== undefined) {
      const node = element("strong");
      appendInline(node, bold ?? boldToo);
      parent.append(node);
    } else if (italic !== undefined || italicToo !== undefined) {
      const node = element("em");
      appendInline(node, italic ?? italicToo);
      parent.append(node);
    } else if (SAFE_LINK.test(url)) {
      const node = element("a");
      node.href = url;
      node.rel = "noopener noreferrer nofollow";
      node.target = "_blank";
      appendInline(node, linkText);
      parent.append(node);
    } else {
      parent.append(whole); // javascript:, data: and relative links stay text
    }
  }
  parent.append(text.slice(at));
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || LIST_ITEM.test(line);
}

/** `source` as a DocumentFragment of block elements. An unclosed fence (an answer still
 * streaming) runs to the end. */
function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  const lines = source.split(/\r\n|\n|\r/);
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = FENCE.exec(line);
    const heading = HEADING.exec(line);
    const item = LIST_ITEM.exec(line);
    if (BLANK.test(line)) {
      i++;
    } else if (fence) {
      const code = [];
      for (i++; i < lines.length && !FENCE_END.test(lines[i]); i++) code.push(lines[i]);
      i++;
      const pre = element("pre");
      const node = element("code");
      if (fence[1]) node.dataset.lang = fence[1];
      node.textContent = code.join("\n");
      pre.append(node);
      fragment.append(pre);
    } else if (heading) {
      const node = element(`h${Math.min(6, heading[1].length + 2)}`); // an answer's "#" is not the page's title
      appendInline(node, heading[2]);
      fragment.append(node);
      i++;
    } else if (item) {
      const ordered = /\d/.test(item[1]);
      const list = element(ordered ? "ol" : "ul");
      if (ordered && parseInt(item[1], 10) !== 1) list.start = parseInt(item[1], 10);
      let next;
      while (i < lines.length && (next = LIST_ITEM.exec(lines[i])) && /\d/.test(next[1]) === ordered) {
        const entry = element("li");
        appendInline(entry, next[2]);
        list.append(entry);
        i++;
      }
      fragment.append(list);
    } else {
      const paragraph = element("p");
      do {
        if (paragraph.childNodes.length) paragraph.append(element("br"));
        appendInline(paragraph, lines[i]);
        i++;
      } while (i < lines.length && !BLANK.test(lines[i]) && !startsBlock(lines[i]));
      fragment.append(paragraph);
    }
  }
  return fragment;
}

function showMarkdown(container, text) {
  container.replaceChildren(renderMarkdown(text));
}

// ---- conversations ----

const CHAT_HASH = "#chat=";

/** The list of the user's chats (GET /v1/conversations), the open one marked. */
async function loadConversations() {
  try {
    const { data } = await api("/v1/conversations?limit=100");
    $("conversation-list").replaceChildren(...data.map(conversationItem));
    setStatus($("conversations-status"), data.length ? "" : "No chats yet.");
  } catch (error) {
    setStatus($("conversations-status"), error.message, false);
  }
}

function conversationItem(conversation) {
  const item = element("li");
  item.dataset.conversationId = conversation.id;
  const open = element("button", "conversation-open");
  open.type = "button";
  const title = element("span", "conversation-title");
  title.textContent = conversation.title || "Untitled chat";
  const when = element("time");
  when.dateTime = conversation.updated_at;
  when.textContent = new Date(conversation.updated_at).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
  open.append(title, when);
  if (conversation.id === state.conversationId) open.setAttribute("aria-current", "true");
  open.addEventListener("click", () => openConversation(conversation.id));
  const remove = element("button", "conversation-delete");
  remove.type = "button";
  remove.textContent = "×";
  remove.setAttribute("aria-label", `Delete chat “${title.textContent}”`);
  remove.addEventListener("click", () => deleteConversation(conversation.id));
  item.append(open, remove);
  return item;
}

/** Marks the open chat in the list and in the address (so a reload reopens it). */
function markOpen(id) {
  for (const button of document.querySelectorAll(".conversation-open")) {
    if (button.parentElement.dataset.conversationId === id) button.setAttribute("aria-current", "true");
    else button.removeAttribute("aria-current");
  }
  history.replaceState(null, "", id ? CHAT_HASH + encodeURIComponent(id) : location.pathname + location.search);
}

/** Shows a stored chat: its turns, each answer with its feedback buttons and the votes on it. */
async function openConversation(id) {
  setDrawer(false);
  let conversation;
  try {
    conversation = await api(`/v1/conversations/${encodeURIComponent(id)}`);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) markOpen(null);
    setStatus($("conversations-status"), error.message, false);
    return;
  }
  selectTab("chat");
  newConversation();
  state.conversationId = conversation.id;
  $("chat-empty").hidden = conversation.turns.length > 0;
  for (const stored of conversation.turns) {
    if (stored.role === "user") {
      const turn = { role: "user", content: stored.content };
      turn.article = addUserMessage(turn);
      state.turns.push(turn);
    } else if (stored.role === "assistant") {
      restoreAnswer(stored);
    }
  }
  updateRegenerate();
  markOpen(conversation.id);
}

function restoreAnswer(stored) {
  const votes = stored.votes || {};
  const correction = stored.original === null && votes.correction ? votes.correction : null; // corrected, not yet resent
  const turn = {
    role: "assistant",
    content: correction ?? stored.content,
    original: stored.original ?? (correction ? stored.content : null),
    completionId: stored.completion_id,
  };
  turn.article = addAssistantMessage(stored.model || "");
  showMarkdown(turn.article.querySelector(".content"), turn.content);
  state.turns.push(turn);
  finishAnswer(turn, stored.model || "", stored.completion_id ? stored.finish_reason : "stopped", votes);
  if (turn.original !== null && turn.original !== turn.content) showOriginal(turn);
}

async function deleteConversation(id) {
  try {
    await api(`/v1/conversations/${encodeURIComponent(id)}`, { method: "DELETE" });
    if (id === state.conversationId) newConversation();
    await loadConversations();
    setStatus($("conversations-status"), "Chat deleted from your list (its feedback stays).");
  } catch (error) {
    setStatus($("conversations-status"), error.message, false);
  }
}

/** The chat list as a drawer on a phone (on a laptop it is always beside the chat). */
function setDrawer(open) {
  $("sidebar").classList.toggle("open", open);
  $("chats-toggle").setAttribute("aria-expanded", String(open));
  if (open) $("conversation-list").querySelector("button")?.focus();
}

// ---- chat ----

function newConversation() {
  if (state.chatAbort) state.chatAbort.abort("new chat");
  state.conversationId = newId();
  state.turns = [];
  $("messages").replaceChildren($("chat-empty"));
  $("chat-empty").hidden = false;
  setStatus($("chat-error"), "", false);
  markOpen(null);
}

/** Keeps the newest tokens in view: the page scrolls, the composer sticks to the bottom. */
function scrollToEnd() {
  window.scrollTo(0, document.documentElement.scrollHeight);
}

/** A status line inside the chat, scrolled clear of the sticky composer (style.css gives it
 * the room as scroll-margin): on a phone it would otherwise hide behind it. */
function showStatus(element, text, ok = true) {
  setStatus(element, text, ok);
  if (text) element.scrollIntoView({ block: "nearest" });
}

function addUserMessage(turn) {
  $("chat-empty").hidden = true;
  const article = $("user-template").content.firstElementChild.cloneNode(true);
  article.querySelector(".content").textContent = turn.content;
  article.querySelector(".edit").addEventListener("click", () => editQuestion(turn));
  $("messages").append(article);
  scrollToEnd();
  return article;
}

/** An assistant bubble from the template; its controls are wired once the answer is done. */
function addAssistantMessage(model) {
  const article = $("assistant-template").content.firstElementChild.cloneNode(true);
  article.querySelector(".meta").textContent = model;
  article.querySelector(".actions").hidden = true;
  $("messages").append(article);
  scrollToEnd();
  return article;
}

function pressOnly(buttons, pressed) {
  for (const button of buttons) button.setAttribute("aria-pressed", String(button === pressed));
}

/** The answer is complete (or stopped): its meta line, copy and regenerate, and, when it was
 * stored, its feedback controls with the user's `votes` on it pressed. */
function finishAnswer(turn, model, finishReason, votes = {}) {
  const { article } = turn;
  const note = { length: " · cut at max tokens", stopped: " · stopped (no completion id, so it cannot be rated)" }[finishReason] || "";
  article.querySelector(".meta").textContent = model + note;
  article.querySelector(".content").classList.remove("streaming");
  article.removeAttribute("aria-busy");
  article.querySelector(".actions").hidden = false;
  article.querySelector(".copy").addEventListener("click", () => copyAnswer(turn));
  article.querySelector(".regenerate").addEventListener("click", regenerate);
  if (!turn.completionId) return;
  article.dataset.completionId = turn.completionId;
  article.querySelector(".feedback").hidden = false;
  wireFeedback(article, turn, votes);
}

/** Only the last answer can be drawn again: an earlier one has later turns built on it. */
function updateRegenerate() {
  const last = state.turns[state.turns.length - 1];
  for (const turn of state.turns) {
    if (turn.role === "assistant") turn.article.querySelector(".regenerate").hidden = turn !== last;
  }
}

async function copyAnswer(turn) {
  const status = turn.article.querySelector(".status");
  try {
    await navigator.clipboard.writeText(turn.content);
    showStatus(status, "Copied.");
  } catch (_) { // no clipboard over plain http on a LAN address, or permission refused
    showStatus(status, "The browser refused the clipboard; select the text to copy it.", false);
  }
}

function wireFeedback(article, turn, votes) {
  const status = article.querySelector(".status");
  const thumbs = [article.querySelector(".thumb-up"), article.querySelector(".thumb-down")];
  const ratingGroup = article.querySelector(".rating");
  const ratingButtons = [1, 2, 3, 4, 5].map((value) => {
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = String(value);
    button.setAttribute("aria-label", `Rate ${value} out of 5`);
    button.setAttribute("aria-pressed", String(votes.rating === value));
    button.dataset.rating = String(value);
    ratingGroup.append(button);
    return button;
  });
  if (votes.thumbs === true || votes.thumbs === false) pressOnly(thumbs, thumbs[votes.thumbs ? 0 : 1]);

  async function send(body, what, button, group) {
    setStatus(status, "Saving…");
    try {
      const saved = await postFeedback({ completion_id: turn.completionId, ...body });
      if (button) pressOnly(group, button);
      showStatus(status, savedText(saved.outcome, what));
      return true;
    } catch (error) {
      showStatus(status, error.message, false);
      return false;
    }
  }

  const reason = article.querySelector(".reason");
  thumbs[0].addEventListener("click", async () => {
    reason.hidden = true;
    await send({ kind: "thumbs", up: true }, "thumbs up", thumbs[0], thumbs);
  });
  thumbs[1].addEventListener("click", async () => {
    // Saved at once, so a user who never explains still counts; the reason is a second revision.
    if (await send({ kind: "thumbs", up: false }, "thumbs down", thumbs[1], thumbs)) {
      reason.hidden = false;
      reason.scrollIntoView({ block: "nearest" });
    }
  });
  reason.querySelector(".reason-skip").addEventListener("click", () => { reason.hidden = true; });
  reason.addEventListener("submit", async (event) => {
    event.preventDefault();
    const tags = [...reason.querySelectorAll("input[type=checkbox]:checked")].map((box) => box.value);
    const comment = reason.querySelector("textarea").value.trim();
    const body = { kind: "thumbs", up: false, tags, ...(comment ? { comment } : {}) };
    const what = ["thumbs down", tags.join(", "), comment ? "with your comment" : ""].filter(Boolean).join(": ").replace(/: with/, ", with");
    if (await send(body, what, thumbs[1], thumbs)) reason.hidden = true;
  });
  for (const button of ratingButtons) {
    const rating = Number(button.dataset.rating);
    button.addEventListener("click", () => send({ kind: "rating", rating }, `rating ${rating}/5`, button, ratingButtons));
  }
  article.querySelector(".correct").addEventListener("click", () => editAnswer(article, turn, send));
}

/** The model's own text, one click away above a corrected answer. */
function showOriginal(turn) {
  const content = turn.article.querySelector(".content");
  content.classList.add("corrected");
  if (turn.article.querySelector(".original")) return;
  const original = document.createElement("details");
  original.className = "original";
  const summary = document.createElement("summary");
  summary.textContent = "Original answer";
  const text = document.createElement("div");
  text.textContent = turn.original;
  original.append(summary, text);
  content.before(original);
}

/** "Correct this answer": the answer becomes an editable box; saving posts a correction and
 * shows the corrected text (the original stays one click away). */
function editAnswer(article, turn, send) {
  if (article.querySelector(".editor")) return;
  const content = article.querySelector(".content");
  const editor = document.createElement("form");
  editor.className = "editor";
  const label = document.createElement("label");
  label.textContent = "Corrected answer";
  const textarea = document.createElement("textarea");
  textarea.value = turn.content;
  textarea.rows = Math.min(12, Math.max(3, turn.content.split("\n").length + 1));
  textarea.id = `correction-${turn.completionId}`;
  label.htmlFor = textarea.id;
  const save = document.createElement("button");
  save.type = "submit";
  save.className = "primary";
  save.textContent = "Save correction";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  const buttons = document.createElement("div");
  buttons.className = "editor-buttons";
  buttons.append(save, cancel);
  editor.append(label, textarea, buttons);
  content.hidden = true;
  content.after(editor);
  textarea.focus();

  cancel.addEventListener("click", () => {
    editor.remove();
    content.hidden = false;
  });
  editor.addEventListener("submit", async (event) => {
    event.preventDefault();
    const correction = textarea.value;
    if (correction.trim() === "") {
      showStatus(article.querySelector(".status"), "A correction cannot be empty.", false);
      return;
    }
    save.disabled = true;
    const ok = await send({ kind: "correction", correction }, "your correction");
    save.disabled = false;
    if (!ok) return;
    turn.content = correction;
    showMarkdown(content, correction);
    showOriginal(turn);
    editor.remove();
    content.hidden = false;
    article.querySelector(".status").scrollIntoView({ block: "nearest" });
  });
}

/** "Edit" on a question: edit it in place; sending drops it and every later turn and asks
 * again from there (the stored conversation forks there too). */
function editQuestion(turn) {
  const { article } = turn;
  if (state.chatBusy || article.querySelector(".editor") || !state.turns.includes(turn)) return;
  const content = article.querySelector(".content");
  const editor = element("form", "editor");
  const label = element("label");
  label.textContent = "Edit message";
  const textarea = element("textarea");
  textarea.value = turn.content;
  textarea.rows = Math.min(8, Math.max(2, turn.content.split("\n").length + 1));
  label.append(textarea);
  const send = element("button", "primary");
  send.type = "submit";
  send.textContent = "Send edited";
  const cancel = element("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  const buttons = element("div", "editor-buttons");
  buttons.append(send, cancel);
  editor.append(label, buttons);
  content.hidden = true;
  article.querySelector(".actions").hidden = true;
  content.after(editor);
  textarea.focus();
  const close = () => {
    editor.remove();
    content.hidden = false;
    article.querySelector(".actions").hidden = false;
  };
  cancel.addEventListener("click", close);
  editor.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = textarea.value.trim();
    if (!text || state.chatBusy) return;
    const at = state.turns.indexOf(turn);
    if (at < 0) return close();
    for (const later of state.turns.splice(at)) later.article.remove();
    await ask(text);
  });
}

function setBusy(busy) {
  state.chatBusy = busy;
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  for (const button of document.querySelectorAll("#messages .regenerate, #messages .edit")) button.disabled = busy;
}

async function sendChat(event) {
  event.preventDefault();
  const input = $("chat-input");
  const text = input.value.trim();
  if (!text || state.chatBusy || !$("model").value) return;
  input.value = "";
  await ask(text);
}

/** Adds the user's message and streams the answer to it. */
async function ask(text) {
  const turn = { role: "user", content: text };
  turn.article = addUserMessage(turn);
  state.turns.push(turn);
  await answer();
}

/** "Regenerate": the last answer is dropped and the same history asked again. Its stored
 * completion and any feedback on it stay: a regenerated answer is a sample worth comparing. */
async function regenerate() {
  const last = state.turns[state.turns.length - 1];
  if (state.chatBusy || !last || last.role !== "assistant") return;
  state.turns.pop();
  last.article.remove();
  await answer();
}

/** Streams an answer to the conversation so far (it ends with the user's message) into a new
 * bubble. "Stop" keeps what arrived; a failure gives the question back to the composer. */
async function answer() {
  const model = $("model").value;
  // This conversation's turns: "New chat" replaces state.turns, and a late answer must not
  // land in the next conversation.
  const turns = state.turns;
  const conversationId = state.conversationId;
  const question = turns[turns.length - 1];
  setBusy(true);
  setStatus($("chat-error"), "", false);
  const article = addAssistantMessage(model);
  const content = article.querySelector(".content");
  content.classList.add("streaming");
  article.setAttribute("aria-busy", "true"); // screen readers read the answer once, not per token
  const turn = { role: "assistant", content: "", original: null, completionId: null, article };
  const abort = new AbortController();
  state.chatAbort = abort;
  try {
    const choices = await streamChat(
      { model, messages: turns.map(({ role, content: text }) => ({ role, content: text })), conversation_id: conversationId, ...sampling() },
      (index, choice) => {
        if (index !== 0) return;
        turn.content = choice.text;
        showMarkdown(content, choice.text);
        scrollToEnd();
      },
      abort.signal,
    );
    const choice = choices[0];
    if (!choice || !choice.completionId) throw new Error("The answer carried no completion_id, so it cannot be rated.");
    Object.assign(turn, { content: choice.text, original: choice.text, completionId: choice.completionId });
    turns.push(turn);
    finishAnswer(turn, model, choice.finishReason);
    if (state.conversationId === conversationId) markOpen(conversationId);
    loadConversations(); // this chat is new in the list, or moves to its top
  } catch (error) {
    if (abort.signal.reason === "stop" && turn.content) {
      // The server cancels a generation whose client left and stores nothing of it; the
      // text so far stays here, and goes to the model as this turn if the chat goes on.
      turns.push(turn);
      finishAnswer(turn, model, "stopped");
      loadConversations(); // the server may have finished it before the stop reached it
    } else if (turns === state.turns) { // failed, or stopped before any text: ask again from the composer
      turns.splice(turns.indexOf(question), 1);
      question.article.classList.add("failed");
      question.article.querySelector(".actions").hidden = true;
      article.remove();
      $("chat-input").value = question.content;
      if (!abort.signal.aborted) setStatus($("chat-error"), error.message, false);
    }
  } finally {
    if (state.chatAbort === abort) { // not when another answer started meanwhile (after "New chat")
      state.chatAbort = null;
      setBusy(false);
    }
    updateRegenerate();
  }
}

function stopAnswer() {
  if (state.chatAbort) state.chatAbort.abort("stop");
}

// ---- compare ----

/** The current comparison: answers a and b (a = first model or sample 0) and which one the
 * page placed on the left, chosen at random so position bias can be measured, not baked in. */
let comparison = null;

function panelOf(side) {
  return { answer: $(`answer-${side}`), reveal: $(`reveal-${side}`), panel: $(`panel-${side}`) };
}

async function runCompare(event) {
  event.preventDefault();
  const prompt = $("compare-input").value.trim();
  if (!prompt || state.compareBusy) return;
  state.compareBusy = true;
  $("compare-send").disabled = true;
  setStatus($("compare-error"), "", false);
  setStatus($("compare-status"), "");
  const left = Math.random() < 0.5 ? "a" : "b";
  const sideOf = { a: left === "a" ? "left" : "right", b: left === "a" ? "right" : "left" };
  comparison = { left, answers: { a: null, b: null } };
  for (const side of ["left", "right"]) {
    const { answer, reveal, panel } = panelOf(side);
    answer.textContent = "";
    answer.classList.add("streaming");
    reveal.textContent = "";
    delete panel.dataset.completionId;
  }
  for (const button of document.querySelectorAll(".verdicts button")) {
    button.disabled = true;
    button.setAttribute("aria-pressed", "false");
  }
  $("compare-result").hidden = false;

  const show = (which) => (_index, choice) => showMarkdown(panelOf(sideOf[which]).answer, choice.text);
  // No conversation_id: a comparison is not a chat, and would crowd the chat list.
  const common = { messages: [{ role: "user", content: prompt }], ...sampling() };
  const model = $("model").value;
  const against = $("compare-against").value;
  try {
    let a;
    let b;
    if (against && against !== model) {
      const [modelA, modelB] = [model, against];
      [[a], [b]] = await Promise.all([
        streamChat({ model: modelA, ...common }, show("a")),
        streamChat({ model: modelB, ...common }, show("b")),
      ]);
      a.label = modelA;
      b.label = modelB;
    } else {
      [a, b] = await streamChat({ model, n: 2, ...common }, (index, choice) => show(index === 0 ? "a" : "b")(index, choice));
      a.label = `${model}, sample 1`;
      b.label = `${model}, sample 2`;
    }
    if (!a || !b || !a.completionId || !b.completionId) throw new Error("The server did not return two answers with completion ids.");
    comparison.answers = { a, b };
    for (const which of ["a", "b"]) {
      const { answer, panel } = panelOf(sideOf[which]);
      answer.classList.remove("streaming");
      panel.dataset.completionId = comparison.answers[which].completionId;
    }
    for (const button of document.querySelectorAll(".verdicts button")) button.disabled = false;
  } catch (error) {
    $("compare-result").hidden = true;
    comparison = null;
    setStatus($("compare-error"), error.message, false);
  } finally {
    state.compareBusy = false;
    $("compare-send").disabled = false;
  }
}

const VERDICT_TEXT = { tie: "a tie", both_bad: "both bad" };

async function vote(event) {
  const button = event.target.closest("button[data-verdict]");
  if (!button || !comparison) return;
  const { left, answers } = comparison;
  const right = left === "a" ? "b" : "a";
  const picked = button.dataset.verdict; // left | right | tie | both_bad, as the user saw it
  const verdict = picked === "left" ? left : picked === "right" ? right : picked;
  const status = $("compare-status");
  setStatus(status, "Saving…");
  try {
    const saved = await postFeedback({
      kind: "pairwise",
      completion_id: answers.a.completionId,
      other_completion_id: answers.b.completionId,
      verdict,
      left,
    });
    pressOnly(document.querySelectorAll(".verdicts button"), button);
    const what = picked === "left" ? "A is better" : picked === "right" ? "B is better" : VERDICT_TEXT[picked];
    setStatus(status, savedText(saved.outcome, what));
    panelOf(left === "a" ? "left" : "right").reveal.textContent = answers.a.label;
    panelOf(left === "a" ? "right" : "left").reveal.textContent = answers.b.label;
  } catch (error) {
    setStatus(status, error.message, false);
  }
}

// ---- classify ----

/** The classify view's state: the queue of texts (one per pasted line), which one is shown,
 * and the prediction the verdict buttons judge. */
const classifying = {
  queue: [],
  position: -1,
  busy: false,
  model: null, // the /v1/models entry the queue is classified with
  prediction: null, // {id, task, text, shown, labels, entities}
};

const NOT_AN_ENTITY = "O";

function loadClassifiers() {
  const select = $("classify-model");
  const previous = select.value;
  select.replaceChildren(...state.classifiers.map((model) => {
    const option = new Option(`${model.id} (${model.task === "ner" ? "entities" : "labels"})`, model.id);
    option.title = `version ${model.version || "unknown"}`;
    return option;
  }));
  if (state.classifiers.some((model) => model.id === previous)) select.value = previous;
  const none = state.classifiers.length === 0;
  $("classify-send").disabled = none;
  setStatus($("classify-error"), none ? "The server serves no classifier (alignloop serve --classifier NAME=PATH)." : "", false);
}

/** "Classify": the box's non-empty lines become the queue, and the first is classified. */
function startClassify(event) {
  event.preventDefault();
  if (classifying.busy) return;
  const lines = $("classify-input").value.split(/\r\n|\n|\r/).map((line) => line.trim()).filter(Boolean);
  const model = state.classifiers.find((entry) => entry.id === $("classify-model").value);
  if (!lines.length || !model) return;
  classifying.queue = lines;
  classifying.model = model;
  classifyAt(0);
}

/** Classifies queue[position] and shows it. One text at a time, only when asked: every
 * prediction is logged as shown, so classifying texts nobody looks at would log views that were
 * never seen. */
async function classifyAt(position) {
  const text = classifying.queue[position];
  if (text === undefined || classifying.busy) return;
  classifying.busy = true;
  $("classify-send").disabled = true;
  $("queue-next").disabled = true;
  setStatus($("classify-error"), "", false);
  try {
    const model = classifying.model;
    const answer = await api("/v1/classify", { method: "POST", body: { model: model.id, input: text } });
    const [result] = answer.results || [];
    if (!result || !result.prediction_id) throw new Error("The answer carried no prediction_id, so it cannot be judged.");
    classifying.position = position;
    showPrediction(answer, result, text, model);
  } catch (error) {
    setStatus($("classify-error"), error.message, false);
  } finally {
    classifying.busy = false;
    $("classify-send").disabled = state.classifiers.length === 0;
    $("queue-next").disabled = false;
  }
}

/** `text` cut at character offsets counted as the server counts them (Unicode code points, as
 * Python indexes a str); JavaScript strings index UTF-16 units, which differ after an emoji. */
function codePoints(text) {
  const chars = Array.from(text);
  return (start, end) => chars.slice(start, end).join("");
}

function percent(p) {
  if (!Number.isFinite(p)) return "";
  return p < 0.005 ? "<1%" : `${Math.round(p * 100)}%`;
}

/** The text with each entity as a <mark> carrying its type; built from text nodes only, never
 * HTML, since the text is the user's own. */
function highlightEntities(container, text, entities) {
  const cut = codePoints(text);
  const length = Array.from(text).length;
  let at = 0;
  const sorted = entities.map((entity, index) => ({ ...entity, index })).sort((a, b) => a.start - b.start);
  for (const entity of sorted) {
    if (entity.start < at || entity.end > length) continue; // overlapping or out of range: show as plain text
    container.append(cut(at, entity.start));
    const mark = document.createElement("mark");
    mark.className = "entity";
    mark.dataset.type = entity.type;
    mark.dataset.index = String(entity.index);
    const type = document.createElement("span");
    type.className = "entity-type";
    type.textContent = entity.type;
    mark.append(cut(entity.start, entity.end), type);
    container.append(mark);
    at = entity.end;
  }
  container.append(cut(at, length));
}

/** The labels a user may name: the model card's labels, else those the answer shows (the keys of
 * the probabilities); for NER the entity types of its tags (B-PER, I-PER → PER). */
function labelsOf(task, result, card) {
  const probabilities = result.probabilities || (task === "ner" ? [] : {});
  if (task !== "ner") return card && card.labels ? [...card.labels] : Object.keys(probabilities);
  const tags = card && card.labels ? card.labels : probabilities.flatMap((word) => Object.keys(word));
  const types = new Set();
  // B-X and I-X name type X; a bare tag other than O (IO tagging) is a type itself, as the server reads it.
  for (const tag of tags) if (tag !== NOT_AN_ENTITY) types.add(/^[BI]-/.test(tag) ? tag.slice(2) : tag);
  return [...types].sort();
}

function showPrediction(answer, result, text, card) {
  const task = answer.task === "ner" ? "ner" : "classification";
  const prediction = {
    id: result.prediction_id,
    task,
    text,
    shown: task === "ner" ? null : result.label,
    labels: labelsOf(task, result, card),
    entities: task === "ner" ? result.entities || [] : [],
  };
  classifying.prediction = prediction;
  const article = $("prediction");
  article.hidden = false;
  article.dataset.predictionId = prediction.id;
  article.dataset.task = task;
  $("prediction-meta").textContent = `${answer.model} · version ${String(answer.model_version || "").slice(0, 12)}`;

  const shownText = $("prediction-text");
  shownText.replaceChildren();
  const label = $("prediction-label");
  label.replaceChildren();
  const list = $("probability-list");
  list.replaceChildren();
  if (task === "ner") {
    highlightEntities(shownText, text, prediction.entities);
    const n = prediction.entities.length;
    label.textContent = n ? `${n} entit${n === 1 ? "y" : "ies"} found` : "No entities found";
    $("prediction-probabilities").hidden = true;
  } else {
    shownText.textContent = text;
    const badge = document.createElement("span");
    badge.className = "label-badge";
    badge.textContent = result.label;
    const probability = document.createElement("span");
    probability.className = "probability";
    probability.textContent = percent((result.probabilities || {})[result.label]);
    label.append("Prediction: ", badge, " ", probability);
    const ranked = Object.entries(result.probabilities || {}).sort((a, b) => b[1] - a[1]);
    list.replaceChildren(...ranked.map(([name, p]) => {
      const item = document.createElement("li");
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.max(1, Math.round(p * 100))}%`;
      const caption = document.createElement("span");
      caption.textContent = `${name} ${percent(p)}`;
      item.append(caption, bar);
      return item;
    }));
    $("prediction-probabilities").hidden = false;
  }

  pressOnly([$("judge-correct"), $("judge-wrong")], null);
  $("fix-label").hidden = true;
  $("fix-entities").hidden = true;
  setStatus($("prediction-status"), "");
  const { queue, position } = classifying;
  $("queue").hidden = queue.length < 2;
  $("queue-position").textContent = `Text ${position + 1} of ${queue.length}`;
  $("queue-next").hidden = position + 1 >= queue.length;
}

/** POST the verdict on the shown prediction; a later one replaces it (one live vote per user
 * and prediction). */
async function sendVerdict(body, what) {
  const prediction = classifying.prediction;
  const status = $("prediction-status");
  setStatus(status, "Saving…");
  try {
    const saved = await postFeedback({ kind: "prediction", prediction_id: prediction.id, ...body });
    if (classifying.prediction === prediction) setStatus(status, savedText(saved.outcome, what));
    return true;
  } catch (error) {
    if (classifying.prediction === prediction) setStatus(status, error.message, false);
    return false;
  }
}

/** ✓ or ✗. A ✗ is saved at once and then offers the optional fix: the right label, or a verdict
 * per entity; each fix is saved as a new revision of the same vote. */
async function judge(correct) {
  const prediction = classifying.prediction;
  if (!prediction) return;
  const ok = await sendVerdict({ correct }, correct ? "correct" : "wrong");
  if (!ok || classifying.prediction !== prediction) return;
  pressOnly([$("judge-correct"), $("judge-wrong")], correct ? $("judge-correct") : $("judge-wrong"));
  $("fix-label").hidden = correct || prediction.task === "ner";
  $("fix-entities").hidden = correct || prediction.task !== "ner";
  if (correct) return;
  if (prediction.task === "ner") {
    showEntityVerdicts(prediction);
  } else {
    const select = $("right-label");
    const others = prediction.labels.filter((label) => label !== prediction.shown);
    select.replaceChildren(new Option("Not sure", ""), ...others.map((label) => new Option(label, label)));
  }
}

async function saveRightLabel() {
  const label = $("right-label").value;
  await sendVerdict(label ? { correct: false, label } : { correct: false }, label ? `wrong, right label: ${label}` : "wrong");
}

/** One picker per shown entity: right, wrong (type unknown), the right type, or not an entity. */
function showEntityVerdicts(prediction) {
  const cut = codePoints(prediction.text);
  $("fix-entities-hint").textContent = prediction.entities.length
    ? "Mark each entity; saving replaces your ✗ with these verdicts."
    : "No entity was shown: your ✗ says the model missed one.";
  $("save-entities").hidden = prediction.entities.length === 0;
  $("entity-verdicts").replaceChildren(...prediction.entities.map((entity, index) => {
    const item = document.createElement("li");
    const label = document.createElement("label");
    const select = document.createElement("select");
    select.id = `entity-verdict-${index}`;
    select.dataset.index = String(index);
    label.htmlFor = select.id;
    label.textContent = `“${cut(entity.start, entity.end)}” as ${entity.type}`;
    select.append(new Option(`✓ right`, "right"), new Option("✗ wrong, type unknown", "wrong"));
    for (const type of prediction.labels) {
      if (type !== entity.type) select.append(new Option(`✗ should be ${type}`, `type:${type}`));
    }
    select.append(new Option("✗ not an entity", `type:${NOT_AN_ENTITY}`));
    item.append(label, select);
    return item;
  }));
}

async function saveEntityVerdicts(event) {
  event.preventDefault();
  const entities = [...$("entity-verdicts").querySelectorAll("select")].map((select) => {
    const verdict = { index: Number(select.dataset.index), correct: select.value === "right" };
    if (select.value.startsWith("type:")) verdict.label = select.value.slice(5);
    return verdict;
  });
  const wrong = entities.filter((entity) => !entity.correct).length;
  $("save-entities").disabled = true;
  await sendVerdict({ correct: false, entities }, `${wrong} of ${entities.length} entities wrong`);
  $("save-entities").disabled = false;
}

// ---- history ----

/** A comparison's answers in the places the user saw them, named as the compare view names
 * them: A on the left, B on the right. Feedback sent without `left` (a script's) has no places:
 * first and second answer then. */
function comparedAnswers(feedback) {
  const order = feedback.left === "b" ? ["b", "a"] : ["a", "b"];
  const names = feedback.left ? ["A", "B"] : ["First answer", "Second answer"];
  const texts = { a: feedback.completion_text, b: feedback.other_completion_text };
  return order.map((which, place) => ({ which, name: names[place], text: texts[which] || "" }));
}

function describe(feedback) {
  switch (feedback.kind) {
    case "thumbs": {
      const tags = feedback.tags && feedback.tags.length ? `: ${feedback.tags.join(", ")}` : "";
      return (feedback.up ? "thumbs up" : "thumbs down") + tags;
    }
    case "rating":
      return `rated ${feedback.rating}/5`;
    case "pairwise": {
      const preferred = comparedAnswers(feedback).find((answer) => answer.which === feedback.verdict);
      if (preferred) return `${preferred.name} is better`;
      return { tie: "a tie", both_bad: "both bad" }[feedback.verdict] || `verdict ${feedback.verdict}`;
    }
    case "correction":
      return "corrected the answer";
    case "prediction":
      if (feedback.correct) return "prediction correct";
      if (feedback.label) return `prediction wrong → ${feedback.label}`;
      if (feedback.entities && feedback.entities.length) {
        const wrong = feedback.entities.filter((entity) => !entity.correct).length;
        return `prediction wrong (${wrong} of ${feedback.entities.length} entities)`;
      }
      return "prediction wrong";
    default:
      return feedback.kind;
  }
}

function paragraph(className, text) {
  const node = element("p", className);
  node.textContent = text;
  return node;
}

function historyItem(feedback) {
  const item = document.createElement("li");
  item.className = "history-item";
  item.dataset.feedbackId = String(feedback.id);
  const head = document.createElement("div");
  head.className = "history-item-head";
  const kind = document.createElement("span");
  kind.className = `badge ${feedback.kind}`;
  kind.textContent = feedback.kind;
  const summary = document.createElement("span");
  summary.className = "summary";
  summary.textContent = describe(feedback);
  const when = document.createElement("time");
  when.dateTime = feedback.updated_at || feedback.created_at;
  when.textContent = new Date(when.dateTime).toLocaleString();
  const remove = document.createElement("button");
  remove.type = "button";
  remove.className = "delete";
  remove.textContent = "Delete";
  remove.setAttribute("aria-label", `Delete ${feedback.kind} feedback ${feedback.id}`);
  remove.addEventListener("click", () => deleteFeedback(feedback, item));
  head.append(kind, summary, when, remove);
  item.append(head);
  if (feedback.prompt_text) item.append(paragraph("prompt-snippet", `Prompt: ${feedback.prompt_text}`));
  if (feedback.kind === "pairwise") {
    const answers = element("div", "history-answers");
    for (const answer of comparedAnswers(feedback)) {
      const block = element("div", "history-answer");
      const preferred = answer.which === feedback.verdict;
      block.classList.toggle("preferred", preferred);
      block.append(paragraph("history-answer-name", preferred ? `${answer.name} · preferred` : answer.name),
        paragraph("answer-snippet", answer.text));
      answers.append(block);
    }
    item.append(answers);
  } else if (feedback.kind === "prediction") {
    // A vote on a classifier's prediction has no answer text: its model version says what it judged.
    const id = feedback.prediction_id || "";
    const short = id.length > 24 ? `${id.slice(0, 13)}…${id.slice(-2)}` : id; // pred-<32 hex>-<i> would wrap on a phone
    const answer = paragraph("answer-snippet", `version ${feedback.model_version || "unknown"} · ${short}`);
    answer.title = id;
    item.append(answer);
  } else {
    item.append(paragraph("answer-snippet", feedback.completion_text || ""));
  }
  if (feedback.kind === "correction") item.append(paragraph("correction-text", `→ ${feedback.correction}`));
  if (feedback.comment) item.append(paragraph("comment-text", `“${feedback.comment}”`));
  return item;
}

async function loadHistory() {
  const status = $("history-status");
  setStatus(status, "Loading…");
  try {
    const { data } = await api("/v1/feedback?limit=100");
    $("history-list").replaceChildren(...data.map(historyItem));
    setStatus(status, data.length ? `${data.length} item${data.length === 1 ? "" : "s"}.` : "No feedback yet.");
  } catch (error) {
    setStatus(status, error.message, false);
  }
}

async function deleteFeedback(feedback, item) {
  const status = $("history-status");
  try {
    await api(`/v1/feedback/${encodeURIComponent(feedback.id)}`, { method: "DELETE" });
    item.remove();
    setStatus(status, `Deleted ${feedback.kind} feedback ${feedback.id}.`);
  } catch (error) {
    setStatus(status, error.message, false);
  }
}

// ---- wiring ----

document.addEventListener("DOMContentLoaded", () => {
  for (const tab of TABS) $(`tab-${tab}`).addEventListener("click", () => selectTab(tab));
  $("tabs").addEventListener("keydown", tabKeys);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("new-chat").addEventListener("click", () => {
    newConversation();
    setDrawer(false);
    $("chat-input").focus();
  });
  $("stop").addEventListener("click", stopAnswer);
  $("chats-toggle").addEventListener("click", () => setDrawer(!$("sidebar").classList.contains("open")));
  $("sidebar-close").addEventListener("click", () => setDrawer(false));
  $("model").addEventListener("change", loadOpponents);
  $("compare-against").addEventListener("change", describeCompare);
  $("compare-form").addEventListener("submit", runCompare);
  document.querySelector(".verdicts").addEventListener("click", vote);
  $("classify-form").addEventListener("submit", startClassify);
  $("classify-input").addEventListener("keydown", (event) => {
    // Enter classifies; Shift+Enter starts a new line (several lines make a queue).
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("classify-form").requestSubmit();
    }
  });
  $("judge-correct").addEventListener("click", () => judge(true));
  $("judge-wrong").addEventListener("click", () => judge(false));
  $("right-label").addEventListener("change", saveRightLabel);
  $("fix-entities").addEventListener("submit", saveEntityVerdicts);
  $("queue-next").addEventListener("click", () => classifyAt(classifying.position + 1));
  $("history-refresh").addEventListener("click", loadHistory);
  // A reload reopens the chat that was open: its id is in the address (read before the empty
  // chat below clears it).
  const reopen = location.hash.startsWith(CHAT_HASH) ? decodeURIComponent(location.hash.slice(CHAT_HASH.length)) : null;
  newConversation();
  selectTab("chat");
  startSession({ views: ["app", "tabs"], enter: enterApp, leave: newConversation }, reopen);
});

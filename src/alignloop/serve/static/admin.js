"use strict";
// The alignloop admin page: users and their keys, the model registry (lineage, deploy, roll
// back), feedback export and the server's counters. Like the chat page it speaks only the
// server's HTTP API (/admin/...), so everything here a script can do too. Plain JS, no build step;
// common.js, loaded first, holds the API calls and the login both pages share.

/** A failed call's status line; a 401 (the key went away) sends the page back to the login. */
function showError(element, error) {
  if (error instanceof ApiError && error.status === 401) {
    showLogin("Your key is no longer accepted; log in again.");
    return;
  }
  setStatus(element, error.message, false);
}

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function button(text, label, onClick) {
  const node = element("button", text);
  node.type = "button";
  node.setAttribute("aria-label", label);
  node.addEventListener("click", () => onClick(node));
  return node;
}

const shortVersion = (version) => (version.length > 12 ? version.slice(0, 12) : version);
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

// ---- login ----

async function enterAdmin(me) {
  if (!me.admin) {
    showLogin(`${me.name} is not an admin; this page needs an admin's key (the chat page takes any user's).`);
    return;
  }
  showAccount(me);
  await Promise.all([loadUsers(), loadVersions(), loadStats()]);
}

// ---- users ----

async function loadUsers() {
  try {
    const { data } = await api("/admin/users");
    $("user-list").replaceChildren(...data.map(userRow));
  } catch (error) {
    showError($("users-status"), error);
  }
}

function userRow(user) {
  const item = element("li", undefined, "row-card user-row");
  item.dataset.user = user.name;
  const head = element("div", undefined, "row-head");
  head.append(element("strong", user.name, "row-title"));
  if (session.me && user.name === session.me.name) head.append(element("span", "you", "badge"));
  if (user.admin) head.append(element("span", "admin", "badge"));
  head.append(element("span", user.active ? "key active" : "key revoked", user.active ? "badge ok" : "badge off"));
  const actions = element("div", undefined, "row-actions");
  if (user.active && !(session.me && user.name === session.me.name)) {
    actions.append(button("Revoke", `Revoke ${user.name}'s key`, () => revoke(user.name)));
  }
  actions.append(button(user.active ? "Rotate" : "New key", `New key for ${user.name}`, () => rotate(user.name)));
  item.append(head, actions);
  return item;
}

function showKey(label, key) {
  $("new-key-label").textContent = label;
  $("new-key-value").textContent = key;
  $("new-key").hidden = false;
}

async function addUser(event) {
  event.preventDefault();
  const name = $("new-user-name").value.trim();
  const admin = $("new-user-admin").checked;
  $("new-key").hidden = true;
  try {
    const { user, key } = await api("/admin/users", { method: "POST", body: { name, admin } });
    showKey(`${user.name}${user.admin ? " (admin)" : ""} added. Their API key:`, key);
    setStatus($("users-status"), `Added ${user.name}.`, true);
    $("new-user-name").value = "";
    $("new-user-admin").checked = false;
    await loadUsers();
  } catch (error) {
    showError($("users-status"), error);
  }
}

async function revoke(name) {
  $("new-key").hidden = true;
  try {
    await api(`/admin/users/${encodeURIComponent(name)}/revoke`, { method: "POST" });
    setStatus($("users-status"), `Revoked ${name}'s key: refused from their next request.`, true);
    await loadUsers();
  } catch (error) {
    showError($("users-status"), error);
  }
}

async function rotate(name) {
  try {
    const { key } = await api(`/admin/users/${encodeURIComponent(name)}/rotate`, { method: "POST" });
    if (session.me && name === session.me.name && session.key) {
      // The old key stops working at once: keep this page (and the chat page) logged in.
      session.key = key;
      localStorage.setItem(KEY_STORAGE, key);
    }
    showKey(`${name}'s new API key (the old one no longer works):`, key);
    setStatus($("users-status"), `Gave ${name} a new key.`, true);
    await loadUsers();
  } catch (error) {
    showError($("users-status"), error);
  }
}

async function copyKey() {
  try {
    await navigator.clipboard.writeText($("new-key-value").textContent);
    setStatus($("users-status"), "Key copied.", true);
  } catch (_) {
    // No clipboard (plain http on a LAN address): select the key so Ctrl+C copies it.
    window.getSelection().selectAllChildren($("new-key-value"));
    setStatus($("users-status"), "Key selected: press Ctrl+C (⌘C) to copy it.", true);
  }
}

// ---- the registry ----

async function loadVersions() {
  try {
    const { data } = await api("/admin/models");
    $("version-list").replaceChildren(...data.map((row, index) => versionRow(row, index, data)));
    if (!data.length) $("version-list").append(element("li", "No model version is registered yet.", "hint"));
  } catch (error) {
    showError($("registry-status"), error);
  }
}

/** "passed" or "refused", then the numbers the gate read, from a loop's stored evaluation. */
function evaluationSummary(evaluation) {
  if (!evaluation) return "";
  const parts = [];
  if (evaluation.passed !== undefined) parts.push(evaluation.passed ? "gate passed" : "gate refused");
  for (const [name, value] of Object.entries(evaluation.metrics || {})) {
    if (typeof value === "number") parts.push(`${name} ${Number.isInteger(value) ? value : value.toFixed(3)}`);
  }
  if (evaluation.reasons && evaluation.reasons.length) parts.push(`(${evaluation.reasons.join("; ")})`);
  return parts.join(", ");
}

function fact(list, term, value) {
  if (value === undefined || value === null || value === "") return;
  list.append(element("dt", term), element("dd", String(value)));
}

function versionRow(row, index, all) {
  const item = element("li", undefined, "row-card version-row");
  item.dataset.version = row.version;
  const head = element("div", undefined, "row-head");
  head.append(element("strong", `${row.name} · ${shortVersion(row.version)}`, "row-title"));
  if (row.serving) head.append(element("span", "serving", "badge ok"));
  if (row.deployed) head.append(element("span", "deployed", "badge"));
  const facts = element("dl", undefined, "facts");
  fact(facts, "version", row.version);
  fact(facts, "parent", row.parent_version || "—");
  fact(facts, "created", when(row.created_at));
  fact(facts, "feedback rows", row.feedback_rows);
  fact(facts, "evaluation", evaluationSummary(row.evaluation));
  fact(facts, "path", row.path);
  const lineage = element("div", undefined, "lineage");
  lineage.hidden = true;
  const actions = element("div", undefined, "row-actions");
  actions.append(button("Lineage", `Lineage of version ${row.version}`, (node) => toggleLineage(row.version, lineage, node)));
  if (!row.serving) {
    // Older than what its name serves now: going back to it is a rollback.
    const current = all.findIndex((other) => other.name === row.name && other.serving);
    const rollback = current > index;
    const label = rollback ? `Roll back to version ${row.version}` : `Deploy version ${row.version}`;
    actions.append(button(rollback ? "Roll back" : "Deploy", label, (node) => deployVersion(row, node)));
  }
  item.append(head, facts, actions, lineage);
  return item;
}

async function toggleLineage(version, box, node) {
  if (!box.hidden) {
    box.hidden = true;
    node.setAttribute("aria-expanded", "false");
    return;
  }
  try {
    const { ancestry, feedback } = await api(`/admin/models/${encodeURIComponent(version)}/lineage`);
    const byUser = new Map();
    for (const row of feedback) {
      const kinds = byUser.get(row.user_name) || new Map();
      kinds.set(row.kind, (kinds.get(row.kind) || 0) + 1);
      byUser.set(row.user_name, kinds);
    }
    const chain = element("p", `Ancestry: ${ancestry.map(shortVersion).join(" ← ")}`);
    const summary = element("p", feedback.length
      ? `Trained on ${feedback.length} feedback rows from ${byUser.size} users:`
      : "No feedback rows trained this version (a base model, or trained outside the loop).");
    const users = element("ul", undefined, "lineage-users");
    for (const [user, kinds] of byUser) {
      const counts = [...kinds].map(([kind, count]) => `${count} ${kind}`).join(", ");
      users.append(element("li", `${user}: ${counts}`));
    }
    box.replaceChildren(chain, summary, users);
    box.hidden = false;
    node.setAttribute("aria-expanded", "true");
  } catch (error) {
    showError($("registry-status"), error);
  }
}

async function deployVersion(row, node) {
  for (const other of document.querySelectorAll("#version-list button")) other.disabled = true;
  setStatus($("registry-status"), `Loading ${row.name} ${shortVersion(row.version)} from ${row.path}…`, null);
  try {
    const answer = await api(`/admin/models/${encodeURIComponent(row.version)}/deploy`, { method: "POST" });
    const was = answer.previous_version ? ` (was ${shortVersion(answer.previous_version)})` : "";
    setStatus($("registry-status"), answer.warning || `${answer.name} now serves ${shortVersion(answer.version)}${was}.`,
      !answer.warning);
    await Promise.all([loadVersions(), loadStats()]);
  } catch (error) {
    showError($("registry-status"), error);
    node.disabled = false;
    await loadVersions();
  }
}

// ---- export ----

async function exportRecords(event) {
  event.preventDefault();
  const kind = $("export-kind").value;
  setStatus($("export-status"), `Exporting ${kind}…`, null);
  try {
    const response = await apiFetch(`/admin/export?kind=${encodeURIComponent(kind)}`);
    const text = await response.text();
    const count = text.split("\n").filter((line) => line.trim()).length;
    const skipped = Object.entries(JSON.parse(response.headers.get("X-Skipped") || "{}"))
      .map(([reason, n]) => `${n} ${reason}`).join(", ");
    const link = element("a");
    link.href = URL.createObjectURL(new Blob([text], { type: "application/x-ndjson" }));
    link.download = `${kind}.jsonl`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
    setStatus($("export-status"), `Downloaded ${count} ${kind} records as ${kind}.jsonl; skipped: ${skipped || "none"}.`, true);
  } catch (error) {
    showError($("export-status"), error);
  }
}

// ---- stats ----

const STAT_NAMES = [
  ["rows_running", "running"],
  ["rows_queued", "waiting"],
  ["tokens_generated", "tokens"],
  ["rows_preempted", "preempted"],
  ["rows_cancelled", "cancelled"],
];

async function loadStats() {
  try {
    const { models } = await api("/admin/stats");
    const cards = Object.entries(models).map(([name, numbers]) => {
      const card = element("div", undefined, "stat-card");
      card.dataset.model = name;
      card.append(element("strong", `${name} · ${shortVersion(numbers.version)}`));
      const list = element("dl", undefined, "facts");
      for (const [key, label] of STAT_NAMES) fact(list, label, numbers[key]);
      card.append(list);
      return card;
    });
    $("stats-list").replaceChildren(...cards);
    setStatus($("stats-status"), cards.length ? "" : "No chat model is served.", null);
  } catch (error) {
    showError($("stats-status"), error);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("add-user-form").addEventListener("submit", addUser);
  $("copy-key").addEventListener("click", copyKey);
  $("export-form").addEventListener("submit", exportRecords);
  $("refresh-stats").addEventListener("click", loadStats);
  startSession({ views: ["admin", "admin-nav"], enter: enterAdmin });
});

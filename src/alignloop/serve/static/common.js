"use strict";
// What the chat page (app.js) and the admin page (admin.js) share: calls to the server's HTTP API
// with the bearer key, status lines, and the login: the key saved in localStorage is one login
// for both pages. Plain JS, no build step: index.html and admin.html load this file before their
// own script, which hands its own parts to `startSession`.

const KEY_STORAGE = "alignloop.apiKey"; // shared by the chat and admin pages: one login for both

const session = {
  key: null, // the API key sent as a bearer token; null when auth is off or before login
  me: null, // GET /v1/me
};

const $ = (id) => document.getElementById(id);

/** An HTTP error from the API, carrying the server's own message (its `{"error": {"message"}}`). */
class ApiError extends Error {
  constructor(status, message, param) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

/** The message of an error body: ours is {"error": {"message"}}; FastAPI's own is {"detail"}. */
function errorMessage(body, status, retryAfter) {
  let message = `HTTP ${status}`;
  if (body && body.error && body.error.message) message = body.error.message;
  else if (body && typeof body.detail === "string") message = body.detail;
  else if (body && Array.isArray(body.detail)) {
    message = body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
  }
  if (status === 429 && retryAfter) message += ` (try again in ${retryAfter} s)`;
  return message;
}

/** fetch with the bearer key; throws ApiError with the server's message on a non-2xx answer. A
 * 401 while logged in (the key went away) sends the page back to the login. */
async function apiFetch(path, { method = "GET", body, headers = {}, signal } = {}) {
  const allHeaders = { ...headers };
  if (session.key) allHeaders.Authorization = `Bearer ${session.key}`;
  if (body !== undefined) allHeaders["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers: allHeaders,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (response.ok) return response;
  const text = await response.text();
  let parsed = null;
  try {
    parsed = JSON.parse(text);
  } catch (_) {
    parsed = null;
  }
  const error = new ApiError(response.status, errorMessage(parsed, response.status, response.headers.get("Retry-After")),
    parsed && parsed.error ? parsed.error.param : undefined);
  if (response.status === 401 && session.me) showLogin("Your key is no longer accepted; log in again.");
  throw error;
}

/** apiFetch, then the JSON body (null for 204 No Content). */
async function api(path, options) {
  const response = await apiFetch(path, options);
  if (response.status === 204) return null;
  return response.json();
}

/** Shows `text` in a status line: `ok` true (the default) styles it as done, false as an error,
 * null as neither (a step still under way). */
function setStatus(element, text, ok = true) {
  element.textContent = text;
  element.classList.toggle("error", ok === false);
  element.classList.toggle("ok", ok === true && text !== "");
}

// ---- login ----

/** What the page adds to the login: see `startSession`. */
const sessionPage = { views: [], enter: async () => {}, leave: () => {} };

function showLogin(message = "") {
  session.me = null;
  for (const id of sessionPage.views) $(id).hidden = true;
  $("account").hidden = true;
  $("login").hidden = false;
  setStatus($("login-error"), message, false);
  $("api-key").focus();
}

/** Shows the page to user `me` (the page's `enter` calls it once it accepts `me`). */
function showAccount(me) {
  session.me = me;
  $("login").hidden = true;
  for (const id of sessionPage.views) $(id).hidden = false;
  $("account").hidden = false;
  $("user-name").textContent = me.auth ? me.name : `${me.name} (auth off)`;
  $("logout").hidden = !me.auth;
}

/** Logs in with the saved key (or none: auth may be off); `args` go to the page's `enter`. */
async function start(...args) {
  session.key = localStorage.getItem(KEY_STORAGE);
  try {
    await sessionPage.enter(await api("/v1/me"), ...args);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      showLogin(session.key ? "Your saved key was not accepted; log in again." : "");
    } else {
      showLogin(`Cannot reach the server: ${error.message}`);
    }
  }
}

async function login(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  session.key = key;
  try {
    const me = await api("/v1/me");
    localStorage.setItem(KEY_STORAGE, key);
    $("api-key").value = "";
    await sessionPage.enter(me);
  } catch (error) {
    session.key = null;
    const message = error instanceof ApiError && error.status === 401 ? "That key was not accepted." : error.message;
    setStatus($("login-error"), message, false);
  }
}

function logout() {
  localStorage.removeItem(KEY_STORAGE);
  session.key = null;
  sessionPage.leave();
  showLogin("");
}

/** Wires the login form and the "Log out" button, then logs in with the saved key. `views`: the
 * ids of what only a logged-in user sees; `enter(me, ...args)`: the page's own entry for user
 * `me`, which calls `showAccount(me)` (or `showLogin` to turn `me` away); `leave()`: the page's own
 * clean-up on logging out; `args`: passed to `enter` by this first login. */
function startSession({ views, enter, leave = () => {} }, ...args) {
  Object.assign(sessionPage, { views, enter, leave });
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  return start(...args);
}

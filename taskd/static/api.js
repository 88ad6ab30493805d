// The API over fetch, and the login's tokens.
//
// The access token lives in memory only (this tab's), the refresh token in localStorage, so
// that a reload or a new tab keeps the login. Refresh tokens rotate: each one works once, and
// presenting a used one again ends the whole login. So a refresh runs one at a time across
// every tab of this origin (a Web Lock), reads the refresh token from storage inside the lock,
// and stores the new one before anything else happens.

const REFRESH_KEY = "taskd.refresh";
const USER_KEY = "taskd.username";
const LOCK = "taskd-refresh";
const EARLY_MAX_MS = 30_000; // refresh this long before the access token expires...
const EARLY_SHARE = 0.2; // ...or this share of its life before, when that is shorter

/** An answer other than 2xx, or no answer at all (`status` 0). */
export class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
    this.body = body && typeof body === "object" ? body : {};
  }

  /** 400's `{field: [messages]}`, as `{field: "message message"}`. */
  get fields() {
    if (this.status !== 400) return {};
    const out = {};
    for (const [name, messages] of Object.entries(this.body)) {
      out[name] = Array.isArray(messages) ? messages.join(" ") : String(messages);
    }
    return out;
  }
}

function describe(status, body) {
  if (status === 0) return "The server cannot be reached. Check your connection and try again.";
  if (body && typeof body.detail === "string") return body.detail;
  if (status === 400 && body && typeof body === "object") {
    const first = body.non_field_errors || Object.values(body)[0];
    if (Array.isArray(first) && first.length) return first.join(" ");
  }
  if (status >= 500) return `The server is having trouble (${status}). Try again shortly.`;
  return `The request failed (${status}).`;
}

/** One JSON request: `{status, data, headers}`, or an `ApiError`. */
export async function request(method, path, body, headers = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers }, cache: "no-store" };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch {
    throw new ApiError(0, null);
  }
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null; // a proxy's HTML error page, say
  }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return { status: resp.status, data, headers: resp.headers };
}

/** Seconds an access token lives, from its own claims (so the browser's clock does not matter). */
function lifetimeMs(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const claims = JSON.parse(atob(part));
    return Math.max(0, (claims.exp - claims.iat) * 1000);
  } catch {
    return 60_000;
  }
}

/** The login of this browser. Emits `ended` (detail: a message) when it is over. */
export class Session extends EventTarget {
  #access = null;
  #expiresAt = 0;
  #lifetime = 0;
  #timer = 0;
  #refreshing = null;

  constructor() {
    super();
    // Logged out in another tab: this one is logged out too.
    window.addEventListener("storage", (event) => {
      if (event.key === REFRESH_KEY && event.newValue === null && this.#access !== null) {
        this.#forget();
        this.#end("You logged out in another tab.");
      }
    });
  }

  get username() {
    return localStorage.getItem(USER_KEY) || "";
  }

  /** Is there a login to resume (a refresh token kept from before)? */
  get stored() {
    return localStorage.getItem(REFRESH_KEY) !== null;
  }

  async register(username, password, email) {
    const body = { username, password };
    if (email) body.email = email;
    return (await request("POST", "/api/register/", body)).data;
  }

  async login(username, password) {
    const { data } = await request("POST", "/api/login/", { username, password });
    localStorage.setItem(USER_KEY, username);
    this.#keep(data);
  }

  /** Revoke the login on the server (best effort) and forget it here. */
  async logout() {
    const refresh = localStorage.getItem(REFRESH_KEY);
    this.#forget();
    if (refresh) await request("POST", "/api/logout/", { refresh }).catch(() => {});
  }

  /** A valid access token, refreshed first when it is about to expire. */
  async accessToken() {
    if (this.#access === null || Date.now() >= this.#expiresAt - this.#early()) {
      await this.refresh();
    }
    return this.#access;
  }

  /** Rotate the refresh token; the tab shares one attempt, tabs take turns. */
  refresh() {
    if (this.#refreshing === null) {
      this.#refreshing = this.#rotate().finally(() => {
        this.#refreshing = null;
      });
    }
    return this.#refreshing;
  }

  /** An authenticated request; an access token refused (401) is refreshed and tried once more. */
  async call(method, path, body, headers = {}) {
    const send = (token) => request(method, path, body, { ...headers, Authorization: `Bearer ${token}` });
    const token = await this.accessToken();
    try {
      return await send(token);
    } catch (error) {
      if (error.status !== 401) throw error;
      if (this.#access === token) await this.refresh();
      return send(this.#access);
    }
  }

  async #rotate() {
    const run = async () => {
      const refresh = localStorage.getItem(REFRESH_KEY);
      if (refresh === null) throw this.#end("Please log in.");
      let data;
      try {
        ({ data } = await request("POST", "/api/token/refresh/", { refresh }));
      } catch (error) {
        if (error.status === 400 || error.status === 401) {
          // Expired, revoked or used already: this login is over. Unless another tab has just
          // rotated it (a tab without Web Locks), in which case the next call gets the new one.
          if (localStorage.getItem(REFRESH_KEY) === refresh) {
            this.#forget();
            throw this.#end("Your session has ended. Please log in again.");
          }
        }
        throw error;
      }
      this.#keep(data); // the new refresh token is stored before anything else runs
    };
    if (navigator.locks) await navigator.locks.request(LOCK, run);
    else await run();
  }

  #early() {
    return Math.min(EARLY_MAX_MS, (this.#lifetime || 0) * EARLY_SHARE);
  }

  #keep(pair) {
    localStorage.setItem(REFRESH_KEY, pair.refresh);
    this.#access = pair.access;
    this.#lifetime = lifetimeMs(pair.access);
    this.#expiresAt = Date.now() + this.#lifetime;
    // Refresh ahead of expiry, so that requests and reconnects never wait for it.
    clearTimeout(this.#timer);
    this.#timer = setTimeout(() => {
      this.refresh().catch(() => {}); // an ended login says so through `ended`
    }, Math.max(1000, this.#lifetime - this.#early()));
  }

  #forget() {
    clearTimeout(this.#timer);
    this.#access = null;
    this.#expiresAt = 0;
    localStorage.removeItem(REFRESH_KEY);
  }

  #end(message) {
    this.dispatchEvent(new CustomEvent("ended", { detail: message }));
    const error = new ApiError(401, { detail: message, code: "session_ended" });
    error.ended = true;
    return error;
  }
}

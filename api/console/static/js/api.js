// The console's only way to the server: the public JSON API, with the access token this page
// holds in memory. The token is in this module's variable and nowhere else: no cookie (so no
// cross-site request can carry it: no CSRF surface), no localStorage or sessionStorage (which
// any script of this origin could read later), never in a URL. A reload forgets it.

const API = "/api/v1";

let session = null; // { token, kind: "tenant" | "operator", scopes: Set, expiresAt: ms }
let expiryTimer = null;
let onExpired = () => {};

/** An error answer of the API (RFC 9457 problem JSON), or a network failure (status 0). */
export class ApiError extends Error {
  constructor(status, title, detail, retryAfter, requestId) {
    super(detail || title);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.retryAfter = retryAfter;
    this.requestId = requestId;
  }

  /** What to tell the user: what happened and, for 429/503, when to try again. */
  explain() {
    if (this.status === 0) return "The server could not be reached. Check the connection and try again.";
    let text = `${this.title || "Error"} (${this.status})`;
    if (this.detail && this.detail !== this.title) text += `: ${this.detail}`;
    if (this.status === 429 || this.status === 503) {
      const wait = this.retryAfter;
      text += wait !== null ? ` Try again in ${wait} second${wait === 1 ? "" : "s"}.` : " Try again shortly.";
    }
    return text;
  }
}

/** Seconds from a Retry-After header (delta-seconds or an HTTP date), or null. */
function retryAfterSeconds(value) {
  if (!value) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.ceil((date - Date.now()) / 1000));
}

async function errorOf(response) {
  let problem = {};
  try {
    problem = await response.json();
  } catch {
    // not JSON: the status alone says enough
  }
  return new ApiError(
    response.status,
    typeof problem.title === "string" ? problem.title : response.statusText,
    typeof problem.detail === "string" ? problem.detail : "",
    retryAfterSeconds(response.headers.get("Retry-After")),
    response.headers.get("X-Request-ID"),
  );
}

/** The signed-in session, or null. */
export function current() {
  return session;
}

/** Whether the session's token carries a scope. */
export function has(scope) {
  return session !== null && session.scopes.has(scope);
}

/** Called once when the token expires (or the API refuses it): the page signs out. */
export function whenExpired(callback) {
  onExpired = callback;
}

function forget() {
  session = null;
  clearTimeout(expiryTimer);
  expiryTimer = null;
}

/**
 * Exchange a credential at /auth/token: a tenant's API key (client_credentials) or an
 * operator's e-mail and password (password grant).
 */
export async function signIn(kind, form) {
  const body = new URLSearchParams(
    kind === "tenant"
      ? { grant_type: "client_credentials", client_secret: form.key }
      : { grant_type: "password", username: form.username, password: form.password },
  );
  let response;
  try {
    response = await fetch(`${API}/auth/token`, { method: "POST", body, credentials: "omit", cache: "no-store" });
  } catch {
    throw new ApiError(0, "Network error", "", null, null);
  }
  if (!response.ok) throw await errorOf(response);
  const answer = await response.json();
  forget();
  session = {
    token: answer.access_token,
    kind,
    scopes: new Set(String(answer.scope || "").split(" ").filter(Boolean)),
    expiresAt: Date.now() + answer.expires_in * 1000,
  };
  expiryTimer = setTimeout(() => {
    forget();
    onExpired("Your session expired. Sign in again to continue.");
  }, answer.expires_in * 1000);
  return session;
}

/** Revoke the token server-side (POST /auth/revoke), then forget it, whatever the answer. */
export async function signOut() {
  if (session === null) return;
  const token = session.token;
  forget();
  try {
    const response = await fetch(`${API}/auth/revoke`, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}` },
      credentials: "omit",
      cache: "no-store",
    });
    // 401: already expired or revoked, which is what signing out wants.
    if (!response.ok && response.status !== 401) throw await errorOf(response);
  } catch (error) {
    if (error instanceof ApiError) throw error;
    throw new ApiError(0, "Network error", "", null, null);
  }
}

/**
 * Call the API with the session's token. `body` is sent as JSON; the answer is parsed as JSON
 * unless `raw` is set (then the Response is returned). A 401 ends the session.
 */
export async function call(method, path, { body, query, raw = false } = {}) {
  if (session === null) throw new ApiError(401, "Signed out", "sign in again", null, null);
  const url = new URL(`${API}${path}`, window.location.origin);
  for (const [name, value] of Object.entries(query || {})) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of [].concat(value)) url.searchParams.append(name, item);
  }
  const headers = { Authorization: `Bearer ${session.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
  } catch {
    throw new ApiError(0, "Network error", "", null, null);
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (response.status === 401) {
      forget();
      onExpired(`Your session ended (${error.detail || "the token was refused"}). Sign in again.`);
    }
    throw error;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

/** The path and query of the prediction route, for the "try it" panel's curl line. */
export const PREDICT_PATH = `${API}/predict`;

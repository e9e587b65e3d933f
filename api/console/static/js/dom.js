// Building the page. Every value from the API goes in as text (textContent, or an attribute
// set with setAttribute): never as HTML. Nothing in the console parses a string as markup
// (tests/api/test_console_static.py looks for the DOM properties and calls that would).

let ids = 0;

/** A unique element id, for label/for and aria-describedby. */
export function uid(prefix) {
  ids += 1;
  return `${prefix}-${ids}`;
}

/**
 * An element: `attrs` are attributes (on* handlers are not accepted: use `events`), `children`
 * are nodes or strings (added as text nodes).
 */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) throw new Error(`use listen() for ${name}`);
    if (name === "text") node.textContent = String(value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  append(node, ...children);
  return node;
}

/** Append nodes or strings (as text) to `node`. */
export function append(node, ...children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Replace `node`'s children. */
export function replace(node, ...children) {
  node.replaceChildren();
  return append(node, ...children);
}

/** A date-time from the API, shown in UTC to the second (or "never"). */
export function when(value, none = "never") {
  if (!value) return none;
  const date = new Date(value);
  if (Number.isNaN(date.getTime())) return String(value);
  return `${date.toISOString().slice(0, 19).replace("T", " ")} UTC`;
}

/** A whole number with thousands separators. */
export function count(value) {
  if (value === null || value === undefined) return "unlimited";
  return Number(value).toLocaleString("en");
}

/**
 * A table: `columns` are [heading, (row) => node or string]. An empty list shows `empty`.
 */
export function table(caption, columns, rows, empty = "Nothing yet.") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  const head = h("tr", {}, columns.map(([title]) => h("th", { scope: "col" }, title)));
  const body = rows.map((row) => h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row)))));
  return h(
    "div",
    { class: "table-wrap", tabindex: "0", role: "region", "aria-label": caption },
    h("table", {}, h("caption", {}, caption), h("thead", {}, head), h("tbody", {}, body)),
  );
}

/** A labelled input (or select when `options` is given); returns [wrapper, control]. */
export function field(label, attrs = {}, options = null) {
  const id = uid("f");
  const control = options
    ? h("select", { id, ...attrs }, options.map(([value, text]) => h("option", { value }, text)))
    : h("input", { id, ...attrs });
  return [h("div", { class: "field" }, h("label", { for: id }, label), control), control];
}

/** A button that runs `action` on click, disabled (and marked busy) while it runs. */
export function button(text, action, attrs = {}) {
  const node = h("button", { type: "button", ...attrs }, text);
  node.addEventListener("click", async () => {
    node.disabled = true;
    node.setAttribute("aria-busy", "true");
    try {
      await action();
    } finally {
      node.disabled = false;
      node.removeAttribute("aria-busy");
    }
  });
  return node;
}

/** A message in a region: kind "error", "ok" or "info". */
export function notice(kind, ...children) {
  return h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, ...children);
}

/**
 * A secret shown once (a new key, a webhook's signing secret): read-only, with a copy button and
 * the warning that it will not be shown again.
 */
export function secretOnce(label, secret) {
  const id = uid("secret");
  const input = h("input", { id, type: "text", readonly: true, value: secret, class: "secret", spellcheck: "false" });
  const copied = h("span", { class: "muted", "aria-live": "polite" });
  const copy = button("Copy", async () => {
    try {
      await navigator.clipboard.writeText(secret);
      copied.textContent = "Copied.";
    } catch {
      input.select();
      copied.textContent = "Selected: press Ctrl+C to copy.";
    }
  });
  return h(
    "div",
    { class: "notice warn", role: "status", "data-secret-once": "" },
    h("label", { for: id }, label),
    h("div", { class: "row" }, input, copy, copied),
    h("p", {}, "Copy it now: it is shown this once and cannot be shown again."),
  );
}

/** A section with a heading and a body node that callers fill. */
export function panel(title, level = 3) {
  const id = uid("panel");
  const body = h("div", { class: "panel-body" });
  const node = h("section", { class: "panel", "aria-labelledby": id }, h(`h${level}`, { id }, title), body);
  return [node, body];
}

/** The text of an error for the user (an ApiError explains itself). */
export function explain(error) {
  return typeof error.explain === "function" ? error.explain() : `Unexpected error: ${error.message}`;
}

/**
 * Fill `container` from `loader` (an async function returning nodes): "Loading…" while it runs,
 * the error and a retry button if it fails.
 */
export async function load(container, loader) {
  replace(container, h("p", { class: "muted loading", role: "status" }, "Loading…"));
  container.setAttribute("aria-busy", "true");
  try {
    replace(container, await loader());
  } catch (error) {
    replace(
      container,
      notice("error", explain(error)),
      button("Retry", () => load(container, loader)),
    );
  } finally {
    container.removeAttribute("aria-busy");
  }
}

/** Run `action` and show its outcome in `where` (an element): its result text, or the error. */
export async function attempt(where, action) {
  replace(where, h("p", { class: "muted", role: "status" }, "Working…"));
  try {
    const result = await action();
    replace(where, result ?? "");
    return true;
  } catch (error) {
    replace(where, notice("error", explain(error)));
    return false;
  }
}

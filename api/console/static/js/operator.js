// The operator's view: tenants and their keys, plans, usage across tenants, the billing export,
// the audit trail, models, and the operator's webhook endpoints. Every action is one call of
// the public admin API with the signed-in operator's token.
import { call } from "./api.js";
import {
  append, attempt, button, count, field, h, load, notice, panel, replace, secretOnce, table, when,
} from "./dom.js";
import { KEY_SCOPES, keyTable, thisMonth, usageReport, webhooksPanel } from "./tenant.js";

const SECTIONS = [
  ["tenants", "Tenants"],
  ["plans", "Plans"],
  ["usage", "Usage"],
  ["billing", "Billing"],
  ["audit", "Audit trail"],
  ["models", "Models"],
  ["webhooks", "Webhooks"],
];

/** An optional whole number from an input, or null when empty. */
function optionalInt(input) {
  return input.value.trim() === "" ? null : Number.parseInt(input.value, 10);
}

// ---- Tenants ---------------------------------------------------------------------------------

function keysOf(tenant) {
  const [node, body] = panel(`Keys of ${tenant.name}`, 4);
  const list = h("div");
  const outcome = h("div", { "aria-live": "polite" });
  const refresh = () => load(list, async () => {
    const { keys } = await call("GET", `/admin/tenants/${encodeURIComponent(tenant.id)}/keys`);
    return keyTable(`Keys of ${tenant.name}`, keys, {
      keyPath: "/admin/keys", grace, outcome, refresh,
    });
  });
  const [graceField, grace] = field("Grace period of a rotation (seconds the old key keeps working)", { type: "number", min: "0", max: "604800", value: "3600" });
  const [nameField, name] = field("Name of the new key", { required: true, maxlength: "200", value: "default" });
  const boxes = KEY_SCOPES.map((scope) => {
    const input = h("input", { type: "checkbox", value: scope, checked: scope === "predict" || scope === "usage:read" });
    return [h("label", { class: "check" }, input, ` ${scope}`), input];
  });
  const form = h("form", { class: "inline-form" }, nameField, h("fieldset", {}, h("legend", {}, "Scopes"), boxes.map(([l]) => l)), h("button", { type: "submit" }, "Issue key"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const scopes = boxes.filter(([, i]) => i.checked).map(([, i]) => i.value);
    if (await attempt(outcome, async () => {
      const issued = await call("POST", `/admin/tenants/${encodeURIComponent(tenant.id)}/keys`, { body: { name: name.value.trim(), scopes } });
      return secretOnce(`New key "${issued.name}" for ${tenant.name}`, issued.key);
    })) refresh();
  });
  append(body, form, outcome, graceField, list);
  refresh();
  return node;
}

function tenantDetail(tenant, plans, where, onChange, message) {
  // The outcome of the change that rebuilt this view, if any.
  const outcome = h("div", { "aria-live": "polite" }, message ? notice("ok", message) : "");
  const [planField, plan] = field("Plan", {}, plans.map((p) => [p.name, p.name]));
  plan.value = tenant.plan;
  const [rateField, rate] = field("Rate limit override (empty: the plan's)", { value: tenant.rate_limit ?? "", placeholder: "100/minute" });
  const [quotaField, quota] = field("Monthly quota override, units (empty: the plan's)", { type: "number", min: "0", value: tenant.monthly_quota ?? "" });
  const form = h("form", { class: "inline-form" }, planField, rateField, quotaField, h("button", { type: "submit" }, "Save"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { plan: plan.value, rate_limit: rate.value.trim() || null, monthly_quota: optionalInt(quota) };
    let saved = null;
    if (await attempt(outcome, async () => {
      saved = await call("PATCH", `/admin/tenants/${encodeURIComponent(tenant.id)}`, { body });
      onChange();
    })) showTenantDetail(tenant.id, plans, where, onChange, `Saved ${saved.name}.`);
  });
  const suspended = tenant.status === "suspended";
  const toggle = button(suspended ? "Reactivate tenant" : "Suspend tenant", async () => {
    if (!suspended && !window.confirm(`Suspend ${tenant.name}? Its keys and tokens stop working.`)) return;
    if (await attempt(outcome, async () => {
      await call("PATCH", `/admin/tenants/${encodeURIComponent(tenant.id)}`, { body: { status: suspended ? "active" : "suspended" } });
      onChange();
    })) showTenantDetail(tenant.id, plans, where, onChange, suspended ? "Tenant reactivated." : "Tenant suspended: its keys and tokens are refused.");
  }, { class: suspended ? "" : "danger" });
  const [node, body] = panel(`Tenant ${tenant.name}`, 3);
  append(
    body,
    h("dl", { class: "facts" },
      h("dt", {}, "Id"), h("dd", {}, h("code", {}, tenant.id)),
      h("dt", {}, "Status"), h("dd", { "data-testid": "tenant-status" }, tenant.status),
      h("dt", {}, "Created"), h("dd", {}, when(tenant.created_at))),
    toggle,
    form,
    outcome,
    keysOf(tenant),
  );
  return node;
}

async function showTenantDetail(id, plans, where, onChange, message = null) {
  await load(where, async () => tenantDetail(await call("GET", `/admin/tenants/${encodeURIComponent(id)}`), plans, where, onChange, message));
  where.querySelector("h3")?.setAttribute("tabindex", "-1");
  where.querySelector("h3")?.focus();
}

function tenantsSection(root) {
  const listBox = h("div");
  const detail = h("div");
  const outcome = h("div", { "aria-live": "polite" });
  const [searchField, search] = field("Search tenants by name or id", { type: "search" });
  let tenants = [];
  let plans = [];
  const render = () => {
    const needle = search.value.trim().toLowerCase();
    const shown = tenants.filter((t) => !needle || t.name.toLowerCase().includes(needle) || t.id.includes(needle));
    replace(listBox, table("Tenants", [
      ["name", (t) => h("span", { class: "tenant-name" }, t.name)],
      ["plan", (t) => t.plan],
      ["status", (t) => t.status],
      ["monthly quota", (t) => (t.monthly_quota === null ? "plan's" : count(t.monthly_quota))],
      ["created", (t) => when(t.created_at)],
      ["actions", (t) => button("Manage", () => showTenantDetail(t.id, plans, detail, refresh), { "aria-label": `Manage ${t.name}` })],
    ], shown, needle ? "No tenant matches." : "No tenant yet."));
  };
  const refresh = () => load(listBox, async () => {
    [{ tenants }, { plans }] = await Promise.all([call("GET", "/admin/tenants", { query: { limit: 500 } }), call("GET", "/admin/plans")]);
    render();
    return Array.from(listBox.childNodes);
  });
  search.addEventListener("input", render);

  const [nameField, name] = field("Name", { required: true, maxlength: "200" });
  const [quotaField, quota] = field("Monthly quota, units (optional)", { type: "number", min: "0" });
  const [rateField, rate] = field("Rate limit (optional)", { placeholder: "60/minute" });
  const form = h("form", { class: "inline-form" }, nameField, rateField, quotaField, h("button", { type: "submit" }, "Create tenant"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: name.value.trim() };
    if (rate.value.trim()) body.rate_limit = rate.value.trim();
    if (quota.value.trim()) body.monthly_quota = optionalInt(quota);
    if (await attempt(outcome, async () => {
      const created = await call("POST", "/admin/tenants", { body });
      await refresh();
      showTenantDetail(created.id, plans, detail, refresh);
      return notice("ok", `Tenant ${created.name} created.`);
    })) form.reset();
  });
  const [createNode, createBody] = panel("New tenant");
  append(createBody, form, outcome);
  append(root, createNode, searchField, listBox, detail);
  refresh();
}

// ---- Plans -----------------------------------------------------------------------------------

function plansSection(root) {
  const list = h("div");
  const outcome = h("div", { "aria-live": "polite" });
  const refresh = () => load(list, async () => {
    const { plans } = await call("GET", "/admin/plans");
    return table("Plans", [
      ["name", (p) => p.name],
      ["rate limits", (p) => p.rate_limits ?? "server default"],
      ["monthly quota", (p) => count(p.monthly_quota)],
      ["in flight", (p) => (p.max_in_flight === null ? "no bound" : String(p.max_in_flight))],
      ["models", (p) => (p.models === null ? "all" : p.models.join(", "))],
      ["price / 1,000 units", (p) => `${p.price_per_1000_units} ${p.currency}`],
      ["status", (p) => p.status],
    ], plans);
  });
  const [nameField, name] = field("Name", { required: true, pattern: "[A-Za-z0-9_.\\-]+" });
  const [rateField, rate] = field("Rate limits (optional)", { placeholder: "10/second;1000/hour" });
  const [quotaField, quota] = field("Monthly quota, units (optional)", { type: "number", min: "0" });
  const [priceField, price] = field("Price per 1,000 units (minor units)", { type: "number", min: "0", value: "0" });
  const form = h("form", { class: "inline-form" }, nameField, rateField, quotaField, priceField, h("button", { type: "submit" }, "Create plan"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { name: name.value.trim(), monthly_quota: optionalInt(quota), price_per_1000_units: optionalInt(price) ?? 0 };
    if (rate.value.trim()) body.rate_limits = rate.value.trim();
    if (await attempt(outcome, async () => {
      const created = await call("POST", "/admin/plans", { body });
      return notice("ok", `Plan ${created.name} created.`);
    })) {
      form.reset();
      refresh();
    }
  });
  const [createNode, createBody] = panel("New plan");
  append(createBody, form, outcome);
  append(root, list, createNode);
  refresh();
}

// ---- Usage and billing -----------------------------------------------------------------------

/** This month's billing rows (JSON lines) summed per tenant, largest first. */
async function topTenants(month) {
  const response = await call("GET", "/admin/billing/export", { query: { month, format: "jsonl" }, raw: true });
  const totals = new Map();
  for (const line of (await response.text()).split("\n")) {
    if (!line.trim()) continue;
    const row = JSON.parse(line);
    const total = totals.get(row.tenant_id) || { tenant_id: row.tenant_id, tenant_name: row.tenant_name, requests: 0, units: 0 };
    total.requests += row.requests;
    total.units += row.units;
    totals.set(row.tenant_id, total);
  }
  return [...totals.values()].sort((a, b) => b.units - a.units);
}

function usageSection(root) {
  const { start, end } = thisMonth();
  const top = h("div");
  const [monthField, month] = field("Month (UTC)", { type: "month", required: true, value: start.slice(0, 7) });
  const monthForm = h("form", { class: "inline-form" }, monthField, h("button", { type: "submit" }, "Rank tenants"));
  const chart = h("div");
  const [tenantField, tenant] = field("Tenant", {}, []);
  const [startField, from] = field("From (UTC day)", { type: "date", value: start, required: true });
  const [endField, to] = field("To (UTC day)", { type: "date", value: end, required: true });
  const form = h("form", { class: "inline-form" }, tenantField, startField, endField, h("button", { type: "submit" }, "Show usage"));
  const show = () => load(chart, async () => {
    const report = await call("GET", "/admin/usage", { query: { tenant_id: tenant.value, start: from.value, end: to.value } });
    const name = tenant.selectedOptions[0]?.textContent || tenant.value;
    return [h("h4", {}, `Usage of ${name}`), ...usageReport(report, `${name}: requests and units per day, by model and version`)];
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (tenant.value) show();
  });
  const rank = () => load(top, async () => {
    const [{ tenants }, ranking] = await Promise.all([call("GET", "/admin/tenants", { query: { limit: 500 } }), topTenants(month.value)]);
    const chosen = tenant.value;
    replace(tenant, tenants.map((t) => h("option", { value: t.id }, t.name)));
    if (chosen) tenant.value = chosen;
    return table(`Top tenants of ${month.value}, by units`, [
      ["tenant", (t) => t.tenant_name],
      ["requests", (t) => count(t.requests)],
      ["units", (t) => count(t.units)],
      ["actions", (t) => button("Chart", () => {
        tenant.value = t.tenant_id;
        return show();
      }, { "aria-label": `Chart the usage of ${t.tenant_name}` })],
    ], ranking.slice(0, 20), "No usage in this month.");
  });
  monthForm.addEventListener("submit", (event) => {
    event.preventDefault();
    rank();
  });
  rank();
  const [topNode, topBody] = panel("Top tenants of a month");
  append(topBody, h("p", { class: "muted" }, "Summed from the month's billing export."), monthForm, top);
  const [chartNode, chartBody] = panel("A tenant's usage");
  append(chartBody, form, chart);
  append(root, topNode, chartNode);
}

function billingSection(root) {
  const outcome = h("div", { "aria-live": "polite" });
  const [monthField, month] = field("Month (UTC)", { type: "month", required: true, value: thisMonth().start.slice(0, 7) });
  const [formatField, format] = field("Format", {}, [["csv", "CSV"], ["jsonl", "JSON lines"]]);
  const form = h("form", { class: "inline-form" }, monthField, formatField, h("button", { type: "submit" }, "Download the export"));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    await attempt(outcome, async () => {
      const response = await call("GET", "/admin/billing/export", { query: { month: month.value, format: format.value }, raw: true });
      const blob = await response.blob();
      const url = URL.createObjectURL(blob);
      const link = h("a", { href: url, download: `modelgate-billing-${month.value}.${format.value}` }, "download");
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10_000);
      return notice("ok", `Downloaded the ${month.value} export (${count(blob.size)} bytes).`);
    });
  });
  const [node, body] = panel("Billing export");
  append(body, h("p", { class: "muted" }, "One row per tenant, model, model version and day, as the billing system reads it."), form, outcome);
  append(root, node);
}

// ---- Audit trail -----------------------------------------------------------------------------

// ---- The audit chain, checked in the browser ---------------------------------------------------

/** JSON text as Python's json.dumps(ensure_ascii=True) writes it: every character outside
 * printable ASCII as a \uXXXX escape. */
function asciiJson(text) {
  return text.replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

/** A value as JSON with sorted keys and no whitespace (auth.audit.canonical_form's rules). */
function canonicalJson(value) {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const members = Object.keys(value).sort().map((key) => `${asciiJson(JSON.stringify(key))}:${canonicalJson(value[key])}`);
    return `{${members.join(",")}}`;
  }
  return asciiJson(JSON.stringify(value));
}

/** An API timestamp as Python's isoformat(timespec="microseconds") of the UTC time. */
function pythonTime(text) {
  const match = /^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|[+-]00:00)?$/.exec(text);
  if (!match) return text;
  return `${match[1]}.${(match[2] || "").padEnd(6, "0").slice(0, 6)}+00:00`;
}

/** The hex SHA-256 an event's hash should be: the one `modelgate audit verify` recomputes. */
async function eventHash(event) {
  const document = {
    id: event.id,
    created_at: pythonTime(event.created_at),
    actor: event.actor,
    actor_key_id: event.actor_key_id,
    action: event.action,
    target_type: event.target_type,
    target_id: event.target_id,
    tenant_id: event.tenant_id,
    remote_addr: event.client_addr,
    user_agent: event.user_agent,
    request_id: event.request_id,
    detail: event.detail,
    prev_hash: event.prev_hash,
  };
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(canonicalJson(document)));
  return Array.from(new Uint8Array(digest), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

/**
 * Verify a page of events (newest first): each event's hash recomputed, and each event naming
 * the previous one's hash. The whole chain, from its first event to its recorded end, is
 * `modelgate audit verify`.
 */
async function verification(events) {
  const whole = "The whole chain, from its first event to its recorded end, is checked by \"Verify the whole chain\" (or `modelgate audit verify`).";
  for (let i = 0; i + 1 < events.length; i += 1) {
    const [newer, older] = [events[i], events[i + 1]];
    if (newer.id === older.id + 1 && newer.prev_hash !== older.hash) {
      return notice("error", `Chain broken: event ${newer.id} does not follow event ${older.id} (deleted, inserted or reordered). ${whole}`);
    }
  }
  if (!globalThis.crypto?.subtle) {
    return notice("info", `The ${events.length} events shown link up (each names the previous one's hash); their hashes cannot be recomputed on a page served over plain http. ${whole}`);
  }
  for (const event of events) {
    if ((await eventHash(event)) !== event.hash) {
      return notice("error", `Chain broken: event ${event.id} does not match its hash (edited after it was recorded). ${whole}`);
    }
  }
  return notice("ok", `Verified: the ${events.length} events shown match their hashes and link up. ${whole}`);
}

/**
 * The whole chain's verification on the server (GET /admin/audit/verify, what `modelgate audit
 * verify` prints): run on demand, as it reads every event.
 */
function chainVerification() {
  const result = h("div", { "data-testid": "chain-verification", "aria-live": "polite" });
  const run = button("Verify the whole chain", () => load(result, async () => {
    const report = await call("GET", "/admin/audit/verify");
    if (report.intact) {
      return notice("ok", `The whole chain is intact: ${count(report.events)} events, from the first to the recorded end. Head hash (keep it elsewhere to compare later): `, h("code", { class: "hash", "data-testid": "chain-head" }, report.head));
    }
    return notice("error", `The chain is broken at event ${report.first_bad_id}: ${report.problem}. The ${count(report.events)} events before it verify.`);
  }));
  return h("div", { class: "chain-check" }, run, result);
}

function auditSection(root) {
  const results = h("div");
  const [tenantField, tenant] = field("Tenant id", { placeholder: "any" });
  const [actorField, actor] = field("Actor", { placeholder: "any" });
  const [actionField, action] = field("Action", { placeholder: "e.g. tenant.suspend" });
  const [sinceField, since] = field("Since (UTC)", { type: "datetime-local" });
  const [untilField, until] = field("Until (UTC)", { type: "datetime-local" });
  const form = h("form", { class: "inline-form" }, tenantField, actorField, actionField, sinceField, untilField, h("button", { type: "submit" }, "Search the trail"));
  const query = (cursor) => ({
    tenant_id: tenant.value.trim(),
    actor: actor.value.trim(),
    action: action.value.trim(),
    since: since.value ? `${since.value}:00Z` : "",
    until: until.value ? `${until.value}:00Z` : "",
    cursor,
    limit: 100,
  });
  const show = (cursor) => load(results, async () => {
    const page = await call("GET", "/admin/audit", { query: query(cursor) });
    return [
      await verification(page.events),
      table("Audit events, newest first", [
        ["when", (e) => when(e.created_at)],
        ["actor", (e) => e.actor],
        ["action", (e) => h("span", { class: "audit-action" }, e.action)],
        ["target", (e) => `${e.target_type} ${e.target_id}`],
        ["tenant", (e) => e.tenant_id ?? ""],
        ["from", (e) => e.client_addr ?? ""],
        ["detail", (e) => h("code", {}, JSON.stringify(e.detail))],
      ], page.events, "No event matches."),
      page.next_cursor === null ? "" : button("Older events", () => show(page.next_cursor)),
    ];
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    show(null);
  });
  append(root, chainVerification(), form, results);
  show(null);
}

// ---- Models ----------------------------------------------------------------------------------

function modelsSection(root) {
  const list = h("div");
  const outcome = h("div", { "aria-live": "polite" });
  const refresh = () => load(list, async () => {
    const { models } = await call("GET", "/models");
    return models.map((m) => {
      const [node, body] = panel(`${m.name}: active version ${m.active_version ?? "none"}`, 4);
      append(body,
        m.unavailable_reason ? notice("error", m.unavailable_reason) : "",
        table(`Versions of ${m.name}`, [
          ["version", (v) => v.version],
          ["state", (v) => (v.error ? `${v.state}: ${v.error}` : v.state)],
          ["runtime", (v) => v.runtime ?? ""],
          ["source", (v) => (v.source ? `${v.source}${v.source_version ? ` (${v.source_version})` : ""}` : "registered")],
          ["created", (v) => when(v.created_at, "")],
          ["active", (v) => (v.active ? "active" : "")],
          ["actions", (v) => (v.active || v.state !== "ready" ? "" : button(`Activate version ${v.version}`, async () => {
            if (await attempt(outcome, async () => {
              const done = await call("POST", `/admin/models/${encodeURIComponent(m.name)}/activate`, { body: { version: v.version } });
              return notice("ok", `${done.name} version ${done.version} is active${done.previous_version ? ` (was ${done.previous_version})` : ""}.`);
            })) refresh();
          }, { "aria-label": `Activate version ${v.version} of ${m.name}` }))],
        ], m.versions));
      return node;
    });
  });
  const [sourceField, source] = field("Source (models:/…, s3://…, https://…, file://…)", { required: true });
  const [nameField, name] = field("Served name", { required: true });
  const [versionField, version] = field("Version (optional)");
  const [shaField, sha] = field("SHA-256 (required for https)", { pattern: "[0-9a-f]{64}" });
  const activate = h("input", { type: "checkbox" });
  const pickle = h("input", { type: "checkbox" });
  const form = h(
    "form",
    { class: "inline-form" },
    sourceField, nameField, versionField, shaField,
    h("label", { class: "check" }, activate, " activate once verified"),
    h("label", { class: "check" }, pickle, " allow a pickle (it runs code when loaded: only with its SHA-256, from a source you trust)"),
    h("button", { type: "submit" }, "Pull"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = { source: source.value.trim(), name: name.value.trim(), activate: activate.checked, allow_pickle: pickle.checked };
    if (version.value.trim()) body.version = version.value.trim();
    if (sha.value.trim()) body.sha256 = sha.value.trim();
    if (await attempt(outcome, async () => {
      const pulled = await call("POST", "/admin/models/pull", { body });
      return notice("ok", `Pulled ${pulled.name} version ${pulled.version} (${pulled.runtime}, sha256 ${pulled.artifact_sha256}).`);
    })) refresh();
  });
  // Any version the catalogue holds, listed above or not yet loaded here (a version just pulled
  // is loaded when it is activated): the same call as the buttons, which also rolls back.
  const [modelField, model] = field("Model name", { required: true, value: "iris" });
  const [targetField, target] = field("Version to activate", { required: true });
  const activateForm = h("form", { class: "inline-form" }, modelField, targetField, h("button", { type: "submit" }, "Activate"));
  activateForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (await attempt(outcome, async () => {
      const done = await call("POST", `/admin/models/${encodeURIComponent(model.value.trim())}/activate`, { body: { version: target.value.trim() } });
      return notice("ok", `${done.name} version ${done.version} is active${done.previous_version ? ` (was ${done.previous_version})` : ""}.`);
    })) refresh();
  });
  const [activateNode, activateBody] = panel("Activate or roll back a version");
  append(activateBody, activateForm);
  const [pullNode, pullBody] = panel("Pull a model version");
  append(pullBody, form);
  append(root, outcome, list, activateNode, pullNode);
  refresh();
}

// ---- The view --------------------------------------------------------------------------------

const BUILDERS = {
  tenants: tenantsSection,
  plans: plansSection,
  usage: usageSection,
  billing: billingSection,
  audit: auditSection,
  models: modelsSection,
  webhooks: (root) => append(root, webhooksPanel("/admin/webhooks", "Operator webhook endpoints")),
};

/** Build the operator view in `root`, with one section shown at a time. */
export function showOperator(root) {
  const content = h("div", { id: "operator-section", tabindex: "-1" });
  const tabs = SECTIONS.map(([id, title]) => {
    const tab = h("button", { type: "button", class: "tab", "data-section": id, "aria-controls": "operator-section", "aria-pressed": "false" }, title);
    tab.addEventListener("click", () => open(id));
    return tab;
  });
  function open(id) {
    for (const tab of tabs) tab.setAttribute("aria-pressed", String(tab.dataset.section === id));
    const title = SECTIONS.find(([key]) => key === id)[1];
    replace(content, h("h3", { class: "section-title" }, title));
    BUILDERS[id](content);
  }
  replace(root, h("h2", { id: "operator-title" }, "Operations"), h("nav", { class: "tabs", "aria-label": "Operator sections" }, tabs), content);
  open("tenants");
}

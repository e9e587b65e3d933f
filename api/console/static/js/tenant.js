// The tenant's view: its plan and limits, this month's usage, its keys, its webhook endpoints
// and a "try it" panel. Each part is shown only when the signed-in key holds its scope.
import { PREDICT_PATH, call, has } from "./api.js";
import { usageChart } from "./chart.js";
import {
  append, attempt, button, count, field, h, load, notice, panel, replace, secretOnce, table, when,
} from "./dom.js";

export const KEY_SCOPES = ["predict", "usage:read", "keys:manage", "webhooks:manage"];
const EVENTS = [
  "usage.threshold", "quota.exhausted", "key.expiring", "key.revoked", "key.rotated",
  "tenant.suspended", "webhook.test",
];

/** The first and last days of this UTC month so far (YYYY-MM-DD). */
export function thisMonth() {
  const today = new Date().toISOString().slice(0, 10);
  return { start: `${today.slice(0, 8)}01`, end: today };
}

/** A definition list of [term, value] pairs. */
function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));
}

/** A quota gauge: the quota used, the thresholds crossed. */
export function quotaGauge(report) {
  const { monthly_quota: quota, used, remaining } = report.quota;
  if (quota === null) return h("p", { "data-testid": "quota" }, `${count(used)} units used this month; no monthly quota.`);
  const percent = quota === 0 ? 100 : Math.min(100, Math.round((used / quota) * 1000) / 10);
  const id = `gauge-${Math.random().toString(36).slice(2)}`;
  return h(
    "div",
    { class: "gauge", "data-testid": "quota" },
    h("label", { for: id }, `Monthly quota: ${count(used)} of ${count(quota)} units (${percent} %), ${count(remaining)} left`),
    h("meter", { id, min: "0", max: String(quota || 1), low: String(quota * 0.8), high: String(quota * 0.95), optimum: "0", value: String(used) }, `${percent} %`),
    h("p", { class: "muted" }, report.thresholds_crossed.length
      ? `Alert thresholds crossed this month: ${report.thresholds_crossed.map((t) => `${t} %`).join(", ")}`
      : "No alert threshold crossed this month."),
  );
}

/** The totals, gauge, daily chart and by-model table of a usage report. */
export function usageReport(report, title) {
  return [
    h(
      "p",
      { class: "totals" },
      h("span", {}, "Requests: ", h("strong", { "data-testid": "total-requests" }, String(report.total_requests))),
      h("span", {}, "Units: ", h("strong", { "data-testid": "total-units" }, String(report.total_units))),
      h("span", { class: "muted" }, `${report.start} to ${report.end} (UTC)`),
    ),
    quotaGauge(report),
    usageChart(report, title),
    table("Usage by model and version", [
      ["model", (m) => m.model],
      ["version", (m) => m.model_version],
      ["requests", (m) => String(m.requests)],
      ["units", (m) => String(m.units)],
    ], report.by_model, "No predictions in this window."),
  ];
}

function overview(me) {
  const { tenant, limits, key } = me;
  return [
    facts([
      ["Tenant", h("span", { "data-testid": "tenant-name" }, tenant.name)],
      ["Status", tenant.status],
      ["Plan", tenant.plan],
      ["Rate limits", limits.rate_limit],
      ["Monthly quota", limits.monthly_quota === null ? "unlimited" : `${count(limits.monthly_quota)} units`],
      ["Requests in flight", limits.max_in_flight === null ? "no bound" : String(limits.max_in_flight)],
      ["Models", limits.models === null ? "every model" : limits.models.join(", ")],
      ["Signed in with key", `${key.name} (${key.scopes.join(", ")}), expires ${when(key.expires_at)}`],
    ]),
  ];
}

/**
 * A list of keys with Rotate and Revoke on each key still working: the tenant's own
 * (keyPath "/me/keys") and an operator's view of a tenant's ("/admin/keys"). A rotation's
 * grace comes from the panel's field; a key in a rotation's grace (revoked later) may still be
 * revoked now.
 */
export function keyTable(caption, keys, { keyPath, grace, outcome, refresh }) {
  const url = (k, action) => `${keyPath}/${encodeURIComponent(k.id)}/${action}`;
  return table(caption, [
    ["name", (k) => k.name],
    ["prefix", (k) => h("code", {}, k.prefix)],
    ["scopes", (k) => k.scopes.join(", ")],
    ["created", (k) => when(k.created_at)],
    ["last used", (k) => when(k.last_used_at)],
    ["expires", (k) => when(k.expires_at)],
    ["revoked", (k) => when(k.revoked_at, "no")],
    ["actions", (k) => (k.revoked_at && new Date(k.revoked_at) <= new Date() ? "" : h("div", { class: "row" },
      button("Rotate", async () => {
        if (await attempt(outcome, async () => {
          const body = { grace_seconds: grace.value.trim() === "" ? 0 : Number.parseInt(grace.value, 10) };
          const issued = await call("POST", url(k, "rotate"), { body });
          return secretOnce(`New key replacing "${k.name}"`, issued.key);
        })) refresh();
      }, { "aria-label": `Rotate key ${k.name}` }),
      button("Revoke", async () => {
        if (!window.confirm(`Revoke the key "${k.name}" (${k.prefix}…)? Every client using it stops working.`)) return;
        if (await attempt(outcome, async () => {
          await call("POST", url(k, "revoke"));
          return notice("ok", `Key ${k.name} (${k.prefix}…) revoked.`);
        })) refresh();
      }, { "aria-label": `Revoke key ${k.name}` }),
    ))],
  ], keys, "No keys.");
}

function keysPanel() {
  const [node, body] = panel("API keys");
  const list = h("div");
  const outcome = h("div", { "aria-live": "polite" });
  const refresh = () => load(list, async () => {
    const { keys } = await call("GET", "/me/keys");
    return keyTable("Your API keys", keys, {
      keyPath: "/me/keys", grace, outcome, refresh,
    });
  });
  const [graceField, grace] = field("Grace period of a rotation (seconds the old key keeps working)", { type: "number", min: "0", max: "604800", value: "3600" });

  const [nameField, name] = field("Name of the new key", { required: true, maxlength: "200" });
  const boxes = KEY_SCOPES.map((scope) => {
    const input = h("input", { type: "checkbox", value: scope, checked: scope === "predict" || scope === "usage:read" });
    return [h("label", { class: "check" }, input, ` ${scope}`), input];
  });
  const [expiryField, expiry] = field("Expires (optional, UTC)", { type: "datetime-local" });
  const form = h(
    "form",
    { class: "inline-form" },
    nameField,
    h("fieldset", {}, h("legend", {}, "Scopes"), boxes.map(([label]) => label)),
    expiryField,
    h("button", { type: "submit" }, "Create key"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const scopes = boxes.filter(([, input]) => input.checked).map(([, input]) => input.value);
    const body = { name: name.value.trim(), scopes };
    if (expiry.value) body.expires_at = `${expiry.value}:00Z`;
    if (await attempt(outcome, async () => {
      const issued = await call("POST", "/me/keys", { body });
      return secretOnce(`New key "${issued.name}"`, issued.key);
    })) {
      form.reset();
      refresh();
    }
  });
  append(body, form, outcome, graceField, list);
  refresh();
  return node;
}

function deliveries(base, endpoint) {
  const where = h("div", { class: "deliveries" });
  load(where, async () => {
    const { attempts } = await call("GET", `${base}/${encodeURIComponent(endpoint.id)}/deliveries`);
    return table(`Deliveries to ${endpoint.url}`, [
      ["attempted", (a) => when(a.attempted_at)],
      ["outcome", (a) => a.outcome],
      ["status", (a) => (a.status_code === null ? "none" : String(a.status_code))],
      ["latency", (a) => `${Math.round(a.latency_ms)} ms`],
      ["answer", (a) => h("code", {}, a.response_excerpt)],
    ], attempts, "No delivery yet.");
  });
  return where;
}

/** Webhook endpoints under `base` (/me/webhooks for a tenant, /admin/webhooks for operators). */
export function webhooksPanel(base, title = "Webhook endpoints") {
  const [node, body] = panel(title);
  const list = h("div");
  const detail = h("div");
  const outcome = h("div", { "aria-live": "polite" });
  const refresh = () => load(list, async () => {
    const { endpoints } = await call("GET", base);
    return table("Webhook endpoints", [
      ["URL", (e) => h("code", {}, e.url)],
      ["events", (e) => e.events.join(", ")],
      ["status", (e) => (e.disabled_reason ? `${e.status}: ${e.disabled_reason}` : e.status)],
      ["created", (e) => when(e.created_at)],
      ["actions", (e) => h("div", { class: "row" },
        button("Deliveries", async () => replace(detail, h("h4", {}, `Deliveries to ${e.url}`), deliveries(base, e)), { "aria-label": `Deliveries to ${e.url}` }),
        button("Send test", () => attempt(outcome, async () => {
          await call("POST", `${base}/${encodeURIComponent(e.id)}/test`);
          return notice("ok", "A webhook.test event was queued.");
        }), { "aria-label": `Send test event to ${e.url}` }),
        button("Delete", async () => {
          if (!window.confirm(`Delete the endpoint ${e.url}?`)) return;
          if (await attempt(outcome, async () => {
            await call("DELETE", `${base}/${encodeURIComponent(e.id)}`);
            return notice("ok", "Endpoint deleted.");
          })) refresh();
        }, { "aria-label": `Delete the endpoint ${e.url}` }),
      )],
    ], endpoints, "No endpoint.");
  });
  const [urlField, url] = field("Endpoint URL (https)", { type: "url", required: true, placeholder: "https://…" });
  const [descField, description] = field("Description", { maxlength: "200" });
  const boxes = EVENTS.map((name) => {
    const input = h("input", { type: "checkbox", value: name, checked: name === "usage.threshold" || name === "quota.exhausted" });
    return [h("label", { class: "check" }, input, ` ${name}`), input];
  });
  const form = h(
    "form",
    { class: "inline-form" },
    urlField,
    h("fieldset", {}, h("legend", {}, "Events"), boxes.map(([label]) => label)),
    descField,
    h("button", { type: "submit" }, "Add endpoint"),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const events = boxes.filter(([, input]) => input.checked).map(([, input]) => input.value);
    if (await attempt(outcome, async () => {
      const created = await call("POST", base, { body: { url: url.value.trim(), events, description: description.value } });
      return secretOnce(`Signing secret of ${created.url}`, created.secret);
    })) {
      form.reset();
      refresh();
    }
  });
  append(body, form, outcome, list, detail);
  refresh();
  return node;
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

function tryIt() {
  const [node, body] = panel("Try it");
  const inputs = h("div");
  const result = h("div", { "aria-live": "polite" });
  const curl = h("pre", { class: "curl", "data-testid": "curl" });
  load(inputs, async () => {
    const { models } = await call("GET", "/models");
    const serving = models.filter((m) => m.serving);
    if (!serving.length) return notice("info", "No model is being served.");
    const [modelField, model] = field("Model", {}, serving.map((m) => [m.name, `${m.name} (active: ${m.active_version})`]));
    const features = h("div", { class: "features" });
    const controls = [];
    const render = () => {
      const chosen = serving.find((m) => m.name === model.value) || serving[0];
      controls.length = 0;
      replace(features, chosen.feature_names.map((feature, index) => {
        // A typical value to start from: the middle of the training data's range.
        const range = (chosen.training_range || chosen.input_range || [])[index];
        const start = range && Number.isFinite(range.min + range.max) ? Math.round(((range.min + range.max) / 2) * 100) / 100 : 0;
        const [wrap, input] = field(feature, { type: "number", step: "any", required: true, value: String(start) });
        controls.push(input);
        return wrap;
      }));
    };
    model.addEventListener("change", render);
    render();
    const form = h("form", { class: "inline-form" }, modelField, features, h("button", { type: "submit" }, "Send one prediction"));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const request = { model: model.value, features: controls.map((input) => Number(input.value)) };
      // The credential is never written into the command: the reader supplies their own key.
      curl.textContent = [
        `curl -X POST ${shellQuote(`${window.location.origin}${PREDICT_PATH}`)} \\`,
        '  -H "Authorization: Bearer $MODELGATE_API_KEY" -H "Content-Type: application/json" \\',
        `  -d ${shellQuote(JSON.stringify(request))}`,
      ].join("\n");
      await attempt(result, async () => {
        const answer = await call("POST", "/predict", { body: request });
        return [
          notice("ok", `Prediction: ${answer.class_name} (class ${answer.prediction}) from ${answer.model} version ${answer.model_version}`),
          h("pre", { class: "json" }, JSON.stringify(answer, null, 2)),
        ];
      });
    });
    return form;
  });
  append(body, inputs, result, h("p", { class: "muted" }, "The same request with curl:"), curl);
  return node;
}

/** Build the tenant view in `root`. */
export async function showTenant(root) {
  const title = h("h2", { id: "tenant-title" }, "Your account");
  const [overviewNode, overviewBody] = panel("Plan and limits");
  replace(root, title, overviewNode);
  await load(overviewBody, async () => overview(await call("GET", "/me")));
  if (has("usage:read")) {
    const [usageNode, usageBody] = panel("Usage this month");
    append(root, usageNode);
    const { start, end } = thisMonth();
    load(usageBody, async () => usageReport(await call("GET", "/me/usage", { query: { start, end } }), "Requests and units per day, by model and version"));
  }
  if (has("keys:manage")) append(root, keysPanel());
  if (has("webhooks:manage")) append(root, webhooksPanel("/me/webhooks"));
  if (has("predict")) append(root, tryIt());
}

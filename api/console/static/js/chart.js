// Daily usage charts with uPlot (vendored: /assets/vendor/uplot). uPlot styles its elements
// through the DOM's style properties, which the page's CSP (no inline styles) allows.
import uPlot from "/assets/vendor/uplot/uPlot.esm.js";
import { h, table } from "./dom.js";

// One colour per model version (cycled), each with a contrast of at least 4.5:1 on white; a
// version's requests are a solid line, its units a dashed one.
const COLOURS = ["#1f4e79", "#b35900", "#2e6b30", "#8b1a4a", "#5b3c99", "#006d75", "#6b5900"];

/** Every UTC day from `start` to `end` (YYYY-MM-DD), inclusive. */
function days(start, end) {
  const out = [];
  for (let day = new Date(`${start}T00:00:00Z`); day <= new Date(`${end}T00:00:00Z`); day.setUTCDate(day.getUTCDate() + 1)) {
    out.push(day.toISOString().slice(0, 10));
  }
  return out;
}

/**
 * The chart's series after the x axis, and their values for `dates`: a requests and a units
 * series for each model version of the report's `by_day_and_model` (days without usage at 0),
 * or, when it has none, the day totals of `by_day`.
 */
function seriesOf(report, dates) {
  const versions = new Map();
  for (const row of report.by_day_and_model ?? []) {
    const label = `${row.model} ${row.model_version}`;
    if (!versions.has(label)) versions.set(label, new Map());
    versions.get(label).set(row.date, row);
  }
  const groups = versions.size
    ? [...versions.entries()]
    : [["all models", new Map(report.by_day.map((day) => [day.date, day]))]];
  const series = [];
  const values = [];
  groups.forEach(([label, byDate], index) => {
    const stroke = COLOURS[index % COLOURS.length];
    series.push({ label: `${label} requests`, stroke, width: 2 });
    series.push({ label: `${label} units`, stroke, width: 2, dash: [6, 4] });
    values.push(dates.map((date) => byDate.get(date)?.requests ?? 0));
    values.push(dates.map((date) => byDate.get(date)?.units ?? 0));
  });
  return { series, values, labels: groups.map(([label]) => label) };
}

/**
 * A chart of a usage report's requests and units per day by model and version (days without
 * usage at 0), with the same numbers as a table for screen readers and for exact values.
 */
export function usageChart(report, title) {
  const dates = days(report.start, report.end);
  const xs = dates.map((date) => Date.parse(`${date}T00:00:00Z`) / 1000);
  const { series, values, labels } = seriesOf(report, dates);
  const holder = h("div", {
    class: "chart",
    role: "img",
    "data-series": labels.join("; "),
    "aria-label": `${title}: requests and units per day, by model and version (${labels.join(", ")})`,
  });
  const width = () => Math.max(280, Math.min(900, holder.clientWidth || 600));
  const plot = new uPlot(
    {
      width: width(),
      height: 220,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      series: [{}, ...series],
      // One tick per day at most, labelled with its date (the data are daily).
      axes: [
        { space: 48, incrs: [86400, 2 * 86400, 7 * 86400], values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toISOString().slice(5, 10)) },
        { label: "count" },
      ],
    },
    [xs, ...values],
    holder,
  );
  new ResizeObserver(() => plot.setSize({ width: width(), height: 220 })).observe(holder);
  const rows = (report.by_day_and_model ?? []).filter((row) => row.requests || row.units);
  return h(
    "figure",
    { class: "figure" },
    h("figcaption", {}, title),
    holder,
    h(
      "details",
      {},
      h("summary", {}, "Numbers by day, model and version"),
      table(`${title} by day, model and version`, [
        ["day", (d) => d.date],
        ["model", (d) => d.model],
        ["version", (d) => d.model_version],
        ["requests", (d) => String(d.requests)],
        ["units", (d) => String(d.units)],
      ], rows, "No usage in this window."),
    ),
  );
}

// Daily usage charts with uPlot (vendored: /assets/vendor/uplot). uPlot styles its elements
// through the DOM's style properties, which the page's CSP (no inline styles) allows.
import uPlot from "/assets/vendor/uplot/uPlot.esm.js";
import { h, table } from "./dom.js";

/** Every UTC day from `start` to `end` (YYYY-MM-DD), inclusive. */
function days(start, end) {
  const out = [];
  for (let day = new Date(`${start}T00:00:00Z`); day <= new Date(`${end}T00:00:00Z`); day.setUTCDate(day.getUTCDate() + 1)) {
    out.push(day.toISOString().slice(0, 10));
  }
  return out;
}

/**
 * A chart of a usage report's requests and units per day (days without usage at 0), with the
 * same numbers as a table for screen readers and for exact values.
 */
export function usageChart(report, title) {
  const byDay = new Map(report.by_day.map((day) => [day.date, day]));
  const dates = days(report.start, report.end);
  const xs = dates.map((date) => Date.parse(`${date}T00:00:00Z`) / 1000);
  const requests = dates.map((date) => byDay.get(date)?.requests ?? 0);
  const units = dates.map((date) => byDay.get(date)?.units ?? 0);
  const holder = h("div", { class: "chart", role: "img", "aria-label": `${title}: requests and units per day` });
  const width = () => Math.max(280, Math.min(900, holder.clientWidth || 600));
  const plot = new uPlot(
    {
      width: width(),
      height: 220,
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      series: [
        {},
        { label: "requests", stroke: "#1f4e79", width: 2 },
        { label: "units", stroke: "#b35900", width: 2, dash: [6, 4] },
      ],
      // One tick per day at most, labelled with its date (the data are daily).
      axes: [
        { space: 48, incrs: [86400, 2 * 86400, 7 * 86400], values: (u, ticks) => ticks.map((t) => new Date(t * 1000).toISOString().slice(5, 10)) },
        { label: "count" },
      ],
    },
    [xs, requests, units],
    holder,
  );
  new ResizeObserver(() => plot.setSize({ width: width(), height: 220 })).observe(holder);
  const rows = report.by_day.filter((day) => day.requests || day.units);
  return h(
    "figure",
    { class: "figure" },
    h("figcaption", {}, title),
    holder,
    h(
      "details",
      {},
      h("summary", {}, "Numbers by day"),
      table(`${title} by day`, [["day", (d) => d.date], ["requests", (d) => String(d.requests)], ["units", (d) => String(d.units)]], rows, "No usage in this window."),
    ),
  );
}

// The usage reports page: figures from /ui/api/usage, drawn as plain SVG (no chart library: it works offline).
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#3856d6", "#12b76a", "#f79009", "#d92d20", "#7a2ec5", "#0ba5ec"];

function svgNode(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function percent(rate) {
  return rate === null || rate === undefined ? "—" : `${(rate * 100).toFixed(1)}%`;
}

function number(value) {
  return value === null || value === undefined ? "—" : Math.round(value).toLocaleString("en");
}

// A chart of daily series: bars (counts) or lines (rates, latencies), with a few axis labels.
function dailyChart(days, series, { kind = "bars", format = number, maxValue = null } = {}) {
  const width = 520, height = 220, left = 48, bottom = 28, top = 12, right = 8;
  const svg = svgNode("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img" });
  const values = series.flatMap((s) => s.values.filter((v) => v !== null));
  const top_ = maxValue !== null ? maxValue : Math.max(1, ...values);
  const plotWidth = width - left - right, plotHeight = height - top - bottom;
  const x = (i) => left + (days.length === 1 ? plotWidth / 2 : (i * plotWidth) / (days.length - 1));
  const y = (v) => top + plotHeight - (v / top_) * plotHeight;
  for (const fraction of [0, 0.5, 1]) {
    const value = top_ * fraction;
    svg.appendChild(svgNode("line", { x1: left, x2: width - right, y1: y(value), y2: y(value), stroke: "#e4e7ec" }));
    svg.appendChild(svgNode("text", { x: left - 4, y: y(value) + 4, "text-anchor": "end" }, format(value)));
  }
  const step = Math.max(1, Math.ceil(days.length / 6));
  days.forEach((day, i) => {
    if (i % step === 0 || i === days.length - 1) {
      svg.appendChild(svgNode("text", { x: x(i), y: height - 8, "text-anchor": "middle" }, day.slice(5)));
    }
  });
  const slot = plotWidth / Math.max(days.length, 1);
  series.forEach((s, index) => {
    const colour = COLOURS[index % COLOURS.length];
    if (kind === "bars") {
      const barWidth = Math.max(2, (slot * 0.8) / series.length);
      s.values.forEach((v, i) => {
        if (!v) return;
        const bar = svgNode("rect", { x: x(i) - (slot * 0.4) + index * barWidth, y: y(v), width: barWidth,
          height: y(0) - y(v), fill: colour, class: `bar series-${index}` });
        bar.appendChild(svgNode("title", {}, `${days[i]} ${s.name}: ${format(v)}`));
        svg.appendChild(bar);
      });
    } else {
      const points = s.values.map((v, i) => (v === null ? null : `${x(i)},${y(v)}`)).filter(Boolean);
      if (points.length > 1) {
        svg.appendChild(svgNode("polyline", { points: points.join(" "), fill: "none", stroke: colour,
          "stroke-width": 2 }));
      }
      s.values.forEach((v, i) => {
        if (v === null) return;
        const dot = svgNode("circle", { cx: x(i), cy: y(v), r: 3, fill: colour, class: `point series-${index}` });
        dot.appendChild(svgNode("title", {}, `${days[i]} ${s.name}: ${format(v)}`));
        svg.appendChild(dot);
      });
    }
  });
  const legend = element("div", { class: "legend" });
  series.forEach((s, index) => {
    const swatch = element("b", {}, "■");
    swatch.style.color = COLOURS[index % COLOURS.length];
    legend.appendChild(swatch);
    legend.appendChild(document.createTextNode(` ${s.name}   `));
  });
  const box = element("div");
  box.appendChild(svg);
  box.appendChild(legend);
  return box;
}

// Horizontal bars of the top groups (requests, with shown and accepted in the label).
function topChart(groups, label) {
  const top = groups.slice(0, 8);
  const rowHeight = 24, width = 520, left = 150;
  const svg = svgNode("svg", { viewBox: `0 0 ${width} ${Math.max(1, top.length) * rowHeight + 8}`, width: "100%" });
  const most = Math.max(1, ...top.map((g) => g.requests));
  top.forEach((group, i) => {
    const y = 4 + i * rowHeight;
    svg.appendChild(svgNode("text", { x: left - 6, y: y + 15, "text-anchor": "end" }, group[label]));
    const barWidth = ((width - left - 150) * group.requests) / most;
    svg.appendChild(svgNode("rect", { x: left, y: y + 3, width: Math.max(barWidth, 1), height: rowHeight - 8,
      fill: COLOURS[0], class: "bar" }));
    svg.appendChild(svgNode("text", { x: left + barWidth + 6, y: y + 15 },
      `${number(group.requests)} req, ${percent(group.acceptance_rate)} accepted`));
  });
  if (!top.length) svg.appendChild(svgNode("text", { x: 8, y: 16 }, "no requests in this period"));
  return svg;
}

function table(groups, label, id) {
  const node = element("table", { class: "grid", id });
  const head = element("tr");
  for (const name of [label, "requests", "shown", "accepted", "acceptance", "prompt tokens", "completion tokens",
    "p50 ms", "p90 ms", "p99 ms"]) head.appendChild(element("th", {}, name));
  node.appendChild(head);
  for (const group of groups) {
    const row = element("tr");
    const cells = [group[label], number(group.requests), number(group.shown), number(group.accepted),
      percent(group.acceptance_rate), number(group.prompt_tokens), number(group.completion_tokens),
      number(group.latency_ms.p50), number(group.latency_ms.p90), number(group.latency_ms.p99)];
    cells.forEach((cell) => row.appendChild(element("td", {}, cell)));
    node.appendChild(row);
  }
  return node;
}

function card(name, value, id) {
  const node = element("div", { class: "card" });
  node.appendChild(element("div", { class: "value", id }, value));
  node.appendChild(element("div", { class: "name" }, name));
  return node;
}

function fill(id, child) {
  const box = $(id);
  box.textContent = "";
  box.appendChild(child);
}

function show(report) {
  $("period").textContent = `${report.since} to ${report.until} (UTC)`;
  const totals = report.totals;
  const cards = $("totals");
  cards.textContent = "";
  cards.appendChild(card("requests", number(totals.requests), "total-requests"));
  cards.appendChild(card("completions shown", number(totals.shown), "total-shown"));
  cards.appendChild(card("accepted (inferred)", number(totals.accepted), "total-accepted"));
  cards.appendChild(card("acceptance rate", percent(totals.acceptance_rate), "total-acceptance"));
  cards.appendChild(card("tokens (prompt + completion)", number(totals.prompt_tokens + totals.completion_tokens),
    "total-tokens"));
  cards.appendChild(card("latency p50 / p90 / p99 ms",
    `${number(totals.latency_ms.p50)} / ${number(totals.latency_ms.p90)} / ${number(totals.latency_ms.p99)}`,
    "total-latency"));
  const days = report.days.map((d) => d.day);
  fill("chart-requests", dailyChart(days, [
    { name: "requests", values: report.days.map((d) => d.requests) },
    { name: "shown", values: report.days.map((d) => d.shown) },
    { name: "accepted", values: report.days.map((d) => d.accepted) }]));
  fill("chart-acceptance", dailyChart(days, [
    { name: "accepted / shown", values: report.days.map((d) => d.acceptance_rate) }],
    { kind: "lines", format: percent, maxValue: 1 }));
  fill("chart-latency", dailyChart(days, ["p50", "p90", "p99"].map((p) => (
    { name: p, values: report.days.map((d) => d.latency_ms[p]) })), { kind: "lines" }));
  fill("chart-languages", topChart(report.languages, "language"));
  fill("chart-keys", topChart(report.keys, "key"));
  fill("table-models", table(report.models, "model", "by-model"));
  fill("table-keys", table(report.keys, "key", "by-key"));
  fill("table-languages", table(report.languages, "language", "by-language"));
  document.body.dataset.loaded = "true";
}

async function load() {
  $("error").textContent = "";
  const response = await apiFetch(`api/usage?days=${$("days").value}`);
  if (!response.ok) {
    $("error").textContent = await errorText(response);
    return;
  }
  show(await response.json());
}

document.addEventListener("DOMContentLoaded", () => {
  $("days").addEventListener("change", load);
  $("refresh").addEventListener("click", load);
  load();
});

# ruff: noqa: E501 (the page's own lines)
"""The routes page: one HTML document with its style and script inline (nothing is loaded from
anywhere else). The script draws everything from /api/routes, asked again every quarter second;
every value is set as text, never as markup, so no name or label can inject anything."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Routes - consul-sidecar</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
header{background:#1d232a;color:#fff;padding:10px 18px;display:flex;gap:24px;flex-wrap:wrap;align-items:baseline}
header h1{font-size:17px;margin:0}
main{padding:12px 18px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:0 0 14px;padding:10px 14px}
h2{font-size:15px;margin:2px 0 8px}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eef0f3;vertical-align:top}
th{font-weight:600;color:#555;font-size:12px}
.route{margin:0 0 12px}
.route h3{font-size:14px;margin:6px 0 4px}
.st{display:inline-block;padding:0 6px;border-radius:9px;font-size:12px;color:#fff}
.passing{background:#2e8540}.warning{background:#c77c02}.critical{background:#c4352b}
.draining{background:#6f42c1}.held{background:#5b6770}.maintenance{background:#6f42c1}
.warn{color:#9a4a00;background:#fff4e0;border-left:3px solid #c77c02;padding:2px 8px;margin:3px 0}
.bad{color:#8b1a12;background:#fde8e6;border-left:3px solid #c4352b;padding:2px 8px;margin:3px 0}
.muted{color:#6a737d}.opt{font-size:12px;background:#eef2f7;border-radius:4px;padding:0 5px;margin-right:4px}
pre{font-size:12px;background:#f6f8fa;padding:6px;overflow:auto;max-height:320px}
.plus{color:#1a7f37}.minus{color:#cf222e}
svg{background:#fafbfc;border:1px solid #eef0f3}
#live{font-size:12px}
</style></head>
<body>
<header><h1>Routes</h1><span id="proxy"></span><span id="consul"></span><span id="live" class="muted"></span></header>
<main>
<section id="problems-box" hidden><h2>Problems</h2><div id="problems"></div></section>
<section><h2>Routing table</h2><div id="routes"><p class="muted">loading</p></div></section>
<section id="left-box" hidden><h2>Left out</h2><div id="left"></div></section>
<section><h2>Last hour</h2><div id="plots"></div></section>
<section><h2>Last renders</h2><div id="renders"></div></section>
<section><h2>Warnings</h2><div id="warnings"></div></section>
<section><h2>Fleet</h2><div id="fleet"></div></section>
</main>
<script>
"use strict";
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "cls") e.className = v; else e.setAttribute(k, v);
  }
  for (const kid of kids) {
    if (kid === null || kid === undefined) continue;
    e.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}
function ago(t) {
  if (!t) return "never";
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 90 ? s.toFixed(0) + " s ago" : s < 5400 ? (s / 60).toFixed(0) + " min ago" : (s / 3600).toFixed(1) + " h ago";
}
function ms(s) { return (s * 1000).toFixed(s < 0.01 ? 1 : 0) + " ms"; }
function state(s) { return el("span", {cls: "st " + s}, s); }
const open = new Set();
function details(key, summary, body) {
  const d = el("details", {}, el("summary", {}, summary), body);
  if (open.has(key)) d.open = true;
  d.addEventListener("toggle", () => { d.open ? open.add(key) : open.delete(key); });
  return d;
}
function drawRoutes(doc) {
  const box = document.getElementById("routes");
  if (!doc.catalog) { box.replaceChildren(el("p", {cls: "muted"}, "no template reads the catalog: nothing is routed")); return; }
  if (!doc.routes.length) { box.replaceChildren(el("p", {cls: "muted"}, "no service has http_host, http_path, tcp_port or sni_host meta")); return; }
  const out = [];
  for (const r of doc.routes) {
    const where = [...(r.http ? r.hosts.map(h => h + r.path) : []), ...(r.tcp_port ? ["tcp :" + r.tcp_port] : []), ...r.sni_hosts.map(h => "tls " + h)].join(", ");
    const head = el("h3", {}, where, " \u2192 ", el("b", {"data-service": r.service}, r.service),
      el("span", {cls: "muted"}, "  " + r.passing + " routed of " + r.instances.length +
        (r.sticky ? ", sticky" : "") + (r.check ? ", active check " + r.check : "") +
        (r.failover ? ", FAILOVER datacenter" : "") + (r.held ? ", held by the empty grace" : "")));
    const opts = el("div", {}, ...Object.entries(r.options).map(([k, v]) => el("span", {cls: "opt"}, k + "=" + v)));
    const warns = r.warnings.map(w => el("div", {cls: "warn"}, w));
    const rows = r.instances.map(i => el("tr", {"data-instance": i.id},
      el("td", {}, i.id), el("td", {}, i.container), el("td", {}, i.address + ":" + i.port), el("td", {}, i.node),
      el("td", {}, i.datacenter), el("td", {}, state(i.state)), el("td", {}, i.routed ? String(i.weight) : "-"),
      el("td", {cls: "muted"}, i.server)));
    const table = el("table", {}, el("tr", {}, ...["instance", "container", "address", "node", "dc", "state",
      "weight", "proxy server"].map(h => el("th", {}, h))), ...rows);
    out.push(el("div", {cls: "route", "data-route": r.service}, head, opts, ...warns, table));
  }
  box.replaceChildren(...out);
}
function drawLeft(doc) {
  const box = document.getElementById("left");
  document.getElementById("left-box").hidden = !doc.left_out.length;
  box.replaceChildren(...doc.left_out.map(l => el("div", {"data-left": l.service}, el("b", {}, l.service),
    ...l.warnings.map(w => el("div", {cls: "warn"}, w)))));
}
function drawHeader(doc) {
  const p = doc.proxy;
  const h = doc.history;
  const parts = [];
  if (p) {
    parts.push(p.kind + " " + p.version + (p.pid ? " pid " + p.pid : " not running"));
    if (h.last_apply) parts.push("last " + h.last_apply.how + " " + ago(h.last_apply.at) + " (" + ms(h.last_apply.seconds) + ")");
    if (p.draining) parts.push(p.draining + " server(s) draining");
  } else parts.push("no proxy managed");
  document.getElementById("proxy").textContent = parts.join(" \u00b7 ");
  document.getElementById("consul").textContent = doc.consul.up ? "Consul up" : "Consul DOWN: " + doc.consul.error;
  const probs = Object.entries(doc.problems).map(([k, v]) => el("div", {cls: "bad"}, k + ": " + v));
  if (h.last_failure) probs.push(el("div", {cls: "warn"}, "last failure " + ago(h.last_failure.at) + ", " +
    h.last_failure.what + ": " + h.last_failure.message));
  document.getElementById("problems-box").hidden = !probs.length;
  document.getElementById("problems").replaceChildren(...probs);
}
function plot(title, buckets, value, unit) {
  const W = 360, H = 70, now = Date.now() / 1000;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H);
  const top = Math.max(1e-9, ...buckets.map(value));
  for (const b of buckets) {
    const x = W - (now - b.minute) / 3600 * W, v = value(b), hgt = Math.max(1, v / top * (H - 14));
    const r = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    r.setAttribute("x", Math.max(0, x - 5)); r.setAttribute("y", H - hgt); r.setAttribute("width", 5);
    r.setAttribute("height", hgt); r.setAttribute("fill", "#3b6fb6");
    const t = document.createElementNS("http://www.w3.org/2000/svg", "title");
    t.textContent = new Date(b.minute * 1000).toLocaleTimeString() + ": " + unit(v);
    r.append(t); svg.append(r);
  }
  const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
  label.setAttribute("x", 4); label.setAttribute("y", 12); label.setAttribute("font-size", 11);
  label.textContent = title + (buckets.length ? " (max " + unit(top) + ")" : ": nothing yet");
  svg.append(label);
  return el("div", {style: "display:inline-block;margin-right:12px"}, svg);
}
function drawPlots(doc) {
  const h = doc.history;
  const total = b => Object.values(b.count).reduce((a, c) => a + c, 0);
  document.getElementById("plots").replaceChildren(
    plot("change \u2192 written, median per minute", h.changes, b => b.p50, ms),
    plot("proxy updates per minute (reloads, runtime API)", h.applies, total, v => String(v)));
}
function drawRenders(doc) {
  const items = doc.history.renders.map(r => {
    const pre = el("pre", {});
    for (const line of r.diff.split("\\n")) pre.append(el("span", {cls: line[0] === "+" ? "plus" : line[0] === "-" ? "minus" : ""}, line + "\\n"));
    return details("render:" + r.at, r.template + " " + ago(r.at) + ": +" + r.added + " -" + r.removed + " lines", pre);
  });
  document.getElementById("renders").replaceChildren(...(items.length ? items : [el("p", {cls: "muted"}, "none yet")]));
}
function drawWarnings(doc) {
  const items = doc.history.warnings.map(w => el("div", {cls: "warn"}, ago(w.at) + ": " + w.text));
  document.getElementById("warnings").replaceChildren(...(items.length ? items : [el("p", {cls: "muted"}, "none")]));
}
function drawFleet(doc) {
  if (!doc.fleet.length) { document.getElementById("fleet").replaceChildren(el("p", {cls: "muted"}, "no proxy registered")); return; }
  const rows = doc.fleet.map(f => el("tr", {}, el("td", {}, f.node), el("td", {}, f.address + ":" + f.port),
    el("td", {}, f.proxy + " " + f.version), el("td", {}, state(f.status)),
    el("td", {}, f.page && /^https?:\\/\\//.test(f.page) ? el("a", {href: f.page}, f.page) : "")));
  document.getElementById("fleet").replaceChildren(el("table", {}, el("tr", {}, ...["node", "proxy address", "proxy",
    "state", "routes page"].map(h => el("th", {}, h))), ...rows));
}
let last = "";
async function tick() {
  try {
    const response = await fetch("/api/routes", {cache: "no-cache"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const doc = await response.json();
    drawHeader(doc);
    const key = JSON.stringify(Object.assign({}, doc, {generated: 0}));  // redrawn only when something changed
    if (key !== last) { drawRoutes(doc); drawLeft(doc); drawPlots(doc); drawRenders(doc); drawWarnings(doc); drawFleet(doc); last = key; }
    document.getElementById("live").textContent = "live, " + new Date().toLocaleTimeString();
  } catch (err) {
    document.getElementById("live").textContent = "not updating: " + err.message;
  }
  setTimeout(tick, 250);
}
tick();
</script>
</body></html>
"""

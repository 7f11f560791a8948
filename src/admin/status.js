"use strict";
// Refreshes the page from /status.json every 2 s. Everything shown is set with textContent,
// never parsed as HTML: hosts and other client-supplied text stay text.
(function () {
  var filter = document.getElementById("filter");
  var state = document.getElementById("refresh-state");
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function bytes(n) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  }
  function age(s) {
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    return Math.floor(s / 3600) + "h " + Math.floor(s % 3600 / 60) + "m";
  }
  function fill(id, rows, cells, more, empty) {
    var body = document.getElementById(id);
    if (!body) return;
    var span = body.parentNode.querySelectorAll("thead th").length;
    while (body.firstChild) body.removeChild(body.firstChild);
    rows.forEach(function (row) {
      var tr = el("tr");
      cells(row).forEach(function (c) { tr.appendChild(el("td", c[0], c[1])); });
      body.appendChild(tr);
    });
    if (rows.length === 0) {
      var tr = el("tr"), td = el("td", empty, "empty");
      td.colSpan = span; tr.appendChild(td); body.appendChild(tr);
    }
    if (more > 0) {
      var tr2 = el("tr"), td2 = el("td", "and " + more.toLocaleString("en") + " more", "more");
      td2.colSpan = span; tr2.appendChild(td2); body.appendChild(tr2);
    }
  }
  function text(id, value) {
    var e = document.getElementById(id);
    if (e) e.textContent = String(value);
  }
  function render(s) {
    text("uptime", age(s.uptime_seconds));
    text("open-count", s.tunnels.open);
    var badge = document.getElementById("state");
    badge.textContent = s.draining ? "draining" : "serving";
    badge.className = "badge" + (s.draining ? " draining" : "");
    text("last-reload", s.config.last_reload || "never");
    text("reload-error", s.config.last_reload_error ?
      s.config.last_reload_error.time + ": " + s.config.last_reload_error.error : "none");
    var group = function (g) {
      return [[g.name], [g.open, "n"], [bytes(g.bytes_up), "n"], [bytes(g.bytes_down), "n"], [age(g.oldest_seconds), "n"]];
    };
    fill("by-domain", s.tunnels.by_domain, group, s.tunnels.by_domain_more, "no open tunnels");
    fill("by-client", s.tunnels.by_client, group, s.tunnels.by_client_more, "no open tunnels");
    fill("tunnels", s.tunnels.list, function (t) {
      return [[t.client], [t.host + ":" + t.port], [t.rule], [age(t.age_seconds), "n"], [bytes(t.bytes_up), "n"], [bytes(t.bytes_down), "n"]];
    }, s.tunnels.list_more, "no open tunnels");
    fill("refusals", s.recent_refusals, function (r) {
      return [[r.time.replace("T", " "), "time"], [r.client], [r.port ? r.host + ":" + r.port : r.host], [r.reason, "reason"], [r.rule]];
    }, 0, s.filter ? "no refusal matches" : "nothing refused yet");
    fill("rules", s.rules, function (r) {
      return [[r.name], [r.domains.join(" ")], [r.ports.join(" ")], [r.sni + (r.private_endpoint ? ", private endpoint" : "")], [r.allowed, "n"], [r.refused, "n"]];
    }, 0, "no rules");
    fill("dns-lookups", s.dns.lookups, function (l) {
      return [[l.path], [l.result], [l.count, "n"]];
    }, 0, "no lookups yet");
  }
  function refresh() {
    var q = filter && filter.value ? "?filter=" + encodeURIComponent(filter.value) : "";
    fetch("/status.json" + q, { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (s) { render(s); text("refresh-state", "live, every 2 s"); })
      .catch(function (e) { state.textContent = "refresh failed (" + e.message + "); retrying"; });
  }
  if (filter) {
    filter.addEventListener("input", refresh);
    filter.form.addEventListener("submit", function (e) { e.preventDefault(); refresh(); });
  }
  setInterval(refresh, 2000);
  refresh();
})();

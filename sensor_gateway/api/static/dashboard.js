// sensor-gateway dashboard: live updates from /readings/stream (Server-Sent Events)
// and ages that tick. No dependencies; the pages read without it.
(function () {
  "use strict";
  var STALE_S = Number(document.body.dataset.staleS || 120);
  var live = document.getElementById("live");

  function fmt(v) {
    if (typeof v !== "number" || !isFinite(v)) return "–";
    return Number.isInteger(v) ? String(v) : v.toFixed(2).replace(/\.?0+$/, "");
  }
  function age(s) {
    s = Math.max(0, Math.floor(s));
    if (s < 120) return s + " s";
    if (s < 7200) return Math.floor(s / 60) + " min";
    if (s < 172800) return Math.floor(s / 3600) + " h";
    return Math.floor(s / 86400) + " d";
  }
  function spark(values) {
    if (!values.length) return "";
    var lo = Math.min.apply(null, values), hi = Math.max.apply(null, values);
    var span = (hi - lo) || 1, step = 120 / Math.max(1, values.length - 1);
    return values.map(function (v, i) {
      return (i * step).toFixed(1) + "," + (26 - (v - lo) / span * 24).toFixed(1);
    }).join(" ");
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-sensor] time[datetime], time.age").forEach(function (t) {
      var s = (now - Date.parse(t.getAttribute("datetime"))) / 1000;
      if (isNaN(s)) return;
      t.textContent = age(s);
      var holder = t.closest("[data-sensor]");
      if (!holder) return;
      var stale = s > STALE_S;
      holder.classList.toggle("stale", stale);
      var badge = holder.querySelector(".badge");
      if (badge) badge.textContent = stale ? "stale" : "";
    });
  }
  function cell(cls, text) {
    var td = document.createElement("td");
    td.className = cls;
    td.textContent = text;
    return td;
  }
  function newRow(r) {
    var tbody = document.querySelector("#sensors tbody");
    var empty = tbody.querySelector("tr.empty");
    if (empty) empty.remove();
    var tr = document.createElement("tr");
    tr.dataset.sensor = r.sensor_id;
    tr.dataset.values = "[]";
    var th = document.createElement("th");
    th.scope = "row";
    var a = document.createElement("a");
    a.href = "/sensor/" + encodeURIComponent(r.sensor_id);
    a.textContent = r.sensor_id;
    th.appendChild(a);
    tr.appendChild(th);
    tr.appendChild(cell("kind", r.kind || ""));
    tr.appendChild(cell("num value", ""));
    tr.appendChild(cell("unit", ""));
    var ageTd = cell("age", "");
    ageTd.innerHTML = '<time></time> <span class="badge"></span>';
    tr.appendChild(ageTd);
    var sp = document.createElement("td");
    sp.innerHTML = '<svg class="spark" viewBox="0 0 120 28" width="120" height="28" role="img" aria-label="recent values"><polyline></polyline></svg>';
    tr.appendChild(sp);
    var rows = Array.prototype.slice.call(tbody.querySelectorAll("tr[data-sensor]"));
    var after = rows.filter(function (x) { return x.dataset.sensor > r.sensor_id; })[0];
    tbody.insertBefore(tr, after || null);
    return tr;
  }
  function onReading(r) {
    var table = document.getElementById("sensors");
    var holder = null;
    document.querySelectorAll("[data-sensor]").forEach(function (el) {
      if (el.dataset.sensor === r.sensor_id) holder = el;
    });
    if (!holder && table) holder = newRow(r);
    if (!holder) return;
    var t = holder.querySelector("time");
    if (t && t.getAttribute("datetime") && Date.parse(t.getAttribute("datetime")) > Date.parse(r.timestamp)) return;
    var v = holder.querySelector(".value");
    if (v) v.textContent = fmt(r.value);
    var u = holder.querySelector(".unit");
    if (u) u.textContent = r.unit || "";
    if (t) t.setAttribute("datetime", r.timestamp);
    if (holder.dataset.values !== undefined) {
      var values = JSON.parse(holder.dataset.values || "[]");
      if (typeof r.value === "number") values.push(r.value);
      values = values.slice(-10);
      holder.dataset.values = JSON.stringify(values);
      var pl = holder.querySelector(".spark polyline");
      if (pl) pl.setAttribute("points", spark(values));
    }
    holder.classList.add("flash");
    clearTimeout(holder.flashTimer);
    holder.flashTimer = setTimeout(function () { holder.classList.remove("flash"); }, 300);
    tick();
  }
  function connect() {
    var table = document.getElementById("sensors");
    var latest = document.getElementById("latest");
    var url = null;
    if (table) url = "/readings/stream";
    else if (latest) url = "/readings/stream?sensor_id=" + encodeURIComponent(latest.dataset.sensor);
    if (!url || !window.EventSource) return;
    var es = new EventSource(url);
    es.addEventListener("open", function () { if (live) live.textContent = "● live"; });
    es.addEventListener("error", function () { if (live) live.textContent = "reconnecting…"; });
    es.addEventListener("reading", function (e) {
      try { onReading(JSON.parse(e.data)); } catch (err) { /* a malformed event is skipped */ }
    });
  }
  tick();
  setInterval(tick, 1000);
  connect();
})();

// One device: latest values, live uPlot charts (history from the telemetry API, then live
// frames appended), and the command panel whose list follows each command's lifecycle.
// Over 400 lines on purpose: one page's script; the charts' formatting is in charts.js.
"use strict";

(function () {
  const G = window.Gateway;
  const el = G.el;
  const page = document.getElementById("device-page");
  const deviceId = page.dataset.device;
  const staleSeconds = Number(page.dataset.staleSeconds) || 120;
  const HISTORY_POINTS = 1000;
  const EXPORT_POINTS = 10000; // the history API's cap
  const CHART_HEIGHT = 180;
  const NAME_RE = /^[A-Za-z0-9_.:-]{1,64}$/;

  const state = { id: deviceId, name: deviceId, online: false, last_seen: null, transport: "", metrics: {} };
  const idEl = document.getElementById("device-id");
  const diagnostics = document.getElementById("diagnostics");
  const diagnosticValues = document.getElementById("diagnostic-values");
  const diagnosticCount = document.getElementById("diagnostics-count");
  const badge = document.getElementById("device-badge");
  const nameEl = document.getElementById("device-name");
  const transportEl = document.getElementById("device-transport");
  const seenEl = document.getElementById("device-seen");
  const rejectedEl = document.getElementById("device-rejected");
  const lastRejectionEl = document.getElementById("device-last-rejection");
  const values = document.getElementById("values");
  const chartsBox = document.getElementById("charts");
  const noCharts = document.getElementById("no-charts");
  const list = document.getElementById("commands");
  const noCommands = document.getElementById("no-commands");

  // --- header and latest values ---------------------------------------------------------

  const tiles = new Map(); // metric → value <span>
  for (const tile of document.querySelectorAll("#values .tile, #diagnostic-values .tile")) {
    tiles.set(tile.dataset.metric, tile.querySelector(".tile-value"));
  }
  let renderedSeen;

  // Friendly names and units of a self-describing device's metrics (GET /api/discovery/,
  // docs/conventions.md), shown beside the metric name of its tiles and charts.
  const described = new Map(); // metric → "Temperature (°C)"
  function label(container, metric, cls) {
    const text = described.get(metric);
    if (!text || container.querySelector("." + cls)) return;
    const node = el("span", cls, text);
    const title = container.querySelector(".chart-title, .tile-name");
    if (title) title.after(node);
    else container.append(node);
  }
  function labelAll() {
    for (const [metric, value] of tiles) label(value.parentElement, metric, "tile-unit");
    for (const [metric, chart] of charts) label(chart.card.firstChild, metric, "chart-unit");
  }
  async function loadDescriptions() {
    try {
      const response = await fetch("/api/discovery/", {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!response.ok) return;
      const devices = await response.json();
      const mine = Array.isArray(devices) ? devices.find((d) => d && d.device === deviceId) : null;
      for (const entity of (mine && mine.entities) || []) {
        const unit = entity.unit ? ` (${entity.unit})` : "";
        const named = entity.name && entity.name !== entity.metric ? entity.name : "";
        if (named || unit) described.set(entity.metric, `${named}${unit}`.trim());
      }
      labelAll();
    } catch (err) {
      // Not a discovered device, or the API is unreachable: plain metric names.
    }
  }

  // The device's rejection record (docs/interface.md §5.2); device text by textContent only.
  let renderedRejectedAt;
  function renderRejections() {
    if (!G.isNumber(state.last_rejected_at) || renderedRejectedAt === state.last_rejected_at) return;
    renderedRejectedAt = state.last_rejected_at;
    const last = state.last_rejection || {};
    rejectedEl.textContent = Number(state.rejected || 0).toLocaleString();
    lastRejectionEl.querySelector(".rejection-reason").textContent = String(last.reason || "");
    lastRejectionEl.querySelector(".rejection-detail").textContent = String(last.detail || "");
    lastRejectionEl.querySelector(".rejection-at").replaceChildren(G.timeAgo(state.last_rejected_at));
    lastRejectionEl.hidden = false;
  }

  function renderHeader() {
    const name = state.name || state.id;
    if (nameEl.textContent !== name) nameEl.textContent = name;
    if (idEl) idEl.hidden = name === state.id;
    G.setBadge(badge, G.presence(state, staleSeconds));
    const convention = G.conventionLabel(state);
    if (transportEl.textContent !== convention) {
      transportEl.textContent = convention;
      transportEl.title = state.transport ? "transport: " + state.transport : "";
    }
    renderRejections();
    if (renderedSeen !== state.last_seen) {
      renderedSeen = state.last_seen;
      if (G.isNumber(state.last_seen)) seenEl.replaceChildren(G.timeAgo(state.last_seen));
      else seenEl.textContent = "never";
    }
    for (const name of Object.keys(state.metrics).sort()) {
      let value = tiles.get(name);
      if (!value) {
        const tile = el("div", "tile");
        tile.dataset.metric = name;
        value = el("span", "tile-value");
        tile.append(el("span", "tile-name", name), value);
        (G.isDiagnostic(name) ? diagnosticValues : values).appendChild(tile);
        tiles.set(name, value);
        label(tile, name, "tile-unit");
      }
      const text = G.formatValue(state.metrics[name]);
      if (value.textContent !== text) value.textContent = text;
    }
    const diagnosticTiles = diagnosticValues.children.length;
    diagnostics.hidden = diagnosticTiles === 0;
    diagnosticCount.textContent = String(diagnosticTiles);
  }

  // --- charts ---------------------------------------------------------------------------

  let windowSeconds = 300;
  let generation = 0; // bumps on every history reload; late answers of older ones are ignored
  const charts = new Map(); // metric → {xs, ys, plot, box, card, latest, loaded}
  const dirtyCharts = new Set();
  let drawScheduled = false;

  function chartOptions(metric, width, chart) {
    return window.GatewayCharts.options({
      metric: metric,
      width: width,
      height: CHART_HEIGHT,
      boolean: chart.boolean,
      card: chart.card,
      windowSeconds: () => windowSeconds,
    });
  }

  function chartWidth(box) {
    return Math.max(200, Math.floor(box.clientWidth || chartsBox.clientWidth || 300));
  }

  // A link downloading the chart's window as CSV (the history API's format=csv).
  function exportLink(metric) {
    const link = el("a", "chart-csv", "CSV");
    link.title = "Download this chart's window as CSV";
    link.setAttribute("download", "");
    link.href = "#";
    link.addEventListener("click", () => {
      const now = Date.now() / 1000;
      link.href =
        "/api/devices/" + encodeURIComponent(deviceId) + "/telemetry?format=csv&metric=" +
        encodeURIComponent(metric) + "&since=" + (now - windowSeconds).toFixed(3) +
        "&until=" + now.toFixed(3) + "&max_points=" + EXPORT_POINTS;
    });
    return link;
  }

  function ensureChart(metric, load = true, boolean = false) {
    let chart = charts.get(metric);
    if (chart) return chart;
    const card = el("figure", "chart");
    card.dataset.metric = metric;
    if (boolean) card.dataset.kind = "boolean";
    const head = el("figcaption", "chart-head");
    const latest = el("span", "chart-latest");
    head.append(el("span", "chart-title", metric), latest, exportLink(metric));
    const box = el("div", "chart-box");
    card.append(head, box);
    // Keep charts in metric-name order.
    const after = [...chartsBox.children].find((other) => other.dataset.metric > metric);
    chartsBox.insertBefore(card, after || null);
    noCharts.hidden = true;
    chart = { xs: [], ys: [], plot: null, box, card, latest, loaded: false, boolean };
    charts.set(metric, chart);
    label(head, metric, "chart-unit");
    if (window.uPlot) {
      chart.plot = new window.uPlot(chartOptions(metric, chartWidth(box), chart), [chart.xs, chart.ys], box);
    }
    if (load) loadHistory(metric, chart, generation);
    return chart;
  }

  function rebuildPlots() {
    for (const [metric, chart] of charts) {
      if (chart.plot) chart.plot.destroy();
      chart.box.replaceChildren();
      chart.plot = new window.uPlot(chartOptions(metric, chartWidth(chart.box), chart), [chart.xs, chart.ys], chart.box);
    }
  }

  // Points closer together than this are merged (the newest wins), so a 24 h window fed
  // at 10 Hz stays at about 1500 points per chart.
  function minGap() {
    return windowSeconds / 1500;
  }

  function addPoint(chart, ts, value) {
    const xs = chart.xs;
    const ys = chart.ys;
    const n = xs.length;
    if (n && ts < xs[n - 1]) {
      // Out of order (rare): insert where it belongs, unless it is already there.
      let i = n - 1;
      while (i > 0 && xs[i - 1] > ts) i -= 1;
      if (xs[i - 1] === ts) return;
      xs.splice(i, 0, ts);
      ys.splice(i, 0, value);
      return;
    }
    if (n && ts === xs[n - 1]) {
      ys[n - 1] = value;
    } else if (n >= 2 && ts - xs[n - 2] < minGap()) {
      xs[n - 1] = ts;
      ys[n - 1] = value;
    } else {
      xs.push(ts);
      ys.push(value);
    }
  }

  function trim(chart) {
    const cutoff = Date.now() / 1000 - windowSeconds;
    let drop = 0;
    while (drop < chart.xs.length - 1 && chart.xs[drop] < cutoff) drop += 1;
    if (drop) {
      chart.xs.splice(0, drop);
      chart.ys.splice(0, drop);
    }
  }

  function markChart(metric) {
    dirtyCharts.add(metric);
    if (drawScheduled) return;
    drawScheduled = true;
    requestAnimationFrame(() => {
      drawScheduled = false;
      for (const name of dirtyCharts) {
        const chart = charts.get(name);
        if (!chart) continue;
        trim(chart);
        if (chart.plot) chart.plot.setData([chart.xs, chart.ys]);
        const last = chart.ys.length ? chart.ys[chart.ys.length - 1] : null;
        chart.latest.textContent = chart.boolean && last !== null ? (last ? "on" : "off") : G.formatValue(last);
        chart.card.dataset.points = String(chart.xs.length);
      }
      dirtyCharts.clear();
    });
  }

  async function loadHistory(metric, chart, gen, attempt = 0) {
    const since = Date.now() / 1000 - windowSeconds;
    const url =
      "/api/devices/" + encodeURIComponent(deviceId) + "/telemetry?metric=" +
      encodeURIComponent(metric) + "&since=" + since.toFixed(3) + "&max_points=" + HISTORY_POINTS;
    let points = [];
    try {
      const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
      if (response.ok) {
        const body = await response.json();
        points = Array.isArray(body.points) ? body.points : [];
      } else if (response.status === 404 && attempt < 3) {
        // Seen live but not written yet (the gateway batches writes): ask again shortly.
        setTimeout(() => loadHistory(metric, chart, gen, attempt + 1), 1000);
        return;
      } else {
        console.warn("history of " + metric + ": HTTP " + response.status);
      }
    } catch (err) {
      console.warn("history of " + metric + " failed", err);
    }
    if (gen !== generation || charts.get(metric) !== chart) return; // superseded
    // History replaces what we had; live points newer than the history are kept.
    const lastHistory = points.length ? points[points.length - 1][0] : -Infinity;
    const liveXs = chart.xs;
    const liveYs = chart.ys;
    chart.xs = [];
    chart.ys = [];
    for (const [ts, value] of points) {
      if (G.isNumber(ts) && G.isNumber(value)) addPoint(chart, ts, value);
    }
    for (let i = 0; i < liveXs.length; i += 1) {
      if (liveXs[i] > lastHistory) addPoint(chart, liveXs[i], liveYs[i]);
    }
    chart.loaded = true;
    chart.card.dataset.loaded = "1";
    markChart(metric);
  }

  function reloadAll() {
    generation += 1;
    // Keep what is shown until the new history arrives: loadHistory replaces it and keeps
    // the live points newer than the history (the gateway writes readings in batches, so
    // the newest may not be stored yet).
    for (const [metric, chart] of charts) loadHistory(metric, chart, generation);
  }

  for (const button of document.querySelectorAll("#windows button")) {
    button.addEventListener("click", () => {
      windowSeconds = Number(button.dataset.window);
      for (const other of document.querySelectorAll("#windows button")) {
        other.setAttribute("aria-pressed", String(other === button));
      }
      reloadAll();
    });
  }

  if (window.ResizeObserver) {
    const observer = new ResizeObserver(() => {
      for (const chart of charts.values()) {
        if (chart.plot) chart.plot.setSize({ width: chartWidth(chart.box), height: CHART_HEIGHT });
      }
    });
    observer.observe(chartsBox);
  }
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", rebuildPlots);

  // --- commands -------------------------------------------------------------------------

  const items = new Map(); // command id or "ref:<ref>" → {li, status, trail, detail, statuses}
  const sentRefs = new Map(); // ref → item, for commands this page sent
  let refCounter = 0;

  for (const li of list.querySelectorAll("li[data-command]")) {
    const status = li.querySelector(".cmd-status");
    items.set(li.dataset.command, {
      li, status,
      trail: li.querySelector(".cmd-trail"),
      detail: li.querySelector(".cmd-detail"),
      statuses: [status.textContent.trim()],
    });
  }

  function newItem(name, args, when) {
    const li = el("li", "cmd");
    const head = el("div", "cmd-head");
    const status = el("span", "cmd-status");
    head.append(el("span", "cmd-name", name));
    if (args !== undefined) head.append(" ", el("code", "cmd-args", JSON.stringify(args)));
    head.append(" ", status);
    const trail = el("div", "cmd-trail");
    const detail = el("div", "cmd-detail");
    const meta = el("div", "cmd-meta");
    meta.appendChild(G.timeAgo(when));
    li.append(head, trail, detail, meta);
    list.insertBefore(li, list.firstChild);
    noCommands.hidden = true;
    while (list.children.length > 50) list.lastChild.remove();
    return { li, status, trail, detail, statuses: [] };
  }

  function setStatus(item, status) {
    if (item.statuses[item.statuses.length - 1] !== status) item.statuses.push(status);
    item.status.className = "cmd-status status-" + status;
    item.status.textContent = status;
    item.trail.textContent = item.statuses.join(" → ");
    item.li.dataset.status = status;
  }

  function onCommand(frame) {
    if (frame.device !== deviceId || typeof frame.id !== "string") return;
    let item = items.get(frame.id);
    if (!item && frame.ref !== undefined && sentRefs.has(String(frame.ref))) {
      item = sentRefs.get(String(frame.ref));
      sentRefs.delete(String(frame.ref));
    }
    if (!item) item = newItem(String(frame.name), undefined, Date.now() / 1000);
    items.set(frame.id, item);
    item.li.dataset.command = frame.id;
    setStatus(item, String(frame.status));
    if (frame.error !== undefined && frame.error !== null && frame.error !== "") {
      item.detail.replaceChildren(el("span", "cmd-error", String(frame.error)));
    } else if (frame.result !== undefined && frame.result !== null) {
      item.detail.replaceChildren(el("code", "cmd-result", JSON.stringify(frame.result)));
    }
  }

  function onError(frame) {
    const ref = frame.ref === undefined || frame.ref === null ? null : String(frame.ref);
    const item = ref !== null ? sentRefs.get(ref) : null;
    const message = (frame.code ? frame.code + ": " : "") + (frame.message || "refused");
    if (item) {
      sentRefs.delete(ref);
      setStatus(item, "refused");
      item.detail.replaceChildren(el("span", "cmd-error", message));
      showFormError(message);
    } else {
      console.warn("dashboard error", frame.code, frame.message);
    }
  }

  const form = document.getElementById("command-form");
  const nameInput = document.getElementById("command-name");
  const argsInput = document.getElementById("command-args");
  const formError = document.getElementById("command-error");

  function showFormError(message) {
    if (!formError) return;
    formError.textContent = message;
    formError.hidden = !message;
  }

  function sendCommand(name, args) {
    if (!NAME_RE.test(name)) {
      showFormError("The name must be 1-64 characters of A-Z a-z 0-9 _ . : -");
      return false;
    }
    const ref = "r" + (++refCounter) + "-" + Math.random().toString(36).slice(2, 8);
    if (!socket.send({ type: "command", device: deviceId, name: name, args: args, ref: ref })) {
      showFormError("Not connected: the command was not sent. Try again once the page is live.");
      return false;
    }
    showFormError("");
    const item = newItem(name, args, Date.now() / 1000);
    item.li.dataset.ref = ref;
    setStatus(item, "sending");
    sentRefs.set(ref, item);
    return true;
  }

  if (form) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const name = nameInput.value.trim();
      let args;
      const text = argsInput.value.trim();
      try {
        args = text === "" ? {} : JSON.parse(text);
      } catch (err) {
        showFormError("Arguments are not valid JSON: " + err.message);
        argsInput.focus();
        return;
      }
      if (args === null || typeof args !== "object" || Array.isArray(args)) {
        showFormError("Arguments must be a JSON object, e.g. {\"seconds\": 5}");
        argsInput.focus();
        return;
      }
      sendCommand(name, args);
    });
    for (const button of document.querySelectorAll("#quick .quick-btn")) {
      button.addEventListener("click", () => {
        let args = {};
        try {
          args = JSON.parse(button.dataset.args || "{}");
        } catch (err) {
          args = {};
        }
        nameInput.value = button.dataset.name;
        argsInput.value = JSON.stringify(args);
        if (button.dataset.fill) {
          argsInput.focus(); // a value to choose first: the form sends it
          return;
        }
        sendCommand(button.dataset.name, args);
      });
    }
  }

  // --- frames ---------------------------------------------------------------------------

  // Numbers and booleans (as 0/1 steps) are charted; diagnostic values only as tiles.
  function chartable(metric, value) {
    return (G.isNumber(value) || typeof value === "boolean") && !G.isDiagnostic(metric);
  }

  function applyMetrics(metrics, ts) {
    for (const [metric, value] of Object.entries(metrics || {})) {
      state.metrics[metric] = value;
      if (!chartable(metric, value)) continue;
      const chart = ensureChart(metric, true, typeof value === "boolean");
      if (G.isNumber(ts)) {
        addPoint(chart, ts, Number(value));
        markChart(metric);
      }
    }
  }

  let headerScheduled = false;
  function markHeader() {
    if (headerScheduled) return;
    headerScheduled = true;
    requestAnimationFrame(() => {
      headerScheduled = false;
      renderHeader();
    });
  }

  const socket = G.connect({
    snapshot(frame) {
      // Every (re)connection: replace the device's state, then reload the charts' history.
      const found = (frame.devices || []).find((d) => d && d.id === deviceId);
      Object.assign(state, { name: deviceId, online: false, last_seen: null, transport: "", convention: "", metrics: {} });
      if (found) Object.assign(state, found, { metrics: Object.assign({}, found.metrics || {}) });
      for (const [metric, value] of Object.entries(state.metrics)) {
        if (chartable(metric, value)) ensureChart(metric, false, typeof value === "boolean");
      }
      reloadAll();
      markHeader();
    },
    telemetry(frame) {
      if (frame.device !== deviceId) return;
      if (G.isNumber(frame.ts)) state.last_seen = frame.ts;
      state.online = true;
      applyMetrics(frame.metrics, frame.ts);
      markHeader();
    },
    status(frame) {
      if (frame.device !== deviceId) return;
      state.online = Boolean(frame.online);
      if (state.online && G.isNumber(frame.ts)) state.last_seen = frame.ts;
      markHeader();
    },
    rejection(frame) {
      if (frame.device !== deviceId) return;
      if (G.isNumber(frame.rejected)) state.rejected = frame.rejected;
      if (G.isNumber(frame.ts)) state.last_rejected_at = frame.ts;
      state.last_rejection = { reason: String(frame.reason || ""), detail: String(frame.detail || "") };
      markHeader();
    },
    command: onCommand,
    error: onError,
  }, () => "device=" + encodeURIComponent(deviceId)); // this device's frames alone

  loadDescriptions();

  G.onTick(() => {
    G.setBadge(badge, G.presence(state, staleSeconds));
    for (const metric of charts.keys()) markChart(metric); // slide the window
  });
})();

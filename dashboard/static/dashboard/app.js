// The device list at fleet scale (docs/interface.md §6.3): the page asks the server for ONE
// page of devices (a `view`: search, state, convention, sort, offset) and gets its rows, the
// fleet's counts and from then on frames for those devices only. Frames only mark rows dirty;
// one requestAnimationFrame renders the changed rows, and only their changed cells.
"use strict";

(function () {
  const G = window.Gateway;
  const el = G.el;
  const fleet = document.getElementById("fleet");
  const staleSeconds = Number(fleet.dataset.staleSeconds) || 120;
  const rejectingSeconds = Number(fleet.dataset.rejectingSeconds) || 600;
  const pageSize = Number(fleet.dataset.pageSize) || 50;
  const tbody = document.querySelector("#devices tbody");
  const empty = document.getElementById("empty");
  const filter = document.getElementById("filter");
  const sortSelect = document.getElementById("sort");
  const range = document.getElementById("range");
  const prev = document.getElementById("prev");
  const next = document.getElementById("next");
  const conventionBox = document.getElementById("conventions");
  const presenceButtons = [...document.querySelectorAll("#summary button[data-presence]")];
  const counts = {};
  for (const key of ["total", "problems", "alerting", "rejecting", "online", "stale", "offline"]) {
    counts[key] = document.getElementById("count-" + key);
  }
  const CONVENTIONS = ["native", "tasmota", "discovery", "zigbee2mqtt", "serial", "modbus"];

  // What this page looks at; sent on every (re)connection in the URL, and as a `view` frame.
  const view = { q: "", presence: "all", convention: "all", sort: "problems", offset: 0, limit: pageSize };
  let sent = 0; // ref of the last `view` frame sent: older answers are stale
  let total = 0;

  const devices = new Map(); // id → {id, name, online, last_seen, transport, metrics}: this page only
  const rows = new Map(); // id → {tr, name, idLabel, badge, rejection, transport, seen, metrics, chips}
  const dirty = new Set(); // ids to render on the next animation frame
  let renderScheduled = false;

  function deviceUrl(id) {
    return "/devices/" + encodeURIComponent(id) + "/";
  }

  function makeRow(id) {
    const tr = el("tr");
    tr.dataset.device = id;
    const cells = ["device", "status", "transport", "seen", "metrics"].map((cls) => el("td", cls));
    tr.append(...cells);
    const name = el("a", "name");
    name.href = deviceUrl(id);
    const idLabel = el("span", "id", id);
    cells[0].append(name, idLabel);
    const badge = el("span", "badge");
    // Shown while the device is rejecting: how many of its messages were rejected, the last
    // one's reason and description (device text: textContent only).
    const rejection = el("span", "rejection");
    rejection.hidden = true;
    cells[1].append(badge, rejection);
    return {
      tr, name, idLabel, badge, rejection,
      transport: cells[2], seen: cells[3], metrics: cells[4],
      chips: new Map(), // metric → value <span>
      chipKeys: "",
      lastSeen: undefined,
      text: "",
    };
  }

  function renderMetrics(row, metrics) {
    const names = Object.keys(metrics || {}).sort();
    const keys = names.join("\u0000");
    if (keys !== row.chipKeys) {
      row.chipKeys = keys;
      row.chips.clear();
      const chip = (name) => {
        const value = el("span", "metric-value");
        row.chips.set(name, value);
        const node = el("span", "metric");
        node.append(el("span", "metric-name", name), " ", value);
        return node;
      };
      // Diagnostic values go in a collapsed <details>, kept across renders (and so its
      // open/closed state).
      const diagnostic = names.filter(G.isDiagnostic);
      if (!row.diag) {
        row.diag = el("details", "diag");
        row.diagSummary = el("summary");
        row.diag.append(row.diagSummary);
      }
      row.diagSummary.textContent = diagnostic.length + " diagnostic";
      row.diag.replaceChildren(row.diagSummary, ...diagnostic.map(chip));
      const primary = names.filter((name) => !G.isDiagnostic(name)).map(chip);
      row.metrics.replaceChildren(...primary, ...(diagnostic.length ? [row.diag] : []));
    }
    for (const name of names) {
      const span = row.chips.get(name);
      const text = G.formatValue(metrics[name]);
      if (span.textContent !== text) span.textContent = text;
    }
  }

  // The rejection line of a row: "N rejected · reason: description" while rejecting.
  function renderRejection(row, device) {
    const on = G.rejecting(device, rejectingSeconds);
    const last = device.last_rejection || {};
    const text = on
      ? Number(device.rejected || 0).toLocaleString() + " rejected · " + String(last.reason || "") +
        (last.detail ? ": " + String(last.detail) : "")
      : "";
    if (row.rejection.textContent !== text) row.rejection.textContent = text;
    row.rejection.title = on && G.isNumber(device.last_rejected_at)
      ? "last rejected " + G.formatTime(device.last_rejected_at)
      : "";
    row.rejection.hidden = !on;
  }

  function renderRow(device) {
    let row = rows.get(device.id);
    if (!row) return;
    const name = device.name || device.id;
    if (row.name.textContent !== name) row.name.textContent = name;
    row.idLabel.hidden = name === device.id;
    G.setBadge(row.badge, G.presence(device, staleSeconds));
    renderRejection(row, device);
    const convention = G.conventionLabel(device);
    if (row.transport.textContent !== convention) {
      row.transport.textContent = convention;
      row.transport.title = device.transport ? "transport: " + device.transport : "";
    }
    if (row.lastSeen !== device.last_seen) {
      row.lastSeen = device.last_seen;
      if (G.isNumber(device.last_seen)) row.seen.replaceChildren(G.timeAgo(device.last_seen));
      else row.seen.textContent = "never";
    }
    renderMetrics(row, device.metrics);
  }

  function renderCounts(fleetCounts) {
    if (!fleetCounts || typeof fleetCounts !== "object") return;
    const presence = fleetCounts.presence || {};
    const numbers = {
      total: fleetCounts.total, problems: fleetCounts.problems, alerting: fleetCounts.alerting,
      rejecting: fleetCounts.rejecting,
      online: presence.online, stale: presence.stale, offline: presence.offline,
    };
    for (const [key, value] of Object.entries(numbers)) {
      const text = (G.isNumber(value) ? value : 0).toLocaleString();
      if (counts[key].textContent !== text) counts[key].textContent = text;
    }
    const byConvention = fleetCounts.conventions || {};
    const chips = CONVENTIONS.filter((c) => byConvention[c] > 0 || view.convention === c).map((c) => {
      const button = el("button", "count count-convention");
      button.type = "button";
      button.dataset.convention = c;
      button.setAttribute("aria-pressed", String(view.convention === c));
      button.append(el("b", null, (byConvention[c] || 0).toLocaleString()), " " + G.conventionLabel({ convention: c }));
      return button;
    });
    conventionBox.replaceChildren(...chips);
  }

  function renderPager() {
    const first = total ? view.offset + 1 : 0;
    const last = Math.min(view.offset + rows.size, total);
    range.textContent = first.toLocaleString() + "–" + last.toLocaleString() + " of " + total.toLocaleString();
    prev.disabled = view.offset <= 0;
    next.disabled = view.offset + view.limit >= total;
    empty.hidden = total > 0;
    empty.textContent = view.q || view.presence !== "all" || view.convention !== "all"
      ? "No device matches."
      : "No devices yet. They appear here on their first message.";
    for (const button of presenceButtons) {
      button.setAttribute("aria-pressed", String(button.dataset.presence === view.presence));
    }
  }

  function render() {
    renderScheduled = false;
    const flash = dirty.size <= 50; // a whole page changing at once needs no highlight
    for (const id of dirty) {
      const device = devices.get(id);
      const row = rows.get(id);
      if (!device || !row) continue;
      renderRow(device);
      if (flash && row.metrics.animate) {
        row.metrics.animate(
          [{ backgroundColor: "var(--flash)" }, { backgroundColor: "transparent" }],
          { duration: 700, easing: "ease-out" },
        );
      }
    }
    dirty.clear();
  }

  function markDirty(id) {
    dirty.add(id);
    if (renderScheduled) return;
    renderScheduled = true;
    requestAnimationFrame(render);
  }

  // A snapshot or `view` frame: REPLACE the page with its rows, in the server's order.
  function onPage(frame) {
    if (frame.type === "view" && frame.ref !== undefined && frame.ref !== sent) return; // superseded
    const v = frame.view || {};
    if (G.isNumber(v.offset)) view.offset = v.offset;
    total = G.isNumber(v.total) ? v.total : (frame.devices || []).length;
    devices.clear();
    rows.clear();
    dirty.clear();
    const fragment = document.createDocumentFragment();
    for (const d of frame.devices || []) {
      if (!d || typeof d.id !== "string" || devices.has(d.id)) continue;
      const copy = Object.assign({ metrics: {} }, d, { metrics: Object.assign({}, d.metrics || {}) });
      devices.set(d.id, copy);
      const row = makeRow(d.id);
      rows.set(d.id, row);
      fragment.appendChild(row.tr);
      renderRow(copy);
    }
    tbody.replaceChildren(fragment);
    renderCounts(frame.fleet);
    renderPager();
  }

  function query() {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(view)) params.set(key, String(value));
    return params.toString();
  }

  const socket = G.connect({
    snapshot: onPage,
    view: onPage,
    fleet(frame) {
      renderCounts(frame.fleet);
    },
    telemetry(frame) {
      const d = devices.get(frame.device); // devices off this page are not ours to show
      if (!d) return;
      Object.assign(d.metrics, frame.metrics || {});
      if (G.isNumber(frame.ts)) d.last_seen = frame.ts;
      d.online = true;
      markDirty(d.id);
    },
    status(frame) {
      const d = devices.get(frame.device);
      if (!d) return;
      d.online = Boolean(frame.online);
      if (G.isNumber(frame.ts) && d.online) d.last_seen = frame.ts;
      markDirty(d.id);
    },
    rejection(frame) {
      const d = devices.get(frame.device);
      if (!d) return;
      if (G.isNumber(frame.rejected)) d.rejected = frame.rejected;
      if (G.isNumber(frame.ts)) d.last_rejected_at = frame.ts;
      d.last_rejection = { reason: String(frame.reason || ""), detail: String(frame.detail || "") };
      markDirty(d.id);
    },
    error(frame) {
      console.warn("dashboard error", frame.code, frame.message);
    },
  }, query);

  // Ask for the current view; the answer replaces the page (only the newest answer counts).
  function ask(resetOffset) {
    if (resetOffset) view.offset = 0;
    sent += 1;
    socket.send(Object.assign({ type: "view", ref: sent }, view));
  }

  filter.addEventListener("input", () => {
    view.q = filter.value.trim().toLowerCase().slice(0, 100);
    ask(true);
  });
  sortSelect.addEventListener("change", () => {
    view.sort = sortSelect.value;
    ask(true);
  });
  for (const button of presenceButtons) {
    button.addEventListener("click", () => {
      view.presence = button.dataset.presence;
      ask(true);
    });
  }
  conventionBox.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-convention]");
    if (!button) return;
    view.convention = view.convention === button.dataset.convention ? "all" : button.dataset.convention;
    ask(true);
  });
  prev.addEventListener("click", () => {
    view.offset = Math.max(0, view.offset - view.limit);
    ask(false);
  });
  next.addEventListener("click", () => {
    view.offset += view.limit;
    ask(false);
  });

  // The page's one clock (live.js) also re-evaluates "stale" and "rejecting" without a frame.
  G.onTick(() => {
    for (const [id, row] of rows) {
      const device = devices.get(id);
      G.setBadge(row.badge, G.presence(device, staleSeconds));
      renderRejection(row, device);
    }
  });
})();

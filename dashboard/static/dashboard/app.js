// The live device list: a snapshot on connect, then telemetry/status frames (docs/interface.md §6).
// Frames only mark devices dirty; one requestAnimationFrame renders the changed rows, and
// only their changed cells, so hundreds of devices reporting every second stay smooth.
"use strict";

(function () {
  const G = window.Gateway;
  const el = G.el;
  const fleet = document.getElementById("fleet");
  const staleSeconds = Number(fleet.dataset.staleSeconds) || 120;
  const tbody = document.querySelector("#devices tbody");
  const empty = document.getElementById("empty");
  const filter = document.getElementById("filter");
  const counts = {
    online: document.getElementById("count-online"),
    stale: document.getElementById("count-stale"),
    offline: document.getElementById("count-offline"),
  };

  const devices = new Map(); // id → {id, name, online, last_seen, transport, metrics}
  const rows = new Map(); // id → {tr, name, idLabel, badge, transport, seen, metrics, chips}
  const dirty = new Set(); // ids to render on the next animation frame
  let renderScheduled = false;
  let needle = "";

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
    cells[1].appendChild(badge);
    return {
      tr, name, idLabel, badge,
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

  function renderRow(device) {
    let row = rows.get(device.id);
    if (!row) {
      row = makeRow(device.id);
      rows.set(device.id, row);
      insertSorted(row.tr, device.id);
    }
    const name = device.name || device.id;
    if (row.name.textContent !== name) row.name.textContent = name;
    row.idLabel.hidden = name === device.id;
    row.text = (name + " " + device.id).toLowerCase();
    row.tr.hidden = needle !== "" && !row.text.includes(needle);
    G.setBadge(row.badge, G.presence(device, staleSeconds));
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

  function insertSorted(tr, id) {
    // Rows are kept in id order; new devices are rare, so a linear scan is fine.
    for (const other of tbody.children) {
      if (other.dataset.device > id) {
        tbody.insertBefore(tr, other);
        return;
      }
    }
    tbody.appendChild(tr);
  }

  function renderSummary() {
    const n = { online: 0, stale: 0, offline: 0 };
    for (const device of devices.values()) n[G.presence(device, staleSeconds)] += 1;
    for (const key of Object.keys(n)) {
      const text = String(n[key]);
      if (counts[key].textContent !== text) counts[key].textContent = text;
    }
    empty.hidden = devices.size > 0;
  }

  function render() {
    renderScheduled = false;
    const flash = dirty.size <= 50; // a whole fleet changing at once needs no highlight
    for (const id of dirty) {
      const device = devices.get(id);
      if (!device) continue;
      renderRow(device);
      if (flash && rows.get(id).tr.animate) {
        rows.get(id).metrics.animate(
          [{ backgroundColor: "var(--flash)" }, { backgroundColor: "transparent" }],
          { duration: 700, easing: "ease-out" },
        );
      }
    }
    dirty.clear();
    renderSummary();
  }

  function markDirty(id) {
    dirty.add(id);
    if (renderScheduled) return;
    renderScheduled = true;
    requestAnimationFrame(render);
  }

  function device(id) {
    let d = devices.get(id);
    if (!d) {
      d = { id: id, name: id, online: false, last_seen: null, transport: "", metrics: {} };
      devices.set(id, d);
    }
    return d;
  }

  function onSnapshot(frame) {
    // Replace everything: a reconnect must not duplicate or keep forgotten devices.
    devices.clear();
    rows.clear();
    dirty.clear();
    const list = (frame.devices || []).slice().sort((a, b) => (a.id < b.id ? -1 : 1));
    const fragment = document.createDocumentFragment();
    for (const d of list) {
      if (!d || typeof d.id !== "string") continue;
      const copy = Object.assign({ metrics: {} }, d);
      devices.set(d.id, copy);
      const row = makeRow(d.id);
      rows.set(d.id, row);
      fragment.appendChild(row.tr);
      renderRow(copy);
    }
    tbody.replaceChildren(fragment);
    renderSummary();
  }

  G.connect({
    snapshot: onSnapshot,
    telemetry(frame) {
      if (typeof frame.device !== "string") return;
      const d = device(frame.device);
      Object.assign(d.metrics, frame.metrics || {});
      if (G.isNumber(frame.ts)) d.last_seen = frame.ts;
      d.online = true;
      markDirty(d.id);
    },
    status(frame) {
      if (typeof frame.device !== "string") return;
      const d = device(frame.device);
      d.online = Boolean(frame.online);
      if (G.isNumber(frame.ts) && d.online) d.last_seen = frame.ts;
      markDirty(d.id);
    },
    error(frame) {
      console.warn("dashboard error", frame.code, frame.message);
    },
  });

  filter.addEventListener("input", () => {
    needle = filter.value.trim().toLowerCase();
    for (const row of rows.values()) row.tr.hidden = needle !== "" && !row.text.includes(needle);
  });

  // The page's one clock (live.js) also re-evaluates "stale" without waiting for a frame.
  G.onTick(() => {
    for (const [id, row] of rows) G.setBadge(row.badge, G.presence(devices.get(id), staleSeconds));
    renderSummary();
  });
})();

// The live device table: a snapshot on connect, then telemetry/status frames (CONTRACT §6).
// Everything that comes from devices is inserted with textContent / DOM APIs, never as markup.
"use strict";

(function () {
  const WS_PATH = "/ws/dashboard/";
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 30000;

  const devices = new Map(); // id → {id, name, online, last_seen, transport, metrics}
  const rows = new Map(); // id → <tr>
  const dirty = new Set(); // ids to re-render on the next animation frame
  let renderScheduled = false;
  let attempts = 0;
  let socket = null;

  const tbody = document.querySelector("#devices tbody");
  const empty = document.getElementById("empty");
  const conn = document.getElementById("conn");

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setConnection(state, text) {
    conn.className = "conn conn-" + state;
    conn.textContent = text;
  }

  function formatValue(value) {
    if (typeof value === "boolean") return value ? "true" : "false";
    if (typeof value === "number") {
      return value.toLocaleString(undefined, { maximumFractionDigits: 3 });
    }
    return String(value);
  }

  function formatAgo(epochSeconds) {
    if (epochSeconds === null || epochSeconds === undefined) return "never";
    const seconds = Math.max(0, Math.round(Date.now() / 1000 - epochSeconds));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return new Date(epochSeconds * 1000).toLocaleString();
  }

  function renderSeen(cell, lastSeen) {
    cell.replaceChildren();
    if (lastSeen === null || lastSeen === undefined) {
      cell.textContent = "never";
      return;
    }
    const time = el("time", null, formatAgo(lastSeen));
    const date = new Date(lastSeen * 1000);
    time.dateTime = date.toISOString();
    time.title = date.toLocaleString();
    time.dataset.epoch = String(lastSeen);
    cell.appendChild(time);
  }

  function renderRow(device) {
    let tr = rows.get(device.id);
    if (!tr) {
      tr = el("tr");
      tr.dataset.device = device.id;
      for (const cls of ["device", "status", "transport", "seen", "metrics"]) {
        tr.appendChild(el("td", cls));
      }
      rows.set(device.id, tr);
      insertSorted(tr, device.id);
    }
    const [cellDevice, cellStatus, cellTransport, cellSeen, cellMetrics] = tr.children;

    cellDevice.replaceChildren(el("span", "name", device.name || device.id));
    if (device.name && device.name !== device.id) {
      cellDevice.appendChild(el("span", "id", device.id));
    }
    cellStatus.replaceChildren(
      el("span", "badge " + (device.online ? "badge-online" : "badge-offline"),
        device.online ? "online" : "offline"),
    );
    cellTransport.textContent = device.transport || "";
    renderSeen(cellSeen, device.last_seen);

    cellMetrics.replaceChildren();
    for (const name of Object.keys(device.metrics || {}).sort()) {
      const chip = el("span", "metric");
      chip.append(el("span", "metric-name", name), " ",
        el("span", "metric-value", formatValue(device.metrics[name])));
      cellMetrics.appendChild(chip);
    }
    empty.hidden = rows.size > 0;
  }

  function insertSorted(tr, id) {
    for (const other of tbody.children) {
      if (other.dataset.device > id) {
        tbody.insertBefore(tr, other);
        return;
      }
    }
    tbody.appendChild(tr);
  }

  function flash(id) {
    const tr = rows.get(id);
    if (!tr) return;
    tr.classList.remove("flash");
    void tr.offsetWidth; // restart the transition
    tr.classList.add("flash");
    setTimeout(() => tr.classList.remove("flash"), 150);
  }

  function markDirty(id) {
    dirty.add(id);
    if (renderScheduled) return;
    renderScheduled = true;
    requestAnimationFrame(() => {
      renderScheduled = false;
      for (const dirtyId of dirty) {
        const device = devices.get(dirtyId);
        if (device) {
          renderRow(device);
          flash(dirtyId);
        }
      }
      dirty.clear();
    });
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
    devices.clear();
    rows.clear();
    dirty.clear();
    tbody.replaceChildren();
    for (const d of frame.devices || []) {
      devices.set(d.id, Object.assign({ metrics: {} }, d));
      renderRow(devices.get(d.id));
    }
    empty.hidden = rows.size > 0;
  }

  const handlers = {
    snapshot: onSnapshot,
    telemetry(frame) {
      const d = device(frame.device);
      Object.assign(d.metrics, frame.metrics || {});
      if (typeof frame.ts === "number") d.last_seen = frame.ts;
      markDirty(d.id);
    },
    status(frame) {
      const d = device(frame.device);
      d.online = Boolean(frame.online);
      if (typeof frame.ts === "number" && d.online) d.last_seen = frame.ts;
      markDirty(d.id);
    },
    command() {}, // the command panel comes with the full dashboard
    error(frame) {
      console.warn("dashboard error", frame.code, frame.message);
    },
  };

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    setConnection("connecting", "connecting…");
    socket = new WebSocket(scheme + location.host + WS_PATH);
    socket.onopen = () => {
      attempts = 0;
      setConnection("connected", "live");
    };
    socket.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        console.warn("dashboard: frame is not JSON", err);
        return;
      }
      const handler = frame && handlers[frame.type];
      if (handler) handler(frame);
    };
    socket.onclose = () => {
      socket = null;
      // Exponential backoff with jitter, so a restarted gateway isn't hit by every tab at once.
      const delay = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempts) * (0.5 + Math.random() / 2);
      attempts = Math.min(attempts + 1, 10);
      setConnection("disconnected", "disconnected — retrying in " + Math.ceil(delay / 1000) + " s");
      setTimeout(connect, delay);
    };
  }

  // Keep "x s ago" honest without re-rendering rows.
  setInterval(() => {
    for (const time of tbody.querySelectorAll("time[data-epoch]")) {
      time.textContent = formatAgo(Number(time.dataset.epoch));
    }
  }, 5000);

  connect();
})();

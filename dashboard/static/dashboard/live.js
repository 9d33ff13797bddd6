// Shared by the dashboard pages: the /ws/dashboard/ client (docs/interface.md §6) and small helpers.
// Everything that comes from devices or users is inserted with textContent / DOM APIs only.
"use strict";

window.Gateway = (function () {
  const WS_PATH = "/ws/dashboard/";
  const BACKOFF_MIN_MS = 500;
  const BACKOFF_MAX_MS = 30000;
  const TICK_MS = 5000;

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function isNumber(value) {
    return typeof value === "number" && Number.isFinite(value);
  }

  function formatValue(value) {
    if (typeof value === "boolean") return value ? "true" : "false";
    if (isNumber(value)) return value.toLocaleString(undefined, { maximumFractionDigits: 3 });
    if (value === null || value === undefined) return "–";
    return String(value);
  }

  // Times across the app: the browser's time zone, ISO-like ("2026-12-04 09:15:54"); the
  // page header names the zone (zoneName).
  const pad = (n, width = 2) => String(n).padStart(width, "0");
  function formatDate(epochSeconds) {
    const d = new Date(epochSeconds * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate());
  }
  function formatClock(epochSeconds, withSeconds = true) {
    const d = new Date(epochSeconds * 1000);
    const hm = pad(d.getHours()) + ":" + pad(d.getMinutes());
    return withSeconds ? hm + ":" + pad(d.getSeconds()) : hm;
  }
  function formatTime(epochSeconds) {
    return formatDate(epochSeconds) + " " + formatClock(epochSeconds);
  }
  function zoneName() {
    const minutes = -new Date().getTimezoneOffset();
    const sign = minutes < 0 ? "-" : "+";
    const offset = "UTC" + sign + pad(Math.floor(Math.abs(minutes) / 60)) + ":" + pad(Math.abs(minutes) % 60);
    let zone = "";
    try {
      zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
    } catch (err) {
      zone = "";
    }
    return zone && zone !== "UTC" ? zone + " (" + offset + ")" : offset;
  }

  // Diagnostic values (as Home Assistant's `entity_category: diagnostic`): the device's own
  // health and radio, not what it measures; shown collapsed.
  const DIAGNOSTIC = /^(Uptime|UptimeSec|uptime|Heap|LoadAvg|Sleep|SleepMode|MqttCount|Vcc|rssi|RSSI|linkquality|Wifi\..+|wifi\..+)$/;
  function isDiagnostic(metric) {
    return DIAGNOSTIC.test(metric);
  }

  // A device's convention (docs/interface.md §5.2) as shown; its transport when unknown.
  const CONVENTIONS = { native: "native", tasmota: "Tasmota", discovery: "discovery", zigbee2mqtt: "Zigbee2MQTT", serial: "serial", modbus: "Modbus" };
  function conventionLabel(device) {
    const c = device.convention;
    if (typeof c === "string" && Object.hasOwn(CONVENTIONS, c)) return CONVENTIONS[c];
    return device.transport || "";
  }

  function formatAgo(epochSeconds) {
    if (epochSeconds === null || epochSeconds === undefined) return "never";
    const seconds = Math.max(0, Math.round(Date.now() / 1000 - epochSeconds));
    if (seconds < 60) return seconds + " s ago";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h ago";
    return formatTime(epochSeconds);
  }

  // A <time> element showing "x s ago"; the page's one clock refreshes every data-epoch.
  function timeAgo(epochSeconds) {
    const time = el("time", null, formatAgo(epochSeconds));
    const date = new Date(epochSeconds * 1000);
    time.dateTime = date.toISOString();
    time.title = formatTime(epochSeconds);
    time.dataset.epoch = String(epochSeconds);
    return time;
  }

  // "online", "stale" (online but silent for longer than staleSeconds) or "offline".
  function presence(device, staleSeconds) {
    if (!device.online) return "offline";
    if (isNumber(device.last_seen) && Date.now() / 1000 - device.last_seen > staleSeconds) {
      return "stale";
    }
    return "online";
  }

  // Whether the device's latest rejected message is at most windowSeconds old (the server's
  // "rejecting" state, docs/interface.md §6.3).
  function rejecting(device, windowSeconds) {
    return isNumber(device.last_rejected_at) && Date.now() / 1000 - device.last_rejected_at <= windowSeconds;
  }

  function setBadge(badge, state) {
    if (badge.dataset.state === state) return;
    badge.dataset.state = state;
    badge.className = "badge badge-" + state;
    badge.textContent = state;
  }

  // Times the server rendered (UTC) in the same convention, and the zone in the header.
  function localiseServerTimes() {
    for (const time of document.querySelectorAll("time[datetime]:not([data-epoch])")) {
      const epoch = Date.parse(time.dateTime) / 1000;
      if (!isNumber(epoch)) continue;
      time.textContent = formatTime(epoch);
      time.title = time.dateTime;
    }
    const zone = document.getElementById("tz");
    if (zone) {
      zone.textContent = "Times in " + zoneName();
      zone.hidden = false;
    }
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", localiseServerTimes);
  } else {
    localiseServerTimes();
  }

  // ONE timer for the whole page: relative times and staleness are refreshed together.
  const tickers = [];
  function onTick(callback) {
    tickers.push(callback);
  }
  setInterval(() => {
    for (const time of document.querySelectorAll("time[data-epoch]")) {
      const text = formatAgo(Number(time.dataset.epoch));
      if (time.textContent !== text) time.textContent = text;
    }
    for (const callback of tickers) callback();
  }, TICK_MS);

  // Extra listeners by frame type, for page parts that live in their own script (alerts.js):
  // each is called after the page's own handler, snapshots included.
  const listeners = Object.create(null);
  function on(type, callback) {
    (listeners[type] = listeners[type] || []).push(callback);
  }

  // A WebSocket that reconnects with exponential backoff and jitter. `handlers` maps frame
  // types to functions; every (re)connection starts with a snapshot, which the page must use
  // to REPLACE its state. `query()`, when given, returns the URL's query string on each
  // (re)connection: a view (docs/interface.md §6.3) so the snapshot holds one page, not the
  // fleet. A `batch` frame's frames are handled one by one, in order, as if each came alone.
  // Returns {send(frame) → bool, isOpen()}.
  function connect(handlers, query) {
    const conn = document.getElementById("conn");
    let socket = null;
    let attempts = 0;
    let retryTimer = null;

    function setConnection(state, text) {
      if (!conn) return;
      conn.className = "conn conn-" + state;
      conn.textContent = text;
      document.body.classList.toggle("is-disconnected", state === "disconnected");
    }

    function handle(frame) {
      if (!frame || typeof frame.type !== "string") return;
      // Own properties only: a frame typed "constructor" must not reach Object's.
      const handler = Object.hasOwn(handlers, frame.type) ? handlers[frame.type] : null;
      const extra = Object.hasOwn(listeners, frame.type) ? listeners[frame.type] : [];
      for (const callback of [handler, ...extra]) {
        if (typeof callback !== "function") continue;
        try {
          callback(frame);
        } catch (err) {
          console.error("dashboard: handling a " + frame.type + " frame failed", err);
        }
      }
    }

    function open() {
      retryTimer = null;
      const scheme = location.protocol === "https:" ? "wss://" : "ws://";
      setConnection("connecting", attempts ? "reconnecting…" : "connecting…");
      // batch=1: a loop turn's telemetry and status frames may come as one `batch` frame.
      const view = typeof query === "function" ? query() : "";
      const search = view ? view + "&batch=1" : "batch=1";
      socket = new WebSocket(scheme + location.host + WS_PATH + "?" + search);
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
        if (frame && frame.type === "batch" && Array.isArray(frame.frames)) {
          for (const inner of frame.frames) handle(inner);
        } else {
          handle(frame);
        }
      };
      socket.onclose = () => {
        socket = null;
        // Exponential backoff with jitter, so a restarted gateway isn't hit by every tab at once.
        const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** attempts);
        const delay = base * (0.5 + Math.random() / 2);
        attempts = Math.min(attempts + 1, 10);
        setConnection("disconnected", "disconnected — retrying in " + Math.ceil(delay / 1000) + " s");
        if (handlers.close) handlers.close();
        retryTimer = setTimeout(open, delay);
      };
    }

    // Back on the network: don't wait out the backoff.
    window.addEventListener("online", () => {
      if (retryTimer !== null) {
        clearTimeout(retryTimer);
        open();
      }
    });

    open();
    return {
      send(frame) {
        if (!socket || socket.readyState !== WebSocket.OPEN) return false;
        socket.send(JSON.stringify(frame));
        return true;
      },
      isOpen() {
        return Boolean(socket && socket.readyState === WebSocket.OPEN);
      },
    };
  }

  return {
    el, isNumber, formatValue, formatAgo, formatTime, formatDate, formatClock, zoneName, timeAgo,
    isDiagnostic, conventionLabel, presence, rejecting, setBadge, onTick, on, connect,
  };
})();

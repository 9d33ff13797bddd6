// The alerts panel of the device list: active alerts, live from `alert` frames (docs/alerts.md),
// a badge on each alerting device's row, and an Ack button for users allowed to acknowledge.
// On every (re)connection the active list is fetched again from /api/alerts/?state=active.
// Everything from rules, devices and users is inserted with textContent / DOM APIs only.
"use strict";

(function () {
  const G = window.Gateway;
  const el = G.el;
  const panel = document.getElementById("alerts");
  if (!panel) return;
  const list = document.getElementById("alert-list");
  const count = document.getElementById("alerts-count");
  const empty = document.getElementById("alerts-empty");
  const canAck = panel.dataset.canAck === "1";
  const SEVERITY_ORDER = { critical: 0, warning: 1, info: 2 };

  const active = new Map(); // alert id → alert (as in the list API)
  let generation = 0; // only the latest refetch counts
  let heard = null; // alerts from frames while a refetch is on its way (newer than its answer)

  function csrfToken() {
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  function severity(alert) {
    return Object.hasOwn(SEVERITY_ORDER, alert.severity) ? alert.severity : "info";
  }

  function item(alert) {
    const li = el("li", "alert alert-" + severity(alert));
    li.dataset.alert = String(alert.id);
    const badge = el("span", "badge badge-severity", severity(alert));
    const name = el("span", "alert-rule", alert.rule_name || "rule " + alert.rule);
    const device = el("a", "alert-device", alert.device);
    device.href = "/devices/" + encodeURIComponent(alert.device) + "/";
    const head = el("div", "alert-head");
    head.append(badge, " ", name, " on ", device);
    const meta = el("div", "alert-meta");
    if (G.isNumber(alert.value)) meta.append(el("span", "alert-value", G.formatValue(alert.value)), " · ");
    meta.append("raised ");
    if (G.isNumber(alert.raised_at)) meta.append(G.timeAgo(alert.raised_at));
    li.append(head, meta);
    if (alert.acknowledged) {
      const who = alert.acknowledged_by ? " by " + alert.acknowledged_by : "";
      li.append(el("div", "alert-ack", "acknowledged" + who));
    } else if (canAck) {
      const button = el("button", "alert-ack-button", "Ack");
      button.type = "button";
      button.setAttribute("aria-label", "Acknowledge alert " + alert.id);
      button.addEventListener("click", () => acknowledge(alert.id, button));
      li.append(button);
    }
    return li;
  }

  function render() {
    const alerts = [...active.values()].sort(
      (a, b) =>
        SEVERITY_ORDER[severity(a)] - SEVERITY_ORDER[severity(b)] || (b.raised_at || 0) - (a.raised_at || 0),
    );
    list.replaceChildren(...alerts.map(item));
    count.textContent = String(alerts.length);
    empty.hidden = alerts.length > 0;
    badges();
  }

  // A badge in each alerting device's row (rows are rebuilt by app.js, so this runs again
  // after every change, snapshot and clock tick).
  function badges() {
    const worst = new Map(); // device → severity
    for (const alert of active.values()) {
      const current = worst.get(alert.device);
      if (!current || SEVERITY_ORDER[severity(alert)] < SEVERITY_ORDER[current]) {
        worst.set(alert.device, severity(alert));
      }
    }
    for (const tr of document.querySelectorAll("#devices tbody tr[data-device]")) {
      const cell = tr.querySelector("td.status");
      if (!cell) continue;
      let badge = cell.querySelector(".alert-badge");
      const level = worst.get(tr.dataset.device);
      if (!level) {
        if (badge) badge.remove();
        continue;
      }
      if (!badge) {
        badge = el("span", "badge alert-badge");
        cell.append(" ", badge);
      }
      if (badge.dataset.level !== level) {
        badge.dataset.level = level;
        badge.className = "badge alert-badge alert-badge-" + level;
        badge.textContent = "alert";
        badge.title = level + " alert";
      }
    }
  }

  function apply(alert) {
    if (!alert || typeof alert.id !== "number" || typeof alert.device !== "string") return;
    if (alert.state === "active") active.set(alert.id, alert);
    else active.delete(alert.id);
  }

  async function refetch() {
    const mine = ++generation;
    heard = [];
    try {
      const response = await fetch("/api/alerts/?state=active", {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const alerts = await response.json();
      if (mine !== generation) return; // a newer refetch owns `heard`
      if (!Array.isArray(alerts)) throw new Error("not a list");
      active.clear();
      alerts.forEach(apply);
      heard.forEach(apply);
      render();
    } catch (err) {
      console.warn("alerts: could not load the active alerts", err);
    } finally {
      if (mine === generation) heard = null;
    }
  }

  async function acknowledge(id, button) {
    button.disabled = true;
    try {
      const response = await fetch("/api/alerts/" + encodeURIComponent(id) + "/ack", {
        method: "POST",
        credentials: "same-origin",
        headers: { Accept: "application/json", "Content-Type": "application/json", "X-CSRFToken": csrfToken() },
        body: "{}",
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      apply(await response.json()); // the frame follows; this is for a slow socket
      render();
    } catch (err) {
      button.disabled = false;
      console.warn("alerts: acknowledging alert " + id + " failed", err);
    }
  }

  G.on("snapshot", () => {
    render(); // the rows were rebuilt: put the badges back, then refresh from the API
    refetch();
  });
  G.on("view", badges); // another page of rows: badge the alerting ones
  G.on("alert", (frame) => {
    if (heard) heard.push(frame.alert);
    apply(frame.alert);
    render();
  });
  G.onTick(badges);
})();

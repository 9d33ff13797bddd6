// uPlot options for the device page's charts (device.js): axes as wide as their labels, ticks
// with the decimals their step needs, times in the browser's zone (live.js), the chosen window
// on the x axis, on/off metrics as 0/1 steps.
"use strict";

window.GatewayCharts = (function () {
  const G = window.Gateway;

  function colours() {
    const css = getComputedStyle(document.documentElement);
    const v = (name) => css.getPropertyValue(name).trim();
    return { accent: v("--accent"), muted: v("--muted"), line: v("--line"), fill: v("--accent-fill") };
  }

  // An axis as wide as its longest label (uPlot calls this again once the labels are known),
  // so "1006.5" is never clipped to "..,006.5".
  function axisSize(self, labels, axisIdx, cycleNum) {
    const axis = self.axes[axisIdx];
    if (cycleNum > 1) return axis._size;
    let size = axis.ticks.size + axis.gap;
    const longest = (labels || []).reduce((a, b) => (String(b).length > a.length ? String(b) : a), "");
    if (longest) {
      self.ctx.font = axis.font[0];
      size += self.ctx.measureText(longest).width / (window.devicePixelRatio || 1);
    }
    return Math.ceil(size) + 4;
  }

  // Value ticks with as many decimals as their step needs ("19.5", never ":19.500").
  function valueTicks(self, splits) {
    const step = splits.length > 1 ? Math.abs(splits[1] - splits[0]) : 1;
    const decimals = step > 0 ? Math.min(6, Math.max(0, -Math.floor(Math.log10(step) + 1e-9))) : 0;
    return splits.map((v) => (v === null || v === undefined ? "" : v.toFixed(decimals)));
  }

  // Time ticks in the browser's zone, ISO-like: "09:15", "09:15:30", a date where the day changes.
  function timeTicks(windowSeconds) {
    return (self, splits, axisIdx, space, incr) => {
      let lastDay = "";
      return splits.map((t) => {
        const day = G.formatDate(t);
        const clock = G.formatClock(t, incr < 60);
        const withDay = windowSeconds() >= 86400 && day !== lastDay;
        lastDay = day;
        return withDay ? day.slice(5) + " " + clock : clock;
      });
    };
  }

  // Options of one chart: `card` gets the drawn labels, `windowSeconds()` is the chosen window.
  function options({ metric, width, height, boolean, card, windowSeconds }) {
    const c = colours();
    const axis = {
      stroke: c.muted,
      grid: { stroke: c.line, width: 1 },
      ticks: { stroke: c.line, width: 1 },
      font: "12px system-ui, sans-serif",
    };
    const series = { label: metric, stroke: c.accent, width: 2, fill: c.fill, points: { show: false } };
    // The drawn labels are also on the card (data-x-ticks, data-y-ticks), for tests and tools.
    const shown = (format, key) => (self, splits, ...rest) => {
      const labels = format(self, splits, ...rest);
      card.dataset[key] = labels.join("|");
      return labels;
    };
    const y = Object.assign({}, axis, { size: axisSize, values: shown(valueTicks, "yTicks") });
    const scales = {
      // The whole window, whatever the data covers: a short series gets minute ticks.
      x: { time: true, range: () => [Date.now() / 1000 - windowSeconds(), Date.now() / 1000] },
    };
    // A flat or single-point series gets a narrow band around its value, not 0-2000.
    scales.y = {
      range: (self, min, max) => {
        if (!G.isNumber(min) || !G.isNumber(max)) return [0, 1];
        if (min === max) {
          const pad = Math.abs(min) * 0.01 || 1;
          return [min - pad, max + pad];
        }
        return window.uPlot.rangeNum(min, max, 0.1, true);
      },
    };
    if (boolean) {
      // On/off values (relays, switches): steps between 0 and 1.
      series.paths = window.uPlot.paths.stepped({ align: 1 });
      scales.y = { range: [-0.1, 1.1] };
      y.splits = () => [0, 1];
      y.values = shown((self, splits) => splits.map((v) => (v === 1 ? "on" : v === 0 ? "off" : "")), "yTicks");
    }
    return {
      width: width,
      height: height,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: scales,
      series: [{}, series],
      axes: [Object.assign({}, axis, { values: shown(timeTicks(windowSeconds), "xTicks") }), y],
    };
  }

  return { options };
})();

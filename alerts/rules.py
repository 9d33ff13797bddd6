"""Alert rules as input (validation of the API's JSON) and as compiled, in-memory matchers.

A rule's `device` is a device id or an fnmatch glob (``*``, ``?``, ``[...]``) of at most
`MAX_PATTERN` characters; a glob is compiled once into a regular expression and its answer per
device is cached. `quiet_band` sums up a device's rules of one metric as the values for which
none of them holds, so the evaluator judges them one by one only for a value outside it.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from alerts.models import AlertRule, Op, Severity
from devices.telemetry.parsing import valid_metric_name

MAX_PATTERN = 128
MAX_NAME = 200
MAX_FOR = 7 * 24 * 3600.0  # a week
MAX_NOTIFY_URLS = 10
MAX_URL = 2000
#: Device ids are 1-64 of [A-Za-z0-9_-]; a pattern may add the glob characters.
PATTERN_RE = re.compile(rf"^[A-Za-z0-9_\-*?\[\]!]{{1,{MAX_PATTERN}}}\Z")
GLOB_CHARS = frozenset("*?[")
METRIC_OPS = (Op.ABOVE, Op.BELOW, Op.OUTSIDE, Op.EQUALS)


class RuleError(ValueError):
    """The rule cannot be stored; the message says why (answered with 400)."""


def _number(data: dict[str, Any], key: str, *, required: bool) -> float | None:
    value = data.get(key)
    if value is None:
        if required:
            raise RuleError(f"{key} is required for this op")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RuleError(f"{key} must be a number")
    value = float(value)
    if not math.isfinite(value) or abs(value) > 1e15:
        raise RuleError(f"{key} must be a finite number")
    return value


def parse_rule(data: Any) -> dict[str, Any]:
    """Validate the API's rule JSON into `AlertRule` field values, or raise `RuleError`."""
    if not isinstance(data, dict):
        raise RuleError("a rule is a JSON object")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME:
        raise RuleError(f"name must be a non-empty string of at most {MAX_NAME} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise RuleError("name must not contain control characters")
    device = data.get("device")
    if not isinstance(device, str) or not PATTERN_RE.match(device):
        raise RuleError(
            f"device must be a device id or a glob: 1-{MAX_PATTERN} characters of "
            "A-Z a-z 0-9 _ - and * ? [ ] !"
        )
    op = data.get("op")
    if op not in Op.values:
        raise RuleError(f"op must be one of {', '.join(Op.values)}")
    metric = data.get("metric", "")
    if op in METRIC_OPS:
        if not isinstance(metric, str) or not valid_metric_name(metric):
            raise RuleError("metric must be 1-200 characters without control characters")
    elif metric is None:
        metric = ""
    elif not isinstance(metric, str) or (metric and not valid_metric_name(metric)):
        raise RuleError("metric must be a string")
    threshold = _number(data, "threshold", required=op in METRIC_OPS)
    high = _number(data, "threshold_high", required=op == Op.OUTSIDE)
    if op == Op.OUTSIDE and high < threshold:  # type: ignore[operator]
        raise RuleError("threshold_high must not be below threshold")
    hysteresis = _number(data, "hysteresis", required=False) or 0.0
    if hysteresis < 0:
        raise RuleError("hysteresis must not be negative")
    for_seconds = _number(data, "for", required=False) or 0.0
    if not 0 <= for_seconds <= MAX_FOR:
        raise RuleError(f"for must be between 0 and {MAX_FOR:.0f} seconds")
    if op == Op.NODATA and for_seconds <= 0:
        raise RuleError("a nodata rule needs for > 0 (the silence that raises it)")
    severity = data.get("severity", Severity.WARNING)
    if severity not in Severity.values:
        raise RuleError(f"severity must be one of {', '.join(Severity.values)}")
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        raise RuleError("enabled must be true or false")
    notify = data.get("notify", [])
    if not isinstance(notify, list) or len(notify) > MAX_NOTIFY_URLS:
        raise RuleError(f"notify must be a list of at most {MAX_NOTIFY_URLS} Apprise URLs")
    for url in notify:
        if not isinstance(url, str) or not 3 < len(url) <= MAX_URL or "://" not in url:
            raise RuleError("each notify entry must be an Apprise URL such as json://host/")
    return {
        "name": name.strip(),
        "device": device,
        "metric": metric,
        "op": op,
        "threshold": threshold,
        "threshold_high": high,
        "hysteresis": hysteresis,
        "for_seconds": for_seconds,
        "severity": severity,
        "enabled": enabled,
        "notify_urls": notify,
    }


@dataclass(eq=False)
class CompiledRule:
    """One enabled rule, ready to judge values: `check(value)` is True, False or None (keep)."""

    id: int
    name: str
    pattern: str
    metric: str
    op: str
    threshold: float | None
    threshold_high: float | None
    hysteresis: float
    for_seconds: float
    severity: str
    notify_urls: list[str]
    _regex: re.Pattern[str] | None = None
    _matches: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_model(cls, rule: AlertRule) -> CompiledRule:
        regex = None
        if GLOB_CHARS.intersection(rule.device):
            regex = re.compile(fnmatch.translate(rule.device))
        return cls(
            id=rule.id,
            name=rule.name,
            pattern=rule.device,
            metric=rule.metric,
            op=rule.op,
            threshold=rule.threshold,
            threshold_high=rule.threshold_high,
            hysteresis=rule.hysteresis or 0.0,
            for_seconds=rule.for_seconds or 0.0,
            severity=rule.severity,
            notify_urls=list(rule.notify_urls or []),
            _regex=regex,
        )

    @property
    def is_glob(self) -> bool:
        return self._regex is not None

    def matches(self, device_id: str) -> bool:
        """Whether the rule covers `device_id` (a glob's answer is cached per device)."""
        if self._regex is None:
            return device_id == self.pattern
        hit = self._matches.get(device_id)
        if hit is None:
            hit = self._matches[device_id] = self._regex.match(device_id) is not None
        return hit

    def check(self, value: float, active: bool) -> bool | None:
        """True: the condition holds; False: it has ended; None: inside the hysteresis band.

        `active` says whether an alert is open: the band only delays the end of one.
        """
        t, h = self.threshold, self.hysteresis
        if self.op == Op.ABOVE:
            if value > t:
                return True
            return None if active and value > t - h else False
        if self.op == Op.BELOW:
            if value < t:
                return True
            return None if active and value < t + h else False
        if self.op == Op.OUTSIDE:
            hi = self.threshold_high
            if value < t or value > hi:
                return True
            return None if active and (value < t + h or value > hi - h) else False
        if self.op == Op.EQUALS:
            return value == t
        return None


Band = tuple[float, float, frozenset[float]]


def quiet_band(rules: Iterable[CompiledRule]) -> Band:
    """``(lo, hi, equal)``: a value v with lo ≤ v ≤ hi and v not in `equal` makes none of the
    metric rules hold while no alert of theirs is open (``check(v, False)`` is False for each).

    The evaluator judges such rules only for a value outside it, so a reading costs the same
    with one rule or a hundred on its metric; NaN is outside every band, so it is judged.
    """
    lo, hi, equal = -math.inf, math.inf, set()
    for rule in rules:
        t = rule.threshold
        if rule.op == Op.ABOVE:  # holds for v > t
            hi = min(hi, t)  # type: ignore[type-var]
        elif rule.op == Op.BELOW:  # holds for v < t
            lo = max(lo, t)  # type: ignore[type-var]
        elif rule.op == Op.OUTSIDE:  # holds for v < t or v > high
            lo, hi = max(lo, t), min(hi, rule.threshold_high)  # type: ignore[type-var]
        elif rule.op == Op.EQUALS:
            equal.add(t)
    return lo, hi, frozenset(equal)  # type: ignore[return-value]

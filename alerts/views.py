"""The alerts REST API (docs/interface.md §8), mounted at ``/api/alerts/``.

- ``GET /api/alerts/?state=active|cleared[&limit=N]``: raised alerts, newest first.
- ``GET /api/alerts/rules``: the rules; ``POST`` one → ``201`` with the stored rule.
- ``GET /api/alerts/rules/<id>``: one rule; ``DELETE`` it (and its alerts) → ``204``.
- ``GET /api/alerts/<id>``: one alert with its audit trail (``events``).
- ``POST /api/alerts/<id>/ack`` ``{"note"?}`` → ``200`` with the alert.

As the commands API (devices/commands/views.py): session authentication, CSRF through the
``X-CSRFToken`` header, errors ``{"error", "code"}``; ``401`` anonymous, ``403`` without the
permission (``alerts.manage_rules`` for rules, ``alerts.acknowledge_alert`` to acknowledge;
staff and superusers have both), ``400`` bad input, ``404`` unknown alert.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse
from django.views.decorators.csrf import csrf_exempt

from alerts import store
from alerts.hooks import current_evaluator
from alerts.models import AlertRule, AlertState
from alerts.outbox import emit
from alerts.rules import RuleError, parse_rule
from devices.api import coded_error, json_response, unsafe_guard

MAX_BODY_BYTES = 16 * 1024
MAX_NOTE = 1000
DEFAULT_LIMIT, MAX_LIMIT = 200, 1000
MANAGE_PERMISSION = "alerts.manage_rules"
ACK_PERMISSION = "alerts.acknowledge_alert"


def _allowed(user: Any, permission: str) -> bool:
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        return False
    return bool(user.is_staff or user.is_superuser or user.has_perm(permission))


def can_manage_rules(user: Any) -> bool:
    """Staff, superusers, or the ``alerts.manage_rules`` permission."""
    return _allowed(user, MANAGE_PERMISSION)


def can_acknowledge(user: Any) -> bool:
    """Staff, superusers, or the ``alerts.acknowledge_alert`` permission."""
    return _allowed(user, ACK_PERMISSION)


def _not_allowed(allowed: str) -> HttpResponse:
    response = coded_error(405, f"method not allowed; use {allowed}", "method_not_allowed")
    response["Allow"] = allowed
    return response


async def _unsafe_guard(request: HttpRequest, check: Any, what: str) -> HttpResponse | None:
    """401 anonymous, 403 CSRF or permission, 400 oversized body; None when it may go on."""
    denied = await unsafe_guard(request, check, what)
    if denied is not None:
        return denied
    if len(request.body) > MAX_BODY_BYTES:
        return coded_error(400, f"body larger than {MAX_BODY_BYTES} bytes", "bad_request")
    return None


def _body(request: HttpRequest) -> Any:
    if not request.body:
        return {}
    return orjson.loads(request.body)


@csrf_exempt  # checked in _unsafe_guard, after authentication (401 before 403)
async def alert_list(request: HttpRequest) -> HttpResponse:
    """Raised alerts, newest first; ``state`` narrows to active or cleared ones."""
    if request.method not in ("GET", "HEAD"):
        return _not_allowed("GET")
    if not (await request.auser()).is_authenticated:
        return coded_error(401, "authentication required", "unauthenticated")
    state = request.GET.get("state") or None
    if state not in (None, AlertState.ACTIVE, AlertState.CLEARED):
        return coded_error(400, "state must be active or cleared", "bad_request")
    try:
        limit = int(request.GET.get("limit") or DEFAULT_LIMIT)
    except ValueError:
        return coded_error(400, "limit must be an integer", "bad_request")
    if not 1 <= limit <= MAX_LIMIT:
        return coded_error(400, f"limit must be between 1 and {MAX_LIMIT}", "bad_request")
    alerts = await database_sync_to_async(store.list_alerts)(state, limit)
    return json_response(alerts)


def _create_rule(fields: dict[str, Any], user: Any) -> dict[str, Any]:
    return AlertRule.objects.create(**fields, created_by=user).as_dict()


def _rules() -> list[dict[str, Any]]:
    return [rule.as_dict() for rule in AlertRule.objects.all()]


@csrf_exempt
async def rules(request: HttpRequest) -> HttpResponse:
    """``GET``: every rule (any logged-in user); ``POST``: create one (201)."""
    if request.method in ("GET", "HEAD"):
        if not (await request.auser()).is_authenticated:
            return coded_error(401, "authentication required", "unauthenticated")
        return json_response(await database_sync_to_async(_rules)())
    if request.method != "POST":
        return _not_allowed("GET, POST")
    refused = await _unsafe_guard(request, can_manage_rules, "manage alert rules")
    if refused is not None:
        return refused
    try:
        fields = parse_rule(_body(request))
    except orjson.JSONDecodeError:
        return coded_error(400, "body must be a JSON object (a rule)", "bad_request")
    except RuleError as exc:
        return coded_error(400, str(exc), "bad_request")
    rule = await database_sync_to_async(_create_rule)(fields, await request.auser())
    evaluator = current_evaluator()
    if evaluator is not None:  # this process evaluates (rungateway): the rule applies from now
        try:
            await evaluator.reload()
        except TimeoutError:
            pass  # the database is slow; the reload still happens
    response = json_response(rule, status=201)
    response["Location"] = f"/api/alerts/rules/{rule['id']}"
    return response


def _rule(rule_id: int) -> dict[str, Any] | None:
    rule = AlertRule.objects.filter(pk=rule_id).first()
    return rule.as_dict() if rule is not None else None


def _delete_rule(rule_id: int) -> list[store.Change] | None:
    """Clear the rule's active alerts (so dashboards drop them), then delete it; None if unknown."""
    rule = AlertRule.objects.filter(pk=rule_id).first()
    if rule is None:
        return None
    now = time.time()
    active = rule.alerts.filter(state=AlertState.ACTIVE).values_list("id", flat=True)
    changes = [c for c in (store.clear_alert(i, None, now) for i in list(active)) if c]
    rule.delete()  # one delete() per rule, so the evaluators hear of it (alerts/signals.py)
    return changes


@csrf_exempt
async def rule_detail(request: HttpRequest, rule_id: str) -> HttpResponse:
    """``GET``: one rule (any logged-in user); ``DELETE``: remove it and its alerts (204)."""
    if request.method not in ("GET", "HEAD", "DELETE"):
        return _not_allowed("GET, DELETE")
    if request.method == "DELETE":
        refused = await _unsafe_guard(request, can_manage_rules, "manage alert rules")
        if refused is not None:
            return refused
    elif not (await request.auser()).is_authenticated:
        return coded_error(401, "authentication required", "unauthenticated")
    if not rule_id.isdigit() or len(rule_id) > 18:
        return coded_error(404, f"no rule {rule_id[:40]!r}", "not_found")
    if request.method == "DELETE":
        cleared = await database_sync_to_async(_delete_rule)(int(rule_id))
        if cleared is None:
            return coded_error(404, f"no rule {rule_id!r}", "not_found")
        await emit(cleared, notify=False)
        return HttpResponse(status=204)
    rule = await database_sync_to_async(_rule)(int(rule_id))
    if rule is None:
        return coded_error(404, f"no rule {rule_id!r}", "not_found")
    return json_response(rule)


@csrf_exempt
async def alert_detail(request: HttpRequest, alert_id: str) -> HttpResponse:
    """One raised alert with its audit trail (any logged-in user)."""
    if request.method not in ("GET", "HEAD"):
        return _not_allowed("GET")
    if not (await request.auser()).is_authenticated:
        return coded_error(401, "authentication required", "unauthenticated")
    if not alert_id.isdigit() or len(alert_id) > 18:
        return coded_error(404, f"no alert {alert_id[:40]!r}", "not_found")
    alert = await database_sync_to_async(store.alert_detail)(int(alert_id))
    if alert is None:
        return coded_error(404, f"no alert {alert_id!r}", "not_found")
    return json_response(alert)


@csrf_exempt
async def acknowledge(request: HttpRequest, alert_id: str) -> HttpResponse:
    """Acknowledge a raised alert (200 with the alert; acknowledging twice changes nothing)."""
    if request.method != "POST":
        return _not_allowed("POST")
    refused = await _unsafe_guard(request, can_acknowledge, "acknowledge alerts")
    if refused is not None:
        return refused
    try:
        data = _body(request)
    except orjson.JSONDecodeError:
        return coded_error(400, 'body must be empty or a JSON object {"note"?}', "bad_request")
    note = data.get("note", "") if isinstance(data, dict) else None
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        return coded_error(
            400, f"note must be a string of at most {MAX_NOTE} characters", "bad_request"
        )
    if not alert_id.isdigit() or len(alert_id) > 18:
        return coded_error(404, f"no alert {alert_id[:40]!r}", "not_found")
    user = await request.auser()
    found, change = await database_sync_to_async(store.acknowledge)(
        int(alert_id), user, note, time.time()
    )
    if not found:
        return coded_error(404, f"no alert {alert_id!r}", "not_found")
    if change is not None:
        await emit([change], notify=False)
        return json_response(change.alert)
    alerts = await database_sync_to_async(_one)(int(alert_id))
    return json_response(alerts)


def _one(alert_id: int) -> dict[str, Any]:
    from alerts.models import Alert

    return Alert.objects.select_related("rule", "acknowledged_by").get(pk=alert_id).as_dict()

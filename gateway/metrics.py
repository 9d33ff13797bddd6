"""The gateway's Prometheus metrics, in one place so names match docs/interface.md §5.5 exactly.

Protocol servers, consumers and the telemetry pipeline import these objects and update them;
``/metrics`` renders the default registry. Every drop or rejection has a counter here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MQTT_CONNECTED = Gauge(
    "gateway_mqtt_connected", "1 while the MQTT bridge is connected to the broker"
)
MQTT_MESSAGES_RECEIVED = Counter(
    "gateway_mqtt_messages_received", "MQTT messages received from the broker"
)
MQTT_MESSAGES_PARKED = Counter(
    "gateway_mqtt_messages_parked",
    "QoS 1/2 messages queued past a busy device instance's limit instead of stalling the others",
)
MQTT_MESSAGES_DROPPED = Counter(
    "gateway_mqtt_messages_dropped",
    "MQTT messages the bridge dropped before any consumer saw them",
    ["reason"],
)
MQTT_INSTANCES_EVICTED = Counter(
    "gateway_mqtt_instances_evicted",
    "Application instances retired early because the instance limit was reached",
)
MQTT_RECONNECTS = Counter("gateway_mqtt_reconnects", "Connections to the broker (re)established")
MESSAGES_REJECTED = Counter(
    "gateway_messages_rejected", "Inbound messages rejected, by reason", ["reason"]
)
TELEMETRY_STORED = Counter("gateway_telemetry_stored", "Telemetry values written to the database")
TELEMETRY_DROPPED = Counter(
    "gateway_telemetry_dropped", "Telemetry values dropped before storage, by reason", ["reason"]
)
REJECTIONS_UNRECORDED = Counter(
    "gateway_rejections_unrecorded",
    "Rejected messages not added to their device's rejection record, by reason "
    "(unknown_device: no such device in the registry)",
    ["reason"],
)
TELEMETRY_DUPLICATES = Counter(
    "gateway_telemetry_duplicates",
    "Readings not stored again: the device's metric at that time is stored already "
    "(a retained message replayed, a message redelivered)",
)
DEVICE_TEXT_CLEANED = Counter(
    "gateway_device_text_cleaned",
    "Device-supplied texts (ack results and errors) changed to be storable, by reason",
    ["reason"],
)
CHANNEL_MESSAGES_DROPPED = Counter(
    "gateway_channel_messages_dropped",
    "Channel-layer messages a full channel refused, by group kind (the group's name up to its "
    "first dot; `channel` for a direct send)",
    ["group"],
)
WS_CLIENTS = Gauge("gateway_ws_clients", "Connected dashboard WebSocket clients")
WS_FRAMES_DROPPED = Counter(
    "gateway_ws_frames_dropped", "Dashboard frames dropped for slow clients"
)
COMMANDS = Counter("gateway_commands", "Command status changes, by new status", ["status"])
SERIAL_FRAMES = Counter("gateway_serial_frames", "Frames read from serial ports", ["port"])
CONSUMER_ERRORS = Counter(
    "gateway_consumer_errors", "Application instances that raised, by protocol", ["protocol"]
)
DASHBOARD_EVENTS_DROPPED = Counter(
    "gateway_dashboard_events_dropped",
    "Dashboard frames the telemetry pipeline could not hand to the channel layer, by reason",
    ["reason"],
)
SERIAL_MIRROR_DROPPED = Counter(
    "gateway_serial_mirror_dropped",
    "Serial devices' telemetry not mirrored to the broker (outbox full while it was away)",
)
DISCOVERY_REFUSED = Counter(
    "gateway_discovery_refused",
    "Discovered entities or documents not ingested, by reason (unsupported, too_many_entities)",
    ["reason"],
)
for _reason in ("unsupported", "too_many_entities"):
    DISCOVERY_REFUSED.labels(reason=_reason)
ALERT_TRANSITIONS = Counter(
    "gateway_alert_transitions", "Alert transitions stored, by kind", ["kind"]
)
ALERT_DROPPED = Counter(
    "gateway_alert_dropped",
    "Alert work dropped (evaluations before rules loaded, transitions, notifications), by reason",
    ["reason"],
)
ALERT_NOTIFICATIONS = Counter(
    "gateway_alert_notifications", "Alert notifications sent through Apprise, by result", ["result"]
)
MODBUS_REQUESTS = Counter(
    "gateway_modbus_requests",
    "Modbus transactions by bus, unit and result (ok, timeout, crc_error, exception, error)",
    ["bus", "unit", "result"],
)
MODBUS_BUS_OPEN = Gauge("gateway_modbus_bus_open", "1 while a Modbus bus is open", ["bus"])
MODBUS_READS_DROPPED = Counter(
    "gateway_modbus_reads_dropped",
    "Polls dropped because a unit's application instance was 64 events behind",
    ["bus"],
)
EVENT_LOOP_LAG = Histogram(
    "gateway_event_loop_lag_seconds",
    "How late the event loop ran a timer due now (sampled every 100 ms): a stall delays "
    "every message, frame and timer behind it",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)

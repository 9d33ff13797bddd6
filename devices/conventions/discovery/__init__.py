"""Self-describing devices: Home Assistant MQTT discovery documents and Zigbee2MQTT.

A device that announces itself is ingested with no per-vendor code (docs/conventions.md):
`documents` reads discovery config topics (with `abbreviations` expanded), `zigbee2mqtt` reads
Zigbee2MQTT's device list, both into `entities`; `templates` runs their Jinja templates in a
bounded sandbox (`direct` reads the commonest shapes without a render, to the same text);
`mapping` turns state and availability into readings and presence and commands into publishes;
`registry` indexes entities by topic; `consumer` is the one static MQTT instance per bridge that
does the subscribing, reading and commanding.

Knows nothing of sockets; uses the telemetry pipeline and the command service like every
convention.
"""

"""Device conventions: how each family of devices speaks, turned into readings and commands.

Holds one consumer per convention: the native MQTT topics (`native`), Tasmota (`tasmota`),
serial line devices (`serial`, with the line codecs in `codecs`), Modbus units (`modbus`,
with point decoding in `modbus_codec` and the shipped register maps in `modbus_profiles/`), the
Home Assistant discovery documents the gateway publishes for every device (`homeassistant`),
self-describing devices ingested from their Home Assistant discovery documents and Zigbee2MQTT
(`discovery`), and the mirror that republishes serial devices on the broker in the native
convention (`mirror`). A new convention is a new module here plus its route in
`devices/routing.py`.

Knows nothing of sockets: consumers receive ASGI events from the protocol servers and talk to
the telemetry pipeline and the command service. The mirror is the one module that owns a
broker connection (an outbound publisher).
"""

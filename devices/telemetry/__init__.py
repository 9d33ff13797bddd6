"""Telemetry: from a parsed reading to a stored row and a dashboard frame.

Holds payload parsing and validation (`parsing`), the per-loop `TelemetryPipeline`
(`pipeline`) and its rooms: the bounded, batched writer (`batching`), the batch SQL (`store`),
coalesced dashboard frames (`fanout`) and device/metric news (`announce`).

Knows nothing of device conventions, commands, sockets or MQTT topics: a convention turns its
wire format into `submit_reading` / `submit_status` calls.
"""

"""The `modbus` ASGI protocol (docs/asgi-modbus.md): bus configs, profiles, the polling server.

Owns the buses (RTU serial lines, Modbus TCP) and turns poll results into `modbus.*` events for
one application instance per unit. Knows nothing of devices or dashboards.
"""

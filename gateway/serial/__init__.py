"""The `serial` ASGI protocol (docs/asgi-serial.md): framing, the interface server, consumers."""

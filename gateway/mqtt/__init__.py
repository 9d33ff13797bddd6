"""The `mqtt` ASGI protocol (docs/asgi-mqtt.md): topic routing, consumer base, interface server."""

from gateway.mqtt.routing import Match, TopicRouter, find_topic_router, topic

__all__ = ["Match", "TopicRouter", "find_topic_router", "topic"]

"""The gateway's ASGI application: one ProtocolTypeRouter for every protocol it speaks.

`http` and `websocket` are served by any ASGI server (daphne, uvicorn); `mqtt`, `serial` and
`modbus` are served by our own interface servers in `gateway/mqtt`, `gateway/serial` and
`gateway/modbus`.
"""

import os

from django.core.asgi import get_asgi_application

from gateway.switching import tune_switch_interval

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
# Every server of this application runs threads beside its event loop (the telemetry writer,
# sync views): hand the GIL back to the loop within 0.5 ms, not 5 (gateway/switching.py).
tune_switch_interval()
# Populate Django's app registry before importing anything that touches models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from alerts.routing import mqtt_routes as alert_routes  # noqa: E402
from dashboard.routing import websocket_urlpatterns  # noqa: E402
from devices.conventions.modbus import ModbusDeviceConsumer  # noqa: E402
from devices.conventions.serial import SerialDeviceConsumer  # noqa: E402
from devices.routing import mqtt_routes  # noqa: E402
from gateway.mqtt.routing import TopicRouter  # noqa: E402
from gateway.origin import SameOriginValidator  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": SameOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
        "mqtt": TopicRouter([*mqtt_routes, *alert_routes]),
        "serial": SerialDeviceConsumer.as_asgi(),
        "modbus": ModbusDeviceConsumer.as_asgi(),
    }
)

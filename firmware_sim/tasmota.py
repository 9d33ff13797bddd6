"""A simulated Tasmota device (single relay, AM2301 + BMP280 sensors), without I/O.

Modelled on Tasmota's default MQTT conventions (FullTopic `%prefix%/%topic%/`):

- `tele/<id>/LWT`: `Online` retained on connect; `Offline` retained as the Last Will and
  before a clean disconnect (restart, shutdown).
- `tele/<id>/INFO1` once per connect, then every TelePeriod `tele/<id>/STATE`
  (`{"Time", "Uptime", "UptimeSec", ..., "POWER", "Wifi": {...}}`) and `tele/<id>/SENSOR`
  (`{"Time", "AM2301": {"Temperature", "Humidity", "DewPoint"}, "BMP280": {...}, ...}`).
- `cmnd/<id>/<Command>` in, command names case-insensitive, an empty payload queries.
  Answers go to `stat/<id>/RESULT` as JSON; `Power` also publishes `stat/<id>/POWER` ON|OFF.
  Modelled: `Power`/`Power1` (ON/OFF/TOGGLE, 1/0/2, true/false), `TelePeriod`, `Restart 1`,
  `State`, `Status` (empty, 8/10, 11); anything else answers `{"Command":"Unknown"}`.

Differences from real firmware: `Time` is UTC (Tasmota's `Timezone 0`), and TelePeriod
accepts any value from 0.01 s to a day (Tasmota: 10-3600) so tests and demos can run fast.
"""

from __future__ import annotations

import math
import time
from typing import Any

from firmware_sim.firmware import (
    CommandError,
    Firmware,
    Outgoing,
    Reply,
    _check_interval,
    dumps,
)

VERSION = "14.3.0(sim)"


def tasmota_time(now: float) -> str:
    """Tasmota's `Time` field: ISO 8601 local time without a zone (UTC here)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))


def tasmota_uptime(seconds: float) -> str:
    """Tasmota's `Uptime` field: `<days>T<hh>:<mm>:<ss>`."""
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    return f"{days}T{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def dew_point(temperature: float, humidity: float) -> float:
    """Magnus formula, as Tasmota reports `DewPoint`."""
    gamma = math.log(max(humidity, 1e-3) / 100) + 17.62 * temperature / (243.12 + temperature)
    return 243.12 * gamma / (17.62 - gamma)


class TasmotaFirmware(Firmware):
    """Tasmota's topics and payloads for one device whose MQTT Topic is its id."""

    style = "tasmota"

    def __init__(self, device_id: str, **kwargs: Any) -> None:
        super().__init__(device_id, **kwargs)
        self.signal_dbm = self.rng.uniform(-75.0, -45.0)

    def will(self) -> Outgoing:
        return Outgoing(f"tele/{self.device_id}/LWT", b"Offline", qos=1, retain=True)

    def birth(self) -> list[Outgoing]:
        info = {
            "Info1": {
                "Module": "Generic",
                "Version": VERSION,
                "FallbackTopic": f"cmnd/DVES_{self.device_id}_fb/",
                "GroupTopic": "cmnd/tasmotas/",
            }
        }
        return [
            Outgoing(f"tele/{self.device_id}/LWT", b"Online", qos=1, retain=True),
            Outgoing(f"tele/{self.device_id}/INFO1", dumps(info), qos=self.qos),
        ]

    def goodbye(self) -> Outgoing:
        return self.will()

    def subscriptions(self) -> list[str]:
        return [f"cmnd/{self.device_id}/#"]

    @property
    def power(self) -> str:
        return "ON" if self.relay else "OFF"

    def state(self, now: float) -> dict[str, Any]:
        """The STATE object (also the answer to `State` and `Status 11`)."""
        uptime = now - self.boot_time
        self.signal_dbm = min(-30.0, max(-95.0, self.signal_dbm + self.rng.gauss(0.0, 1.0)))
        dbm = round(self.signal_dbm)
        return {
            "Time": tasmota_time(now),
            "Uptime": tasmota_uptime(uptime),
            "UptimeSec": int(uptime),
            "Heap": 25,
            "SleepMode": "Dynamic",
            "Sleep": 50,
            "LoadAvg": 19,
            "MqttCount": self.connects,
            "POWER": self.power,
            "Wifi": {
                "AP": 1,
                "SSId": "simnet",
                "BSSId": "02:00:00:00:00:01",
                "Channel": 6,
                "Mode": "11n",
                "RSSI": max(0, min(100, 2 * (dbm + 100))),
                "Signal": dbm,
                "LinkCount": 1,
                "Downtime": "0T00:00:03",
            },
        }

    def sensor(self, now: float, advance: bool = True) -> dict[str, Any]:
        """The SENSOR object (also the answer to `Status 10`)."""
        if advance:
            self.signals.sample(now)
        temp = self.signals.temperature.value
        hum = self.signals.humidity.value
        return {
            "Time": tasmota_time(now),
            "AM2301": {
                "Temperature": round(temp, 1),
                "Humidity": round(hum, 1),
                "DewPoint": round(dew_point(temp, hum), 1),
            },
            "BMP280": {
                "Temperature": round(temp + 0.4, 1),
                "Pressure": round(self.signals.pressure.value, 1),
            },
            "PressureUnit": "hPa",
            "TempUnit": "C",
        }

    def telemetry(self, now: float) -> list[Outgoing]:
        self.seq += 1
        return [
            Outgoing(f"tele/{self.device_id}/STATE", dumps(self.state(now)), qos=self.qos),
            Outgoing(f"tele/{self.device_id}/SENSOR", dumps(self.sensor(now)), qos=self.qos),
        ]

    def handle(self, topic: str, payload: bytes) -> Reply | None:
        prefix = f"cmnd/{self.device_id}/"
        if not topic.startswith(prefix) or "/" in topic[len(prefix) :]:
            return None
        command = topic[len(prefix) :].lower()
        try:
            arg = payload.decode().strip()
        except UnicodeDecodeError:
            arg = "\ufffd"
        reply = Reply()
        handler = getattr(self, f"cmd_{command}", None)
        result: dict[str, Any] | None
        if handler is None:
            result = {"Command": "Unknown"}
        else:
            try:
                result = handler(arg, reply)
            except CommandError:
                reply = Reply()
                result = {"Command": "Error"}
        if result is not None:
            reply.messages.insert(0, Outgoing(f"stat/{self.device_id}/RESULT", dumps(result)))
        return reply

    # Commands: cmd_<lowercased name>(payload, reply) -> the RESULT object.
    def cmd_power(self, arg: str, reply: Reply) -> dict[str, Any]:
        """`Power [ON|OFF|TOGGLE|1|0|2|true|false]`; empty queries."""
        value = arg.lower()
        if value in {"on", "1", "true"}:
            self.relay = True
        elif value in {"off", "0", "false"}:
            self.relay = False
        elif value in {"toggle", "2"}:
            self.relay = not self.relay
        elif value:
            raise CommandError(value)
        reply.messages.append(Outgoing(f"stat/{self.device_id}/POWER", self.power.encode()))
        return {"POWER": self.power}

    cmd_power1 = cmd_power

    def cmd_teleperiod(self, arg: str, reply: Reply) -> dict[str, Any]:
        """`TelePeriod <seconds>`; empty queries."""
        if arg:
            try:
                seconds = float(arg)
            except ValueError:
                raise CommandError(arg) from None
            self.interval = _check_interval(seconds)
        period = self.interval
        return {"TelePeriod": int(period) if period.is_integer() else period}

    def cmd_restart(self, arg: str, reply: Reply) -> dict[str, Any]:
        """`Restart 1` restarts (announcing `Offline` first); anything else explains itself."""
        if arg != "1":
            return {"Restart": "1 to restart"}
        reply.reboot_after_ack = self.reboot_delay
        return {"Restart": "Restarting"}

    def cmd_state(self, arg: str, reply: Reply) -> dict[str, Any]:
        """`State`: the STATE object on RESULT."""
        return self.state(time.time())

    def cmd_status(self, arg: str, reply: Reply) -> None:
        """`Status` (device summary), `Status 8`/`10` (sensors), `Status 11` (state)."""
        now = time.time()
        if arg in {"8", "10"}:
            return self._status_topic(reply, "STATUS10", {"StatusSNS": self.sensor(now, False)})
        if arg == "11":
            return self._status_topic(reply, "STATUS11", {"StatusSTS": self.state(now)})
        if arg in {"", "0"}:
            body = {
                "Status": {
                    "Module": 1,
                    "DeviceName": self.device_id,
                    "FriendlyName": [self.device_id],
                    "Topic": self.device_id,
                    "Power": int(self.relay),
                }
            }
            return self._status_topic(reply, "STATUS", body)
        raise CommandError(arg)

    def _status_topic(self, reply: Reply, name: str, body: dict[str, Any]) -> None:
        # Status answers go to their own stat/<id>/STATUSn topic, not to RESULT.
        reply.messages.append(Outgoing(f"stat/{self.device_id}/{name}", dumps(body)))

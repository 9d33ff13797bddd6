"""A simulated GPS receiver's NMEA 0183 output: GGA, RMC, VTG and GSA once per fix.

A vehicle drives a slow circle; every sentence carries its XOR checksum (built with pynmea2),
so the gateway's `devices.conventions.nmea` decodes it like a real receiver's
(`python -m firmware_sim serial --pty --format nmea`).
"""

from __future__ import annotations

import math
import time

import pynmea2

KMH_PER_KNOT = 1.852


class GpsTrack:
    """Position, speed and course of a vehicle circling a point, as NMEA sentences."""

    def __init__(self, lat: float = 48.1173, lon: float = 11.5167, radius_m: float = 200.0) -> None:
        self.lat0, self.lon0, self.radius = lat, lon, radius_m
        self.speed_kmh = 36.0
        self.started = time.monotonic()

    def _position(self, elapsed: float) -> tuple[float, float, float]:
        angle = elapsed * (self.speed_kmh / 3.6) / self.radius
        north, east = self.radius * math.cos(angle), self.radius * math.sin(angle)
        lat = self.lat0 + north / 111_320
        lon = self.lon0 + east / (111_320 * math.cos(math.radians(self.lat0)))
        course = (math.degrees(angle) + 90) % 360
        return lat, lon, course

    @staticmethod
    def _dm(value: float, positive: str, negative: str, degree_digits: int) -> tuple[str, str]:
        hemisphere = positive if value >= 0 else negative
        value = abs(value)
        degrees = int(value)
        minutes = (value - degrees) * 60
        return f"{degrees:0{degree_digits}d}{minutes:07.4f}", hemisphere

    def sentences(self) -> list[bytes]:
        """One fix: GGA, RMC, VTG, GSA lines (CR LF terminated, as receivers send them)."""
        lat, lon, course = self._position(time.monotonic() - self.started)
        now = time.gmtime()
        hhmmss = time.strftime("%H%M%S", now) + ".00"
        lat_s, ns = self._dm(lat, "N", "S", 2)
        lon_s, ew = self._dm(lon, "E", "W", 3)
        knots = f"{self.speed_kmh / KMH_PER_KNOT:.1f}"
        msgs = [
            pynmea2.GGA(
                "GP",
                "GGA",
                (hhmmss, lat_s, ns, lon_s, ew, "1", "08", "0.9", "545.4", "M", "46.9", "M", "", ""),
            ),  # fmt: skip
            pynmea2.RMC(
                "GP",
                "RMC",
                (
                    hhmmss,
                    "A",
                    lat_s,
                    ns,
                    lon_s,
                    ew,
                    knots,
                    f"{course:.1f}",
                    time.strftime("%d%m%y", now),
                    "",
                    "",
                ),
            ),  # fmt: skip
            pynmea2.VTG(
                "GP",
                "VTG",
                (f"{course:.1f}", "T", "", "M", knots, "N", f"{self.speed_kmh:.1f}", "K"),
            ),  # fmt: skip
            pynmea2.GSA(
                "GP",
                "GSA",
                (
                    "A",
                    "3",
                    "04",
                    "05",
                    "",
                    "09",
                    "12",
                    "",
                    "",
                    "24",
                    "",
                    "",
                    "",
                    "",
                    "2.5",
                    "1.3",
                    "2.1",
                ),
            ),  # fmt: skip
        ]
        return [str(m).encode() + b"\r\n" for m in msgs]

"""Plausible sensor signals for simulated devices: mean-reverting bounded random walks.

Each quantity is an Ornstein-Uhlenbeck process (a random walk pulled back towards its mean),
sampled exactly for any time step so a device's readings look the same at 0.1 Hz and at 10 Hz,
then reflected into physical bounds. Temperature follows a slow daily cycle, humidity moves
against temperature, the battery drains with use, and the relay only changes on command.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field


@dataclass
class Walk:
    """One mean-reverting random walk: `theta` is the pull per second, `sigma` the noise scale."""

    mean: float
    sigma: float
    theta: float
    low: float
    high: float
    value: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.value):
            self.value = self.mean

    def step(self, dt: float, rng: random.Random, mean: float | None = None) -> float:
        """Advance by `dt` seconds (exact OU transition) and return the new, bounded value."""
        mu = self.mean if mean is None else mean
        if dt <= 0:
            return self.value
        decay = math.exp(-self.theta * dt)
        spread = self.sigma * math.sqrt((1.0 - decay * decay) / (2.0 * self.theta))
        value = mu + (self.value - mu) * decay + spread * rng.gauss(0.0, 1.0)
        self.value = _reflect(value, self.low, self.high)
        return self.value


def _reflect(value: float, low: float, high: float) -> float:
    """Fold a value back into [low, high] as a random walk bouncing off walls would."""
    span = high - low
    if span <= 0:
        return low
    offset = (value - low) % (2 * span)
    return low + (offset if offset <= span else 2 * span - offset)


@dataclass
class SensorSignals:
    """The readings of one simulated weather sensor with a relay and a battery."""

    rng: random.Random
    temperature: Walk
    humidity: Walk
    pressure: Walk
    battery: float
    drain_per_hour: float
    relay: bool = False
    last: float = field(default_factory=time.time)

    @classmethod
    def create(cls, rng: random.Random, now: float | None = None) -> SensorSignals:
        """A sensor with its own climate (indoor-ish mean temperature, humidity, altitude)."""
        temp_mean = rng.uniform(17.0, 25.0)
        hum_mean = rng.uniform(35.0, 60.0)
        # Sea-level pressure minus a random altitude's worth (~0.12 hPa per metre).
        pres_mean = 1013.25 - rng.uniform(0.0, 400.0) * 0.12
        return cls(
            rng=rng,
            temperature=Walk(temp_mean, 0.05, 1 / 600, -20.0, 50.0, rng.gauss(temp_mean, 0.8)),
            humidity=Walk(hum_mean, 0.15, 1 / 900, 5.0, 95.0, rng.gauss(hum_mean, 3.0)),
            pressure=Walk(pres_mean, 0.05, 1 / 3600, 940.0, 1060.0, rng.gauss(pres_mean, 2.0)),
            battery=rng.uniform(60.0, 100.0),
            drain_per_hour=rng.uniform(0.2, 1.5),
            relay=rng.random() < 0.3,
            last=time.time() if now is None else now,
        )

    def sample(self, now: float | None = None) -> dict[str, float | bool]:
        """Advance every signal to `now` and return rounded readings."""
        now = time.time() if now is None else now
        dt = max(0.0, now - self.last)
        self.last = now
        # A daily swing of +-1.5 degrees peaking mid-afternoon (UTC is good enough here).
        hour = (now % 86400) / 3600
        daily = 1.5 * math.sin((hour - 9.0) / 24 * 2 * math.pi)
        temp = self.temperature.step(dt, self.rng, self.temperature.mean + daily)
        # Warmer air holds more water, so relative humidity moves against temperature.
        hum = self.humidity.step(dt, self.rng, self.humidity.mean - 2.0 * daily)
        pres = self.pressure.step(dt, self.rng)
        # Drains faster with the relay on; a flat battery is swapped for a fresh one.
        self.battery -= dt / 3600 * self.drain_per_hour * (2.0 if self.relay else 1.0)
        if self.battery < 1.0:
            self.battery = 100.0
        return {
            "temperature": round(temp, 2),
            "humidity": round(hum, 1),
            "pressure": round(pres, 1),
            "battery": round(self.battery, 1),
            "relay": self.relay,
        }

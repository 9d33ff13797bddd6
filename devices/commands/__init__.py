"""Commands: who may send one, and its life from `pending` to `acked | failed | timeout`.

Holds the service (`service`: checks, create, submit, deliver, apply_ack), the conditional
state transitions (`states`), the per-loop deadline timers (`timers`), the batched lookup of
held commands (`held`) and the REST views (`views`).

Knows nothing of transports: a device consumer hands `deliver()` a coroutine that puts the
command on its wire (an MQTT publish, a serial line) and decides when a device is reachable.
"""

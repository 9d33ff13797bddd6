"""Benchmarks: the gateway against a bare aiomqtt subscriber and mqttasgi (`python -m bench`)."""

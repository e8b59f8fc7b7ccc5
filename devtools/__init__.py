"""Development and test tooling, kept apart from the production apps.

- `fake_daraja`: a local stand-in for Safaricom's Daraja API (the real wire format);
- `fake_firebase`: a local stand-in for the Firebase Realtime Database REST API;
- `sim/`: the meter simulator (a port of the firmware core) and the networked fleet;
- `simulate_meters`: the fleet as a command (`python -m devtools.simulate_meters`);
- `services`: private PostgreSQL, Redis and Mosquitto processes for tests and benchmarks.

Production code (`portal`, `meters`, `payments`, `mqtt_worker`) never imports this package;
this package may import the Django-free codec and rules, and its commands use the apps' services
as any client would.
"""

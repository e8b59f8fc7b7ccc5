"""Meter simulator: a pure-Python port of the ESP32 firmware core (see meter_core)."""

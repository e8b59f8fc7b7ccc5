"""Firmware updates over the air (issue 13, firmware/PROTOCOL-ext.md "OTA ext"): releases staff
upload, rollouts in stages, each meter's progress from its status messages.

`models` (imported by meters.models), `signing` (the release signature, checked with
OTA_PUBLIC_KEY), `services` (every write), `selectors` (reads), `views` (the image download).
"""

// Per-meter device configuration. Copy to meter_config.h (git-ignored: it holds this meter's
// credentials) and fill in. Each meter has its own MQTT username/password (the broker's ACL
// pattern rules key on the username = meter number), and TLS to the broker is verified with
// the CA certificate below.
#pragma once

// Identity: must match ^[A-Za-z0-9_-]{1,32}$ and the meter's record in the backend.
#define METER_NO "METER001"
#define FW_VERSION "1.0.0"

// Wi-Fi.
#define WIFI_SSID "your-ssid"
#define WIFI_PASSWORD "your-wifi-password"

// MQTT over TLS (port 8883). The username is the meter number (see deploy ACL patterns).
#define MQTT_URI "mqtts://mqtt.example.com:8883"
#define MQTT_USERNAME METER_NO
#define MQTT_PASSWORD "per-meter-secret"
// PEM of the CA that signed the broker's certificate (not the broker certificate itself).
#define MQTT_CA_PEM                                                                       \
    "-----BEGIN CERTIFICATE-----\n"                                                       \
    "...paste the CA certificate here...\n"                                               \
    "-----END CERTIFICATE-----\n"

// SNTP servers: timestamps are Unix ms only after a sync (before, ms since boot).
#define NTP_SERVER_1 "pool.ntp.org"
#define NTP_SERVER_2 "time.google.com"

// OTA arrives over MQTT (command/ota, firmware/PROTOCOL-ext.md): images are fetched over HTTPS,
// verified with the broker's CA above, and must be signed with the release key whose public
// half is esp32/include/ota_public_key.h (python firmware/tools/sign_firmware.py keygen).
// There is no LAN OTA (ArduinoOTA): it had no signature, no rollback, and reset on a bad password.

// Hardware.
#define RELAY_PIN 26
// 1: the relay driver closes the relay on a HIGH level (safe level LOW, pull-down resistor on
// the pin); 0: an active-low module (safe level HIGH, pull-up resistor). The pin is set to the
// safe level before it becomes an output; the resistor holds it there before the firmware runs.
#define RELAY_ACTIVE_HIGH 1
#define PZEM_RX_PIN 16  // ESP32 RX <- PZEM TX
#define PZEM_TX_PIN 17  // ESP32 TX -> PZEM RX
#define PZEM_ADDRESS 0xF8

// Behaviour (the core's MeterConfig; defaults follow PROTOCOL.md).
#define REPORT_INTERVAL_MS 30000
#define SENSOR_FAIL_TIMEOUT_MS 60000
#define LOW_BALANCE_KWH 1.0
// The supply's maximum (80 A x 230 V): a reading that implies more is billed only up to it.
#define RATED_MAX_KW 18.4
#define WATCHDOG_TIMEOUT_S 30
// Boot-loop guard: after this many boots in a row that did not stay up BOOT_GUARD_STABLE_AFTER_MS,
// the next boot runs in safe mode (relay open, OTA only) for SAFE_MODE_MS.
#define BOOT_GUARD_MAX_FAST_BOOTS 5
#define BOOT_GUARD_STABLE_AFTER_MS 120000UL
#define SAFE_MODE_MS (10UL * 60UL * 1000UL)
// Reboot after this long without the broker (stale Wi-Fi/TLS state is the usual cause).
#define REBOOT_AFTER_OFFLINE_MS (6UL * 60UL * 60UL * 1000UL)

// Device configuration compiled into the image. Copy to meter_config.h (git-ignored) and fill in.
//
// The image carries NO meter identity. One signed image goes to the whole fleet by OTA
// (PROTOCOL-ext.md "OTA"), so everything that differs per meter -- meter number, MQTT
// username/password, broker URL, and optionally the broker's CA and the Wi-Fi -- is provisioned
// into the meter's NVS over the serial console (README.md "Provisioning a meter") and survives
// OTA updates. What is below is the same for every meter of a fleet (or a fallback for it).
// Defining METER_NO, MQTT_USERNAME, MQTT_PASSWORD or MQTT_URI here stops the build.
#pragma once

#define FW_VERSION "1.0.0"

// Wi-Fi the meters join unless their identity has its own (provision ssid=... wifipass=...).
#define WIFI_SSID "your-ssid"
#define WIFI_PASSWORD "your-wifi-password"

// The fleet CA: PEM of the CA that signed the broker's certificate (and the firmware server's),
// not the broker certificate itself. Used when a meter's identity has no CA of its own
// (provision ca=...). Leave it "" to require a CA in every identity: a meter whose broker URL is
// mqtts:// and that has no CA anywhere does not connect (esp-tls cannot verify the server).
// For example: #define MQTT_CA_PEM "-----BEGIN CERTIFICATE-----\n" "MIID...\n" "-----END CERTIFICATE-----\n"
#define MQTT_CA_PEM ""

// 1: broker URLs mqtt:// (no TLS) are accepted, for a bench broker only. Production: 0.
#ifndef METER_ALLOW_PLAIN_MQTT
#define METER_ALLOW_PLAIN_MQTT 0
#endif

// ---- DEVELOPMENT BOARD ONLY ----------------------------------------------------------------------
// A bench board can run without being provisioned: with METER_DEV_IDENTITY 1 (here, or
// build_flags = -DMETER_DEV_IDENTITY=1), a board that has NO identity in NVS connects with the
// DEV_* identity below. A stored identity always wins, and an unreadable one is never replaced
// by it. The board's meter state then belongs to DEV_METER_NO: provisioning it later as a real
// meter needs its flash erased first (README.md). An image built with it would give every
// unprovisioned meter it reaches this identity: the build prints a message, the boot banner says
// "DEVELOPMENT IMAGE", and firmware/tools/sign_firmware.py refuses to sign it.
#ifndef METER_DEV_IDENTITY
#define METER_DEV_IDENTITY 0
#endif
#define DEV_METER_NO "DEV001"
#define DEV_MQTT_USERNAME DEV_METER_NO
#define DEV_MQTT_PASSWORD "dev-password"
#define DEV_MQTT_URI "mqtt://192.168.1.10:1883"  // needs METER_ALLOW_PLAIN_MQTT 1, or mqtts:// and a CA

// SNTP servers: timestamps are Unix ms only after a sync (before, ms since boot).
#define NTP_SERVER_1 "pool.ntp.org"
#define NTP_SERVER_2 "time.google.com"

// OTA arrives over MQTT (command/ota, firmware/PROTOCOL-ext.md): images are fetched over HTTPS,
// verified with the meter's CA (its identity's, else MQTT_CA_PEM above), and must be signed with the release key whose public
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

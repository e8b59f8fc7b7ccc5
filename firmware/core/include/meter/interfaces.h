// The seams between the portable meter core and the hardware. The core talks only to these,
// so the same state machine runs on the ESP32 (Arduino/ESP-IDF glue in esp32/) and on the host
// (fakes in test/ and trace/), and nothing here may include Arduino.h or ESP-IDF headers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace meter {

// Monotonic milliseconds plus, once SNTP has synced, the wall clock.
class Clock {
public:
    virtual ~Clock() = default;
    // Arduino millis(): wraps every 2^32 ms (49.7 days); callers use elapsedMs() only.
    virtual uint32_t millis() const = 0;
    // Unix time in ms; false until the time is trustworthy (SNTP synced).
    virtual bool unixMillis(uint64_t& out) const = 0;
};

// Small persistent values (NVS on the ESP32). Values are opaque byte strings.
class KvStore {
public:
    virtual ~KvStore() = default;
    virtual bool get(const char* key, std::vector<uint8_t>& out) = 0;
    virtual bool put(const char* key, const uint8_t* data, size_t len) = 0;
};

// A persistent log of records (the report ring, which is also the MQTT outbox). A record is
// pending from append until consume(key); when the log is full, append drops the oldest.
class RecordLog {
public:
    virtual ~RecordLog() = default;
    virtual bool append(const uint8_t* data, size_t len) = 0;
    virtual size_t size() const = 0;  // pending records
    // The i-th pending record, oldest first, and its key (stable across reboots).
    virtual bool peekAt(size_t index, std::vector<uint8_t>& out, uint32_t& key) = 0;
    // Marks the record `key` as delivered; false if it is not pending (already consumed or dropped).
    virtual bool consume(uint32_t key) = 0;
    bool peekOldest(std::vector<uint8_t>& out) {
        uint32_t key;
        return peekAt(0, out, key);
    }
    bool popOldest() {
        std::vector<uint8_t> out;
        uint32_t key;
        return peekAt(0, out, key) && consume(key);
    }
    // The newest record ever appended that the log still holds, consumed or not. begin()
    // consults it as a witness of the last register the meter sent; a log that forgets records
    // (RAM only) may simply return false.
    virtual bool peekNewest(std::vector<uint8_t>& /*out*/) { return false; }
};

// RAM that survives a soft reset but not a power cut (RTC_NOINIT memory on the ESP32). The
// core keeps an exact copy of its state here, so a watchdog or software reset bills the energy
// in between without any flash write.
class RetainedStore {
public:
    virtual ~RetainedStore() = default;
    virtual bool load(std::vector<uint8_t>& out) = 0;
    virtual void store(const uint8_t* data, size_t len) = 0;
};

// Uniform 32-bit random numbers (esp_random() with an entropy source on the device; seeded and
// repeatable on the host, so that traces and tests are deterministic).
class Random {
public:
    virtual ~Random() = default;
    virtual uint32_t next32() = 0;
};

class Relay {
public:
    virtual ~Relay() = default;
    virtual void set(bool closed) = 0;  // closed = power flows to the customer
};

// The energy sensor's own non-volatile register (PZEM-004T v3: Wh, 32 bits).
class EnergySource {
public:
    virtual ~EnergySource() = default;
    // false (or a non-finite value) when the sensor did not answer.
    virtual bool readKwh(double& kwh) = 0;
};

// The MQTT client (esp_mqtt on the device). A QoS 1 message is delivered when the client
// reports its PUBACK (MeterCore::onPublished with the id publish() returned), or lost when the
// client drops it from its outbox (esp_mqtt deletes unacknowledged messages 30 s after they were
// queued, silently unless MQTT_REPORT_DELETED_MESSAGES is set).
class Publisher {
public:
    virtual ~Publisher() = default;
    // The message id (> 0) of a QoS 1 message, 0 for a QoS 0 message the client took, or -1
    // when the client refused it.
    virtual int publish(const std::string& topic, const std::string& payload, int qos, bool retain) = 0;
    // Bytes waiting in the client's outbox (esp_mqtt_client_get_outbox_size): flow control.
    virtual size_t outboxBytes() { return 0; }
};

// Raw NOR-flash-like storage for the ring buffer: erase sets a sector to 0xFF, program can only
// clear bits. The ESP32 glue maps it onto a data partition; tests use MemFlash with power cuts.
class FlashRegion {
public:
    virtual ~FlashRegion() = default;
    virtual size_t size() const = 0;
    virtual size_t sectorSize() const = 0;
    virtual bool read(size_t offset, uint8_t* out, size_t len) = 0;
    virtual bool program(size_t offset, const uint8_t* data, size_t len) = 0;
    virtual bool eraseSector(size_t sectorIndex) = 0;
};

}  // namespace meter

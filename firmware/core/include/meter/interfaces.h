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

// A persistent FIFO of records (the offline report buffer). When full, append drops the oldest.
class RecordLog {
public:
    virtual ~RecordLog() = default;
    virtual bool append(const uint8_t* data, size_t len) = 0;
    virtual bool peekOldest(std::vector<uint8_t>& out) = 0;
    virtual bool popOldest() = 0;
    virtual size_t size() const = 0;
    // The newest record ever appended that the log still holds, replayed (consumed) or not.
    // begin() consults it as a second witness of the last energy register the meter sent; a
    // log that forgets records (RAM only) may simply return false.
    virtual bool peekNewest(std::vector<uint8_t>& /*out*/) { return false; }
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

class Publisher {
public:
    virtual ~Publisher() = default;
    // true when the client took the message (for QoS 1: it is in the client's outbox).
    virtual bool publish(const std::string& topic, const std::string& payload, int qos, bool retain) = 0;
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

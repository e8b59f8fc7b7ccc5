// In-memory implementations of the core's interfaces for host tests and the trace runner.
// MemFlash behaves like NOR flash (erase to 0xFF, program only clears bits) and can lose power
// after a chosen number of byte operations, to test torn writes.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "meter/interfaces.h"

namespace meter {

class ManualClock : public Clock {
public:
    explicit ManualClock(uint32_t startMillis = 0) : start_(startMillis) {}
    uint32_t millis() const override { return static_cast<uint32_t>(start_ + elapsed_); }
    bool unixMillis(uint64_t& out) const override {
        if (!synced_) return false;
        out = unixAtSync_ + (elapsed_ - elapsedAtSync_);
        return true;
    }
    void advance(uint64_t ms) { elapsed_ += ms; }
    void sync(uint64_t unixMs) {
        synced_ = true;
        unixAtSync_ = unixMs;
        elapsedAtSync_ = elapsed_;
    }
    // A reboot: millis() restarts and the wall clock is unknown until the next SNTP sync.
    void restart(uint32_t startMillis) {
        start_ = startMillis;
        elapsed_ = 0;
        synced_ = false;
    }

private:
    uint32_t start_;
    uint64_t elapsed_ = 0;
    bool synced_ = false;
    uint64_t unixAtSync_ = 0;
    uint64_t elapsedAtSync_ = 0;
};

class MemKv : public KvStore {
public:
    bool get(const char* key, std::vector<uint8_t>& out) override {
        auto it = data_.find(key);
        if (it == data_.end()) return false;
        out = it->second;
        return true;
    }
    bool put(const char* key, const uint8_t* d, size_t len) override {
        data_[key].assign(d, d + len);
        ++writes_[key];
        return true;
    }
    size_t writes(const std::string& key) const {
        auto it = writes_.find(key);
        return it == writes_.end() ? 0 : it->second;
    }
    size_t totalWrites() const {
        size_t n = 0;
        for (const auto& w : writes_) n += w.second;
        return n;
    }
    // The whole partition erased (Arduino's initArduino erases NVS on NO_FREE_PAGES).
    void wipe() { data_.clear(); }
    // A stored value damaged in place (a bit flip the NVS CRC did not catch, a bad migration).
    void corrupt(const std::string& key) {
        auto it = data_.find(key);
        if (it != data_.end() && !it->second.empty()) it->second[it->second.size() / 2] ^= 0x5A;
    }

private:
    std::map<std::string, std::vector<uint8_t>> data_;
    std::map<std::string, size_t> writes_;
};

class MemFlash : public FlashRegion {
public:
    MemFlash(size_t size, size_t sectorSize) : bytes_(size, 0xFF), sectorSize_(sectorSize) {}
    size_t size() const override { return bytes_.size(); }
    size_t sectorSize() const override { return sectorSize_; }
    bool read(size_t off, uint8_t* out, size_t len) override {
        if (off + len > bytes_.size()) return false;
        std::copy(bytes_.begin() + static_cast<long>(off), bytes_.begin() + static_cast<long>(off + len), out);
        return true;
    }
    bool program(size_t off, const uint8_t* d, size_t len) override {
        if (off + len > bytes_.size()) return false;
        for (size_t i = 0; i < len; ++i) {
            if (!spend()) return false;
            bytes_[off + i] &= d[i];  // NOR: bits only go from 1 to 0
        }
        return true;
    }
    bool eraseSector(size_t sector) override {
        size_t first = sector * sectorSize_;
        if (first + sectorSize_ > bytes_.size()) return false;
        ++erases_;
        for (size_t i = 0; i < sectorSize_; ++i) {
            if (!spend()) return false;
            bytes_[first + i] = 0xFF;
        }
        return true;
    }
    // The power fails after `byteOps` more byte programs/erases; everything after fails.
    void cutPowerAfter(size_t byteOps) {
        armed_ = true;
        budget_ = byteOps;
    }
    void restorePower() {
        armed_ = false;
        dead_ = false;
    }
    bool powerLost() const { return dead_; }
    size_t erases() const { return erases_; }

private:
    bool spend() {
        if (dead_) return false;
        if (!armed_) return true;
        if (budget_ == 0) {
            dead_ = true;
            return false;
        }
        --budget_;
        return true;
    }
    std::vector<uint8_t> bytes_;
    size_t sectorSize_;
    bool armed_ = false;
    bool dead_ = false;
    size_t budget_ = 0;
    size_t erases_ = 0;
};

class FakeRelay : public Relay {
public:
    void set(bool closed) override {
        state = closed;
        ++calls;
    }
    bool state = false;
    int calls = 0;
};

class FakeEnergy : public EnergySource {
public:
    bool readKwh(double& kwh) override {
        if (!ok) return false;
        kwh = value;
        return true;
    }
    void setKwh(double v) {
        ok = true;
        value = v;
    }
    void fail() { ok = false; }
    bool ok = false;  // no reading until the test provides one
    double value = 0;
};

// xorshift32: deterministic, so a regId drawn in a test or trace is the same in the C++ core
// and in the Python port (meter_core.py XorShift32).
class XorShiftRandom : public Random {
public:
    explicit XorShiftRandom(uint32_t seed = 1) : x_(seed ? seed : 1) {}
    uint32_t next32() override {
        x_ ^= x_ << 13;
        x_ ^= x_ >> 17;
        x_ ^= x_ << 5;
        return x_;
    }

private:
    uint32_t x_;
};

struct Published {
    std::string topic;
    std::string payload;
    int qos;
    bool retain;
};

// A client that takes every message and acknowledges nothing by itself (tests that need PUBACKs
// use FakeEspMqtt).
class RecordingPublisher : public Publisher {
public:
    int publish(const std::string& topic, const std::string& payload, int qos, bool retain) override {
        if (refuse) return -1;
        messages.push_back({topic, payload, qos, retain});
        return qos > 0 ? ++lastId : 0;
    }
    std::vector<Published> messages;
    bool refuse = false;  // simulates a full outbox
    int lastId = 0;
};

}  // namespace meter

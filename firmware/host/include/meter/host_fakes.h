// In-memory implementations of the core's interfaces for host tests and the trace runner.
// MemFlash behaves like NOR flash (erase to 0xFF, program only clears bits) and can lose power
// after a chosen number of byte operations, to test torn writes. FakeEspMqtt models esp_mqtt's
// outbox (ESP-IDF 4.4, esp-mqtt bb9c8af): devtools/sim/meter_core.py EspMqttOutbox repeats it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "meter/identity.h"
#include "meter/interfaces.h"
#include "meter/ota.h"

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
    uint64_t monotonic() const { return elapsed_; }  // ms since the last restart, never wraps
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

// The identity namespace: a map, with NVS failures to inject.
class MemIdentityStore : public IdentityStore {
public:
    Read get(const char* key, std::vector<uint8_t>& out) override {
        if (failReads) return Read::Failed;
        auto it = data.find(key);
        if (it == data.end()) return Read::Missing;
        out = it->second;
        return Read::Ok;
    }
    bool put(const char* key, const uint8_t* d, size_t len) override {
        if (failWrites) return false;
        std::vector<uint8_t>& v = data[key];
        v.assign(d, d + len);
        if (flipOnWrite && !v.empty()) v[v.size() / 2] ^= 0x20;  // flash that does not keep what it was given
        ++writes;
        return true;
    }
    bool erase(const char* key) override {
        if (failWrites) return false;
        data.erase(key);
        ++writes;
        return true;
    }
    void corrupt(const std::string& key) {
        auto it = data.find(key);
        if (it != data.end() && !it->second.empty()) it->second[it->second.size() / 2] ^= 0x5A;
    }
    std::map<std::string, std::vector<uint8_t>> data;
    bool failReads = false;
    bool failWrites = false;
    bool flipOnWrite = false;
    size_t writes = 0;
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

// RTC memory: survives a soft reset (the caller keeps the object), lost at a power cut (clear()).
class MemRetained : public RetainedStore {
public:
    bool load(std::vector<uint8_t>& out) override {
        if (!valid_) return false;
        out = data_;
        return true;
    }
    void store(const uint8_t* d, size_t n) override {
        data_.assign(d, d + n);
        valid_ = true;
        ++stores;
    }
    void clear() {
        data_.clear();
        valid_ = false;
    }
    size_t stores = 0;

private:
    std::vector<uint8_t> data_;
    bool valid_ = false;
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

// A client that takes every message and acknowledges nothing (for payload tests; the meter's
// own behaviour is tested against FakeEspMqtt).
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

namespace meter {

// esp_mqtt's outbox, as the core sees it (mqtt_client.c / mqtt_outbox.c in ESP-IDF 4.4):
// - esp_mqtt_client_enqueue() stores every message (QoS 0 too, with store=true) with the time
//   it was queued; QoS 1 messages get an id (random with MQTT_MSG_ID_INCREMENTAL off, which is
//   Arduino's setting; 0 makes the enqueue fail), QoS 0 messages id 0.
// - While connected, each pass of the client's task reads PUBACKs (the message leaves the outbox
//   and MQTT_EVENT_PUBLISHED is posted), deletes every message older than the expiry
//   (OUTBOX_EXPIRED_TIMEOUT_MS, 30 s; MQTT_EVENT_DELETED only with MQTT_REPORT_DELETED_MESSAGES),
//   then sends what is queued. A QoS 0 message leaves the outbox once sent.
// - A disconnect keeps the outbox; after the reconnect, unacknowledged messages are sent again
//   (DUP). A PUBACK for a message no longer in the outbox posts nothing. A power cut loses it all.
// Simplified: the broker answers every message at the next pass (or never: acking = false, the
// broker got the message but its PUBACK is lost; blackhole = true, a half-open link that loses
// what is sent until the keepalive notices), and a connected client does not retransmit by
// itself (esp_mqtt does after 1 s; that only adds duplicates of the same report).
class FakeEspMqtt : public Publisher {
public:
    struct Item {
        int id;
        std::string topic;
        std::string payload;
        int qos;
        bool retain;
        uint64_t queuedAt;
        bool transmitted;
        uint64_t pass;  // the pass in which it was last transmitted
        bool resend;    // transmitted on an earlier connection, not acknowledged
        bool lostInTransit;  // its last transmission went into a dead link
    };
    struct Delivery {
        std::string topic;
        std::string payload;
        int qos;
        bool retain;
        int id;
        bool dup;
    };

    explicit FakeEspMqtt(const ManualClock& clock, uint32_t expiryMs = 30000) : clock_(clock), expiryMs_(expiryMs) {}

    int publish(const std::string& topic, const std::string& payload, int qos, bool retain) override {
        if (refuse) return -1;
        int id = 0;
        if (qos > 0) {
            id = idSource != nullptr ? static_cast<int>(idSource->next32() % 65535u) : (lastId_ % 65535) + 1;
            if (idSource == nullptr) lastId_ = id;
            if (id == 0) return -1;
        }
        Item it{id, topic, payload, qos, retain, clock_.monotonic(), false, pass_, false, false};
        if (connected_) {
            transmit(it, false);
            if (qos == 0) return 0;
        }
        items_.push_back(it);
        return id;
    }

    size_t outboxBytes() override {
        size_t n = 0;
        for (const auto& it : items_) n += packetBytes(it);
        return n;
    }

    // The network: the transport is up or down (the core learns it from onConnected()).
    void connect() { connected_ = true; }
    void disconnect() {
        connected_ = false;
        for (auto& it : items_) {
            if (it.transmitted) it.resend = true;
        }
    }
    void powerCut() {
        items_.clear();
        connected_ = false;
    }
    bool connected() const { return connected_; }

    // One pass of the client's task; acknowledged ids go to `acked` (MQTT_EVENT_PUBLISHED),
    // expired ones to `deleted` when reportDeleted (MQTT_EVENT_DELETED).
    void service(std::vector<int>& acked, std::vector<int>& deleted) {
        if (!connected_) return;
        ++pass_;
        for (auto it = items_.begin(); it != items_.end();) {
            if (acking && !it->lostInTransit && it->qos > 0 && it->transmitted && !it->resend && it->pass < pass_) {
                acked.push_back(it->id);
                it = items_.erase(it);
            } else {
                ++it;
            }
        }
        const uint64_t now = clock_.monotonic();
        for (auto it = items_.begin(); it != items_.end();) {
            if (now - it->queuedAt > expiryMs_) {
                if (onExpired) onExpired(it->id);
                if (reportDeleted) deleted.push_back(it->id);
                it = items_.erase(it);
            } else {
                ++it;
            }
        }
        for (auto it = items_.begin(); it != items_.end();) {
            if (!it->transmitted || it->resend) {
                transmit(*it, it->transmitted);
                if (it->qos == 0) {
                    it = items_.erase(it);
                    continue;
                }
            }
            ++it;
        }
    }

    // Runs a pass and hands its events to the core, as the glue's loop() does.
    template <class Core>
    void serviceInto(Core& core) {
        std::vector<int> acked, deleted;
        service(acked, deleted);
        for (int id : acked) core.onPublished(id);
        for (int id : deleted) core.onPublishDropped(id);
    }

    size_t size() const { return items_.size(); }

    bool refuse = false;          // the client refuses to enqueue (out of memory)
    bool acking = true;           // the broker answers with PUBACKs
    bool blackhole = false;       // what is sent is lost (a half-open link)
    bool reportDeleted = false;   // MQTT_REPORT_DELETED_MESSAGES
    Random* idSource = nullptr;   // random message ids like esp_mqtt's; null: 1, 2, 3, ...
    std::function<void(const Delivery&)> onTransmit;
    std::function<void(int)> onExpired;
    std::vector<Delivery> messages;  // what the broker received, in order, duplicates included

private:
    static size_t packetBytes(const Item& it) {
        size_t rem = 2 + it.topic.size() + (it.qos > 0 ? 2 : 0) + it.payload.size();
        size_t lenBytes = rem < 128 ? 1 : rem < 16384 ? 2 : 3;
        return 1 + lenBytes + rem;
    }
    void transmit(Item& it, bool dup) {
        it.transmitted = true;
        it.resend = false;
        it.pass = pass_;
        it.lostInTransit = blackhole;
        if (blackhole) return;
        Delivery d{it.topic, it.payload, it.qos, it.retain, it.id, dup};
        messages.push_back(d);
        if (onTransmit) onTransmit(d);
    }

    const ManualClock& clock_;
    uint32_t expiryMs_;
    bool connected_ = true;
    uint64_t pass_ = 0;
    int lastId_ = 0;
    std::vector<Item> items_;
};

}  // namespace meter

namespace meter {

// The device's OTA primitives (esp_https_ota into the inactive slot, esp_ota_ops) over a table
// of images by URL. A fetch takes fetchMs; restart() and rollback() only raise a flag that the
// test or trace runner turns into a reboot into the right image. The Python port's
// SimOtaPlatform is the same model with an injected fetch function.
class FakeOtaPlatform : public OtaPlatform {
public:
    struct Image {
        std::string bytes;
        std::string version;   // what the image reports as fw once it runs
        bool crashes = false;  // it panics right after boot (before it can report)
        bool invalid = false;  // esp_https_ota_finish refuses it (not an app image)
    };

    explicit FakeOtaPlatform(const ManualClock& clock) : clock_(clock) {}

    bool beginFetch(const std::string& url) override {
        ++fetches;
        fetching_ = true;
        haveFetched_ = false;
        url_ = url;
        startedAt_ = clock_.monotonic();
        return true;
    }
    Fetch pollFetch(std::string& error) override {
        if (!fetching_) {
            error = "no download running";
            return Fetch::Failed;
        }
        if (clock_.monotonic() - startedAt_ < fetchMs) return Fetch::InProgress;
        fetching_ = false;
        auto it = images.find(url_);
        if (it == images.end()) {
            error = "HTTP 404";
            return Fetch::Failed;
        }
        fetched_ = it->second;
        haveFetched_ = true;
        return Fetch::Done;
    }
    bool fetchedSha256(uint8_t out[32]) override {
        return haveFetched_ && sha256(reinterpret_cast<const uint8_t*>(fetched_.bytes.data()), fetched_.bytes.size(), out);
    }
    void abortFetch() override {
        fetching_ = false;
        haveFetched_ = false;
    }
    bool activate(std::string& error) override {
        if (!haveFetched_) {
            error = "nothing downloaded";
            return false;
        }
        if (fetched_.invalid) {
            error = "not a valid app image";
            return false;
        }
        next = fetched_;
        haveNext = true;
        return true;
    }
    void restart() override { restartRequested = true; }
    bool markValid() override {
        ++markedValid;
        return true;
    }
    void rollback() override { rollbackRequested = true; }
    // A reset: a download in progress is gone (the boot image choice is in flash and stays).
    void reset() {
        fetching_ = false;
        haveFetched_ = false;
        restartRequested = false;
        rollbackRequested = false;
    }

    std::map<std::string, Image> images;
    uint64_t fetchMs = 5000;
    Image next;              // the image the next restart boots, after activate()
    bool haveNext = false;
    bool restartRequested = false;
    bool rollbackRequested = false;
    int markedValid = 0;
    int fetches = 0;

private:
    const ManualClock& clock_;
    bool fetching_ = false;
    bool haveFetched_ = false;
    std::string url_;
    uint64_t startedAt_ = 0;
    Image fetched_;
};

}  // namespace meter

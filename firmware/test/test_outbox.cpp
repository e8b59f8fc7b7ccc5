// The ring is the outbox: a report leaves the ring only on its PUBACK, a report that esp_mqtt
// dropped from its outbox (30 s expiry, silently) is sent again, a power cut at any moment loses
// nothing, and the only duplicates are copies of the same report (same regId and seq).
#include <map>
#include <set>
#include <tuple>

#include "rig.h"

using namespace meter;

namespace {

// Records every report the core puts into the ring: the reports that must reach the broker.
class SpyLog : public RecordLog {
public:
    SpyLog(RecordLog& inner, std::vector<Report>& appended) : inner_(inner), appended_(appended) {}
    bool append(const uint8_t* d, size_t n) override {
        Report r;
        ReportMeta m;
        if (unpackReport(d, n, r, m)) appended_.push_back(r);
        return inner_.append(d, n);
    }
    size_t size() const override { return inner_.size(); }
    bool peekAt(size_t i, std::vector<uint8_t>& out, uint32_t& key) override { return inner_.peekAt(i, out, key); }
    bool consume(uint32_t key) override { return inner_.consume(key); }
    bool peekNewest(std::vector<uint8_t>& out) override { return inner_.peekNewest(out); }

private:
    RecordLog& inner_;
    std::vector<Report>& appended_;
};

// A meter on a network that can drop, stall and lose power.
struct Field {
    MeterConfig cfg;
    ManualClock clock;
    MemKv kv;
    MemFlash flash{64 * 64, 64};
    std::unique_ptr<FlashRing> ring;
    std::unique_ptr<SpyLog> spy;
    FakeRelay relay;
    FakeEnergy energy;
    FakeEspMqtt mqtt{clock};
    XorShiftRandom rng{5};
    MemRetained rtc;
    std::unique_ptr<MeterCore> core;
    std::vector<Report> appended;
    double sensor = 1000;
    bool consuming = true;

    Field() {
        cfg.statusIntervalMs = 0;
        cfg.reportIntervalMs = 10000;
        cfg.sampleIntervalMs = 1000;
        cfg.seqBlock = 4;
        mqtt.disconnect();
        boot("poweron");
    }
    void boot(const std::string& reason) {
        ring.reset(new FlashRing(flash, 64));
        spy.reset(new SpyLog(*ring, appended));
        core.reset(new MeterCore(cfg, clock, kv, *spy, relay, energy, mqtt, rng, reason));
        core->attachRetained(rtc);
        energy.setKwh(sensor);
        core->begin();
        core->onMessage(core->topic("command/balance"), R"({"balance": 1000, "timestamp": 1})");
    }
    void step(uint64_t ms) {
        for (uint64_t t = 0; t < ms; t += 1000) {
            clock.advance(1000);
            if (consuming) sensor += 0.0005;  // 1.8 kW
            energy.setKwh(sensor);
            mqtt.serviceInto(*core);
            core->loop();
        }
    }
    void up() {
        mqtt.connect();
        core->onConnected();
    }
    void down() {
        mqtt.disconnect();
        core->onDisconnected();
    }
    void powerCut() {
        mqtt.powerCut();
        rtc.clear();
        clock.restart(0);
        boot("poweron");
    }
    // The household stops; the network is up; everything still in the ring gets out.
    void settle() {
        consuming = false;
        mqtt.acking = true;
        mqtt.blackhole = false;
        if (!mqtt.connected()) up();
        step(120000);
        mqtt.serviceInto(*core);  // the PUBACK of the report sent in the last loop
    }
    // Every report that went into the ring reached the broker, and copies are identical.
    void checkDelivered() {
        std::map<std::pair<std::string, double>, std::string> seen;
        for (const auto& m : mqtt.messages) {
            if (m.topic != core->topic("consumption")) continue;
            Payload p(m.payload);
            auto key = std::make_pair(p.str("regId"), p.num("seq"));
            auto it = seen.find(key);
            if (it != seen.end()) CHECK_MESSAGE(it->second == m.payload, "a duplicate must be the same report");
            seen[key] = m.payload;
        }
        for (const auto& r : appended) {
            CAPTURE(r.seq);
            CHECK(seen.count(std::make_pair(r.regId, static_cast<double>(r.seq))) == 1);
        }
        CHECK(seen.size() == appended.size());
    }
};

size_t count(const FakeEspMqtt& m, const std::string& topic) {
    size_t n = 0;
    for (const auto& d : m.messages) n += d.topic == topic ? 1 : 0;
    return n;
}

}  // namespace

TEST_CASE("a report leaves the ring only when its PUBACK arrives") {
    Field f;
    f.up();
    f.step(10000);  // one report, handed to the client
    REQUIRE(count(f.mqtt, f.core->topic("consumption")) == 1);
    CHECK(f.ring->size() == 1);
    CHECK(f.core->inflight() == 1);
    f.step(1000);  // the PUBACK
    CHECK(f.ring->size() == 0);
    CHECK(f.core->inflight() == 0);
    f.checkDelivered();
}

TEST_CASE("a report that expired unacknowledged in esp_mqtt's outbox is sent again from the ring") {
    Field f;
    f.up();
    f.mqtt.acking = false;  // the broker stalls
    f.step(10000);
    std::vector<int> expired;
    f.mqtt.onExpired = [&](int id) { expired.push_back(id); };
    f.step(31000);  // queued more than 30 s ago: esp_mqtt deletes it, silently
    CHECK(expired.size() == 1);
    CHECK(f.ring->size() == 4);  // nothing was acknowledged
    CHECK(count(f.mqtt, f.core->topic("consumption")) == 4);
    f.step(1000);  // one second after the expiry the core sends it again
    CHECK(count(f.mqtt, f.core->topic("consumption")) == 5);
    f.settle();
    CHECK(f.ring->size() == 0);
    f.checkDelivered();
}

TEST_CASE("with MQTT_REPORT_DELETED_MESSAGES the report is sent again at the next loop") {
    Field f;
    f.mqtt.reportDeleted = true;
    f.cfg.outboxExpiryMs = 600000;  // the core's own timer would not fire in this test
    f.core.reset();
    f.boot("poweron");
    f.up();
    f.mqtt.acking = false;
    f.step(40000);  // four reports, unacknowledged
    CHECK(count(f.mqtt, f.core->topic("consumption")) == 4);
    f.step(1000);  // the first was queued more than 30 s ago: MQTT_EVENT_DELETED, sent again at once
    CHECK(count(f.mqtt, f.core->topic("consumption")) == 5);
    f.settle();
    CHECK(f.ring->size() == 0);
    f.checkDelivered();
}

TEST_CASE("a drop followed by a reconnect after more than 30 s loses nothing") {
    Field f;
    f.up();
    f.mqtt.acking = false;
    f.step(30000);  // three reports in flight, unacknowledged
    REQUIRE(f.core->inflight() == 3);
    f.down();
    f.step(120000);  // the back-off reaches 2 minutes; twelve more reports wait in the ring
    f.mqtt.acking = true;
    f.up();  // esp_mqtt deletes the three at its first pass; the core sends them from the ring
    f.settle();
    CHECK(f.ring->size() == 0);
    f.checkDelivered();
    CHECK(f.appended.size() == 27);
}

TEST_CASE("reports in flight are limited by count and by the outbox's size") {
    Field f;
    f.down();
    f.step(300000);  // 30 reports in the ring
    REQUIRE(f.ring->size() == 30);
    f.mqtt.acking = false;
    f.up();
    f.step(1000);
    CHECK(f.core->inflight() == f.cfg.maxInflight);
    CHECK(f.mqtt.size() == f.cfg.maxInflight);
    const size_t perReport = f.mqtt.outboxBytes() / f.cfg.maxInflight;

    SUBCASE("a small outbox limit holds back more") {
        f.cfg.maxOutboxBytes = static_cast<uint32_t>(2 * perReport + perReport / 2);
        f.core.reset();
        f.mqtt.powerCut();
        f.mqtt.connect();
        f.boot("poweron");
        f.core->onConnected();
        f.step(1000);
        CHECK(f.core->inflight() == 3);
    }
}

TEST_CASE("a PUBACK for an id that two messages share consumes neither, and both are sent again") {
    struct Ids : Random {
        std::vector<uint32_t> ids{7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20};
        size_t i = 0;
        uint32_t next32() override { return ids[i++ % ids.size()]; }
    } ids;
    Field f;
    f.mqtt.idSource = &ids;
    f.up();
    f.mqtt.acking = false;
    f.step(20000);  // two reports, both with id 7 (esp_mqtt draws ids at random)
    REQUIRE(f.core->inflight() == 2);
    f.mqtt.acking = true;
    f.step(1000);  // two PUBACKs for id 7: the core cannot tell which report each was for
    CHECK(f.ring->size() == 2);
    f.step(40000);  // expired in the core's view: sent again with fresh ids, acknowledged
    f.settle();
    CHECK(f.ring->size() == 0);
    f.checkDelivered();
}

TEST_CASE("no report is lost or doubled across a drop, a long reconnect and a power cut at any step") {
    // A script of network events; the power is cut once, after step `cut` (every step in turn).
    const int steps = 24;
    for (int cut = -1; cut < steps; ++cut) {
        CAPTURE(cut);
        Field f;
        for (int s = 0; s < steps; ++s) {
            switch (s % 8) {
                case 0: f.up(); break;
                case 1: f.mqtt.acking = false; break;    // PUBACKs lost
                case 2: f.mqtt.blackhole = true; break;  // then a half-open link loses what is sent
                case 3: f.down(); break;                 // until the keepalive drops it
                case 5: f.mqtt.acking = true; f.mqtt.blackhole = false; break;
                case 6: f.up(); break;                 // back after more than 30 s
                default: break;
            }
            f.step(s % 8 == 4 ? 45000 : 7000);
            if (s == cut) f.powerCut();
        }
        f.settle();
        CHECK(f.ring->size() == 0);
        f.checkDelivered();
        // Every kWh billed went out in some report.
        std::string last;
        for (const auto& m : f.mqtt.messages) {
            if (m.topic == f.core->topic("consumption")) last = m.payload;
        }
        REQUIRE_FALSE(last.empty());
        CHECK(Payload(last).num("energyTotal") == doctest::Approx(round6(f.core->energyTotal())).epsilon(1e-12));
    }
}

// Reconciliation, relay policy, reports, offline buffering, persistence and status.
#include "rig.h"

using namespace meter;

namespace {
// A meter that has billed `kwh` since it was installed, with a balance of 10.
void consume(Rig& r, double from, double kwh) {
    r.energy.setKwh(from);
    r.run(1000);
    r.energy.setKwh(from + kwh);
    r.run(1000);
}
}  // namespace

TEST_CASE("a balance command with energyTotal keeps consumption that was in flight") {
    Rig r;
    r.boot();
    r.core->onConnected();
    consume(r, 0, 5.0);
    REQUIRE(r.core->energyTotal() == 5.0);
    // The ledger accounted up to 4.75 kWh; the meter has billed 0.25 kWh more since.
    r.balanceCmd(R"({"balance": 10.5, "timestamp": 1698765432000, "energyTotal": 4.75, "cmdId": "c-1"})");
    CHECK(r.core->balance() == 10.25);
    auto acks = r.on("balance");
    REQUIRE(acks.size() == 1);
    Payload ack(acks[0].payload);
    CHECK(ack.str("meterNo") == "METER001");
    CHECK(ack.num("balance") == 10.25);
    CHECK(ack.str("cmdId") == "c-1");
    CHECK(acks[0].qos == 0);
    CHECK_FALSE(acks[0].retain);

    SUBCASE("the same command delivered twice (QoS 1) gives the same balance") {
        r.balanceCmd(R"({"balance": 10.5, "timestamp": 1698765432000, "energyTotal": 4.75, "cmdId": "c-1"})");
        CHECK(r.core->balance() == 10.25);
    }
    SUBCASE("a ledger ahead of the meter's register within the same history credits the difference") {
        r.balanceCmd(R"({"balance": 2, "timestamp": 1, "energyTotal": 5.5, "regId": ")" + r.core->regId() + "\"}");
        CHECK(r.core->balance() == 2.5);
    }
    SUBCASE("without regId, a register ahead of the meter's is not credited") {
        r.balanceCmd(R"({"balance": 2, "timestamp": 1, "energyTotal": 5.5})");
        CHECK(r.core->balance() == 2);
        Payload notice(r.on("status").at(r.on("status").size() - 2).payload);
        CHECK(notice.str("status") == "error");
        CHECK(notice.str("message") == kMsgRegisterAhead);
    }
}

TEST_CASE("a seed-only balance command sets the balance and is acknowledged without cmdId") {
    Rig r;
    r.boot();
    r.core->onConnected();
    consume(r, 0, 5.0);
    r.balanceCmd(R"({"balance": 5.25, "timestamp": 1698765432000})");
    CHECK(r.core->balance() == 5.25);
    Payload ack(r.on("balance").at(0).payload);
    CHECK(ack.size() == 4);  // meterNo, balance, timestamp, regId
    CHECK(ack.str("regId") == r.core->regId());
    CHECK_FALSE(ack.has("cmdId"));
}

TEST_CASE("malformed commands change nothing and publish nothing") {
    Rig r;
    r.boot();
    r.core->onConnected();
    r.balanceCmd(R"({"balance": 7, "timestamp": 1})");
    size_t before = r.pub.messages.size();
    const char* bad[] = {
        "", "not json", "[1,2]", R"({"balance": "12"})", R"({"balance": true})", R"({"balance": NaN})",
        R"({"balance": 1e400})", R"({"balance": 01})", R"({"balance": 1.})", R"({"balance": 5} x)",
        R"({"balance": 5, "energyTotal": -1})", R"({"balance": 5, "energyTotal": "3"})",
        R"({"timestamp": 1})", R"({"balance": 2e9})", "{\"balance\": 5}\x01",
    };
    for (const char* p : bad) {
        CAPTURE(p);
        r.balanceCmd(p);
        CHECK(r.core->balance() == 7);
    }
    std::string big = R"({"balance": 5, "pad": ")" + std::string(1100, 'x') + "\"}";
    r.balanceCmd(big);
    r.core->onMessage("smartmeter/OTHER/command/balance", R"({"balance": 99, "timestamp": 1})");
    r.relayCmd(R"({"state": "sideways"})");
    r.relayCmd(R"({"state": 1})");
    CHECK(r.core->balance() == 7);
    CHECK(r.core->relayOverride() == RelayOverride::Auto);
    CHECK(r.pub.messages.size() == before);
}

TEST_CASE("an unusable cmdId is dropped from the echo but the balance still applies") {
    Rig r;
    r.boot();
    r.core->onConnected();
    r.balanceCmd(R"({"balance": 3, "timestamp": 1, "cmdId": 42})");
    r.balanceCmd(R"({"balance": 4, "timestamp": 1, "cmdId": ")" + std::string(65, 'a') + "\"}");
    auto acks = r.on("balance");
    REQUIRE(acks.size() == 2);
    CHECK_FALSE(Payload(acks[0].payload).has("cmdId"));
    CHECK_FALSE(Payload(acks[1].payload).has("cmdId"));
    CHECK(r.core->balance() == 4);
}

TEST_CASE("relay policy: on iff balance > 0, overrides, and the sensor fail-safe") {
    Rig r;
    r.cfg.sensorFailTimeoutMs = 1000;
    r.boot();
    CHECK_FALSE(r.relay.state);  // a new meter has no credit
    r.balanceCmd(R"({"balance": 0.000001, "timestamp": 1})");
    CHECK(r.relay.state);
    r.balanceCmd(R"({"balance": 0, "timestamp": 1})");
    CHECK_FALSE(r.relay.state);
    r.balanceCmd(R"({"balance": -2, "timestamp": 1})");
    CHECK_FALSE(r.relay.state);

    r.relayCmd(R"({"state": "on", "reason": "emergency", "cmdId": "r-1", "timestamp": 1})");
    CHECK(r.relay.state);
    r.relayCmd(R"({"state": "auto"})");
    CHECK_FALSE(r.relay.state);
    r.balanceCmd(R"({"balance": 8, "timestamp": 1})");
    CHECK(r.relay.state);
    r.relayCmd(R"({"state": "off", "reason": "maintenance"})");
    CHECK_FALSE(r.relay.state);

    SUBCASE("a maintenance 'off' survives a reboot") {
        r.reboot();
        CHECK(r.core->relayOverride() == RelayOverride::Off);
        CHECK_FALSE(r.relay.state);
    }
    SUBCASE("forced 'on' does not beat a dead sensor") {
        r.relayCmd(R"({"state": "on"})");
        r.energy.fail();
        r.run(2000);
        CHECK_FALSE(r.relay.state);
    }
}

TEST_CASE("a relay command is answered with a status that echoes cmdId") {
    Rig r;
    r.boot();
    r.core->onConnected();
    r.balanceCmd(R"({"balance": 8, "timestamp": 1})");
    r.relayCmd(R"({"state": "off", "reason": "maintenance", "cmdId": "r-9", "timestamp": 1})");
    Payload s(r.on("status").back().payload);
    CHECK(s.str("cmdId") == "r-9");
    CHECK(s.str("relay") == "off");
    CHECK(s.str("message") == "Relay override: off");
}

TEST_CASE("connect publishes online with the ext fields, then the condition, and the will is offline") {
    Rig r;
    r.boot("brownout");
    r.clock.advance(42000);
    Message will = r.core->willMessage();
    CHECK(will.topic == "smartmeter/METER001/status");
    CHECK(will.retain);
    CHECK(Payload(will.payload).str("status") == "offline");
    r.core->onConnected();
    auto st = r.on("status");
    REQUIRE(st.size() == 2);  // online, then low_balance (a new meter has no credit)
    Payload online(st[0].payload);
    CHECK(online.str("status") == "online");
    CHECK(online.str("message") == "Device operating normally");
    CHECK(online.num("wifi_rssi") == -65);
    CHECK(online.str("relay") == "off");
    CHECK(online.str("fw") == "1.0.0");
    CHECK(online.num("uptime") == 42);
    CHECK(online.str("resetReason") == "brownout");
    CHECK(online.num("timestamp") == 42000);
    CHECK(online.str("regId") == r.core->regId());
    CHECK(online.num("unbilledKwh") == 0);
    CHECK(st[0].qos == 0);
    CHECK(st[0].retain);
    CHECK(Payload(st[1].payload).str("status") == "low_balance");

    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");  // back above the threshold
    CHECK(Payload(r.on("status").back().payload).str("status") == "online");
}

TEST_CASE("reports every interval with strictly increasing seq, energyTotal, and SNTP time") {
    Rig r;
    r.cfg.reportIntervalMs = 10000;
    r.boot();
    r.core->onConnected();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.clock.sync(1698765400000);
    r.energy.setKwh(0);
    r.run(1000);
    r.energy.setKwh(0.125);
    r.run(19000);
    auto reports = r.on("consumption");
    REQUIRE(reports.size() == 2);
    Payload a(reports[0].payload), b(reports[1].payload);
    CHECK(reports[0].qos == 1);
    CHECK_FALSE(reports[0].retain);
    CHECK(a.num("seq") == 0);
    CHECK(b.num("seq") == 1);
    CHECK(a.num("unitsConsumed") == 0.125);
    CHECK(a.num("remainingBalance") == 9.875);
    CHECK(a.num("totalConsumed") == 0.125);
    CHECK(a.num("energyTotal") == 0.125);
    CHECK(a.num("timestamp") == 1698765410000);
    CHECK(b.num("unitsConsumed") == 0);
    CHECK(b.num("energyTotal") == 0.125);
    CHECK(b.num("timestamp") == 1698765420000);
}

TEST_CASE("offline reports are buffered and replayed oldest-first, before newer ones") {
    Rig r;
    r.cfg.replayBatch = 2;
    r.boot();
    r.energy.setKwh(0);
    r.run(1000);
    for (int i = 1; i <= 5; ++i) {
        r.energy.setKwh(i * 0.5);
        r.run(30000);
    }
    CHECK(r.on("consumption").empty());
    CHECK(r.ring->size() == 5);
    r.core->onConnected();
    CHECK(r.on("consumption").size() == 2);  // one batch at connect
    r.run(1000);
    r.run(1000);
    auto reports = r.on("consumption");
    REQUIRE(reports.size() == 5);
    for (int i = 0; i < 5; ++i) CHECK(Payload(reports[i].payload).num("seq") == i);
    CHECK(Payload(reports[4].payload).num("energyTotal") == 2.5);
    CHECK(r.ring->size() == 0);

    SUBCASE("a refused publish keeps the report for later") {
        r.pub.refuse = true;
        r.run(30000);
        CHECK(r.ring->size() == 1);
        r.pub.refuse = false;
        r.run(1000);  // sent
        CHECK(r.ring->size() == 1);
        r.run(1000);  // acknowledged
        CHECK(r.ring->size() == 0);
        CHECK(Payload(r.on("consumption").back().payload).num("seq") == 5);
    }
}

TEST_CASE("seq never repeats across reboots and costs one flash write per block") {
    Rig r;
    r.cfg.seqBlock = 4;
    r.cfg.reportIntervalMs = 1000;
    r.boot();
    r.core->onConnected();
    r.run(6000);  // seq 0..5
    CHECK(r.core->nextSeq() == 6);
    r.reboot();  // power cut: the next boot resumes above everything sent
    r.core->onConnected();
    r.run(1000);
    double afterReboot = Payload(r.on("consumption").back().payload).num("seq");
    CHECK(afterReboot == 8);  // the block 4..7 was reserved: 6 and 7 are skipped, never reused
    CHECK(r.kv.writes("seq") == 3);  // first boot (4), seq 4 reached (8), second boot (12)
}

TEST_CASE("the state is written at most once a minute while billing, payments and new baselines at once") {
    Rig r;
    r.cfg.persistIntervalMs = 60000;
    r.boot();
    CHECK(r.kv.writes("state") == 1);  // the new register history is written at once
    r.balanceCmd(R"({"balance": 100, "timestamp": 1})");
    CHECK(r.kv.writes("state") == 2);  // the payment is written immediately
    r.energy.setKwh(0);
    r.run(1000);
    CHECK(r.kv.writes("state") == 3);  // the first sensor reading of a boot without a saved one
    for (int s = 1; s <= 600; ++s) {  // 10 minutes of steady consumption, a report every 30 s
        r.energy.setKwh(s * 0.001);
        r.run(1000);
    }
    // One write a minute, not one per report (20 reports went out).
    CHECK(r.ring->size() == 16);  // 20 reports into a 16-slot ring while offline
    CHECK(r.kv.writes("state") == 3 + 10);
    r.run(59000);  // no consumption: nothing new to write
    CHECK(r.kv.writes("state") == 3 + 10);
    double billed = r.core->energyTotal();
    r.reboot();  // power cut: the report log and the saved sensor register cover the gap
    CHECK(r.core->energyTotal() == billed);
    CHECK(r.core->balance() == doctest::Approx(100 - billed).epsilon(1e-12));
}

TEST_CASE("a power cut right after a report never steps the register on the wire backwards") {
    Rig r;
    r.cfg.persistIntervalMs = 60000;
    r.boot();
    r.core->onConnected();
    r.balanceCmd(R"({"balance": 50, "timestamp": 1})");
    r.energy.setKwh(1200);
    r.run(1000);  // baseline
    r.energy.setKwh(1200.25);
    r.run(29000);  // report seq 0 with energyTotal 0.25, 30 s after boot
    REQUIRE(r.on("consumption").size() == 1);
    double sent = Payload(r.on("consumption")[0].payload).num("energyTotal");
    CHECK(sent == 0.25);
    r.energy.setKwh(1200.5);
    r.run(5000);  // billed, not yet reported, not yet persisted (throttle)
    r.reboot();   // the state holds the register of the last report and the sensor reading then
    CHECK(r.core->energyTotal() == sent);
    r.core->onConnected();
    r.run(1000);  // the reading 1200.5 is 0.25 above the saved one: billed, not forgiven
    CHECK(r.core->energyTotal() == 0.5);
    r.energy.setKwh(1200.6);
    r.run(30000);
    auto reports = r.on("consumption");
    REQUIRE(reports.size() == 2);
    Payload after(reports[1].payload);
    CHECK(after.num("energyTotal") == doctest::Approx(0.6).epsilon(1e-12));
    CHECK(after.num("seq") == 64);  // next reserved block
    CHECK(after.str("regId") == Payload(reports[0].payload).str("regId"));
}

namespace {
// NVS that stops accepting the state record (partition full, flash fault).
class FlakyKv : public MemKv {
public:
    bool put(const char* key, const uint8_t* d, size_t len) override {
        if (refuseState && std::string(key) == kKeyState) return false;
        return MemKv::put(key, d, len);
    }
    bool refuseState = false;
};
}  // namespace

TEST_CASE("the report log is a second witness of the register when the state write fails") {
    MeterConfig cfg;
    cfg.statusIntervalMs = 0;
    cfg.reportIntervalMs = 10000;
    cfg.ratedMaxKw = 1e6;
    ManualClock clock;
    FlakyKv kv;
    MemFlash flash{16 * 64, 64};
    FakeRelay relay;
    FakeEnergy energy;
    FakeEspMqtt pub(clock);
    XorShiftRandom rng(7);
    auto ring = std::make_unique<FlashRing>(flash, 64);
    auto core = std::make_unique<MeterCore>(cfg, clock, kv, *ring, relay, energy, pub, rng, "poweron");
    core->begin();
    core->onMessage(core->topic("command/balance"), R"({"balance": 10, "timestamp": 1})");
    kv.refuseState = true;
    energy.setKwh(7);
    auto run = [&](int seconds) {
        for (int i = 0; i < seconds; ++i) {
            clock.advance(1000);
            pub.serviceInto(*core);
            core->loop();
        }
    };
    run(1);
    energy.setKwh(7.5);
    run(19);  // two reports while offline: both in the ring, the state write refused
    REQUIRE(ring->size() == 2);
    core->onConnected();
    run(1);  // sent and acknowledged: consumed in flash, still the newest record
    CHECK(ring->size() == 0);
    CHECK(pub.messages.size() >= 2);
    clock.restart(0);
    ring = std::make_unique<FlashRing>(flash, 64);
    core = std::make_unique<MeterCore>(cfg, clock, kv, *ring, relay, energy, pub, rng, "poweron");
    core->begin();
    CHECK(core->energyTotal() == 0.5);  // from the ring, not the stale NVS value (0)
    CHECK(core->balance() == 9.5);
}

TEST_CASE("commands the glue could not queue are reported, with their count") {
    Rig r;
    r.boot();
    r.core->onConnected();
    r.core->commandsLost(3);
    auto st = r.on("status");
    Payload notice(st.back().payload);
    CHECK(notice.str("status") == "error");
    CHECK(notice.str("message") == std::string(kMsgCommandsLost) + "3");
}

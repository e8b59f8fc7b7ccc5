// The state in retained (RTC) RAM: a soft reset resumes exactly, with no flash write between
// reports; a damaged or missing copy falls back to NVS and the report ring.
#include "rig.h"

using namespace meter;

TEST_CASE("a watchdog reset between reports resumes exactly from retained RAM") {
    Rig r;
    r.cfg.persistIntervalMs = 600000;  // NVS would be 10 minutes behind
    r.boot();
    r.core->onConnected();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.energy.setKwh(100);
    r.run(1000);
    for (int s = 1; s <= 40; ++s) {  // a report at 30 s, then 10 s more of billing
        r.energy.setKwh(100 + s * 0.0005);
        r.run(1000);
    }
    const double billed = r.core->energyTotal();
    const size_t nvsWrites = r.kv.totalWrites();
    REQUIRE(billed == doctest::Approx(0.02).epsilon(1e-9));
    r.energy.setKwh(100.0215);  // used during the reset
    r.softReset("task_wdt");
    CHECK(r.core->energyTotal() == billed);  // RTC: not the 30 s report, not NVS
    r.core->onConnected();
    r.run(1000);
    CHECK(r.core->energyTotal() == doctest::Approx(0.0215).epsilon(1e-9));
    r.run(29000);
    auto reports = r.on("consumption");
    REQUIRE(reports.size() == 2);
    Payload first(reports.front().payload);
    Payload second(reports.back().payload);
    // unitsConsumed covers everything since the previous report, also what came before the reset.
    CHECK(second.num("unitsConsumed") ==
          doctest::Approx(second.num("energyTotal") - first.num("energyTotal")).epsilon(1e-9));
    CHECK(second.num("energyTotal") == doctest::Approx(0.0215).epsilon(1e-9));
    CHECK(second.num("totalConsumed") == doctest::Approx(0.0015).epsilon(1e-9));  // since this boot
    // Only the reset itself wrote NVS (the restored state brought level, the seq block).
    CHECK(r.kv.totalWrites() <= nvsWrites + 2);
    CHECK(r.rtc.stores > 40);
}

TEST_CASE("a damaged retained copy is ignored: NVS and the report ring take over") {
    Rig r;
    r.boot();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.energy.setKwh(5);
    r.run(1000);
    r.energy.setKwh(5.5);
    r.run(30000);  // one report in the ring with energyTotal 0.5
    std::vector<uint8_t> v;
    REQUIRE(r.rtc.load(v));
    v[10] ^= 0x40;
    r.rtc.store(v.data(), v.size());
    r.softReset("panic");
    CHECK(r.core->energyTotal() == 0.5);
    CHECK(r.core->balance() == 9.5);
    RetainedRecord back;
    REQUIRE(r.rtc.load(v));
    CHECK(decodeRetained(v, back));  // rewritten from the restored state
}

TEST_CASE("retained records: CRC, version and values are checked") {
    RetainedRecord rec;
    rec.state.regId = "AbCdEf12";
    rec.state.energyTotal = 3;
    rec.state.balance = 4;
    rec.relayOverride = RelayOverride::On;
    rec.intervalUnits = 0.125;
    auto v = encodeRetained(rec);
    REQUIRE(v.size() == kRetainedRecordBytes);
    RetainedRecord back;
    REQUIRE(decodeRetained(v, back));
    CHECK(back.intervalUnits == 0.125);
    CHECK(back.relayOverride == RelayOverride::On);
    for (size_t i = 0; i < v.size(); ++i) {
        auto bad = v;
        bad[i] ^= 0x10;
        CAPTURE(i);
        CHECK_FALSE(decodeRetained(bad, back));
    }
}

// millis() wraps every 49.7 days; everything timed must keep working across the wrap.
#include "rig.h"

using namespace meter;

TEST_CASE("elapsedMs is right across the 32-bit wrap") {
    CHECK(elapsedMs(5, 0xFFFFFFFBu) == 10);
    CHECK(elapsedMs(0, 0xFFFFFFFFu) == 1);
    CHECK(elapsedMs(30000, 0) == 30000);
    CHECK(elapsedMs(0xFFFFFFFFu, 0) == 0xFFFFFFFFu);
}

TEST_CASE("the 64-bit uptime keeps counting through several wraps") {
    UptimeCounter up(0xFFFFF000u);
    CHECK(up.update(0xFFFFFFFFu) == 0xFFF);
    CHECK(up.update(0x00000FFFu) == 0x1FFF);
    uint64_t total = up.total();
    for (int i = 0; i < 3; ++i) {
        total = up.update(0x80000FFFu);
        total = up.update(0x00000FFFu);
    }
    CHECK(total == 0x1FFFull + 3ull * 0x100000000ull);
}

TEST_CASE("reports keep a 30 s rhythm and ms-since-boot timestamps across the wrap") {
    Rig r(0xFFFFFFFFu - 15000);  // wraps 15 s after boot
    r.boot();
    r.core->onConnected();
    r.energy.setKwh(1.0);
    r.run(95000);
    auto reports = r.on("consumption");
    REQUIRE(reports.size() == 3);
    CHECK(Payload(reports[0].payload).num("timestamp") == 30000);
    CHECK(Payload(reports[1].payload).num("timestamp") == 60000);
    CHECK(Payload(reports[2].payload).num("timestamp") == 90000);
    CHECK(Payload(r.on("status").back().payload).num("timestamp") < 1e12);
}

TEST_CASE("the sensor fail timeout is measured across the wrap") {
    Rig r(0xFFFFFFFFu - 2500);
    r.cfg.sensorFailTimeoutMs = 5000;
    r.boot();
    r.balanceCmd(R"({"balance": 3, "timestamp": 1})");
    r.energy.fail();
    r.run(4000);  // a naive `now > since + timeout` would fire or never fire here
    CHECK(r.relay.state);
    r.run(2000);
    CHECK_FALSE(r.relay.state);
}

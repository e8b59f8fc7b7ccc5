// Billing on register deltas: baseline after boot, non-positive deltas, sensor fail-safe.
#include <limits>

#include "rig.h"

using namespace meter;

TEST_CASE("the first reading after boot is a baseline, not consumption") {
    Rig r;
    r.boot();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.energy.setKwh(1234.5);  // a register that already counted 1234.5 kWh before we booted
    r.run(1000);
    CHECK(r.core->balance() == 10);
    CHECK(r.core->energyTotal() == 0);
    r.energy.setKwh(1234.75);
    r.run(1000);
    CHECK(r.core->balance() == doctest::Approx(9.75).epsilon(1e-12));
    CHECK(r.core->energyTotal() == doctest::Approx(0.25).epsilon(1e-12));
    CHECK(r.core->sessionTotal() == doctest::Approx(0.25).epsilon(1e-12));
}

TEST_CASE("non-positive deltas are not billed and a register reset re-baselines") {
    Rig r;
    r.boot();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.energy.setKwh(100.0);
    r.run(1000);
    r.energy.setKwh(100.5);
    r.run(1000);
    double afterFirst = r.core->balance();
    r.run(3000);  // same register: delta 0
    CHECK(r.core->balance() == afterFirst);
    r.energy.setKwh(3.0);  // sensor replaced or reset: register went backwards
    r.run(1000);
    CHECK(r.core->balance() == afterFirst);
    r.energy.setKwh(3.25);  // billed from the new baseline, not from 100.5
    r.run(1000);
    CHECK(r.core->balance() == doctest::Approx(afterFirst - 0.25).epsilon(1e-12));
    CHECK(r.core->energyTotal() == doctest::Approx(0.75).epsilon(1e-12));
}

TEST_CASE("a reboot keeps energyTotal and balance and bills the energy used while it was down") {
    Rig r;
    r.boot();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.energy.setKwh(50.0);
    r.run(1000);
    r.energy.setKwh(51.0);
    r.run(1000);
    r.core->persistNow();    // energyTotal 1.0 with the sensor at 51.0
    r.energy.setKwh(51.25);  // consumed while the ESP32 was rebooting
    r.reboot();
    CHECK(r.core->energyTotal() == 1.0);
    CHECK(r.core->balance() == 9.0);
    CHECK(r.core->sessionTotal() == 0.0);
    r.run(1000);  // 51.25 - 51.0 billed
    CHECK(r.core->energyTotal() == 1.25);
    CHECK(r.core->sessionTotal() == 0.25);
    r.energy.setKwh(51.5);
    r.run(1000);
    CHECK(r.core->energyTotal() == 1.5);
    CHECK(r.core->sessionTotal() == 0.5);
    CHECK(r.core->unbilledKwh() == 0);
}

TEST_CASE("a sensor register below the saved one after a reboot bills nothing and re-baselines") {
    Rig r;
    r.boot();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.energy.setKwh(500.0);
    r.run(1000);
    r.energy.setKwh(500.5);
    r.run(1000);
    r.core->persistNow();
    r.energy.setKwh(0.75);  // the PZEM was reset (or replaced) while the meter was down
    r.reboot();
    r.run(1000);
    CHECK(r.core->energyTotal() == 0.5);
    r.energy.setKwh(1.0);
    r.run(1000);
    CHECK(r.core->energyTotal() == 0.75);  // billed from the new baseline, not from 500.5
}

TEST_CASE("a delta above the rated power is capped, counted and reported") {
    Rig r;
    r.cfg.ratedMaxKw = 18.0;
    r.boot();
    r.core->onConnected();
    r.balanceCmd(R"({"balance": 100, "timestamp": 1})");
    r.energy.setKwh(10.0);
    r.run(1000);
    r.energy.setKwh(10.004);  // 14.4 kW over one second: below the rating, billed in full
    r.run(1000);
    CHECK(r.core->energyTotal() == doctest::Approx(0.004).epsilon(1e-12));
    r.energy.setKwh(30.004);  // +20 kWh in one second: a glitch or tampering
    r.run(1000);
    // 18 kW x 1 s = 0.005 kWh, plus one register step (0.001 kWh)
    CHECK(r.core->energyTotal() == doctest::Approx(0.004 + 0.006).epsilon(1e-12));
    CHECK(r.core->unbilledKwh() == doctest::Approx(20 - 0.006).epsilon(1e-12));
    r.run(1000);
    auto st = r.on("status");
    bool noticed = false;
    for (const auto& m : st) {
        Payload p(m.payload);
        if (p.str("message") == kMsgOverRated) {
            noticed = true;
            CHECK(p.str("status") == "error");
            CHECK(p.num("unbilledKwh") == doctest::Approx(19.994).epsilon(1e-9));
        }
    }
    CHECK(noticed);
    CHECK(Payload(st.back().payload).str("status") == "online");  // the condition is back
    r.energy.setKwh(30.005);  // billing goes on from the jumped register
    r.run(1000);
    CHECK(r.core->energyTotal() == doctest::Approx(0.011).epsilon(1e-12));
}

TEST_CASE("a sensor that fails for longer than the timeout opens the relay until it recovers") {
    Rig r;
    r.cfg.sensorFailTimeoutMs = 10000;
    r.boot();
    r.core->onConnected();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.energy.setKwh(20.0);
    r.run(1000);
    REQUIRE(r.relay.state);
    r.energy.fail();
    r.run(10000);  // the first failed sample was 9 s ago: still tolerated
    CHECK(r.relay.state);
    CHECK_FALSE(r.core->sensorFault());
    r.run(1000);
    CHECK_FALSE(r.relay.state);
    CHECK(std::string(r.core->condition()) == "error");
    auto status = r.on("status");
    REQUIRE(!status.empty());
    CHECK(Payload(status.back().payload).str("status") == "error");
    CHECK(Payload(status.back().payload).str("relay") == "off");

    // The register kept counting inside the PZEM while the UART was silent: billed on recovery.
    r.energy.setKwh(20.4);
    r.run(1000);
    CHECK(r.relay.state);
    CHECK(r.core->balance() == doctest::Approx(9.6).epsilon(1e-12));
    CHECK(Payload(r.on("status").back().payload).str("status") == "online");
}

TEST_CASE("NaN, infinite and negative readings count as sensor failures") {
    Rig r;
    r.cfg.sensorFailTimeoutMs = 2000;
    r.boot();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    for (double bad : {std::nan(""), std::numeric_limits<double>::infinity(), -1.0}) {
        r.energy.setKwh(5.0);
        r.run(1000);
        REQUIRE(r.relay.state);
        r.energy.setKwh(bad);
        r.run(3000);
        CHECK_FALSE(r.relay.state);
        CHECK(r.core->balance() == 10);
    }
}

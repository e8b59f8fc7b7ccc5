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

TEST_CASE("a reboot keeps energyTotal and balance and takes a fresh baseline") {
    Rig r;
    r.boot();
    r.balanceCmd(R"({"balance": 10, "timestamp": 1})");
    r.energy.setKwh(50.0);
    r.run(1000);
    r.energy.setKwh(51.0);
    r.run(1000);
    r.core->persistNow();
    r.energy.setKwh(52.0);  // consumed while the ESP32 was rebooting
    r.reboot();
    CHECK(r.core->energyTotal() == 1.0);
    CHECK(r.core->balance() == 9.0);
    CHECK(r.core->sessionTotal() == 0.0);
    r.run(1000);  // baseline 52.0
    CHECK(r.core->energyTotal() == 1.0);
    r.energy.setKwh(52.5);
    r.run(1000);
    CHECK(r.core->energyTotal() == 1.5);
    CHECK(r.core->sessionTotal() == 0.5);
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

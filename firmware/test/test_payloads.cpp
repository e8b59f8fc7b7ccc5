// Payloads encoded and decoded against the seed document's examples (shared/seed).
#include <cstdlib>

#include "rig.h"

using namespace meter;

TEST_CASE("round6 rounds half up to 6 decimals") {
    CHECK(round6(10.4952) == 10.4952);
    CHECK(round6(0.0048000000000001) == 0.0048);
    CHECK(round6(1.0000005) == 1.000001);
    CHECK(round6(-0.0000004) == 0.0);
    CHECK(round6(-2.5000004) == -2.5);
    CHECK(round6(5.25) == 5.25);
}

TEST_CASE("jsonNumber is short and exact") {
    CHECK(jsonNumber(10.4952) == "10.4952");
    CHECK(jsonNumber(5) == "5");
    CHECK(jsonNumber(1698765432000.0) == "1698765432000");
    CHECK(jsonNumber(-0.1) == "-0.1");
    CHECK(jsonNumber(0.1 + 0.2) == "0.30000000000000004");
    double tricky = 3.9649335990552004;  // cJSON's own printer drops the last digit of this one
    CHECK(std::strtod(jsonNumber(tricky).c_str(), nullptr) == tricky);
    CHECK(jsonNumber(123456789012.123456) == "123456789012.12346");
}

TEST_CASE("consumption report: the seed example plus seq and energyTotal") {
    Report r;
    r.unitsConsumed = 0.0048;
    r.remainingBalance = 10.4952;
    r.totalConsumed = 0.0048;
    r.timestamp = 1698765432000;
    r.seq = 7;
    r.energyTotal = 1234.5678;
    std::string text = encodeReport("METER001", r);
    CHECK(text ==
          R"({"meterNo":"METER001","unitsConsumed":0.0048,"remainingBalance":10.4952,"totalConsumed":0.0048,)"
          R"("timestamp":1698765432000,"seq":7,"energyTotal":1234.5678})");
    Payload p(text);
    CHECK(p.num("timestamp") == 1698765432000.0);  // 13 digits survive (no exponent form)
}

TEST_CASE("status: the seed example plus relay, fw, uptime and reset reason") {
    StatusInfo s;
    s.status = "online";
    s.message = "Device operating normally";
    s.balance = 10.4952;
    s.wifiRssi = -65;
    s.timestamp = 1698765432000;
    s.relayOn = true;
    s.fw = "1.0.0";
    s.uptimeS = 3600;
    s.resetReason = "poweron";
    CHECK(encodeStatus("METER001", s) ==
          R"({"meterNo":"METER001","status":"online","message":"Device operating normally","balance":10.4952,)"
          R"("wifi_rssi":-65,"timestamp":1698765432000,"relay":"on","fw":"1.0.0","uptime":3600,"resetReason":"poweron"})");
}

TEST_CASE("balance report: the seed example, with cmdId only when the command had one") {
    CHECK(encodeBalanceReport("METER001", 10.5, 1698765432000, "") ==
          R"({"meterNo":"METER001","balance":10.5,"timestamp":1698765432000})");
    CHECK(encodeBalanceReport("METER001", 10.5, 1698765432000, "c-7") ==
          R"({"meterNo":"METER001","balance":10.5,"timestamp":1698765432000,"cmdId":"c-7"})");
}

TEST_CASE("balance command: the seed examples and the ext fields decode") {
    BalanceCommand c;
    REQUIRE(decodeBalanceCommand(R"({"balance": 5.25, "timestamp": 1698765432000})", c));
    CHECK(c.balance == 5.25);
    CHECK_FALSE(c.hasEnergyTotal);
    CHECK(c.cmdId.empty());
    REQUIRE(decodeBalanceCommand("{\n  \"balance\": 10.5,\n  \"timestamp\": 1698765432000\n}", c));
    CHECK(c.balance == 10.5);
    REQUIRE(decodeBalanceCommand(
        R"({"balance": 10.5, "timestamp": 1698765432000, "energyTotal": 12.25, "cmdId": "a1", "reason": "payment", "future": {"x": [1]}})",
        c));
    CHECK(c.hasEnergyTotal);
    CHECK(c.energyTotal == 12.25);
    CHECK(c.cmdId == "a1");
}

TEST_CASE("relay command: the PROTOCOL.md example decodes") {
    RelayCommand c;
    REQUIRE(decodeRelayCommand(R"({"state": "off", "reason": "maintenance", "cmdId": "r1", "timestamp": 1698765432000})", c));
    CHECK(c.state == RelayOverride::Off);
    CHECK(c.cmdId == "r1");
}

TEST_CASE("packed reports round-trip bit for bit") {
    Report r;
    r.seq = 0x0102030405060708ull;
    r.timestamp = 1698765432000;
    r.unitsConsumed = 0.1 + 0.2;
    r.remainingBalance = -3.75;
    r.totalConsumed = 1e-9;
    r.energyTotal = 98765.4321;
    auto b = packReport(r);
    REQUIRE(b.size() == kPackedReportBytes);
    CHECK(b[0] == 0x08);  // little-endian on every host
    Report back;
    REQUIRE(unpackReport(b.data(), b.size(), back));
    CHECK(back.seq == r.seq);
    CHECK(back.timestamp == r.timestamp);
    CHECK(back.unitsConsumed == r.unitsConsumed);
    CHECK(back.remainingBalance == r.remainingBalance);
    CHECK(back.totalConsumed == r.totalConsumed);
    CHECK(back.energyTotal == r.energyTotal);
    CHECK_FALSE(unpackReport(b.data(), b.size() - 1, back));
}

TEST_CASE("the longest payloads stay within the 1024-byte limit") {
    std::string meterNo(32, 'M');
    Report r;
    r.seq = ~0ull;
    r.timestamp = ~0ull;
    r.unitsConsumed = r.remainingBalance = r.totalConsumed = r.energyTotal = -123456789.123457;
    CHECK(encodeReport(meterNo, r).size() <= kMaxPayloadBytes);
    StatusInfo s;
    s.status = "low_balance";
    s.message = "Energy sensor not responding; relay open";
    s.balance = -123456789.123457;
    s.timestamp = ~0ull;
    s.uptimeS = ~0ull;
    s.fw = "1.0.0-rc.1+build.12345";
    s.resetReason = "task_wdt";
    s.cmdId = std::string(kMaxCmdIdBytes, 'c');
    CHECK(encodeStatus(meterNo, s).size() <= kMaxPayloadBytes);
}

// Payloads encoded and decoded against the seed document's examples (shared/seed).
#include <cstdlib>
#include <cstring>

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

TEST_CASE("consumption report: the seed example plus seq, energyTotal and regId") {
    Report r;
    r.unitsConsumed = 0.0048;
    r.remainingBalance = 10.4952;
    r.totalConsumed = 0.0048;
    r.timestamp = 1698765432000;
    r.seq = 7;
    r.energyTotal = 1234.5678;
    r.regId = "Qx7-_a9Z";
    std::string text = encodeReport("METER001", r);
    CHECK(text ==
          R"({"meterNo":"METER001","unitsConsumed":0.0048,"remainingBalance":10.4952,"totalConsumed":0.0048,)"
          R"("timestamp":1698765432000,"seq":7,"energyTotal":1234.5678,"regId":"Qx7-_a9Z"})");
    Payload p(text);
    CHECK(p.num("timestamp") == 1698765432000.0);  // 13 digits survive (no exponent form)
}

TEST_CASE("status: the seed example plus relay, fw, uptime, reset reason, regId and unbilled energy") {
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
    s.regId = "Qx7-_a9Z";
    s.unbilledKwh = 0.25;
    CHECK(encodeStatus("METER001", s) ==
          R"({"meterNo":"METER001","status":"online","message":"Device operating normally","balance":10.4952,)"
          R"("wifi_rssi":-65,"timestamp":1698765432000,"relay":"on","fw":"1.0.0","uptime":3600,"resetReason":"poweron",)"
          R"("regId":"Qx7-_a9Z","unbilledKwh":0.25})");
}

TEST_CASE("balance report: the seed example plus regId, with cmdId only when the command had one") {
    CHECK(encodeBalanceReport("METER001", 10.5, 1698765432000, "Qx7-_a9Z", "") ==
          R"({"meterNo":"METER001","balance":10.5,"timestamp":1698765432000,"regId":"Qx7-_a9Z"})");
    CHECK(encodeBalanceReport("METER001", 10.5, 1698765432000, "Qx7-_a9Z", "c-7") ==
          R"({"meterNo":"METER001","balance":10.5,"timestamp":1698765432000,"regId":"Qx7-_a9Z","cmdId":"c-7"})");
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
    r.seq = kMaxPackedSeq;
    r.timestamp = 1698765432000;
    r.unitsConsumed = 0.1 + 0.2;
    r.remainingBalance = -3.75;
    r.totalConsumed = 1e-9;
    r.energyTotal = 98765.4321;
    r.regId = "z_-09AZa";
    ReportMeta meta;
    meta.relayOverride = RelayOverride::Off;
    meta.rawChained = true;
    auto b = packReport(r, meta);
    REQUIRE(b.size() == kPackedReportBytes);
    CHECK(b[0] == 0x02);
    CHECK(b[1] == 0x06);
    Report back;
    ReportMeta backMeta;
    REQUIRE(unpackReport(b.data(), b.size(), back, backMeta));
    CHECK(back.seq == r.seq);
    CHECK(back.timestamp == r.timestamp);
    CHECK(back.unitsConsumed == r.unitsConsumed);
    CHECK(back.remainingBalance == r.remainingBalance);
    CHECK(back.totalConsumed == r.totalConsumed);
    CHECK(back.energyTotal == r.energyTotal);
    CHECK(back.regId == r.regId);
    CHECK(backMeta.relayOverride == RelayOverride::Off);
    CHECK(backMeta.rawChained);
    CHECK_FALSE(unpackReport(b.data(), b.size() - 1, back, backMeta));
    b[1] = 0x03;  // override 3 does not exist
    CHECK_FALSE(unpackReport(b.data(), b.size(), back, backMeta));

    SUBCASE("what the format cannot hold is refused, not truncated") {
        Report big = r;
        big.seq = kMaxPackedSeq + 1;
        CHECK(packReport(big, meta).empty());
        big = r;
        big.timestamp = kMaxPackedTimestamp + 1;
        CHECK(packReport(big, meta).empty());
        big = r;
        big.regId = "short";
        CHECK(packReport(big, meta).empty());
        big.regId = "bad/char";
        CHECK(packReport(big, meta).empty());
    }
}

TEST_CASE("records written before register histories (48 bytes, no regId) are still read") {
    std::vector<uint8_t> v1;
    auto put = [&](uint64_t x) {
        for (int i = 0; i < 8; ++i) v1.push_back(static_cast<uint8_t>(x >> (8 * i)));
    };
    auto bits = [](double d) {
        uint64_t x;
        std::memcpy(&x, &d, sizeof x);
        return x;
    };
    put(77);
    put(1698765432000);
    put(bits(0.5));
    put(bits(9.5));
    put(bits(1.5));
    put(bits(123.25));
    Report r;
    ReportMeta meta;
    REQUIRE(unpackReport(v1.data(), v1.size(), r, meta));
    CHECK(r.seq == 77);
    CHECK(r.energyTotal == 123.25);
    CHECK(r.regId.empty());
    // Replayed exactly as the old firmware sent it: no regId field.
    CHECK_FALSE(Payload(encodeReport("METER001", r)).has("regId"));
}

TEST_CASE("regIds: 1-16 of [A-Za-z0-9_-]") {
    CHECK(validRegId("a"));
    CHECK(validRegId("0123456789abcdef"));
    CHECK(validRegId("A-_z"));
    CHECK_FALSE(validRegId(""));
    CHECK_FALSE(validRegId("0123456789abcdefg"));
    CHECK_FALSE(validRegId("a b"));
    CHECK_FALSE(validRegId("a/b"));
    CHECK_FALSE(validRegId(std::string("a\0b", 3)));
    BalanceCommand c;
    REQUIRE(decodeBalanceCommand(R"({"balance": 1, "energyTotal": 2, "regId": "Ab_9-"})", c));
    CHECK(c.regId == "Ab_9-");
    CHECK_FALSE(decodeBalanceCommand(R"({"balance": 1, "regId": ""})", c));
    CHECK_FALSE(decodeBalanceCommand(R"({"balance": 1, "regId": 5})", c));
    CHECK_FALSE(decodeBalanceCommand(R"({"balance": 1, "regId": "way-too-long-register"})", c));
    CHECK_FALSE(decodeBalanceCommand(R"({"balance": 1, "regId": "sl/sh"})", c));
}

TEST_CASE("the longest payloads stay within the 1024-byte limit") {
    std::string meterNo(32, 'M');
    Report r;
    r.seq = ~0ull;
    r.timestamp = ~0ull;
    r.unitsConsumed = r.remainingBalance = r.totalConsumed = r.energyTotal = -123456789.123457;
    r.regId = std::string(kMaxRegIdBytes, 'r');
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
    s.regId = std::string(kMaxRegIdBytes, 'r');
    s.unbilledKwh = 123456789.123457;
    s.message = kMsgRegisterAhead;
    CHECK(encodeStatus(meterNo, s).size() <= kMaxPayloadBytes);
}

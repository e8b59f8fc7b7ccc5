// Provisioning over the serial console (the line protocol, what is written, what is said back,
// and that no password is ever said back), and the meter without an identity.
#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

#include "keys/test_ca.h"
#include "keys/test_ota_vectors.h"
#include "meter/flash_ring.h"
#include "meter/host_fakes.h"
#include "meter/meter_core.h"
#include "meter/provisioning.h"

using namespace meter;

namespace {

const char* kSecret = "Zq7-s3cret-Xy";  // the MQTT password of these tests: must never be printed

struct Console {
    MemIdentityStore store;
    IdentityPolicy policy;
    std::vector<std::string> out;
    std::unique_ptr<ProvisioningConsole> console;

    explicit Console(bool imageHasCa = true) {
        policy.imageHasCa = imageHasCa;
        boot();
    }
    // What setup() does: resolve the identity, then open the console with it.
    void boot() {
        BootIdentity b = resolveBootIdentity(store, policy, nullptr);
        console.reset(new ProvisioningConsole(store, policy, b, [this](const std::string& l) { out.push_back(l); }));
    }
    std::vector<std::string> type(const std::string& text) {
        const size_t before = out.size();
        console->feed(reinterpret_cast<const uint8_t*>(text.data()), text.size());
        return std::vector<std::string>(out.begin() + static_cast<long>(before), out.end());
    }
    std::string last(const std::string& line) {
        std::vector<std::string> r = type(line + "\r\n");
        REQUIRE(!r.empty());
        return r.back();
    }
    bool anyOutputHas(const std::string& s) const {
        for (const auto& l : out) {
            if (l.find(s) != std::string::npos) return true;
        }
        return false;
    }
    MeterIdentity stored() {
        MeterIdentity id;
        REQUIRE(readIdentity(store, id) == IdentityRead::Ok);
        return id;
    }
};

std::string provisionLine(const std::string& meterNo = "MTR-7", const std::string& extra = "") {
    return "provision meterNo=" + meterNo + " pass=" + kSecret + " url=mqtts://mqtt.example.com:8883" + extra;
}

}  // namespace

TEST_CASE("console lines: CR, LF or CR LF end a line, backspace edits, control bytes and overlong lines are refused") {
    LineAssembler a(16);
    auto feed = [&](const std::string& s, std::vector<std::string>& lines, std::vector<int>& flags) {
        for (char c : s) {
            if (a.feed(static_cast<uint8_t>(c))) {
                lines.push_back(a.line());
                flags.push_back((a.overflowed() ? 1 : 0) | (a.spoiled() ? 2 : 0));
            }
        }
    };
    std::vector<std::string> lines;
    std::vector<int> flags;
    feed("one\r\ntwo\nthree\r\r\n\n", lines, flags);
    CHECK(lines == std::vector<std::string>{"one", "two", "three"});
    lines.clear();
    flags.clear();
    feed("abX\x08" "c\x7f" "d\tq\n", lines, flags);
    CHECK(lines == std::vector<std::string>{"abd q"});
    lines.clear();
    flags.clear();
    feed("a\x01" "b\nok\n", lines, flags);
    CHECK(flags == std::vector<int>{2, 0});
    CHECK(lines.back() == "ok");
    lines.clear();
    flags.clear();
    feed(std::string(40, 'x') + "\nafter\n", lines, flags);
    CHECK(flags == std::vector<int>{1, 0});
    CHECK(lines[0].empty());  // an overlong line is not kept
    CHECK(lines[1] == "after");
    lines.clear();
    flags.clear();
    feed(std::string(16, 'y') + "\n", lines, flags);  // exactly the limit
    CHECK(flags == std::vector<int>{0});
}

TEST_CASE("console: %XX escapes") {
    std::string out;
    CHECK(percentDecode("a%20b%25c%2fd%2F", out));
    CHECK(out == "a b%c/d/");
    CHECK_FALSE(percentDecode("%", out));
    CHECK_FALSE(percentDecode("a%2", out));
    CHECK_FALSE(percentDecode("%zz", out));
    CHECK(percentDecode("", out));
    CHECK(out.empty());
}

TEST_CASE("console: the parser knows its commands and fields and never quotes what was typed") {
    ConsoleCommand c;
    std::string e;
    CHECK(parseConsoleLine("   ", c, e));
    CHECK(c.verb == ConsoleCommand::Verb::Empty);
    CHECK(parseConsoleLine("HELP", c, e));
    CHECK(c.verb == ConsoleCommand::Verb::Help);
    REQUIRE(parseConsoleLine("Provision METERNO=M1  Pass=a%20b url=mqtts://h\tuser=u", c, e));
    CHECK(c.verb == ConsoleCommand::Verb::Provision);
    CHECK(c.fields.at("meterno") == "M1");
    CHECK(c.fields.at("pass") == "a b");
    CHECK(c.fields.at("user") == "u");
    REQUIRE(parseConsoleLine("provision meterNo=M1 pass=a=b== url=mqtts://h", c, e));
    CHECK(c.fields.at("pass") == "a=b==");  // split at the first '='

    const std::string s = kSecret;
    struct Bad {
        std::string line;
        std::string error;
    };
    for (const Bad& b : std::vector<Bad>{
             {s, "unknown command (type help)"},
             {"provision " + s, "argument 1 is not key=value"},
             {"provision meterNo=M1 " + s + "=x", "argument 2 is not a field of provision (type help)"},
             {"provision meterNo=M1 =" + s, "argument 2 is not key=value"},
             {"provision meterNo=M1 pass=" + s + "%zz url=mqtts://h", "pass: a % must be followed by two hex digits (%25 for a %)"},
             {"provision meterNo=M1 pass=" + s + " pass=" + s, "pass given twice"},
             {"provision meterNo=M1 pass= url=mqtts://h", "pass is empty"},
             {"provision meterNo=M1 pass=" + s, "provision needs url= (type help)"},
             {"rotate user=" + s, "argument 1 is not a field of rotate (type help)"},
             {"unprovision", "unprovision needs meterNo= (type help)"},
             {"identity now", "argument 1 is not key=value"},
         }) {
        CAPTURE(b.line);
        CHECK_FALSE(parseConsoleLine(b.line, c, e));
        CHECK(e == b.error);
        CHECK(e.find(s) == std::string::npos);
    }
}

TEST_CASE("console: ca= is base64 DER, one or more, stored as PEM") {
    std::string pem, why;
    REQUIRE(caFromConsole(test_ca::kRsaBase64, pem, why));
    CHECK(pem == test_ca::kRsaPem);
    REQUIRE(caFromConsole(std::string(test_ca::kRsaBase64) + "," + test_ca::kEcBase64, pem, why));
    CHECK(pem == std::string(test_ca::kRsaPem) + test_ca::kEcPem);
    CHECK_FALSE(caFromConsole("not base64!", pem, why));
    CHECK(why.find("ca: certificate 1 is not base64 of a DER certificate") == 0);
    CHECK_FALSE(caFromConsole(std::string(test_ca::kEcBase64) + ",", pem, why));
    CHECK(why.find("ca: certificate 2 is not") == 0);
    CHECK_FALSE(caFromConsole("TWFu", pem, why));  // base64, but not DER
    std::string five = test_ca::kEcBase64;
    for (int i = 0; i < 4; ++i) five += std::string(",") + test_ca::kEcBase64;
    CHECK_FALSE(caFromConsole(five, pem, why));
    CHECK(why == "ca: at most 4 certificates");
    std::string four = test_ca::kRsaBase64;
    for (int i = 0; i < 3; ++i) four += std::string(",") + test_ca::kRsaBase64;
    CHECK_FALSE(caFromConsole(four, pem, why));  // 4 x 1.2 KiB of PEM
    CHECK(why == "ca: more than 4096 bytes as PEM");
}

TEST_CASE("provisioning: an unprovisioned meter is provisioned, confirmed, restarted, and runs with it") {
    Console c;
    REQUIRE(c.type("identity\n").size() == 3);
    CHECK(c.out[0] == "identity: running none: no identity provisioned");
    CHECK(c.out[1] == "identity: stored none");
    CHECK(c.out[2] == "identity: meter state belongs to no meter yet");

    std::vector<std::string> r = c.type(provisionLine("MTR-7", " ssid=Site%207 wifipass=wifi-pass-1") + "\r\n");
    REQUIRE(r.size() == 2);
    CHECK(r[0] ==
          "provision: ok, stored and read back: meterNo=MTR-7 user=MTR-7 pass=(13 characters, not shown) "
          "url=mqtts://mqtt.example.com:8883 ca=image wifi=ssid:Site%207(password 11 characters, not shown)");
    CHECK(r[1] == "provision: restarting to connect as MTR-7");
    CHECK(c.console->restartRequested());
    MeterIdentity id = c.stored();
    CHECK(id.meterNo == "MTR-7");
    CHECK(id.mqttUser == "MTR-7");
    CHECK(id.mqttPass == kSecret);
    CHECK(id.wifiSsid == "Site 7");
    std::string owner;
    CHECK(readOwner(c.store, owner) == IdentityRead::Ok);
    CHECK(owner == "MTR-7");

    c.boot();  // the restart
    CHECK(c.last("identity").find("identity: meter state belongs to MTR-7") == 0);
    CHECK(c.out[c.out.size() - 3].find("identity: running stored meterNo=MTR-7") == 0);
    const size_t writes = c.store.writes;
    CHECK(c.last(provisionLine("MTR-7", " ssid=Site%207 wifipass=wifi-pass-1")).find("provision: unchanged:") == 0);
    CHECK(c.store.writes == writes);
    CHECK_FALSE(c.console->restartRequested());
    CHECK_FALSE(c.anyOutputHas(kSecret));
    CHECK_FALSE(c.anyOutputHas("wifi-pass-1"));
}

TEST_CASE("provisioning: with the broker's CA, and a user other than the meter number") {
    Console c(false);  // an image without a fleet CA
    CHECK(c.last(provisionLine()) ==
          "provision: refused, nothing written: mqtts:// needs the broker's CA: this image has none (MQTT_CA_PEM), so provision ca=");
    CHECK(c.store.writes == 0);
    std::vector<std::string> r =
        c.type(provisionLine("MTR-7", std::string(" user=meter-user ca=") + test_ca::kRsaBase64 + "," + test_ca::kEcBase64) + "\n");
    REQUIRE(r.size() == 2);
    CHECK(r[0].find(std::string("ca=provisioned(sha256:") + test_ca::kRsaSha256 + ",sha256:" + test_ca::kEcSha256 + ")") !=
          std::string::npos);
    CHECK(r[0].find("user=meter-user") != std::string::npos);
    CHECK(c.stored().caPem == std::string(test_ca::kRsaPem) + test_ca::kEcPem);
}

TEST_CASE("provisioning: refusals write nothing") {
    Console c;
    c.policy.allowPlainMqtt = false;
    struct Case {
        std::string line;
        std::string answer;
    };
    for (const Case& k : std::vector<Case>{
             {"provision meterNo=M/1 pass=x url=mqtts://h", "provision: refused, nothing written: meterNo: 1-32 of A-Z a-z 0-9 _ -"},
             {"provision meterNo=M1 pass=x url=mqtt://h:1883",
              "provision: refused, nothing written: url: mqtt:// (no TLS) is not allowed by this build (METER_ALLOW_PLAIN_MQTT); use mqtts://"},
             {"provision meterNo=M1 pass=x url=https://h",
              "provision: refused, nothing written: url: mqtts://host[:port] (mqtt:// for a bench broker), at most 200 characters"},
             {"provision meterNo=M1 pass=x url=mqtts://h ca=AAAA",
              "provision: refused, nothing written: ca: certificate 1 is not base64 of a DER certificate (openssl x509 -outform der | base64 -w0)"},
             {"provision meterNo=M1 pass=x url=mqtts://h wifipass=12345678",
              "provision: refused, nothing written: wifipass without ssid"},
             {"provision meterNo=M1 pass=a%09b url=mqtts://h", "provision: refused, nothing written: pass: 1-128 printable characters"},
             {"provision meterNo=M1 pass=x url=mqtts://h user=a%20b",
              "provision: refused, nothing written: user: 1-64 printable characters, no spaces"},
         }) {
        CAPTURE(k.line);
        CHECK(c.last(k.line) == k.answer);
    }
    CHECK(c.store.writes == 0);
    CHECK_FALSE(c.console->restartRequested());
}

TEST_CASE("provisioning: the board stays the meter its state belongs to") {
    Console c;
    c.type(provisionLine("MTR-7") + "\n");
    c.boot();
    const size_t writes = c.store.writes;
    CHECK(c.last(provisionLine("MTR-8")) ==
          "provision: refused, nothing written: this board holds the meter state of MTR-7; it can be provisioned only as "
          "MTR-7 (to reuse the board for another meter, erase its flash: README.md)");
    CHECK(c.store.writes == writes);

    // unprovision erases the identity, not the binding
    CHECK(c.last("unprovision meterNo=MTR-8") == "unprovision: refused: the stored identity is not that meter number (type identity)");
    std::vector<std::string> r = c.type("unprovision meterNo=MTR-7\n");
    REQUIRE(r.size() == 2);
    CHECK(r[0] == "unprovision: ok, the identity of MTR-7 is erased (the meter state stays, and stays MTR-7's)");
    CHECK(c.console->restartRequested());
    MeterIdentity id;
    CHECK(readIdentity(c.store, id) == IdentityRead::Missing);
    c.boot();
    CHECK(c.last("unprovision meterNo=MTR-7") == "unprovision: nothing to do: no identity is stored");
    CHECK(c.last(provisionLine("MTR-8")).find("this board holds the meter state of MTR-7") != std::string::npos);
    CHECK(c.last(provisionLine("MTR-7")).find("provision: restarting") == 0);

    SUBCASE("no owner record (lost): the stored identity's meter number binds the board") {
        c.store.data.erase(kKeyOwner);
        CHECK(c.last(provisionLine("MTR-8")).find("this board holds the meter state of MTR-7") != std::string::npos);
    }
    SUBCASE("no owner record: the next boot writes it from the stored identity") {
        c.store.data.erase(kKeyOwner);
        c.boot();
        std::string owner;
        CHECK(readOwner(c.store, owner) == IdentityRead::Ok);
        CHECK(owner == "MTR-7");
    }
}

TEST_CASE("provisioning: NVS that fails or does not keep what it was given") {
    Console c;
    c.store.failWrites = true;
    CHECK(c.last(provisionLine()) == "provision: FAILED writing NVS (owner): nothing changed");
    CHECK_FALSE(c.console->restartRequested());
    c.store.failWrites = false;
    c.store.flipOnWrite = true;
    CHECK(c.last(provisionLine()) == "provision: FAILED: NVS does not read back what was written (type identity)");
    CHECK_FALSE(c.console->restartRequested());
    c.store.flipOnWrite = false;
    c.store.failReads = true;
    CHECK(c.last(provisionLine()) == "provision: refused, nothing written: NVS could not be read");
    CHECK(c.last("identity") == "identity: meter state owner ? (NVS could not be read)");
    c.store.failReads = false;
    // A damaged identity is repaired by provisioning the same meter again.
    c.store.data.clear();
    c.type(provisionLine() + "\n");
    c.boot();
    c.store.corrupt(kKeyIdentity);
    c.boot();
    CHECK(c.last("identity").find("belongs to MTR-7") != std::string::npos);
    CHECK(c.out[c.out.size() - 2] == "identity: stored unreadable (provision it again)");
    CHECK(c.last("rotate pass=abc") == "rotate: refused: the stored identity is unreadable (provision it again)");
    CHECK(c.last(provisionLine()).find("provision: restarting") == 0);
    CHECK(c.stored().meterNo == "MTR-7");
}

TEST_CASE("rotate: a new MQTT password, everything else kept") {
    Console c;
    CHECK(c.last("rotate pass=new-pass-1") == "rotate: refused: no identity is stored (provision first)");
    c.type(provisionLine("MTR-7", std::string(" ca=") + test_ca::kEcBase64) + "\n");
    c.boot();
    const MeterIdentity before = c.stored();
    std::vector<std::string> r = c.type("rotate pass=new%20pass-2\n");
    REQUIRE(r.size() == 2);
    CHECK(r[0].find("rotate: ok, stored and read back: meterNo=MTR-7 user=MTR-7 pass=(10 characters, not shown)") == 0);
    CHECK(r[1] == "rotate: restarting to connect with the new password");
    MeterIdentity after = c.stored();
    CHECK(after.mqttPass == "new pass-2");
    after.mqttPass = before.mqttPass;
    CHECK(after == before);
    c.boot();
    CHECK(c.last("rotate pass=new%20pass-2") == "rotate: unchanged: that is the stored password");
    CHECK_FALSE(c.anyOutputHas("new pass-2"));
    CHECK_FALSE(c.anyOutputHas("new%20pass-2"));
}

TEST_CASE("console: no line, however wrong, makes the meter print a password it was given") {
    Console c;
    c.type(provisionLine() + "\n");
    c.boot();
    const std::string s = kSecret;
    const std::vector<std::string> lines = {
        s,
        "provision " + s,
        "provision pass=" + s,
        "provision meterNo=MTR-7 pass=" + s + " url=mqtts://h pass=" + s,
        "provision meterNo=MTR-7 pass=" + s + "%g url=mqtts://h",
        "provision meterNo=MTR-7 pass=" + s + " url=" + s,
        "provision meterNo=" + s + " pass=" + s + " url=mqtts://h",
        "provision meterNo=MTR-7 pass=" + s + " url=mqtts://h ca=" + s,
        "provision meterNo=MTR-7 pass=" + s + " url=mqtts://h wifipass=" + s,
        "provision meterNo=MTR-7 pass=" + s + " url=mqtts://h ssid=x wifipass=" + s,
        "provision meterNo=MTR-7 pass=" + s + " url=mqtts://h " + s + "=1",
        "rotate pass=" + s,
        "rotate " + s,
        "unprovision meterNo=" + s,
        "unprovision " + s,
        "identity " + s,
        "help " + s,
        s + " provision",
        "provision meterNo=MTR-7 pass=" + s + "\x01",
        std::string(kMaxConsoleLine, 'x') + s,
        "provision meterNo=MTR-7 pass=" + s + std::string(kMaxConsoleLine, 'p'),
        "identity",
        "help",
    };
    for (const auto& l : lines) c.type(l + "\n");
    CHECK(c.out.size() >= lines.size());
    for (const auto& o : c.out) {
        CAPTURE(o);
        CHECK(o.find(s) == std::string::npos);
    }
}

// ---- the meter without an identity --------------------------------------------------------------

namespace {

std::vector<uint8_t> unhex(const std::string& h) {
    std::vector<uint8_t> out;
    for (size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoi(h.substr(i, 2), nullptr, 16)));
    return out;
}

}  // namespace

TEST_CASE("no identity: relay open, not connecting, the reason on the console at boot and every minute") {
    ManualClock clock(5000);
    FakeRelay relay;
    relay.state = true;  // whatever the pin was
    UnprovisionedCore u("1.1.0", clock, relay, "poweron", "no identity provisioned");
    u.begin();
    CHECK_FALSE(relay.state);
    std::string line;
    REQUIRE(u.takeNotice(line));
    CHECK(line == "[meter] not connecting: no identity provisioned. Relay open, nothing metered. Type help to provision.");
    CHECK_FALSE(u.takeNotice(line));
    for (int i = 0; i < 59; ++i) {
        clock.advance(1000);
        CHECK(u.loop() == OtaManager::Action::None);
    }
    CHECK_FALSE(u.takeNotice(line));
    clock.advance(1000);
    u.loop();
    CHECK(u.takeNotice(line));
    CHECK(line.find("[meter] not connecting: no identity provisioned.") == 0);
    CHECK_FALSE(relay.state);
    CHECK(u.uptimeMs() == 60000);
}

TEST_CASE("no identity after an OTA update: the new image is not confirmed and rolls back") {
    // A board whose old firmware had its identity compiled in gets the fleet image by OTA.
    ManualClock clock;
    MemKv kv;
    MemFlash flash{16 * 64, 64};
    FakeRelay relay;
    FakeEnergy energy;
    FakeEspMqtt pub{clock};
    XorShiftRandom rng{7};
    FakeOtaPlatform platform{clock};
    std::vector<uint8_t> key = unhex(ota_vectors::kPublicKeyHex);
    EcdsaP256Verifier verifier{key.data()};
    OtaConfig otaCfg;
    otaCfg.confirmTimeoutMs = 600000;
    platform.images["https://fw.example/good.bin"] = {ota_vectors::kGoodText, ota_vectors::kGoodVersion, false, false};
    MeterConfig cfg;
    cfg.fwVersion = "1.0.0";
    {
        FlashRing ring(flash, 64);
        OtaManager ota(otaCfg, kv, platform, verifier);
        MeterCore core(cfg, clock, kv, ring, relay, energy, pub, rng, "poweron");
        core.attachOta(ota);
        core.begin();
        core.onConnected();
        core.onMessage(core.topic("command/ota"),
                       std::string(R"({"url": "https://fw.example/good.bin", "version": ")") + ota_vectors::kGoodVersion +
                           R"(", "sha256": ")" + ota_vectors::kGoodSha256 + R"(", "signature": ")" +
                           ota_vectors::kGoodSignature + R"(", "cmdId": "ota-1"})");
        for (int i = 0; i < 10 && !platform.restartRequested; ++i) {
            clock.advance(1000);
            core.loop();
        }
        REQUIRE(platform.restartRequested);
    }
    // The new image boots and finds no identity.
    platform.reset();
    clock.restart(0);
    {
        OtaManager ota(otaCfg, kv, platform, verifier);
        UnprovisionedCore u(ota_vectors::kGoodVersion, clock, relay, "software", "no identity provisioned");
        u.attachOta(ota);
        u.begin();
        CHECK(ota.state() == OtaState::Pending);
        CHECK_FALSE(relay.state);
        std::vector<std::string> notices;
        std::string line;
        while (u.takeNotice(line)) notices.push_back(line);
        REQUIRE(notices.size() == 3);
        CHECK(notices[0] == "[meter] OTA 1.1.0: running, waiting for an acknowledged report");
        CHECK(notices[2].find("[meter] firmware 1.1.0 came by OTA and is not confirmed") == 0);
        OtaManager::Action a = OtaManager::Action::None;
        uint64_t t = 0;
        while (a == OtaManager::Action::None && t < 700000) {
            clock.advance(1000);
            t += 1000;
            a = u.loop();
        }
        CHECK(a == OtaManager::Action::Rollback);
        CHECK(t == 601000);
        ota.rollbackNow();
        CHECK(platform.rollbackRequested);
    }
    // The previous image (with its compiled identity) runs again and reports the rollback.
    platform.reset();
    clock.restart(0);
    OtaManager ota(otaCfg, kv, platform, verifier);
    ota.begin("1.0.0", "software", 0);
    CHECK(ota.state() == OtaState::RolledBack);
    CHECK(ota.error() == "no acknowledged report within the confirmation time");
}

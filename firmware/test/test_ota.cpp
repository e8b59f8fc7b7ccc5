// OTA over MQTT: the command, the signature, and the state machine download -> verify ->
// restart -> pending -> valid, or failed / rolled back; the boot-loop guard and safe mode.
#include <cstring>

#include "keys/test_ota_vectors.h"
#include "meter/boot_guard.h"
#include "rig.h"

using namespace meter;
namespace v = ota_vectors;

namespace {

std::vector<uint8_t> unhex(const std::string& h) {
    std::vector<uint8_t> out;
    for (size_t i = 0; i + 1 < h.size(); i += 2) out.push_back(static_cast<uint8_t>(std::stoi(h.substr(i, 2), nullptr, 16)));
    return out;
}

std::string otaCmd(const std::string& url, const char* version, const char* sha, const char* sig,
                   const std::string& cmdId = "ota-1") {
    return R"({"url": ")" + url + R"(", "version": ")" + version + R"(", "sha256": ")" + sha +
           R"(", "signature": ")" + sig + R"(", "cmdId": ")" + cmdId + "\"}";
}

// A meter with OTA: the running image's version is cfg.fwVersion, which a restart into a new
// image changes the way the bootloader would.
struct OtaRig : Rig {
    std::vector<uint8_t> key = unhex(v::kPublicKeyHex);
    EcdsaP256Verifier verifier{key.data()};
    FakeOtaPlatform platform{clock};
    OtaConfig otaCfg;
    std::unique_ptr<OtaManager> ota;
    std::string previousFw;

    OtaRig() {
        cfg.fwVersion = "1.0.0";
        platform.images["https://fw.example/good.bin"] = {v::kGoodText, v::kGoodVersion, false, false};
        platform.images["https://fw.example/crashes.bin"] = {v::kCrashesText, v::kCrashesVersion, true, false};
        platform.images["https://fw.example/invalid.bin"] = {v::kInvalidText, v::kInvalidVersion, false, true};
        platform.images["https://fw.example/silent.bin"] = {v::kSilentText, v::kSilentVersion, false, false};
        platform.images["https://fw.example/swapped.bin"] = {v::kCrashesText, v::kGoodVersion, false, false};
        bootOta("poweron");
    }
    void bootOta(const std::string& reason) {
        ota.reset(new OtaManager(otaCfg, kv, platform, verifier));
        ring.reset(new FlashRing(flash, 64));
        core.reset(new MeterCore(cfg, clock, kv, *ring, relay, energy, pub, rng, reason));
        core->attachRetained(rtc);
        core->attachOta(*ota);
        core->setWifiRssi(-65);
        core->begin();
    }
    void restartInto(const std::string& fw, const std::string& reason) {
        platform.reset();
        pub.powerCut();
        pub.connect();
        clock.restart(0);
        cfg.fwVersion = fw;
        bootOta(reason);
    }
    // What the bootloader does after restart() / rollback().
    void followPlatform() {
        if (platform.restartRequested) {
            previousFw = cfg.fwVersion;
            Image img = platform.next;
            restartInto(img.version, "software");
            if (img.crashes) restartInto(img.version, "panic");
        } else if (platform.rollbackRequested) {
            restartInto(previousFw, "software");
        }
    }
    using Image = FakeOtaPlatform::Image;
    std::vector<std::string> statusMessages() {
        std::vector<std::string> out;
        for (const auto& m : on("status")) out.push_back(Payload(m.payload).str("message"));
        return out;
    }
    bool said(const std::string& text) {
        for (const auto& m : statusMessages()) {
            if (m == text) return true;
        }
        return false;
    }
};

}  // namespace

TEST_CASE("the release signature: ECDSA P-256 over the manifest, with the baked-in key") {
    auto key = unhex(v::kPublicKeyHex);
    EcdsaP256Verifier verifier(key.data());
    auto check = [&](const char* version, const char* sha, const char* sigB64) {
        std::vector<uint8_t> sig;
        REQUIRE(base64Decode(sigB64, sig));
        std::string m = otaManifest(version, sha);
        return verifier.verify(reinterpret_cast<const uint8_t*>(m.data()), m.size(), sig.data(), sig.size());
    };
    CHECK(check(v::kGoodVersion, v::kGoodSha256, v::kGoodSignature));
    CHECK(check(v::kCrashesVersion, v::kCrashesSha256, v::kCrashesSignature));
    CHECK_FALSE(check(v::kForgedVersion, v::kForgedSha256, v::kForgedSignature));  // another key
    CHECK_FALSE(check("1.1.1", v::kGoodSha256, v::kGoodSignature));                // another version
    CHECK_FALSE(check(v::kGoodVersion, v::kCrashesSha256, v::kGoodSignature));     // another image
    uint8_t junk[8] = {0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01};
    std::string m = otaManifest(v::kGoodVersion, v::kGoodSha256);
    CHECK_FALSE(verifier.verify(reinterpret_cast<const uint8_t*>(m.data()), m.size(), junk, sizeof junk));
    CHECK(otaManifest("1.1.0", "ab") == "smartmeter-fw\n1.1.0\nab\n");
}

TEST_CASE("OTA commands: every field is checked, and a rejection echoes cmdId") {
    OtaCommand c;
    std::string why;
    REQUIRE(decodeOtaCommand(otaCmd("https://fw.example/good.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature),
                             c, why, true));
    CHECK(c.version == "1.1.0");
    CHECK(c.cmdId == "ota-1");
    CHECK(c.signature.size() >= 70);
    std::string upper = v::kGoodSha256;
    for (auto& ch : upper) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
    REQUIRE(decodeOtaCommand(otaCmd("https://x/y", "1", upper.c_str(), v::kGoodSignature), c, why, true));
    CHECK(c.sha256 == v::kGoodSha256);  // normalised to lowercase, as the manifest is signed
    struct Bad {
        std::string payload;
        const char* why;
    } bad[] = {
        {otaCmd("http://fw.example/good.bin", "1.1.0", v::kGoodSha256, v::kGoodSignature), "bad url"},
        {otaCmd("https://fw.example/a b", "1.1.0", v::kGoodSha256, v::kGoodSignature), "bad url"},
        {otaCmd("https://fw.example/x", "1.1.0/evil", v::kGoodSha256, v::kGoodSignature), "bad version"},
        {otaCmd("https://fw.example/x", "1.1.0", "abc", v::kGoodSignature), "bad sha256"},
        {otaCmd("https://fw.example/x", "1.1.0", v::kGoodSha256, "not base64!"), "bad signature encoding"},
        {otaCmd("https://fw.example/x", "1.1.0", v::kGoodSha256, "QUJD"), "bad signature encoding"},  // 3 bytes
        {R"({"version": "1.1.0", "cmdId": "ota-9"})", "bad url"},
    };
    for (const auto& b : bad) {
        CAPTURE(b.payload);
        CHECK_FALSE(decodeOtaCommand(b.payload, c, why, true));
        CHECK(why == b.why);
    }
    CHECK(c.cmdId == "ota-9");
    CHECK(decodeOtaCommand(otaCmd("http://fw.local/good.bin", "1.1.0", v::kGoodSha256, v::kGoodSignature), c, why, false));
    std::vector<uint8_t> out;
    CHECK(base64Decode("TWFu", out));
    CHECK(std::string(out.begin(), out.end()) == "Man");
    CHECK(base64Decode("TWE=", out));
    CHECK_FALSE(base64Decode("TWF=", out));  // non-zero spare bits: not the canonical encoding
    CHECK_FALSE(base64Decode("TW=E", out));
    CHECK_FALSE(base64Decode("TWE", out));
}

TEST_CASE("OTA: download, verify, restart, run pending, confirmed by the first acknowledged report") {
    OtaRig r;
    r.core->onConnected();
    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/good.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature));
    CHECK(r.ota->state() == OtaState::Downloading);
    Payload started(r.on("status").back().payload);
    CHECK(started.str("message") == "OTA 1.1.0: downloading");
    CHECK(started.str("cmdId") == "ota-1");
    CHECK(started.str("otaState") == "downloading");
    CHECK(started.str("otaVersion") == "1.1.0");
    r.energy.setKwh(10);
    r.run(4000);
    CHECK(r.ota->state() == OtaState::Downloading);  // the meter keeps metering meanwhile
    r.run(2000);
    CHECK(r.ota->state() == OtaState::Rebooting);
    CHECK(r.said("OTA 1.1.0: verified, restarting"));
    CHECK_FALSE(r.platform.restartRequested);  // the status gets a moment to leave
    const size_t stateWrites = r.kv.writes(kKeyState);
    r.run(3000);
    REQUIRE(r.platform.restartRequested);
    CHECK(r.kv.writes(kKeyState) > stateWrites);  // the state went to flash before the restart

    r.followPlatform();
    CHECK(r.cfg.fwVersion == "1.1.0");
    CHECK(r.ota->state() == OtaState::Pending);
    const size_t before = r.on("status").size();
    r.core->onConnected();
    Payload pending(r.on("status").at(before).payload);  // the online status after the restart
    CHECK(pending.str("fw") == "1.1.0");
    CHECK(pending.str("otaState") == "pending");
    r.run(31000);  // a report, and its PUBACK
    CHECK(r.ota->state() == OtaState::Valid);
    CHECK(r.platform.markedValid == 1);
    CHECK(r.said("OTA 1.1.0: confirmed"));
    CHECK(Payload(r.on("status").back().payload).str("otaState") == "valid");

    SUBCASE("the same command again: already running") {
        r.core->onMessage(r.core->topic("command/ota"),
                          otaCmd("https://fw.example/good.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature, "ota-2"));
        CHECK(r.said("OTA 1.1.0: already running"));
        CHECK(r.platform.fetches == 1);
    }
}

TEST_CASE("OTA: a bad signature, a wrong image and an invalid image are refused before any restart") {
    OtaRig r;
    r.core->onConnected();
    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/good.bin", v::kForgedVersion, v::kForgedSha256, v::kForgedSignature));
    CHECK(r.ota->state() == OtaState::Failed);
    CHECK(r.ota->error() == "bad signature");
    CHECK(r.platform.fetches == 0);
    Payload failed(r.on("status").at(r.on("status").size() - 1).payload);
    CHECK(failed.str("status") == "error");
    CHECK(failed.str("otaError") == "bad signature");

    // The URL serves other bytes than the signed hash (a compromised or mixed-up server).
    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/swapped.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature));
    r.run(6000);
    CHECK(r.ota->state() == OtaState::Failed);
    CHECK(r.ota->error() == "sha256 mismatch");
    CHECK_FALSE(r.platform.haveNext);

    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/invalid.bin", v::kInvalidVersion, v::kInvalidSha256, v::kInvalidSignature));
    r.run(6000);
    CHECK(r.ota->error() == "image rejected: not a valid app image");

    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/missing.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature));
    r.run(6000);
    CHECK(r.ota->error() == "download failed: HTTP 404");
    CHECK_FALSE(r.platform.restartRequested);
    CHECK(r.cfg.fwVersion == "1.0.0");
}

TEST_CASE("OTA: an image that crashes at boot rolls back and is not tried again") {
    OtaRig r;
    r.core->onConnected();
    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/crashes.bin", v::kCrashesVersion, v::kCrashesSha256, v::kCrashesSignature));
    r.run(8000);
    REQUIRE(r.platform.restartRequested);
    r.followPlatform();  // 1.2.0 boots and panics: the next boot is a panic reset of 1.2.0
    CHECK(r.cfg.fwVersion == "1.2.0");
    r.run(1000);
    REQUIRE(r.platform.rollbackRequested);
    r.followPlatform();
    CHECK(r.cfg.fwVersion == "1.0.0");
    CHECK(r.ota->state() == OtaState::RolledBack);
    r.core->onConnected();
    auto st = r.on("status");
    bool reported = false;
    for (const auto& m : st) {
        Payload p(m.payload);
        if (p.has("otaError") && p.str("otaState") == "rolledback") {
            reported = true;
            CHECK(p.str("otaVersion") == "1.2.0");
            CHECK(p.str("otaError") == "the new image crashed (panic)");
            CHECK(p.str("fw") == "1.0.0");
        }
    }
    CHECK(reported);
    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/crashes.bin", v::kCrashesVersion, v::kCrashesSha256, v::kCrashesSignature, "ota-3"));
    CHECK(r.said("OTA 1.2.0 refused: this image rolled back before"));
    CHECK(r.platform.fetches == 1);
}

TEST_CASE("OTA: an image that never gets a report acknowledged rolls back after the confirmation time") {
    OtaRig r;
    r.otaCfg.confirmTimeoutMs = 600000;
    r.bootOta("poweron");
    r.core->onConnected();
    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/silent.bin", v::kSilentVersion, v::kSilentSha256, v::kSilentSignature));
    r.run(8000);
    r.followPlatform();
    CHECK(r.ota->state() == OtaState::Pending);
    r.run(599000);  // it never connects
    CHECK_FALSE(r.platform.rollbackRequested);
    r.run(2000);
    REQUIRE(r.platform.rollbackRequested);
    r.followPlatform();
    CHECK(r.cfg.fwVersion == "1.0.0");
    CHECK(r.ota->state() == OtaState::RolledBack);
    CHECK(r.ota->error() == "no acknowledged report within the confirmation time");
}

TEST_CASE("OTA: a power cut during the download fails the update, and a restart during pending keeps it pending") {
    OtaRig r;
    r.core->onConnected();
    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/good.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature));
    r.run(2000);
    r.restartInto("1.0.0", "poweron");
    CHECK(r.ota->state() == OtaState::Failed);
    CHECK(r.ota->error() == "interrupted by a reboot");
    r.core->onConnected();
    CHECK(r.said("OTA 1.1.0 failed: interrupted by a reboot"));

    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/good.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature, "ota-2"));
    r.run(8000);
    r.followPlatform();
    r.restartInto("1.1.0", "poweron");  // the new image lost power before it reported
    CHECK(r.ota->state() == OtaState::Pending);
    r.core->onConnected();
    r.run(31000);
    CHECK(r.ota->state() == OtaState::Valid);
}

TEST_CASE("OTA: the same command twice is one update, another one meanwhile is refused") {
    OtaRig r;
    r.core->onConnected();
    const std::string good = otaCmd("https://fw.example/good.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature);
    r.core->onMessage(r.core->topic("command/ota"), good);
    r.core->onMessage(r.core->topic("command/ota"), good);  // QoS 1 redelivery
    CHECK(r.platform.fetches == 1);
    r.core->onMessage(r.core->topic("command/ota"),
                      otaCmd("https://fw.example/silent.bin", v::kSilentVersion, v::kSilentSha256, v::kSilentSignature, "ota-7"));
    CHECK(r.said("OTA 1.4.0 refused: busy with 1.1.0"));
    Payload busy(r.on("status").back().payload);
    CHECK(busy.str("cmdId") == "ota-7");
    r.core->onMessage(r.core->topic("command/ota"), "not json");
    r.core->onMessage(r.core->topic("command/ota"), R"({"url": 5, "cmdId": "ota-8"})");
    CHECK(r.said("OTA command rejected: bad url"));
}

TEST_CASE("boot-loop guard: fast reboots counted in RTC memory lead to safe mode, a stable boot clears them") {
    MemRetained rtc;
    BootGuardConfig cfg;
    cfg.maxFastBoots = 3;
    cfg.stableAfterMs = 60000;
    cfg.safeModeMs = 300000;
    for (int i = 1; i <= 3; ++i) {
        BootGuard g(rtc, cfg);
        CHECK_FALSE(g.begin());
        CHECK(g.fastBoots() == static_cast<uint32_t>(i));
        g.loop(30000);  // crashes before it is stable
    }
    BootGuard safe(rtc, cfg);
    CHECK(safe.begin());  // the fourth boot in a row
    CHECK(safe.safeMode());
    CHECK_FALSE(safe.safeModeOver(299000));
    CHECK(safe.safeModeOver(300000));  // time to try a normal boot again, with a clean count
    BootGuard retry(rtc, cfg);
    CHECK_FALSE(retry.begin());
    CHECK(retry.fastBoots() == 1);
    retry.loop(60000);  // stable
    BootGuard next(rtc, cfg);
    CHECK_FALSE(next.begin());
    CHECK(next.fastBoots() == 1);
    next.clear();  // a deliberate restart (OTA) does not count
    BootGuard afterOta(rtc, cfg);
    CHECK_FALSE(afterOta.begin());
    CHECK(afterOta.fastBoots() == 1);
    rtc.clear();  // a power cut: RTC memory is gone, and so is the count
    BootGuard cold(rtc, cfg);
    CHECK_FALSE(cold.begin());
    CHECK(cold.fastBoots() == 1);
}

TEST_CASE("safe mode: relay open, a status without the stored state, and only OTA commands") {
    OtaRig r;
    SafeModeCore safe(r.cfg, r.clock, r.relay, r.pub, "panic", 6);
    safe.attachOta(*r.ota);
    r.relay.state = true;
    safe.begin();
    CHECK_FALSE(r.relay.state);
    Payload will(safe.willMessage().payload);
    CHECK(will.str("status") == "offline");
    safe.onConnected();
    Payload st(r.on("status").back().payload);
    CHECK(st.str("status") == "error");
    CHECK(st.str("message") == safe.message());
    CHECK(st.num("fastBoots") == 6);
    CHECK(st.has("safeMode"));
    CHECK_FALSE(st.has("balance"));
    CHECK_FALSE(st.has("regId"));
    CHECK(st.str("relay") == "off");
    safe.onMessage(safe.topic("command/balance"), R"({"balance": 50, "timestamp": 1})");
    CHECK(r.on("balance").empty());
    safe.onMessage(safe.topic("command/ota"),
                   otaCmd("https://fw.example/good.bin", v::kGoodVersion, v::kGoodSha256, v::kGoodSignature));
    for (int i = 0; i < 10 && safe.loop() == OtaManager::Action::None; ++i) r.clock.advance(1000);
    CHECK(r.ota->state() == OtaState::Rebooting);
    CHECK_FALSE(r.relay.state);
}

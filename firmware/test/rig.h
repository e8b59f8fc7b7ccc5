// A meter on the bench: the core wired to in-memory hardware, plus helpers to read payloads.
#pragma once

#include <cjson/cJSON.h>
#include <doctest/doctest.h>

#include <memory>
#include <string>
#include <vector>

#include "meter/flash_ring.h"
#include "meter/host_fakes.h"
#include "meter/meter_core.h"

namespace meter {

// Parsed JSON payload with typed accessors that fail the test when a field is missing.
class Payload {
public:
    explicit Payload(const std::string& text) : root_(cJSON_Parse(text.c_str())) { REQUIRE(cJSON_IsObject(root_)); }
    ~Payload() { cJSON_Delete(root_); }
    Payload(const Payload&) = delete;
    Payload& operator=(const Payload&) = delete;
    bool has(const char* k) const { return cJSON_GetObjectItemCaseSensitive(root_, k) != nullptr; }
    double num(const char* k) const {
        const cJSON* v = cJSON_GetObjectItemCaseSensitive(root_, k);
        REQUIRE_MESSAGE(cJSON_IsNumber(v), k);
        return v->valuedouble;
    }
    std::string str(const char* k) const {
        const cJSON* v = cJSON_GetObjectItemCaseSensitive(root_, k);
        REQUIRE_MESSAGE(cJSON_IsString(v), k);
        return v->valuestring;
    }
    int size() const { return cJSON_GetArraySize(root_); }

private:
    cJSON* root_;
};

struct Rig {
    MeterConfig cfg;
    ManualClock clock;
    MemKv kv;
    MemFlash flash{16 * 64, 64};
    std::unique_ptr<FlashRing> ring;
    FakeRelay relay;
    FakeEnergy energy;
    FakeEspMqtt pub{clock};  // the network is up; the core learns of it from onConnected()
    XorShiftRandom rng{12345};
    MemRetained rtc;
    std::unique_ptr<MeterCore> core;

    explicit Rig(uint32_t startMillis = 0) : clock(startMillis) {
        cfg.statusIntervalMs = 0;
        // The bench moves the register in big steps between one-second samples; the rated-power
        // cap has its own tests, which set a realistic rating.
        cfg.ratedMaxKw = 1e6;
    }

    MeterCore& boot(const std::string& reason = "poweron") {
        ring.reset(new FlashRing(flash, 64));
        core.reset(new MeterCore(cfg, clock, kv, *ring, relay, energy, pub, rng, reason));
        core->attachRetained(rtc);
        core->setWifiRssi(-65);
        core->begin();
        return *core;
    }
    // A power cut: RAM, RTC memory and the client's outbox are lost; NVS and the ring survive.
    void reboot(uint32_t startMillis = 0) {
        rtc.clear();
        pub.powerCut();
        pub.connect();
        clock.restart(startMillis);
        boot("poweron");
    }
    // A watchdog or software reset: RTC memory survives.
    void softReset(const std::string& reason = "task_wdt") {
        pub.powerCut();
        pub.connect();
        clock.restart(0);
        boot(reason);
    }
    // Advances time the way the device's loop() runs: one call per second, the MQTT client's
    // events (PUBACKs) handed over before each.
    void run(uint64_t ms, uint64_t step = 1000) {
        while (ms > 0) {
            uint64_t d = ms < step ? ms : step;
            clock.advance(d);
            ms -= d;
            pub.serviceInto(*core);
            core->loop();
        }
    }
    std::vector<FakeEspMqtt::Delivery> on(const std::string& suffix) const {
        std::vector<FakeEspMqtt::Delivery> out;
        for (const auto& m : pub.messages) {
            if (m.topic == "smartmeter/" + cfg.meterNo + "/" + suffix) out.push_back(m);
        }
        return out;
    }
    void balanceCmd(const std::string& payload) { core->onMessage(core->topic("command/balance"), payload); }
    void relayCmd(const std::string& payload) { core->onMessage(core->topic("command/relay"), payload); }
};

}  // namespace meter

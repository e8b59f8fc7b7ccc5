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
    RecordingPublisher pub;
    XorShiftRandom rng{12345};
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
        core->setWifiRssi(-65);
        core->begin();
        return *core;
    }
    void reboot(uint32_t startMillis = 0) {
        clock.restart(startMillis);
        boot("software");
    }
    // Advances time the way the device's loop() runs: one call per second.
    void run(uint64_t ms, uint64_t step = 1000) {
        while (ms > 0) {
            uint64_t d = ms < step ? ms : step;
            clock.advance(d);
            ms -= d;
            core->loop();
        }
    }
    std::vector<Published> on(const std::string& suffix) const {
        std::vector<Published> out;
        for (const auto& m : pub.messages) {
            if (m.topic == "smartmeter/" + cfg.meterNo + "/" + suffix) out.push_back(m);
        }
        return out;
    }
    void balanceCmd(const std::string& payload) { core->onMessage(core->topic("command/balance"), payload); }
    void relayCmd(const std::string& payload) { core->onMessage(core->topic("command/relay"), payload); }
};

}  // namespace meter

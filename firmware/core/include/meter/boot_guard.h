// Boot-loop guard: counts boots that did not stay up in RTC memory (it survives the resets a
// boot loop consists of: panics, watchdogs, brown-outs that do not drop the RTC domain), and
// after maxFastBoots of them in a row the next boot runs in safe mode: relay open, network and
// OTA only (SafeModeCore), for safeModeMs, then a normal boot is tried again. Tasmota and
// ESPHome's safe_mode do the same.
#pragma once

#include <cstdint>
#include <string>

#include "meter/interfaces.h"
#include "meter/meter_core.h"
#include "meter/ota.h"

namespace meter {

struct BootGuardConfig {
    uint32_t maxFastBoots = 5;
    uint32_t stableAfterMs = 120000;  // a boot that stays up this long is good
    uint32_t safeModeMs = 600000;
};

class BootGuard {
public:
    BootGuard(RetainedStore& rtc, const BootGuardConfig& cfg) : rtc_(rtc), cfg_(cfg) {}
    // First thing at boot: counts this boot. true: this boot must run in safe mode.
    bool begin();
    // From loop(): once the boot has been up stableAfterMs, the count goes back to 0.
    void loop(uint64_t uptimeMs);
    bool safeMode() const { return safeMode_; }
    uint32_t fastBoots() const { return count_; }
    // In safe mode: time to restart into a normal boot (the count is cleared first).
    bool safeModeOver(uint64_t uptimeMs);
    // Before a deliberate restart (into a new image, a rollback, after a long outage): the next
    // boot does not count as a fast reboot of this one.
    void clear();

private:
    void store();
    RetainedStore& rtc_;
    BootGuardConfig cfg_;
    uint32_t count_ = 0;
    bool safeMode_ = false;
    bool settled_ = false;
};

// The meter in safe mode: it does not read its stored state or report ring (either may be what
// crashes it), holds the relay open, and over MQTT only says so and accepts OTA commands.
class SafeModeCore {
public:
    SafeModeCore(const MeterConfig& cfg, Clock& clock, Relay& relay, Publisher& publisher, std::string resetReason,
                 uint32_t fastBoots);
    void attachOta(OtaManager& ota) { ota_ = &ota; }
    // Opens the relay and (with OTA attached) calls ota.begin().
    void begin();
    // Restart / Rollback: the caller restarts (no state to save in safe mode).
    OtaManager::Action loop();
    void onConnected();
    void onDisconnected() { connected_ = false; }
    void onMessage(const std::string& topic, const std::string& payload);
    // Nothing is reported in safe mode, so no PUBACK matters (statuses are QoS 0).
    void onPublished(int /*msgId*/) {}
    void onPublishDropped(int /*msgId*/) {}
    void setWifiRssi(int rssi) { wifiRssi_ = rssi; }
    uint64_t uptimeMs() const { return uptime_.total(); }
    Message willMessage();
    std::string topic(const char* suffix) const { return "smartmeter/" + cfg_.meterNo + "/" + suffix; }
    const char* message() const;

private:
    StatusInfo statusInfo(const std::string& status, const std::string& message, const std::string& cmdId);
    void publishStatus(const std::string& status, const std::string& message, const std::string& cmdId);
    MeterConfig cfg_;
    Clock& clock_;
    Relay& relay_;
    Publisher& publisher_;
    std::string resetReason_;
    uint32_t fastBoots_;
    OtaManager* ota_ = nullptr;
    UptimeCounter uptime_;
    bool connected_ = false;
    int wifiRssi_ = 0;
};

}  // namespace meter

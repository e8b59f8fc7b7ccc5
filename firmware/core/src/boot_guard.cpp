#include "meter/boot_guard.h"

#include <utility>
#include <vector>

#include "meter/flash_ring.h"

namespace meter {

// RTC record: [0] 'G', [1] version 1, [2..5] u32 count, [6..9] CRC-32 of [0..5].
bool BootGuard::begin() {
    std::vector<uint8_t> v;
    count_ = 0;
    if (rtc_.load(v) && v.size() == 10 && v[0] == 'G' && v[1] == 1) {
        uint32_t crc = 0, count = 0;
        for (int i = 3; i >= 0; --i) {
            crc = (crc << 8) | v[6 + static_cast<size_t>(i)];
            count = (count << 8) | v[2 + static_cast<size_t>(i)];
        }
        if (crc32(v.data(), 6) == crc) count_ = count;
    }
    if (count_ < 0xFFFFFFF0u) ++count_;
    store();
    safeMode_ = count_ > cfg_.maxFastBoots;
    return safeMode_;
}

void BootGuard::store() {
    std::vector<uint8_t> v{'G', 1};
    for (int i = 0; i < 4; ++i) v.push_back(static_cast<uint8_t>(count_ >> (8 * i)));
    uint32_t crc = crc32(v.data(), v.size());
    for (int i = 0; i < 4; ++i) v.push_back(static_cast<uint8_t>(crc >> (8 * i)));
    rtc_.store(v.data(), v.size());
}

void BootGuard::loop(uint64_t uptimeMs) {
    if (settled_ || safeMode_ || uptimeMs < cfg_.stableAfterMs) return;
    settled_ = true;
    count_ = 0;
    store();
}

void BootGuard::clear() {
    count_ = 0;
    store();
}

bool BootGuard::safeModeOver(uint64_t uptimeMs) {
    if (!safeMode_ || uptimeMs < cfg_.safeModeMs) return false;
    count_ = 0;
    store();
    return true;
}

SafeModeCore::SafeModeCore(const MeterConfig& cfg, Clock& clock, Relay& relay, Publisher& publisher,
                           std::string resetReason, uint32_t fastBoots)
    : cfg_(cfg),
      clock_(clock),
      relay_(relay),
      publisher_(publisher),
      resetReason_(std::move(resetReason)),
      fastBoots_(fastBoots),
      uptime_(clock.millis()) {}

void SafeModeCore::begin() {
    uptime_.update(clock_.millis());
    relay_.set(false);  // safe state: no energy the meter cannot account for
    if (ota_ != nullptr) ota_->begin(cfg_.fwVersion, resetReason_, uptime_.total());
}

const char* SafeModeCore::message() const { return "Safe mode after repeated fast reboots: relay open, only OTA accepted"; }

StatusInfo SafeModeCore::statusInfo(const std::string& status, const std::string& message, const std::string& cmdId) {
    StatusInfo s;
    s.status = status;
    s.message = message;
    s.hasBalance = false;  // the stored state is not read in safe mode
    s.wifiRssi = wifiRssi_;
    uint64_t unixMs = 0;
    s.timestamp = clock_.unixMillis(unixMs) ? unixMs : uptime_.total();
    s.relayOn = false;
    s.fw = cfg_.fwVersion;
    s.uptimeS = uptime_.total() / 1000;
    s.resetReason = resetReason_;
    s.safeMode = true;
    s.fastBoots = fastBoots_;
    if (ota_ != nullptr) {
        s.otaState = otaStateName(ota_->state());
        if (ota_->state() != OtaState::Idle) s.otaVersion = ota_->targetVersion();
        if (ota_->state() == OtaState::Failed || ota_->state() == OtaState::RolledBack) s.otaError = ota_->error();
    }
    s.cmdId = cmdId;
    return s;
}

void SafeModeCore::publishStatus(const std::string& status, const std::string& message, const std::string& cmdId) {
    if (!connected_) return;
    publisher_.publish(topic("status"), encodeStatus(cfg_.meterNo, statusInfo(status, message, cmdId)), 0, true);
}

void SafeModeCore::onConnected() {
    uptime_.update(clock_.millis());
    connected_ = true;
    publishStatus("error", message(), "");
}

void SafeModeCore::onMessage(const std::string& t, const std::string& payload) {
    uptime_.update(clock_.millis());
    if (ota_ != nullptr && t == topic("command/ota")) ota_->onCommand(payload, uptime_.total());
}

OtaManager::Action SafeModeCore::loop() {
    uptime_.update(clock_.millis());
    if (ota_ == nullptr) return OtaManager::Action::None;
    OtaManager::Action a = ota_->loop(uptime_.total());
    OtaEvent e;
    while (ota_->takeEvent(e)) publishStatus("error", e.message, e.cmdId);
    return a;
}

Message SafeModeCore::willMessage() {
    uptime_.update(clock_.millis());
    Message m;
    m.topic = topic("status");
    m.payload = encodeStatus(cfg_.meterNo, statusInfo("offline", "Connection lost", ""));
    m.qos = 0;
    m.retain = true;
    return m;
}

}  // namespace meter

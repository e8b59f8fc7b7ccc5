#include "meter/meter_core.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

namespace meter {
namespace {

void putLe(std::vector<uint8_t>& b, uint64_t v) {
    for (int i = 0; i < 8; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
uint64_t getLe(const uint8_t* p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}
uint64_t bitsOf(double d) {
    uint64_t v;
    std::memcpy(&v, &d, sizeof v);
    return v;
}
double fromBits(uint64_t v) {
    double d;
    std::memcpy(&d, &v, sizeof d);
    return d;
}

const char* conditionMessage(const std::string& condition) {
    if (condition == "error") return "Energy sensor not responding; relay open";
    if (condition == "low_balance") return "Balance low";
    return "Device operating normally";
}

}  // namespace

MeterCore::MeterCore(const MeterConfig& cfg, Clock& clock, KvStore& kv, RecordLog& log, Relay& relay,
                     EnergySource& energy, Publisher& publisher, std::string resetReason)
    : cfg_(cfg),
      clock_(clock),
      kv_(kv),
      log_(log),
      relay_(relay),
      energy_(energy),
      publisher_(publisher),
      resetReason_(std::move(resetReason)),
      uptime_(clock.millis()) {
    // Zero would stall seq reservation or replay forever.
    cfg_.seqBlock = std::max<uint32_t>(cfg_.seqBlock, 1);
    cfg_.replayBatch = std::max<uint32_t>(cfg_.replayBatch, 1);
}

uint32_t MeterCore::now() {
    nowMs_ = clock_.millis();
    uptime_.update(nowMs_);
    return nowMs_;
}

uint64_t MeterCore::timestamp() {
    uint64_t unixMs = 0;
    if (clock_.unixMillis(unixMs)) return unixMs;
    return uptime_.total();  // below 1e12: PROTOCOL.md's "time unknown"
}

void MeterCore::begin() {
    uint32_t t = now();
    std::vector<uint8_t> v;
    if (kv_.get(kKeySeq, v) && v.size() == 8) seqNext_ = getLe(v.data());
    // Reserve a block: the stored value is always above every seq this boot can use, so a
    // reboot at any moment resumes above the last one sent (a gap, never a repeat), at the cost
    // of one flash write per seqBlock reports.
    seqCeiling_ = seqNext_ + cfg_.seqBlock;
    std::vector<uint8_t> s;
    putLe(s, seqCeiling_);
    kv_.put(kKeySeq, s.data(), s.size());

    if (kv_.get(kKeyState, v) && v.size() == 16) {
        energyTotal_ = fromBits(getLe(v.data()));
        balance_ = fromBits(getLe(v.data() + 8));
    }
    // The register on the wire must never step backwards: the backend bills only increases,
    // so energy between a restored register and the last one sent would be lost for good.
    // The state is written before every report leaves (emitReport), and the newest record of
    // the report log is a second witness for when that write failed (NVS full, flash fault).
    Report newest;
    if (log_.peekNewest(v) && unpackReport(v.data(), v.size(), newest) && newest.energyTotal > energyTotal_) {
        energyTotal_ = newest.energyTotal;
        balance_ = newest.remainingBalance;
    }
    if (kv_.get(kKeyRelay, v) && v.size() == 1 && v[0] <= 2) override_ = static_cast<RelayOverride>(v[0]);

    lastReportMs_ = t;
    lastPersistMs_ = t;
    lastStatusMs_ = t;
    applyRelay();
}

void MeterCore::loop() {
    uint32_t t = now();
    if (!sampledOnce_ || elapsedMs(t, lastSampleMs_) >= cfg_.sampleIntervalMs) sample(t);
    applyRelay();
    publishConditionIfChanged();
    if (elapsedMs(t, lastReportMs_) >= cfg_.reportIntervalMs) {
        // Next report one interval from now, not from the missed deadline: after a stall the
        // meter sends one report covering the whole gap instead of a burst of empty ones.
        lastReportMs_ = t;
        emitReport();
    }
    drainBuffer();
    // Between reports the state is written at most once per persistIntervalMs (NVS is
    // wear-levelled, but a write per sample would wear it out); every report writes it anyway
    // (emitReport), so with the default intervals this only matters for long report intervals.
    if (stateDirty_ && elapsedMs(t, lastPersistMs_) >= cfg_.persistIntervalMs) persistState();
    if (connected_ && cfg_.statusIntervalMs > 0 && elapsedMs(t, lastStatusMs_) >= cfg_.statusIntervalMs) {
        std::string c = condition();
        publishStatus(c, conditionMessage(c), "");
    }
}

void MeterCore::sample(uint32_t t) {
    sampledOnce_ = true;
    lastSampleMs_ = t;
    double kwh = 0;
    bool ok = energy_.readKwh(kwh) && std::isfinite(kwh) && kwh >= 0 && kwh <= kMaxEnergyTotal;
    if (!ok) {
        if (!sensorFailing_) {
            sensorFailing_ = true;
            sensorFailSinceMs_ = t;
        }
        // Fail-safe: a meter that cannot measure must not deliver unmetered energy for long.
        if (elapsedMs(t, sensorFailSinceMs_) >= cfg_.sensorFailTimeoutMs) sensorFault_ = true;
        return;
    }
    sensorFailing_ = false;
    sensorFault_ = false;
    if (!haveBaseline_) {
        // The first reading after boot is the baseline: energy used while the ESP32 was down
        // is not known to have been billed, and is not billed twice.
        haveBaseline_ = true;
        baseline_ = kwh;
        return;
    }
    double delta = kwh - baseline_;
    // The baseline follows the register either way. A register that went backwards was reset
    // or replaced (the PZEM counts whole Wh, it does not jitter): keeping the old baseline would
    // deliver free energy until the new register caught up.
    baseline_ = kwh;
    if (delta > 0) {
        energyTotal_ += delta;
        sessionTotal_ += delta;
        intervalUnits_ += delta;
        balance_ -= delta;
        stateDirty_ = true;
    }
}

const char* MeterCore::condition() const {
    if (sensorFault_) return "error";
    if (balance_ <= cfg_.lowBalanceThreshold) return "low_balance";
    return "online";
}

void MeterCore::applyRelay() {
    // The sensor fail-safe wins over everything, including a forced "on": staff cannot grant
    // energy that the meter cannot measure.
    bool on = !sensorFault_ && override_ != RelayOverride::Off &&
              (override_ == RelayOverride::On || balance_ > 0);
    if (!relayKnown_ || on != relayOn_) {
        relay_.set(on);
        relayOn_ = on;
        relayKnown_ = true;
    }
}

StatusInfo MeterCore::statusInfo(const std::string& status, const std::string& message, const std::string& cmdId) {
    StatusInfo s;
    s.status = status;
    s.message = message;
    s.balance = balance_;
    s.wifiRssi = wifiRssi_;
    s.timestamp = timestamp();
    s.relayOn = relayOn_;
    s.fw = cfg_.fwVersion;
    s.uptimeS = uptime_.total() / 1000;
    s.resetReason = resetReason_;
    s.cmdId = cmdId;
    return s;
}

void MeterCore::publishStatus(const std::string& status, const std::string& message, const std::string& cmdId) {
    if (!connected_) return;  // QoS 0 and retained: the next connect publishes a fresh one
    publisher_.publish(topic("status"), encodeStatus(cfg_.meterNo, statusInfo(status, message, cmdId)), 0, true);
    publishedCondition_ = status;
    lastStatusMs_ = nowMs_;
}

void MeterCore::publishConditionIfChanged() {
    std::string c = condition();
    if (connected_ && c != publishedCondition_) publishStatus(c, conditionMessage(c), "");
}

uint64_t MeterCore::takeSeq() {
    if (seqNext_ >= seqCeiling_) {
        seqCeiling_ = seqNext_ + cfg_.seqBlock;
        std::vector<uint8_t> s;
        putLe(s, seqCeiling_);
        kv_.put(kKeySeq, s.data(), s.size());
    }
    return seqNext_++;
}

void MeterCore::emitReport() {
    Report r;
    r.seq = takeSeq();
    r.timestamp = timestamp();
    r.unitsConsumed = intervalUnits_;
    r.remainingBalance = balance_;
    r.totalConsumed = sessionTotal_;
    r.energyTotal = energyTotal_;
    intervalUnits_ = 0;
    // "Never lose a kWh": the register this report carries is in flash before the report can
    // leave, so after a power cut the meter resumes at or above every energyTotal it ever sent
    // (see the wear budget in README.md: ~2,900 writes a day at 30 s reports).
    persistState();
    // Straight to MQTT only when nothing older is waiting: reports leave oldest-first.
    if (connected_ && log_.size() == 0 &&
        publisher_.publish(topic("consumption"), encodeReport(cfg_.meterNo, r), 1, false)) {
        return;
    }
    std::vector<uint8_t> b = packReport(r);
    log_.append(b.data(), b.size());
}

void MeterCore::drainBuffer() {
    if (!connected_) return;
    // A bounded batch per call keeps the esp_mqtt outbox (RAM) small after a long outage.
    std::vector<uint8_t> rec;
    for (uint32_t n = 0; n < cfg_.replayBatch && log_.size() > 0; ++n) {
        if (!log_.peekOldest(rec)) break;
        Report r;
        if (!unpackReport(rec.data(), rec.size(), r)) {
            log_.popOldest();  // not a report of ours: drop it rather than block the queue
            continue;
        }
        if (!publisher_.publish(topic("consumption"), encodeReport(cfg_.meterNo, r), 1, false)) break;
        log_.popOldest();
    }
}

void MeterCore::persistState() {
    std::vector<uint8_t> s;
    putLe(s, bitsOf(energyTotal_));
    putLe(s, bitsOf(balance_));
    kv_.put(kKeyState, s.data(), s.size());
    lastPersistMs_ = nowMs_;
    stateDirty_ = false;
}

void MeterCore::persistNow() {
    now();
    persistState();
}

void MeterCore::onConnected() {
    now();
    connected_ = true;
    // Buffered reports first, so a backend that recomputes the balance on "online" has seen
    // them (a seed-only backend has no energyTotal to reconcile with).
    drainBuffer();
    publishStatus("online", conditionMessage("online"), "");
    publishConditionIfChanged();
}

void MeterCore::onDisconnected() {
    now();
    connected_ = false;
}

Message MeterCore::willMessage() {
    now();
    Message m;
    m.topic = topic("status");
    m.payload = encodeStatus(cfg_.meterNo, statusInfo("offline", "Connection lost", ""));
    m.qos = 0;
    m.retain = true;
    return m;
}

void MeterCore::onMessage(const std::string& t, const std::string& payload) {
    now();
    if (t == topic("command/balance")) {
        BalanceCommand cmd;
        if (decodeBalanceCommand(payload, cmd)) applyBalanceCommand(cmd);
    } else if (t == topic("command/relay")) {
        RelayCommand cmd;
        if (decodeRelayCommand(payload, cmd)) applyRelayCommand(cmd);
    }
}

void MeterCore::applyBalanceCommand(const BalanceCommand& cmd) {
    if (cmd.hasEnergyTotal) {
        // PROTOCOL.md: the ledger's balance accounts consumption up to cmd.energyTotal; what
        // this meter billed since then (in flight, or buffered) is still owed.
        balance_ = cmd.balance - (energyTotal_ - cmd.energyTotal);
    } else {
        balance_ = cmd.balance;  // seed-only backend
    }
    // A new balance is persisted at once (not throttled): losing a payment to a power cut
    // would switch a paying customer off until the next resync.
    persistState();
    applyRelay();
    if (connected_) {
        publisher_.publish(topic("balance"), encodeBalanceReport(cfg_.meterNo, balance_, timestamp(), cmd.cmdId), 0,
                           false);
    }
    publishConditionIfChanged();
}

void MeterCore::applyRelayCommand(const RelayCommand& cmd) {
    override_ = cmd.state;
    // Persisted at once: a maintenance "off" must survive a reboot.
    const uint8_t b = static_cast<uint8_t>(override_);
    kv_.put(kKeyRelay, &b, 1);
    applyRelay();
    std::string c = condition();
    publishStatus(c, std::string("Relay override: ") + relayOverrideName(override_), cmd.cmdId);
}

}  // namespace meter

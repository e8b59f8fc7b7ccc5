#include "meter/meter_core.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "meter/flash_ring.h"

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
uint32_t getU32(const uint8_t* p) {
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) | (static_cast<uint32_t>(p[2]) << 16) |
           (static_cast<uint32_t>(p[3]) << 24);
}

const char* conditionMessage(const std::string& condition) {
    if (condition == "error") return "Energy sensor not responding; relay open";
    if (condition == "low_balance") return "Balance low";
    return "Device operating normally";
}

bool plausibleState(const StateRecord& s) {
    return std::isfinite(s.energyTotal) && s.energyTotal >= 0 && s.energyTotal <= kMaxEnergyTotal &&
           std::isfinite(s.balance) && std::fabs(s.balance) <= kMaxAbsBalance + kMaxEnergyTotal &&
           std::isfinite(s.rawKwh) && s.rawKwh >= 0 && s.rawKwh <= kMaxEnergyTotal && std::isfinite(s.unbilledKwh) &&
           s.unbilledKwh >= 0 && s.unbilledKwh <= kMaxEnergyTotal;
}

}  // namespace

std::vector<uint8_t> encodeState(const StateRecord& s) {
    std::vector<uint8_t> b;
    b.reserve(kStateRecordBytes);
    b.push_back(2);
    b.push_back(s.haveRaw ? 1 : 0);
    for (size_t i = 0; i < kOwnRegIdChars; ++i) b.push_back(i < s.regId.size() ? static_cast<uint8_t>(s.regId[i]) : 0);
    putLe(b, bitsOf(s.energyTotal));
    putLe(b, bitsOf(s.balance));
    putLe(b, bitsOf(s.rawKwh));
    putLe(b, bitsOf(s.unbilledKwh));
    uint32_t crc = crc32(b.data(), b.size());
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(crc >> (8 * i)));
    return b;
}

bool decodeState(const std::vector<uint8_t>& v, StateRecord& out) {
    if (v.size() != kStateRecordBytes || v[0] != 2 || v[1] > 1) return false;
    if (crc32(v.data(), kStateRecordBytes - 4) != getU32(v.data() + kStateRecordBytes - 4)) return false;
    StateRecord s;
    s.regId.assign(reinterpret_cast<const char*>(v.data() + 2), kOwnRegIdChars);
    s.haveRaw = v[1] == 1;
    s.energyTotal = fromBits(getLe(v.data() + 10));
    s.balance = fromBits(getLe(v.data() + 18));
    s.rawKwh = fromBits(getLe(v.data() + 26));
    s.unbilledKwh = fromBits(getLe(v.data() + 34));
    if (!validRegId(s.regId) || !plausibleState(s)) return false;
    out = s;
    return true;
}

std::vector<uint8_t> encodeRetained(const RetainedRecord& r) {
    std::vector<uint8_t> b;
    b.reserve(kRetainedRecordBytes);
    b.push_back('R');
    b.push_back(1);
    std::vector<uint8_t> st = encodeState(r.state);
    b.insert(b.end(), st.begin(), st.end());
    b.push_back(static_cast<uint8_t>(r.relayOverride));
    putLe(b, bitsOf(r.intervalUnits));
    uint32_t crc = crc32(b.data(), b.size());
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(crc >> (8 * i)));
    return b;
}

bool decodeRetained(const std::vector<uint8_t>& v, RetainedRecord& out) {
    if (v.size() != kRetainedRecordBytes || v[0] != 'R' || v[1] != 1) return false;
    if (crc32(v.data(), kRetainedRecordBytes - 4) != getU32(v.data() + kRetainedRecordBytes - 4)) return false;
    RetainedRecord r;
    std::vector<uint8_t> st(v.begin() + 2, v.begin() + 2 + static_cast<long>(kStateRecordBytes));
    if (!decodeState(st, r.state) || v[48] > 2) return false;
    r.relayOverride = static_cast<RelayOverride>(v[48]);
    r.intervalUnits = fromBits(getLe(v.data() + 49));
    if (!std::isfinite(r.intervalUnits) || r.intervalUnits < 0 || r.intervalUnits > kMaxEnergyTotal) return false;
    out = r;
    return true;
}

MeterCore::MeterCore(const MeterConfig& cfg, Clock& clock, KvStore& kv, RecordLog& log, Relay& relay,
                     EnergySource& energy, Publisher& publisher, Random& random, std::string resetReason)
    : cfg_(cfg),
      clock_(clock),
      kv_(kv),
      log_(log),
      relay_(relay),
      energy_(energy),
      publisher_(publisher),
      random_(random),
      resetReason_(std::move(resetReason)),
      uptime_(clock.millis()) {
    // Zero would stall seq reservation or replay forever.
    cfg_.seqBlock = std::max<uint32_t>(cfg_.seqBlock, 1);
    cfg_.replayBatch = std::max<uint32_t>(cfg_.replayBatch, 1);
    // A non-positive or non-finite rating would bill nothing at all.
    if (!(cfg_.ratedMaxKw > 0 && cfg_.ratedMaxKw <= 1e6)) cfg_.ratedMaxKw = MeterConfig().ratedMaxKw;
    if (!(cfg_.registerToleranceKwh >= 0 && cfg_.registerToleranceKwh <= 1)) {
        cfg_.registerToleranceKwh = MeterConfig().registerToleranceKwh;
    }
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

std::string MeterCore::drawRegId() {
    std::string id(kOwnRegIdChars, 'A');
    for (size_t i = 0; i < kOwnRegIdChars; ++i) id[i] = kRegIdAlphabet[random_.next32() % 64];
    return id;
}

void MeterCore::restoreState(uint32_t t) {
    (void)t;
    std::vector<uint8_t> v;
    StateRecord st;
    enum class From { Nothing, Retained, Nvs, Legacy } from = From::Nothing;
    bool unreadable = false;
    RetainedRecord kept;
    if (retained_ != nullptr && retained_->load(v) && decodeRetained(v, kept)) {
        // A soft reset: RAM that survived holds the state as it was a moment before, with the
        // sensor register of the last reading, so not even the reset itself is forgiven.
        st = kept.state;
        from = From::Retained;
    } else if (kv_.get(kKeyState, v)) {
        if (decodeState(v, st)) {
            from = From::Nvs;
        } else if (v.size() == 16) {
            st.energyTotal = fromBits(getLe(v.data()));
            st.balance = fromBits(getLe(v.data() + 8));
            if (plausibleState(st)) from = From::Legacy;
            else unreadable = true;
        } else {
            unreadable = true;
        }
    }
    // The newest logged report, consumed or not: a witness of the last register the meter sent.
    Report newest;
    ReportMeta meta;
    bool haveNewest = log_.peekNewest(v) && unpackReport(v.data(), v.size(), newest, meta) &&
                      std::isfinite(newest.energyTotal) && newest.energyTotal >= 0 &&
                      newest.energyTotal <= kMaxEnergyTotal && std::isfinite(newest.remainingBalance);
    bool persist = false;
    bool fromLog = false;
    if (from == From::Retained) {
        if (haveNewest && newest.regId == st.regId && newest.energyTotal > st.energyTotal) {
            st.energyTotal = newest.energyTotal;  // cannot happen unless RAM lost a write
            st.balance = newest.remainingBalance;
            st.haveRaw = false;
        } else {
            intervalUnits_ = kept.intervalUnits;
        }
        override_ = kept.relayOverride;
        // NVS is up to a persist interval behind: bring it level, so that the raw register
        // chain of the next logged reports refers to this state.
        persist = true;
    } else if (from == From::Nvs) {
        // The register on the wire must never step backwards (the backend bills increases only):
        // a report newer than the state of the same history wins. The raw register at that report
        // is the stored one plus what was billed in between, when nothing broke the chain.
        if (haveNewest && newest.regId == st.regId && newest.energyTotal > st.energyTotal) {
            if (st.haveRaw && meta.rawChained) st.rawKwh = st.rawKwh + (newest.energyTotal - st.energyTotal);
            else st.haveRaw = false;
            st.energyTotal = newest.energyTotal;
            st.balance = newest.remainingBalance;
            persist = true;
        }
    } else if (from == From::Legacy) {
        // State written before register histories: the register continues under a new name.
        if (haveNewest && newest.regId.empty() && newest.energyTotal > st.energyTotal) {
            st.energyTotal = newest.energyTotal;
            st.balance = newest.remainingBalance;
        }
        st.regId = drawRegId();
        persist = true;
    } else if (haveNewest) {
        // NVS lost (erased, or a write that never landed) but the report log survived: the log's
        // newest report carries the history, the register and the balance it had.
        st.regId = newest.regId.empty() ? drawRegId() : newest.regId;
        st.energyTotal = newest.energyTotal;
        st.balance = newest.remainingBalance;
        override_ = meta.relayOverride;
        fromLog = true;
        persist = true;
        pendingNotice_ = kMsgStateFromLog;
    } else {
        // First boot, a new board, or everything erased: a register history starts from scratch.
        st = StateRecord();
        st.regId = drawRegId();
        persist = true;
        if (unreadable) pendingNotice_ = kMsgStateUnreadable;
    }

    regId_ = st.regId;
    energyTotal_ = st.energyTotal;
    balance_ = st.balance;
    unbilledKwh_ = st.unbilledKwh;
    if (st.haveRaw) {
        haveBaseline_ = true;
        baseline_ = st.rawKwh;
        baselineAtMs_ = uptime_.total();
        baselineGapMs_ = cfg_.bootGapMs;
        rawChained_ = !persist;  // the chain is to the record in NVS, rewritten below if persist
    }

    // seq: above everything this history may have sent. The log's newest record is a witness
    // too (the seq block in NVS can be lost with the rest of NVS).
    std::vector<uint8_t> sv;
    uint64_t stored = 0;
    if (kv_.get(kKeySeq, sv) && sv.size() == 8) stored = getLe(sv.data());
    seqNext_ = stored;
    if (haveNewest && newest.seq + 1 > seqNext_) seqNext_ = newest.seq + 1;
    if (seqNext_ + cfg_.seqBlock > kMaxPackedSeq) {
        // Beyond anything a meter reaches (2^40 reports): corrupt. seq is ordered within a
        // register history only, so a new history may start again from 0.
        seqNext_ = 0;
        regId_ = drawRegId();
        energyTotal_ = 0;
        balance_ = 0;
        unbilledKwh_ = 0;
        haveBaseline_ = false;
        persist = true;
        pendingNotice_ = kMsgStateUnreadable;
    }

    // The relay override is written at once on every change; the log's copy serves only when
    // NVS lost it too.
    if (from == From::Retained) {
        // already set from the retained record
    } else if (kv_.get(kKeyRelay, v) && v.size() == 1 && v[0] <= 2) {
        override_ = static_cast<RelayOverride>(v[0]);
    } else if (!fromLog) {
        override_ = RelayOverride::Auto;
    }
    if (persist) persistState();
    else saveRetained();
}

void MeterCore::begin() {
    uint32_t t = now();
    if (ota_ != nullptr) ota_->begin(cfg_.fwVersion, resetReason_, uptime_.total());
    restoreState(t);
    // Reserve a block: the stored value is always above every seq this boot can use, so a
    // reboot at any moment resumes above the last one sent (a gap, never a repeat), at the cost
    // of one flash write per seqBlock reports.
    seqCeiling_ = seqNext_ + cfg_.seqBlock;
    std::vector<uint8_t> s;
    putLe(s, seqCeiling_);
    kv_.put(kKeySeq, s.data(), s.size());

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
    if (overRatedPending_ && connected_) {
        overRatedPending_ = false;
        publishNotice(kMsgOverRated);
    }
    if (elapsedMs(t, lastReportMs_) >= cfg_.reportIntervalMs) {
        // Next report one interval from now, not from the missed deadline: after a stall the
        // meter sends one report covering the whole gap instead of a burst of empty ones.
        lastReportMs_ = t;
        emitReport();
    }
    drainBuffer();
    // NVS is written at most once per persistIntervalMs while energy is billed (plus payments,
    // relay changes and new histories): a write per report would wear the NVS sectors out
    // within a meter's life (README.md). What a power cut takes from RAM in between is
    // recovered at boot: the ring's newest report is a witness of the register on the wire, and
    // the saved sensor register bills the energy since.
    if (stateDirty_ && elapsedMs(t, lastPersistMs_) >= cfg_.persistIntervalMs) persistState();
    if (connected_ && cfg_.statusIntervalMs > 0 && elapsedMs(t, lastStatusMs_) >= cfg_.statusIntervalMs) {
        std::string c = condition();
        publishStatus(c, conditionMessage(c), "");
    }
    if (ota_ != nullptr) {
        OtaManager::Action a = ota_->loop(uptime_.total());
        publishOtaEvents();
        // The state goes to flash before the restart into the new image (or back to the old
        // one), so that neither forgives anything.
        if (a == OtaManager::Action::Restart) {
            persistState();
            ota_->restartNow();
        } else if (a == OtaManager::Action::Rollback) {
            persistState();
            ota_->rollbackNow();
        }
    }
    if (retainedDirty_) saveRetained();
}

void MeterCore::publishOtaEvents() {
    if (ota_ == nullptr || !connected_) return;  // kept until the next connect
    OtaEvent e;
    while (ota_->takeEvent(e)) {
        publishStatus(e.error ? std::string("error") : std::string(condition()), e.message, e.cmdId);
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
    uint64_t at = uptime_.total();
    if (!haveBaseline_) {
        // No register saved with the state (first boot, lost state): this reading is the
        // baseline. It is written at once (once per boot at most), so that a power cut before
        // the next throttled write still bills from it.
        haveBaseline_ = true;
        baseline_ = kwh;
        baselineAtMs_ = at;
        baselineGapMs_ = 0;
        persistState();
        return;
    }
    double delta = kwh - baseline_;
    uint64_t spanMs = (at - baselineAtMs_) + baselineGapMs_;
    // The baseline follows the register either way. A register that went backwards was reset
    // or replaced (the PZEM counts whole Wh, it does not jitter): keeping the old baseline would
    // deliver free energy until the new register caught up.
    baseline_ = kwh;
    baselineAtMs_ = at;
    baselineGapMs_ = 0;
    if (delta > 0) {
        double cap = cfg_.ratedMaxKw * static_cast<double>(spanMs) / 3600000.0 + kRegisterStepKwh;
        if (delta > cap) {
            unbilledKwh_ += delta - cap;
            delta = cap;
            rawChained_ = false;
            overRatedPending_ = true;
        }
        energyTotal_ += delta;
        sessionTotal_ += delta;
        intervalUnits_ += delta;
        balance_ -= delta;
        stateDirty_ = true;
        retainedDirty_ = true;
    } else if (delta < 0) {
        rawChained_ = false;
        stateDirty_ = true;
        retainedDirty_ = true;
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
        bool change = relayKnown_;
        relay_.set(on);
        relayOn_ = on;
        relayKnown_ = true;
        // A relay that opened because the credit ran out must stay open after a power cut.
        if (change && stateDirty_) persistState();
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
    s.regId = regId_;
    s.unbilledKwh = unbilledKwh_;
    if (ota_ != nullptr) {
        s.otaState = otaStateName(ota_->state());
        if (ota_->state() != OtaState::Idle) s.otaVersion = ota_->targetVersion();
        if (ota_->state() == OtaState::Failed || ota_->state() == OtaState::RolledBack) s.otaError = ota_->error();
    }
    s.cmdId = cmdId;
    return s;
}

void MeterCore::publishStatus(const std::string& status, const std::string& message, const std::string& cmdId) {
    if (!connected_) return;  // QoS 0 and retained: the next connect publishes a fresh one
    publisher_.publish(topic("status"), encodeStatus(cfg_.meterNo, statusInfo(status, message, cmdId)), 0, true);
    publishedCondition_ = status;
    lastStatusMs_ = nowMs_;
}

// An event, not a condition: status "error" with the message, then (publishConditionIfChanged,
// at once or in the next loop) the meter's actual condition again, which stays retained.
void MeterCore::publishNotice(const std::string& message) { publishStatus("error", message, ""); }

void MeterCore::commandsLost(uint32_t total) {
    now();
    publishNotice(std::string(kMsgCommandsLost) + std::to_string(total));
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
    r.regId = regId_;
    intervalUnits_ = 0;
    retainedDirty_ = true;
    // The ring is the outbox: every report is in flash before it can leave, and leaves the ring
    // only when the broker has acknowledged it (onPublished). Its record is also the witness of
    // the register on the wire after a power cut.
    ReportMeta meta;
    meta.relayOverride = override_;
    meta.rawChained = rawChained_;
    std::vector<uint8_t> b = packReport(r, meta);
    if (!b.empty() && log_.append(b.data(), b.size())) return;  // drainBuffer() sends it
    // The ring refused it (flash fault): the state in NVS is then the only witness of this
    // register, and the report goes out untracked, once.
    persistState();
    if (connected_) publisher_.publish(topic("consumption"), encodeReport(cfg_.meterNo, r), 1, false);
}

void MeterCore::expireInflight() {
    // esp_mqtt deletes a message outboxExpiryMs after it was queued (only while connected, and
    // without telling when MQTT_REPORT_DELETED_MESSAGES is off, the Arduino default); a PUBACK
    // that comes later produces no event. One second later the report is due again.
    const uint64_t now = uptime_.total();
    const uint64_t limit = static_cast<uint64_t>(cfg_.outboxExpiryMs) + 1000;
    inflight_.erase(std::remove_if(inflight_.begin(), inflight_.end(),
                                   [&](const Inflight& f) { return now - f.sentAtMs > limit; }),
                    inflight_.end());
}

void MeterCore::drainBuffer() {
    if (!connected_) return;
    expireInflight();
    std::vector<uint8_t> rec;
    uint32_t handed = 0;
    size_t index = 0;
    // Oldest first; a bounded batch per call, at most maxInflight awaiting their PUBACK and a
    // bounded outbox, so that replaying a long outage never moves the ring into RAM.
    while (handed < cfg_.replayBatch && inflight_.size() < cfg_.maxInflight &&
           publisher_.outboxBytes() < cfg_.maxOutboxBytes) {
        uint32_t key;
        if (!log_.peekAt(index, rec, key)) break;
        bool sent = false;
        for (const auto& f : inflight_) sent = sent || f.key == key;
        if (sent) {
            ++index;
            continue;
        }
        Report r;
        ReportMeta meta;
        if (!unpackReport(rec.data(), rec.size(), r, meta)) {
            log_.consume(key);  // not a report of ours: drop it rather than block the queue
            continue;
        }
        int id = publisher_.publish(topic("consumption"), encodeReport(cfg_.meterNo, r), 1, false);
        if (id < 0) break;  // refused: it stays in the ring for the next loop()
        ++handed;
        if (id == 0) {
            // A client that reports no message ids cannot tell us about PUBACKs: taken counts
            // as delivered (the behaviour before the ring was the outbox).
            log_.consume(key);
            continue;
        }
        Inflight f{key, id, uptime_.total(), false};
        for (auto& other : inflight_) {
            if (other.msgId == id) {
                // esp_mqtt draws message ids at random (MQTT_MSG_ID_INCREMENTAL is off): its
                // PUBACK could be for either message, so neither leaves the ring on it; both are
                // sent again after the expiry (a duplicate the backend absorbs, never a loss).
                other.ambiguous = true;
                f.ambiguous = true;
            }
        }
        inflight_.push_back(f);
        ++index;
    }
}

void MeterCore::onPublished(int msgId) {
    now();
    uint32_t key = 0;
    bool found = false;
    bool ambiguous = false;
    for (const auto& f : inflight_) {
        if (f.msgId != msgId) continue;
        found = true;
        key = f.key;
        ambiguous = ambiguous || f.ambiguous;
    }
    if (!found || ambiguous) return;  // a status (QoS 0 has no PUBACK), or see drainBuffer()
    log_.consume(key);
    inflight_.erase(std::remove_if(inflight_.begin(), inflight_.end(), [&](const Inflight& f) { return f.key == key; }),
                    inflight_.end());
    if (ota_ != nullptr) {
        ota_->onReportAcked(uptime_.total());  // a new image has proved it can report
        publishOtaEvents();
    }
    drainBuffer();
}

void MeterCore::onPublishDropped(int msgId) {
    now();
    inflight_.erase(std::remove_if(inflight_.begin(), inflight_.end(), [&](const Inflight& f) { return f.msgId == msgId; }),
                    inflight_.end());
}

void MeterCore::persistState() {
    StateRecord st;
    st.regId = regId_;
    st.energyTotal = energyTotal_;
    st.balance = balance_;
    st.haveRaw = haveBaseline_;
    st.rawKwh = haveBaseline_ ? baseline_ : 0;
    st.unbilledKwh = unbilledKwh_;
    std::vector<uint8_t> s = encodeState(st);
    kv_.put(kKeyState, s.data(), s.size());
    lastPersistMs_ = nowMs_;
    stateDirty_ = false;
    rawChained_ = haveBaseline_;
    saveRetained();
}

void MeterCore::saveRetained() {
    retainedDirty_ = false;
    if (retained_ == nullptr) return;
    RetainedRecord r;
    r.state.regId = regId_;
    r.state.energyTotal = energyTotal_;
    r.state.balance = balance_;
    r.state.haveRaw = haveBaseline_;
    r.state.rawKwh = haveBaseline_ ? baseline_ : 0;
    r.state.unbilledKwh = unbilledKwh_;
    r.relayOverride = override_;
    r.intervalUnits = intervalUnits_;
    std::vector<uint8_t> b = encodeRetained(r);
    retained_->store(b.data(), b.size());
}

void MeterCore::persistNow() {
    now();
    persistState();
}

void MeterCore::onConnected() {
    now();
    connected_ = true;
    // Reports handed over before the drop are resent by the client itself, unless they are
    // older than the expiry, which the client deletes at its first pass (drainBuffer expires
    // them here too). Buffered reports go first, so a backend that recomputes the balance on
    // "online" has seen them (a seed-only backend has no energyTotal to reconcile with).
    drainBuffer();
    publishStatus("online", conditionMessage("online"), "");
    if (!pendingNotice_.empty()) {
        publishNotice(pendingNotice_);
        pendingNotice_.clear();
    }
    publishOtaEvents();
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
    } else if (t == topic("command/ota") && ota_ != nullptr) {
        ota_->onCommand(payload, uptime_.total());
        publishOtaEvents();
    }
}

void MeterCore::applyBalanceCommand(const BalanceCommand& cmd) {
    // PROTOCOL.md: the ledger's balance accounts consumption up to cmd.energyTotal of the
    // register history cmd.regId; what this meter billed since then (in flight, or buffered) is
    // still owed. A command about another history (this meter lost its state, or its board was
    // replaced) sets the balance as it is: the difference between someone else's register and
    // this one is not a credit.
    const char* notApplied = nullptr;
    if (!cmd.hasEnergyTotal) {
        balance_ = cmd.balance;  // seed-only backend
    } else if (!cmd.regId.empty() ? cmd.regId == regId_
                                  : cmd.energyTotal <= energyTotal_ + cfg_.registerToleranceKwh) {
        balance_ = cmd.balance - (energyTotal_ - cmd.energyTotal);
    } else {
        balance_ = cmd.balance;
        notApplied = cmd.regId.empty() ? kMsgRegisterAhead : kMsgRegIdMismatch;
    }
    // A new balance is persisted at once (not throttled): losing a payment to a power cut
    // would switch a paying customer off until the next resync.
    persistState();
    applyRelay();
    if (connected_) {
        publisher_.publish(topic("balance"),
                           encodeBalanceReport(cfg_.meterNo, balance_, timestamp(), regId_, cmd.cmdId), 0, false);
    }
    if (notApplied != nullptr) publishNotice(notApplied);
    publishConditionIfChanged();
}

void MeterCore::applyRelayCommand(const RelayCommand& cmd) {
    override_ = cmd.state;
    // Persisted at once: a maintenance "off" must survive a reboot.
    const uint8_t b = static_cast<uint8_t>(override_);
    kv_.put(kKeyRelay, &b, 1);
    saveRetained();
    applyRelay();
    std::string c = condition();
    publishStatus(c, std::string("Relay override: ") + relayOverrideName(override_), cmd.cmdId);
}

}  // namespace meter

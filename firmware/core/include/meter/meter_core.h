// The meter's state machine: billing on register deltas (capped at the rated power), local
// balance and reconciliation within a register history (regId), relay policy, reports with
// seq/energyTotal/regId, offline buffering and replay, persistence (the register on the wire
// never steps backwards after a power cut, and energy used across a reboot is billed).
// devtools/sim/meter_core.py is a line-by-line port; when a rule changes here it changes there
// too, and firmware/trace/ holds the traces (with golden output) that prove both still agree.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "meter/interfaces.h"
#include "meter/numeric.h"
#include "meter/ota.h"
#include "meter/payloads.h"

namespace meter {

struct MeterConfig {
    std::string meterNo = "METER001";
    std::string fwVersion = "1.0.0";
    uint32_t reportIntervalMs = 30000;      // seed: every 30 s (configurable)
    uint32_t sampleIntervalMs = 1000;       // how often the energy register is read
    uint32_t sensorFailTimeoutMs = 60000;   // register unreadable this long: relay opens
    uint32_t persistIntervalMs = 60000;     // between reports: at most one state flash write per interval
    uint32_t statusIntervalMs = 300000;     // periodic status while connected; 0 = never
    uint32_t seqBlock = 64;                 // seq values reserved per flash write
    uint32_t replayBatch = 20;              // reports handed to MQTT per loop() at most
    // The ring is the outbox: a report is handed to the client only while fewer than maxInflight
    // reports await their PUBACK and the client's outbox holds less than maxOutboxBytes, so a
    // long outage never moves the ring into RAM.
    uint32_t maxInflight = 8;
    uint32_t maxOutboxBytes = 4096;
    // esp_mqtt deletes a message still unacknowledged this long after it was queued
    // (OUTBOX_EXPIRED_TIMEOUT_MS), without an event unless MQTT_REPORT_DELETED_MESSAGES is set.
    // A report whose PUBACK has not come after this plus one second is sent again from the ring.
    uint32_t outboxExpiryMs = 30000;
    double lowBalanceThreshold = 1.0;       // kWh; at or below: status low_balance
    // The most the supply can deliver (80 A at 230 V). A sample's delta above ratedMaxKw x the
    // time since the previous reading is not billed: it is counted in unbilledKwh and reported,
    // so that a glitching or tampered register is visible instead of charged or forgiven.
    double ratedMaxKw = 18.4;
    // The time the first reading after a boot is allowed to cover beyond the uptime: the state
    // is at most persistIntervalMs old, plus the reboot itself.
    uint32_t bootGapMs = 120000;
    // A balance command without regId applies its energyTotal only up to this far above the
    // meter's own register (PROTOCOL.md: rounding on the wire, never a foreign register).
    double registerToleranceKwh = 0.01;
};

struct Message {
    std::string topic;
    std::string payload;
    int qos = 0;
    bool retain = false;
};

// Keys in the KvStore; the layouts are little-endian and repeated in meter_core.py.
constexpr const char* kKeySeq = "seq";      // u64: first seq the next boot may use
constexpr const char* kKeyState = "state";  // StateRecord (encodeState); 16 bytes: the layout before regId
constexpr const char* kKeyRelay = "relay";  // u8 RelayOverride

// One PZEM-004T register step (1 Wh): allowed on top of the rated-power cap, since two readings
// of a register that counts whole Wh can differ by one step more than the energy between them.
constexpr double kRegisterStepKwh = 0.001;

// The persisted state (NVS "state", and inside the retained RAM record), 46 bytes:
//   [0] version 2, [1] flags (bit 0: rawKwh valid), [2..9] regId (8 characters),
//   [10..17] f64 energyTotal, [18..25] f64 balance, [26..33] f64 rawKwh (the sensor register
//   at energyTotal), [34..41] f64 unbilledKwh, [42..45] CRC-32 of [0..41].
// Version 1 (16 bytes: f64 energyTotal, f64 balance) is what firmware before register
// histories wrote; begin() migrates it (keeps the register, draws a regId).
struct StateRecord {
    std::string regId;
    double energyTotal = 0;
    double balance = 0;
    bool haveRaw = false;
    double rawKwh = 0;
    double unbilledKwh = 0;
};
constexpr size_t kStateRecordBytes = 46;
std::vector<uint8_t> encodeState(const StateRecord& s);
// false for anything but a well-formed version 2 record with plausible values.
bool decodeState(const std::vector<uint8_t>& v, StateRecord& out);

// The copy in retained RAM (RTC memory), refreshed whenever the state changes, 61 bytes:
//   [0] 'R', [1] version 1, [2..47] StateRecord, [48] relay override, [49..56] f64 energy billed
//   since the last report (so that the next report's unitsConsumed still covers it),
//   [57..60] CRC-32 of [0..56].
constexpr size_t kRetainedRecordBytes = 61;
struct RetainedRecord {
    StateRecord state;
    RelayOverride relayOverride = RelayOverride::Auto;
    double intervalUnits = 0;
};
std::vector<uint8_t> encodeRetained(const RetainedRecord& r);
bool decodeRetained(const std::vector<uint8_t>& v, RetainedRecord& out);

// Status messages for events that are not a lasting condition (PROTOCOL-ext.md lists them).
constexpr const char* kMsgRegIdMismatch = "Balance command for another register history: energyTotal not applied";
constexpr const char* kMsgRegisterAhead = "Balance command energyTotal is ahead of this meter's register: not applied";
constexpr const char* kMsgOverRated = "Energy register advanced faster than the rated power: excess not billed";
constexpr const char* kMsgStateUnreadable = "Stored state unreadable: new register history";
constexpr const char* kMsgStateFromLog = "Stored state missing or unreadable: resumed from the report log";
constexpr const char* kMsgCommandsLost = "Commands lost before the meter could read them: ";

class MeterCore {
public:
    MeterCore(const MeterConfig& cfg, Clock& clock, KvStore& kv, RecordLog& log, Relay& relay,
              EnergySource& energy, Publisher& publisher, Random& random, std::string resetReason);

    // Optional, before begin(): RAM that survives soft resets (RTC memory on the device).
    void attachRetained(RetainedStore& retained) { retained_ = &retained; }
    // Optional, before begin(): over-the-air updates (command/ota, status fields, confirmation
    // of a new image by the first acknowledged report). begin() calls ota.begin().
    void attachOta(OtaManager& ota) { ota_ = &ota; }

    // Restores the persisted state, reserves a block of seq numbers and sets the relay.
    void begin();
    // Called continuously from the main loop (at least once per sampleIntervalMs).
    void loop();

    void onConnected();     // after CONNACK: replay the buffer, then status "online"
    void onDisconnected();
    // MQTT_EVENT_PUBLISHED: the broker acknowledged message `msgId`; its report leaves the ring.
    void onPublished(int msgId);
    // MQTT_EVENT_DELETED (only with MQTT_REPORT_DELETED_MESSAGES): the client dropped `msgId`
    // unacknowledged; its report is sent again. Without the event, outboxExpiryMs does the same.
    void onPublishDropped(int msgId);
    void onMessage(const std::string& topic, const std::string& payload);

    void setWifiRssi(int rssi) { wifiRssi_ = rssi; }
    // The glue could not queue `total` commands so far (its queue was full): the broker had them
    // acknowledged, so they are not redelivered. An error status says so, with the count.
    void commandsLost(uint32_t total);
    void persistNow();      // before an OTA update or a deliberate restart

    // The Last Will to configure before (re)connecting: status "offline", retained.
    Message willMessage();

    std::string topic(const char* suffix) const { return "smartmeter/" + cfg_.meterNo + "/" + suffix; }

    double balance() const { return balance_; }
    double energyTotal() const { return energyTotal_; }
    const std::string& regId() const { return regId_; }
    double unbilledKwh() const { return unbilledKwh_; }
    double sessionTotal() const { return sessionTotal_; }
    bool relayClosed() const { return relayOn_; }
    bool sensorFault() const { return sensorFault_; }
    bool connected() const { return connected_; }
    uint64_t nextSeq() const { return seqNext_; }
    size_t inflight() const { return inflight_.size(); }  // reports awaiting their PUBACK
    uint64_t uptimeMs() const { return uptime_.total(); }
    RelayOverride relayOverride() const { return override_; }
    const char* condition() const;

private:
    uint32_t now();                  // reads the clock and advances the 64-bit uptime
    uint64_t timestamp();            // Unix ms when synced, else ms since boot (< 1e12)
    void sample(uint32_t nowMs);
    void applyRelay();
    void publishConditionIfChanged();
    void publishStatus(const std::string& status, const std::string& message, const std::string& cmdId);
    void publishNotice(const std::string& message);
    void publishOtaEvents();
    std::string drawRegId();
    void restoreState(uint32_t t);
    void emitReport();
    void drainBuffer();
    void expireInflight();
    void persistState();
    void saveRetained();
    uint64_t takeSeq();
    void applyBalanceCommand(const BalanceCommand& cmd);
    void applyRelayCommand(const RelayCommand& cmd);
    StatusInfo statusInfo(const std::string& status, const std::string& message, const std::string& cmdId);

    MeterConfig cfg_;
    Clock& clock_;
    KvStore& kv_;
    RecordLog& log_;
    Relay& relay_;
    EnergySource& energy_;
    Publisher& publisher_;
    Random& random_;
    RetainedStore* retained_ = nullptr;
    OtaManager* ota_ = nullptr;
    std::string resetReason_;

    UptimeCounter uptime_;
    uint32_t nowMs_ = 0;

    // Money and energy (double: the device's FPU type; kWh, rounded to 6 places on the wire).
    double balance_ = 0;
    double energyTotal_ = 0;    // lifetime billed energy, persisted, never decreasing
    double sessionTotal_ = 0;   // billed since this boot (totalConsumed)
    double intervalUnits_ = 0;  // billed since the last report (unitsConsumed)
    std::string regId_;         // the register history energyTotal and seq belong to
    double unbilledKwh_ = 0;    // measured beyond the rated power, not billed (this history)

    // Energy register tracking. The baseline is the sensor register already billed up to; at
    // boot it is the one saved with the state, so that energy used across the reboot is billed.
    bool haveBaseline_ = false;
    double baseline_ = 0;
    uint64_t baselineAtMs_ = 0;   // uptime of the baseline reading
    uint32_t baselineGapMs_ = 0;  // time before boot the stored baseline may cover (bootGapMs)
    bool rawChained_ = false;     // baseline followed without a break since the last state write
    bool sampledOnce_ = false;
    uint32_t lastSampleMs_ = 0;
    bool sensorFailing_ = false;
    uint32_t sensorFailSinceMs_ = 0;
    bool sensorFault_ = false;

    // Relay.
    RelayOverride override_ = RelayOverride::Auto;
    bool relayKnown_ = false;
    bool relayOn_ = false;

    // Reporting and persistence.
    uint64_t seqNext_ = 0;
    uint64_t seqCeiling_ = 0;
    uint32_t lastReportMs_ = 0;
    uint32_t lastPersistMs_ = 0;
    bool stateDirty_ = false;     // NVS is behind (written at most once per persistIntervalMs)
    bool retainedDirty_ = false;  // retained RAM is behind (written at the end of loop())

    // Reports handed to the client and not yet acknowledged (RAM only: the client's outbox is
    // lost at a power cut too, and the ring still holds every one of them).
    struct Inflight {
        uint32_t key;        // the ring record
        int msgId;
        uint64_t sentAtMs;   // uptime
        bool ambiguous;      // another message got the same id (esp_mqtt draws ids at random)
    };
    std::vector<Inflight> inflight_;

    // An event to publish as a status once connected (stored state lost or unreadable).
    std::string pendingNotice_;
    bool overRatedPending_ = false;

    // Connection.
    bool connected_ = false;
    std::string publishedCondition_ = "online";
    uint32_t lastStatusMs_ = 0;
    int wifiRssi_ = 0;
};

}  // namespace meter

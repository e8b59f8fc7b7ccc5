// The meter's state machine: billing on register deltas, local balance and reconciliation,
// relay policy, reports with seq/energyTotal, offline buffering and replay, persistence (at
// every report, so the register on the wire never steps backwards after a power cut). devtools/sim/meter_core.py is a line-by-line port; when a rule changes here it
// changes there too, and firmware/trace/ holds the traces that prove both still agree.
#pragma once

#include <cstdint>
#include <string>

#include "meter/interfaces.h"
#include "meter/numeric.h"
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
    uint32_t replayBatch = 20;              // buffered reports handed to MQTT per loop()
    double lowBalanceThreshold = 1.0;       // kWh; at or below: status low_balance
};

struct Message {
    std::string topic;
    std::string payload;
    int qos = 0;
    bool retain = false;
};

// Keys in the KvStore; the layouts are little-endian and repeated in meter_core.py.
constexpr const char* kKeySeq = "seq";      // u64: first seq the next boot may use
constexpr const char* kKeyState = "state";  // f64 energyTotal, f64 balance
constexpr const char* kKeyRelay = "relay";  // u8 RelayOverride

class MeterCore {
public:
    MeterCore(const MeterConfig& cfg, Clock& clock, KvStore& kv, RecordLog& log, Relay& relay,
              EnergySource& energy, Publisher& publisher, std::string resetReason);

    // Restores the persisted state, reserves a block of seq numbers and sets the relay.
    void begin();
    // Called continuously from the main loop (at least once per sampleIntervalMs).
    void loop();

    void onConnected();     // after CONNACK: replay the buffer, then status "online"
    void onDisconnected();
    void onMessage(const std::string& topic, const std::string& payload);

    void setWifiRssi(int rssi) { wifiRssi_ = rssi; }
    void persistNow();      // before an OTA update or a deliberate restart

    // The Last Will to configure before (re)connecting: status "offline", retained.
    Message willMessage();

    std::string topic(const char* suffix) const { return "smartmeter/" + cfg_.meterNo + "/" + suffix; }

    double balance() const { return balance_; }
    double energyTotal() const { return energyTotal_; }
    double sessionTotal() const { return sessionTotal_; }
    bool relayClosed() const { return relayOn_; }
    bool sensorFault() const { return sensorFault_; }
    bool connected() const { return connected_; }
    uint64_t nextSeq() const { return seqNext_; }
    RelayOverride relayOverride() const { return override_; }
    const char* condition() const;

private:
    uint32_t now();                  // reads the clock and advances the 64-bit uptime
    uint64_t timestamp();            // Unix ms when synced, else ms since boot (< 1e12)
    void sample(uint32_t nowMs);
    void applyRelay();
    void publishConditionIfChanged();
    void publishStatus(const std::string& status, const std::string& message, const std::string& cmdId);
    void emitReport();
    void drainBuffer();
    void persistState();
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
    std::string resetReason_;

    UptimeCounter uptime_;
    uint32_t nowMs_ = 0;

    // Money and energy (double: the device's FPU type; kWh, rounded to 6 places on the wire).
    double balance_ = 0;
    double energyTotal_ = 0;    // lifetime billed energy, persisted, never decreasing
    double sessionTotal_ = 0;   // billed since this boot (totalConsumed)
    double intervalUnits_ = 0;  // billed since the last report (unitsConsumed)

    // Energy register tracking.
    bool haveBaseline_ = false;
    double baseline_ = 0;
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
    bool stateDirty_ = false;

    // Connection.
    bool connected_ = false;
    std::string publishedCondition_ = "online";
    uint32_t lastStatusMs_ = 0;
    int wifiRssi_ = 0;
};

}  // namespace meter

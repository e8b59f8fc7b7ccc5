// Encoding and decoding of the PROTOCOL.md payloads (shared/PROTOCOL.md), with cJSON.
// Key order and rounding match devtools/sim/meter_core.py so that both produce the same JSON.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace meter {

constexpr size_t kMaxPayloadBytes = 1024;  // PROTOCOL.md: one JSON object of at most 1024 bytes
constexpr size_t kMaxCmdIdBytes = 64;
constexpr double kMaxAbsBalance = 1e9;       // kWh; anything larger is a corrupt command
constexpr double kMaxEnergyTotal = 1e12;     // kWh; far beyond a 32-bit Wh register
constexpr size_t kPackedReportBytes = 48;

struct Report {
    uint64_t seq = 0;
    uint64_t timestamp = 0;  // Unix ms, or ms since boot (< 1e12) before SNTP sync
    double unitsConsumed = 0;
    double remainingBalance = 0;
    double totalConsumed = 0;
    double energyTotal = 0;
};

struct StatusInfo {
    std::string status;   // online | low_balance | error | offline
    std::string message;
    double balance = 0;
    int wifiRssi = 0;
    uint64_t timestamp = 0;
    bool relayOn = false;
    std::string fw;
    uint64_t uptimeS = 0;
    std::string resetReason;
    std::string cmdId;  // empty: not sent
};

enum class RelayOverride : uint8_t { Auto = 0, On = 1, Off = 2 };

struct BalanceCommand {
    double balance = 0;
    bool hasEnergyTotal = false;
    double energyTotal = 0;
    std::string cmdId;  // empty when absent or unusable
};

struct RelayCommand {
    RelayOverride state = RelayOverride::Auto;
    std::string cmdId;
};

std::string encodeReport(const std::string& meterNo, const Report& r);
std::string encodeStatus(const std::string& meterNo, const StatusInfo& s);
std::string encodeBalanceReport(const std::string& meterNo, double balance, uint64_t timestamp,
                                const std::string& cmdId);

// Commands: false means "ignore this message" (malformed, wrong types, out of range).
bool decodeBalanceCommand(const std::string& payload, BalanceCommand& out);
bool decodeRelayCommand(const std::string& payload, RelayCommand& out);

// The offline buffer stores reports in a fixed little-endian binary layout (48 bytes), not as
// JSON, so that a slot is small and the JSON is rebuilt identically on replay.
std::vector<uint8_t> packReport(const Report& r);
bool unpackReport(const uint8_t* data, size_t len, Report& out);

const char* relayOverrideName(RelayOverride o);

// A double as a JSON number that parses back to exactly the same double.
std::string jsonNumber(double v);

}  // namespace meter

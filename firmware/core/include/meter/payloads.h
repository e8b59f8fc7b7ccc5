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
constexpr size_t kPackedReportBytesV1 = 48;  // firmware before register histories: no regId
constexpr size_t kPackedReportBytes = 51;
constexpr size_t kMaxRegIdBytes = 16;         // PROTOCOL.md: 1-16 of [A-Za-z0-9_-]
constexpr size_t kOwnRegIdChars = 8;          // what this firmware draws: 48 random bits
constexpr uint64_t kMaxPackedSeq = (1ULL << 40) - 1;
constexpr uint64_t kMaxPackedTimestamp = (1ULL << 48) - 1;

struct Report {
    uint64_t seq = 0;
    uint64_t timestamp = 0;  // Unix ms, or ms since boot (< 1e12) before SNTP sync
    double unitsConsumed = 0;
    double remainingBalance = 0;
    double totalConsumed = 0;
    double energyTotal = 0;
    std::string regId;  // empty only for a record written by firmware before register histories
};

enum class RelayOverride : uint8_t { Auto = 0, On = 1, Off = 2 };

// What a logged report carries besides its payload, for recovery at boot when NVS was lost.
struct ReportMeta {
    RelayOverride relayOverride = RelayOverride::Auto;
    // The sensor register was followed without a break (no cap, no reset) since the state in
    // NVS was written, so that state's raw register plus this report's energy gives the raw
    // register at this report.
    bool rawChained = false;
};

struct StatusInfo {
    std::string status;   // online | low_balance | error | offline
    std::string message;
    bool hasBalance = true;  // false in safe mode: the stored state is not read
    double balance = 0;
    int wifiRssi = 0;
    uint64_t timestamp = 0;
    bool relayOn = false;
    std::string fw;
    uint64_t uptimeS = 0;
    std::string resetReason;
    std::string regId;       // empty: not sent (safe mode)
    double unbilledKwh = 0;  // energy beyond the rated power, measured but not billed
    std::string otaState;    // empty: not sent
    std::string otaVersion;  // empty: not sent
    std::string otaError;    // empty: not sent
    bool safeMode = false;
    uint32_t fastBoots = 0;  // sent with safeMode
    std::string cmdId;       // empty: not sent
};

struct BalanceCommand {
    double balance = 0;
    bool hasEnergyTotal = false;
    double energyTotal = 0;
    std::string regId;  // empty when absent
    std::string cmdId;  // empty when absent or unusable
};

struct RelayCommand {
    RelayOverride state = RelayOverride::Auto;
    std::string cmdId;
};

std::string encodeReport(const std::string& meterNo, const Report& r);
std::string encodeStatus(const std::string& meterNo, const StatusInfo& s);
std::string encodeBalanceReport(const std::string& meterNo, double balance, uint64_t timestamp,
                                const std::string& regId, const std::string& cmdId);

// Commands: false means "ignore this message" (malformed, wrong types, out of range).
bool decodeBalanceCommand(const std::string& payload, BalanceCommand& out);
bool decodeRelayCommand(const std::string& payload, RelayCommand& out);

// The report ring stores reports in a fixed little-endian binary layout, not as JSON, so that a
// slot is small and the JSON is rebuilt identically on every (re)send:
//   [0] format 0x02, [1] flags (bits 0-1 relay override, bit 2 rawChained), [2..6] seq (u40),
//   [7..12] timestamp (u48), then f64 unitsConsumed, remainingBalance, totalConsumed,
//   energyTotal, and [45..50] the regId's 8 characters as 6-bit indexes into kRegIdAlphabet.
// Records of 48 bytes are the format before register histories (u64 seq, u64 timestamp, the
// four f64; no regId), still read after an update. packReport returns an empty vector for a
// report it cannot represent (a regId not drawn by this firmware, seq or timestamp too large).
std::vector<uint8_t> packReport(const Report& r, const ReportMeta& meta);
bool unpackReport(const uint8_t* data, size_t len, Report& out, ReportMeta& meta);

// Register history ids: 1-16 of [A-Za-z0-9_-] (PROTOCOL.md). The meter draws its own as 8
// characters of the URL-safe base64 alphabet, one 32-bit random number per character.
extern const char kRegIdAlphabet[65];
bool validRegId(const std::string& id);

const char* relayOverrideName(RelayOverride o);

// A double as a JSON number that parses back to exactly the same double.
std::string jsonNumber(double v);

}  // namespace meter

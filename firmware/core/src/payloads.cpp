#include "meter/payloads.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if __has_include(<cjson/cJSON.h>)
#include <cjson/cJSON.h>  // Debian libcjson-dev (host tests)
#else
#include "cJSON.h"  // bundled with ESP-IDF, so with arduino-esp32
#endif

#include "meter/numeric.h"
#include "meter/ota.h"
#include "meter/strict_json.h"

namespace meter {
namespace {

// Owns a cJSON tree for the duration of a scope (cJSON is a C API without destructors).
struct Json {
    cJSON* p;
    explicit Json(cJSON* ptr) : p(ptr) {}
    ~Json() { cJSON_Delete(p); }
    Json(const Json&) = delete;
    Json& operator=(const Json&) = delete;
};

std::string print(cJSON* root) {
    char* text = cJSON_PrintUnformatted(root);
    std::string out = text ? text : "";
    cJSON_free(text);
    return out;
}

void addNumber(cJSON* o, const char* key, double v) { cJSON_AddItemToObject(o, key, cJSON_CreateRaw(jsonNumber(v).c_str())); }
void addU64(cJSON* o, const char* key, uint64_t v) { addNumber(o, key, static_cast<double>(v)); }
void addString(cJSON* o, const char* key, const std::string& v) {
    cJSON_AddItemToObject(o, key, cJSON_CreateString(v.c_str()));
}

// Parses an incoming command: size limit, strict JSON, must be an object.
cJSON* parseCommand(const std::string& payload) {
    if (payload.size() > kMaxPayloadBytes || !isStrictJson(payload)) return nullptr;
    cJSON* root = cJSON_ParseWithLength(payload.data(), payload.size());
    if (root && !cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return nullptr;
    }
    return root;
}

// cmdId is echoed only when it is a usable string; anything else is treated as absent so that
// the command (the money) still applies.
std::string readCmdId(const cJSON* root) {
    const cJSON* id = cJSON_GetObjectItemCaseSensitive(root, "cmdId");
    if (!cJSON_IsString(id) || id->valuestring == nullptr) return "";
    size_t n = std::strlen(id->valuestring);
    if (n == 0 || n > kMaxCmdIdBytes) return "";
    return id->valuestring;
}

void putU64(std::vector<uint8_t>& b, uint64_t v) {
    for (int i = 0; i < 8; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void putF64(std::vector<uint8_t>& b, double d) {
    uint64_t v;
    std::memcpy(&v, &d, sizeof v);
    putU64(b, v);
}
uint64_t getU64(const uint8_t* p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}
double getF64(const uint8_t* p) {
    uint64_t v = getU64(p);
    double d;
    std::memcpy(&d, &v, sizeof d);
    return d;
}

}  // namespace

const char kRegIdAlphabet[65] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

bool validRegId(const std::string& id) {
    if (id.empty() || id.size() > kMaxRegIdBytes) return false;
    for (char c : id) {
        if (std::strchr(kRegIdAlphabet, c) == nullptr || c == '\0') return false;
    }
    return true;
}

std::string jsonNumber(double v) {
    // cJSON prints 15 digits whenever they parse back to *approximately* the same double, which
    // loses the last bits of some values. The shortest of %.15g/%.16g/%.17g that parses back
    // exactly is what Python's repr produces for the same double, up to notation.
    if (!std::isfinite(v)) return "null";  // never sent: inputs are range-checked
    char buf[32];
    for (int precision = 15; precision <= 17; ++precision) {
        std::snprintf(buf, sizeof buf, "%.*g", precision, v);
        if (std::strtod(buf, nullptr) == v) break;
    }
    return buf;
}

std::string encodeReport(const std::string& meterNo, const Report& r) {
    Json root(cJSON_CreateObject());
    addString(root.p, "meterNo", meterNo);
    addNumber(root.p, "unitsConsumed", round6(r.unitsConsumed));
    addNumber(root.p, "remainingBalance", round6(r.remainingBalance));
    addNumber(root.p, "totalConsumed", round6(r.totalConsumed));
    addU64(root.p, "timestamp", r.timestamp);
    addU64(root.p, "seq", r.seq);
    addNumber(root.p, "energyTotal", round6(r.energyTotal));
    if (!r.regId.empty()) addString(root.p, "regId", r.regId);
    return print(root.p);
}

std::string encodeStatus(const std::string& meterNo, const StatusInfo& s) {
    Json root(cJSON_CreateObject());
    addString(root.p, "meterNo", meterNo);
    addString(root.p, "status", s.status);
    addString(root.p, "message", s.message);
    if (s.hasBalance) addNumber(root.p, "balance", round6(s.balance));
    addNumber(root.p, "wifi_rssi", s.wifiRssi);
    addU64(root.p, "timestamp", s.timestamp);
    addString(root.p, "relay", s.relayOn ? "on" : "off");
    addString(root.p, "fw", s.fw);
    addU64(root.p, "uptime", s.uptimeS);
    addString(root.p, "resetReason", s.resetReason);
    if (!s.regId.empty()) addString(root.p, "regId", s.regId);
    if (s.hasBalance) addNumber(root.p, "unbilledKwh", round6(s.unbilledKwh));
    if (!s.otaState.empty()) addString(root.p, "otaState", s.otaState);
    if (!s.otaVersion.empty()) addString(root.p, "otaVersion", s.otaVersion);
    if (!s.otaError.empty()) addString(root.p, "otaError", s.otaError);
    if (s.safeMode) {
        cJSON_AddItemToObject(root.p, "safeMode", cJSON_CreateTrue());
        addNumber(root.p, "fastBoots", s.fastBoots);
    }
    if (!s.cmdId.empty()) addString(root.p, "cmdId", s.cmdId);
    return print(root.p);
}

std::string encodeBalanceReport(const std::string& meterNo, double balance, uint64_t timestamp,
                                const std::string& regId, const std::string& cmdId) {
    Json root(cJSON_CreateObject());
    addString(root.p, "meterNo", meterNo);
    addNumber(root.p, "balance", round6(balance));
    addU64(root.p, "timestamp", timestamp);
    addString(root.p, "regId", regId);
    if (!cmdId.empty()) addString(root.p, "cmdId", cmdId);
    return print(root.p);
}

bool decodeBalanceCommand(const std::string& payload, BalanceCommand& out) {
    Json root(parseCommand(payload));
    if (!root.p) return false;
    const cJSON* bal = cJSON_GetObjectItemCaseSensitive(root.p, "balance");
    if (!cJSON_IsNumber(bal) || !std::isfinite(bal->valuedouble) ||
        std::fabs(bal->valuedouble) > kMaxAbsBalance) {
        return false;
    }
    BalanceCommand cmd;
    cmd.balance = bal->valuedouble;
    const cJSON* et = cJSON_GetObjectItemCaseSensitive(root.p, "energyTotal");
    if (et != nullptr) {
        // A present but unusable energyTotal rejects the command: silently falling back to the
        // seed rule (local = balance) would forgive consumption that is in flight.
        if (!cJSON_IsNumber(et) || !std::isfinite(et->valuedouble) || et->valuedouble < 0 ||
            et->valuedouble > kMaxEnergyTotal) {
            return false;
        }
        cmd.hasEnergyTotal = true;
        cmd.energyTotal = et->valuedouble;
    }
    const cJSON* rid = cJSON_GetObjectItemCaseSensitive(root.p, "regId");
    if (rid != nullptr) {
        // Like energyTotal: a regId that is present but unusable rejects the command, since the
        // meter could not tell whose register the balance refers to.
        if (!cJSON_IsString(rid) || rid->valuestring == nullptr || !validRegId(rid->valuestring)) return false;
        cmd.regId = rid->valuestring;
    }
    cmd.cmdId = readCmdId(root.p);
    out = cmd;
    return true;
}

bool decodeRelayCommand(const std::string& payload, RelayCommand& out) {
    Json root(parseCommand(payload));
    if (!root.p) return false;
    const cJSON* st = cJSON_GetObjectItemCaseSensitive(root.p, "state");
    if (!cJSON_IsString(st) || st->valuestring == nullptr) return false;
    RelayCommand cmd;
    if (std::strcmp(st->valuestring, "on") == 0) cmd.state = RelayOverride::On;
    else if (std::strcmp(st->valuestring, "off") == 0) cmd.state = RelayOverride::Off;
    else if (std::strcmp(st->valuestring, "auto") == 0) cmd.state = RelayOverride::Auto;
    else return false;
    cmd.cmdId = readCmdId(root.p);
    out = cmd;
    return true;
}

namespace {
void putBytesLe(std::vector<uint8_t>& b, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
uint64_t getBytesLe(const uint8_t* p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}
}  // namespace

std::vector<uint8_t> packReport(const Report& r, const ReportMeta& meta) {
    if (r.seq > kMaxPackedSeq || r.timestamp > kMaxPackedTimestamp || r.regId.size() != kOwnRegIdChars ||
        !validRegId(r.regId)) {
        return {};
    }
    uint64_t rid = 0;
    for (size_t i = 0; i < kOwnRegIdChars; ++i) {
        uint64_t index = static_cast<uint64_t>(std::strchr(kRegIdAlphabet, r.regId[i]) - kRegIdAlphabet);
        rid |= index << (6 * i);
    }
    std::vector<uint8_t> b;
    b.reserve(kPackedReportBytes);
    b.push_back(0x02);
    b.push_back(static_cast<uint8_t>(static_cast<uint8_t>(meta.relayOverride) | (meta.rawChained ? 0x04 : 0)));
    putBytesLe(b, r.seq, 5);
    putBytesLe(b, r.timestamp, 6);
    putF64(b, r.unitsConsumed);
    putF64(b, r.remainingBalance);
    putF64(b, r.totalConsumed);
    putF64(b, r.energyTotal);
    putBytesLe(b, rid, 6);
    return b;
}

bool unpackReport(const uint8_t* data, size_t len, Report& out, ReportMeta& meta) {
    if (len == kPackedReportBytesV1) {
        out.seq = getU64(data);
        out.timestamp = getU64(data + 8);
        out.unitsConsumed = getF64(data + 16);
        out.remainingBalance = getF64(data + 24);
        out.totalConsumed = getF64(data + 32);
        out.energyTotal = getF64(data + 40);
        out.regId.clear();
        meta = ReportMeta();
        return true;
    }
    if (len != kPackedReportBytes || data[0] != 0x02 || (data[1] & 0x03) > 2 || (data[1] & 0xF8) != 0) return false;
    meta.relayOverride = static_cast<RelayOverride>(data[1] & 0x03);
    meta.rawChained = (data[1] & 0x04) != 0;
    out.seq = getBytesLe(data + 2, 5);
    out.timestamp = getBytesLe(data + 7, 6);
    out.unitsConsumed = getF64(data + 13);
    out.remainingBalance = getF64(data + 21);
    out.totalConsumed = getF64(data + 29);
    out.energyTotal = getF64(data + 37);
    uint64_t rid = getBytesLe(data + 45, 6);
    out.regId.assign(kOwnRegIdChars, 'A');
    for (size_t i = 0; i < kOwnRegIdChars; ++i) out.regId[i] = kRegIdAlphabet[(rid >> (6 * i)) & 63];
    return true;
}

bool decodeOtaCommand(const std::string& payload, OtaCommand& out, std::string& error, bool requireHttps) {
    out = OtaCommand();
    Json root(parseCommand(payload));
    if (!root.p) {
        error = "not a JSON object";
        return false;
    }
    out.cmdId = readCmdId(root.p);
    auto text = [&](const char* key, std::string& value) {
        const cJSON* v = cJSON_GetObjectItemCaseSensitive(root.p, key);
        if (!cJSON_IsString(v) || v->valuestring == nullptr) return false;
        value = v->valuestring;
        return true;
    };
    std::string url, version, sha, sig;
    bool urlOk = text("url", url) && !url.empty() && url.size() <= kMaxOtaUrlBytes &&
                 (!requireHttps || url.compare(0, 8, "https://") == 0);
    for (char c : url) urlOk = urlOk && static_cast<unsigned char>(c) > 0x20 && c != 0x7F;
    if (!urlOk) {
        error = "bad url";
        return false;
    }
    if (!text("version", version) || !validFwVersion(version)) {
        error = "bad version";
        return false;
    }
    bool shaOk = text("sha256", sha) && sha.size() == 64;
    for (char& c : sha) {
        if (c >= 'A' && c <= 'F') c = static_cast<char>(c - 'A' + 'a');
        shaOk = shaOk && ((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'));
    }
    if (!shaOk) {
        error = "bad sha256";
        return false;
    }
    std::vector<uint8_t> der;
    if (!text("signature", sig) || !base64Decode(sig, der) || der.size() < 8 || der.size() > kMaxSignatureBytes) {
        error = "bad signature encoding";
        return false;
    }
    out.url = url;
    out.version = version;
    out.sha256 = sha;
    out.signature = der;
    return true;
}

const char* relayOverrideName(RelayOverride o) {
    switch (o) {
        case RelayOverride::On: return "on";
        case RelayOverride::Off: return "off";
        default: return "auto";
    }
}

}  // namespace meter

#include "meter/identity.h"

#include <utility>

#include "meter/flash_ring.h"
#include "meter/ota.h"

namespace meter {
namespace {

bool printable(char c, bool spaceOk) {
    const unsigned char u = static_cast<unsigned char>(c);
    return (spaceOk ? u >= 0x20 : u > 0x20) && u < 0x7F;
}
bool allPrintable(const std::string& s, bool spaceOk) {
    for (char c : s) {
        if (!printable(c, spaceOk)) return false;
    }
    return true;
}
bool isHex(char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

void putU32(std::vector<uint8_t>& b, uint32_t v) {
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
uint32_t getU32(const uint8_t* p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; --i) v = (v << 8) | p[i];
    return v;
}
void putShort(std::vector<uint8_t>& b, const std::string& s) {
    b.push_back(static_cast<uint8_t>(s.size()));
    b.insert(b.end(), s.begin(), s.end());
}
void putLong(std::vector<uint8_t>& b, const std::string& s) {
    b.push_back(static_cast<uint8_t>(s.size() & 0xFF));
    b.push_back(static_cast<uint8_t>(s.size() >> 8));
    b.insert(b.end(), s.begin(), s.end());
}
// Reads a length-prefixed string from [at, end); false if it runs past end.
bool getField(const std::vector<uint8_t>& b, size_t end, size_t& at, size_t lenBytes, std::string& out) {
    if (at + lenBytes > end) return false;
    size_t n = b[at];
    if (lenBytes == 2) n |= static_cast<size_t>(b[at + 1]) << 8;
    at += lenBytes;
    if (at + n > end) return false;
    out.assign(reinterpret_cast<const char*>(b.data() + at), n);
    at += n;
    return true;
}
bool crcOk(const std::vector<uint8_t>& v) {
    return v.size() >= 4 && crc32(v.data(), v.size() - 4) == getU32(v.data() + v.size() - 4);
}

constexpr const char* kPemBegin = "-----BEGIN CERTIFICATE-----";
constexpr const char* kPemEnd = "-----END CERTIFICATE-----";

std::string hex(const uint8_t* p, size_t n) {
    static const char* digits = "0123456789abcdef";
    std::string out;
    for (size_t i = 0; i < n; ++i) {
        out += digits[p[i] >> 4];
        out += digits[p[i] & 15];
    }
    return out;
}

}  // namespace

bool operator==(const MeterIdentity& a, const MeterIdentity& b) {
    return a.meterNo == b.meterNo && a.mqttUser == b.mqttUser && a.mqttPass == b.mqttPass &&
           a.brokerUrl == b.brokerUrl && a.caPem == b.caPem && a.wifiSsid == b.wifiSsid && a.wifiPass == b.wifiPass;
}

bool validMeterNo(const std::string& s) {
    if (s.empty() || s.size() > kMaxMeterNoBytes) return false;
    for (char c : s) {
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
        if (!ok) return false;
    }
    return true;
}

bool validMqttUser(const std::string& s) { return !s.empty() && s.size() <= kMaxMqttUserBytes && allPrintable(s, false); }

bool validMqttPass(const std::string& s) { return !s.empty() && s.size() <= kMaxMqttPassBytes && allPrintable(s, true); }

bool brokerUrlIsTls(const std::string& url) { return url.rfind("mqtts://", 0) == 0; }

bool validBrokerUrl(const std::string& s, std::string& why) {
    why = "url: mqtts://host[:port] (mqtt:// for a bench broker), at most 200 characters";
    if (s.size() > kMaxBrokerUrlBytes) return false;
    size_t at;
    if (s.rfind("mqtts://", 0) == 0) at = 8;
    else if (s.rfind("mqtt://", 0) == 0) at = 7;
    else return false;
    size_t hostEnd;
    if (at < s.size() && s[at] == '[') {
        hostEnd = s.find(']', at);
        if (hostEnd == std::string::npos || hostEnd == at + 1) return false;
        for (size_t i = at + 1; i < hostEnd; ++i) {
            if (!isHex(s[i]) && s[i] != ':' && s[i] != '.') return false;
        }
        ++hostEnd;
    } else {
        hostEnd = at;
        while (hostEnd < s.size() && s[hostEnd] != ':') {
            char c = s[hostEnd];
            bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-';
            if (!ok) return false;
            ++hostEnd;
        }
        if (hostEnd == at || hostEnd - at > 253 || s[at] == '.' || s[at] == '-') return false;
    }
    if (hostEnd == s.size()) return true;
    if (s[hostEnd] != ':') return false;
    const std::string port = s.substr(hostEnd + 1);
    if (port.empty() || port.size() > 5 || port[0] == '0') return false;
    unsigned long p = 0;
    for (char c : port) {
        if (c < '0' || c > '9') return false;
        p = p * 10 + static_cast<unsigned long>(c - '0');
    }
    return p >= 1 && p <= 65535;
}

bool validWifiSsid(const std::string& s) {
    if (s.size() > kMaxWifiSsidBytes) return false;
    for (char c : s) {
        const unsigned char u = static_cast<unsigned char>(c);
        if (u < 0x20 || u == 0x7F) return false;  // UTF-8 bytes are fine, control characters are not
    }
    return true;
}

bool validWifiPass(const std::string& s) {
    if (s.empty()) return true;  // an open network
    if (s.size() == 64) {
        for (char c : s) {
            if (!isHex(c)) return false;
        }
        return true;
    }
    return s.size() >= 8 && s.size() <= 63 && allPrintable(s, true);
}

bool validIdentity(const MeterIdentity& id, std::string& why) {
    if (!validMeterNo(id.meterNo)) {
        why = "meterNo: 1-32 of A-Z a-z 0-9 _ -";
        return false;
    }
    if (!validMqttUser(id.mqttUser)) {
        why = "user: 1-64 printable characters, no spaces";
        return false;
    }
    if (!validMqttPass(id.mqttPass)) {
        why = "pass: 1-128 printable characters";
        return false;
    }
    if (!validBrokerUrl(id.brokerUrl, why)) return false;
    if (!id.caPem.empty()) {
        std::vector<std::vector<uint8_t>> ders;
        if (id.caPem.size() > kMaxCaPemBytes) {
            why = "ca: at most 4096 bytes of PEM";
            return false;
        }
        if (!parseCaPem(id.caPem, ders, why)) return false;
    }
    if (!validWifiSsid(id.wifiSsid)) {
        why = "ssid: at most 32 bytes, no control characters";
        return false;
    }
    if (!validWifiPass(id.wifiPass)) {
        why = "wifipass: 8-63 printable characters, or 64 hex digits";
        return false;
    }
    if (id.wifiSsid.empty() && !id.wifiPass.empty()) {
        why = "wifipass without ssid";
        return false;
    }
    return true;
}

bool identityUsable(const MeterIdentity& id, const IdentityPolicy& policy, std::string& why) {
    if (!validIdentity(id, why)) return false;
    if (!brokerUrlIsTls(id.brokerUrl)) {
        if (!policy.allowPlainMqtt) {
            why = "url: mqtt:// (no TLS) is not allowed by this build (METER_ALLOW_PLAIN_MQTT); use mqtts://";
            return false;
        }
        return true;
    }
    if (id.caPem.empty() && !policy.imageHasCa) {
        why = "mqtts:// needs the broker's CA: this image has none (MQTT_CA_PEM), so provision ca=";
        return false;
    }
    return true;
}

// ---- CA certificates ---------------------------------------------------------------------------

bool wellFormedDerSequence(const std::vector<uint8_t>& der) {
    if (der.size() < 2 || der[0] != 0x30) return false;
    size_t len, header;
    if (der[1] < 0x80) {
        len = der[1];
        header = 2;
    } else {
        const size_t n = der[1] & 0x7F;
        if (n == 0 || n > 3 || der.size() < 2 + n || der[2] == 0) return false;  // DER: shortest form
        len = 0;
        for (size_t i = 0; i < n; ++i) len = (len << 8) | der[2 + i];
        if (len < 0x80) return false;
        header = 2 + n;
    }
    return header + len == der.size();
}

std::string base64Encode(const uint8_t* data, size_t len) {
    static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    std::string out;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t v = static_cast<uint32_t>(data[i]) << 16;
        if (i + 1 < len) v |= static_cast<uint32_t>(data[i + 1]) << 8;
        if (i + 2 < len) v |= data[i + 2];
        out += alphabet[(v >> 18) & 63];
        out += alphabet[(v >> 12) & 63];
        out += i + 1 < len ? alphabet[(v >> 6) & 63] : '=';
        out += i + 2 < len ? alphabet[v & 63] : '=';
    }
    return out;
}

std::string derToPem(const std::vector<std::vector<uint8_t>>& ders) {
    std::string pem;
    for (const auto& der : ders) {
        const std::string b64 = base64Encode(der.data(), der.size());
        pem += kPemBegin;
        pem += '\n';
        for (size_t i = 0; i < b64.size(); i += 64) pem += b64.substr(i, 64) + '\n';
        pem += kPemEnd;
        pem += '\n';
    }
    return pem;
}

bool parseCaPem(const std::string& pem, std::vector<std::vector<uint8_t>>& ders, std::string& why) {
    why = "ca: PEM certificates (BEGIN/END CERTIFICATE) of well-formed DER";
    ders.clear();
    bool inside = false;
    std::string body;
    size_t at = 0;
    while (at < pem.size()) {
        size_t nl = pem.find('\n', at);
        if (nl == std::string::npos) nl = pem.size();
        std::string line = pem.substr(at, nl - at);
        at = nl + 1;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (!inside) {
            if (line.empty()) continue;
            if (line != kPemBegin) return false;
            inside = true;
            body.clear();
        } else if (line == kPemEnd) {
            std::vector<uint8_t> der;
            if (!base64Decode(body, der) || !wellFormedDerSequence(der)) return false;
            ders.push_back(std::move(der));
            inside = false;
        } else {
            body += line;
        }
    }
    return !inside && !ders.empty();
}

// ---- records -----------------------------------------------------------------------------------

std::vector<uint8_t> encodeIdentity(const MeterIdentity& id) {
    std::vector<uint8_t> b{'I', 1};
    putShort(b, id.meterNo);
    putShort(b, id.mqttUser);
    putShort(b, id.mqttPass);
    putShort(b, id.brokerUrl);
    putLong(b, id.caPem);
    putShort(b, id.wifiSsid);
    putShort(b, id.wifiPass);
    putU32(b, crc32(b.data(), b.size()));
    return b;
}

bool decodeIdentity(const std::vector<uint8_t>& v, MeterIdentity& out) {
    if (v.size() < 2 + 4 || v[0] != 'I' || v[1] != 1 || !crcOk(v)) return false;
    const size_t end = v.size() - 4;
    size_t at = 2;
    MeterIdentity id;
    if (!getField(v, end, at, 1, id.meterNo) || !getField(v, end, at, 1, id.mqttUser) ||
        !getField(v, end, at, 1, id.mqttPass) || !getField(v, end, at, 1, id.brokerUrl) ||
        !getField(v, end, at, 2, id.caPem) || !getField(v, end, at, 1, id.wifiSsid) ||
        !getField(v, end, at, 1, id.wifiPass) || at != end) {
        return false;
    }
    std::string why;
    if (!validIdentity(id, why)) return false;
    out = std::move(id);
    return true;
}

std::vector<uint8_t> encodeOwner(const std::string& meterNo) {
    std::vector<uint8_t> b{'O', 1};
    putShort(b, meterNo);
    putU32(b, crc32(b.data(), b.size()));
    return b;
}

bool decodeOwner(const std::vector<uint8_t>& v, std::string& meterNo) {
    if (v.size() < 3 + 4 || v[0] != 'O' || v[1] != 1 || !crcOk(v)) return false;
    size_t at = 2;
    std::string m;
    if (!getField(v, v.size() - 4, at, 1, m) || at != v.size() - 4 || !validMeterNo(m)) return false;
    meterNo = std::move(m);
    return true;
}

IdentityRead readIdentity(IdentityStore& store, MeterIdentity& out) {
    std::vector<uint8_t> v;
    switch (store.get(kKeyIdentity, v)) {
        case IdentityStore::Read::Missing: return IdentityRead::Missing;
        case IdentityStore::Read::Failed: return IdentityRead::StorageFailed;
        case IdentityStore::Read::Ok: break;
    }
    return decodeIdentity(v, out) ? IdentityRead::Ok : IdentityRead::Unreadable;
}

IdentityRead readOwner(IdentityStore& store, std::string& owner) {
    std::vector<uint8_t> v;
    switch (store.get(kKeyOwner, v)) {
        case IdentityStore::Read::Missing: return IdentityRead::Missing;
        case IdentityStore::Read::Failed: return IdentityRead::StorageFailed;
        case IdentityStore::Read::Ok: break;
    }
    return decodeOwner(v, owner) ? IdentityRead::Ok : IdentityRead::Unreadable;
}

const char* sourceName(BootIdentity::Source s) {
    switch (s) {
        case BootIdentity::Source::Stored: return "stored";
        case BootIdentity::Source::Development: return "development (compiled in, METER_DEV_IDENTITY)";
        case BootIdentity::Source::None: break;
    }
    return "none";
}

BootIdentity resolveBootIdentity(IdentityStore& store, const IdentityPolicy& policy, const MeterIdentity* dev) {
    BootIdentity b;
    std::string owner;
    const IdentityRead ownerRead = readOwner(store, owner);
    if (ownerRead == IdentityRead::Ok) b.owner = owner;

    MeterIdentity id;
    switch (readIdentity(store, id)) {
        case IdentityRead::Ok:
            b.source = BootIdentity::Source::Stored;
            break;
        case IdentityRead::Missing:
            if (policy.devIdentity && dev != nullptr) {
                id = *dev;
                b.source = BootIdentity::Source::Development;
            } else {
                b.why = "no identity provisioned";
                return b;
            }
            break;
        case IdentityRead::Unreadable:
            b.why = "the stored identity is unreadable (CRC or field check): provision it again";
            return b;
        case IdentityRead::StorageFailed:
            b.why = "the identity storage (NVS) could not be read";
            return b;
    }
    std::string why;
    if (!identityUsable(id, policy, why)) {
        b.why = std::string(b.source == BootIdentity::Source::Development ? "the development identity " : "the identity ") +
                "cannot be used by this build: " + why;
        b.source = BootIdentity::Source::None;
        return b;
    }
    if (ownerRead == IdentityRead::StorageFailed) {
        b.source = BootIdentity::Source::None;
        b.why = "the identity storage (NVS) could not be read";
        return b;
    }
    if (ownerRead == IdentityRead::Ok && owner != id.meterNo) {
        b.source = BootIdentity::Source::None;
        b.why = "this board's meter state belongs to meter " + owner + ", the identity is " + id.meterNo +
                ": provision it as " + owner + ", or erase the board's flash to reuse it (README.md)";
        return b;
    }
    if (ownerRead != IdentityRead::Ok) {
        // Missing, or damaged (a bit flip the NVS CRC missed): the state is this meter's from now on.
        const std::vector<uint8_t> rec = encodeOwner(id.meterNo);
        if (store.put(kKeyOwner, rec.data(), rec.size())) b.owner = id.meterNo;
    }
    b.identity = std::move(id);
    return b;
}

std::string describeIdentity(const MeterIdentity& id) {
    std::string s = "meterNo=" + id.meterNo + " user=" + id.mqttUser + " pass=(" + std::to_string(id.mqttPass.size()) +
                    " characters, not shown) url=" + id.brokerUrl + " ca=";
    if (id.caPem.empty()) {
        s += "image";
    } else {
        std::vector<std::vector<uint8_t>> ders;
        std::string why;
        if (!parseCaPem(id.caPem, ders, why)) {
            s += "unreadable";
        } else {
            s += "provisioned(";
            for (size_t i = 0; i < ders.size(); ++i) {
                uint8_t h[32];
                if (i > 0) s += ',';
                s += "sha256:" + (sha256(ders[i].data(), ders[i].size(), h) ? hex(h, 32) : std::string("?"));
            }
            s += ")";
        }
    }
    s += " wifi=";
    if (id.wifiSsid.empty()) {
        s += "image";
    } else {
        // The SSID may hold any printable byte: shown %-escaped where it could mislead.
        std::string ssid;
        for (char c : id.wifiSsid) {
            const unsigned char u = static_cast<unsigned char>(c);
            if (u <= 0x20 || u >= 0x7F || c == '%') {
                static const char* digits = "0123456789ABCDEF";
                ssid += '%';
                ssid += digits[u >> 4];
                ssid += digits[u & 15];
            } else {
                ssid += c;
            }
        }
        s += "ssid:" + ssid + (id.wifiPass.empty() ? "(open)" : "(password " + std::to_string(id.wifiPass.size()) + " characters, not shown)");
    }
    return s;
}

}  // namespace meter

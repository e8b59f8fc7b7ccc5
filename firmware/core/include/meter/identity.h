// The meter's identity: its meter number, MQTT credentials, broker URL and, optionally, the CA
// that signs the broker's certificate and the Wi-Fi it joins. It is per meter, so it is not in
// the firmware image (one signed image goes to the whole fleet, PROTOCOL-ext.md "OTA"): it is
// written once into NVS at provisioning (the serial console, provisioning.h) and read at every
// boot. OTA replaces the app image only; NVS, and with it the identity, stays.
//
// Storage (README.md "Provisioning"): the NVS partition labelled "ident" (partitions.csv) when
// the board's partition table has one, else the default "nvs" partition; namespace "ident" in
// either case, apart from the meter state (namespace "meter"). Two keys:
//   "id"    the identity record (encodeIdentity)
//   "owner" the meter number whose meter state (balance, register, report ring) this board
//           holds (encodeOwner): written with the first identity, never erased by the firmware,
//           so that the board cannot later bill another meter number with that state.
// The firmware never erases the partition; `unprovision` erases only the key "id".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace meter {

constexpr const char* kIdentityNamespace = "ident";
constexpr const char* kKeyIdentity = "id";
constexpr const char* kKeyOwner = "owner";

constexpr size_t kMaxMeterNoBytes = 32;    // PROTOCOL.md: ^[A-Za-z0-9_-]{1,32}$
constexpr size_t kMaxMqttUserBytes = 64;
constexpr size_t kMaxMqttPassBytes = 128;
constexpr size_t kMaxBrokerUrlBytes = 200;
constexpr size_t kMaxCaPemBytes = 4096;    // one or a few certificates
constexpr size_t kMaxWifiSsidBytes = 32;   // 802.11
constexpr size_t kMaxWifiPassBytes = 64;   // WPA2: 8-63 characters, or 64 hex digits (the PSK)

struct MeterIdentity {
    std::string meterNo;
    std::string mqttUser;   // the broker's ACL patterns key on it (deploy/mosquitto/acl.example: = meterNo)
    std::string mqttPass;   // never printed
    std::string brokerUrl;  // mqtts://host[:port] (mqtt:// only where the build allows it)
    std::string caPem;      // empty: the fleet CA compiled into the image (MQTT_CA_PEM)
    std::string wifiSsid;   // empty: the image's WIFI_SSID / WIFI_PASSWORD
    std::string wifiPass;   // never printed
};
bool operator==(const MeterIdentity& a, const MeterIdentity& b);
inline bool operator!=(const MeterIdentity& a, const MeterIdentity& b) { return !(a == b); }

// Field rules. Each returns false with `why` set (the rule, never the value).
bool validMeterNo(const std::string& s);
bool validMqttUser(const std::string& s);
bool validMqttPass(const std::string& s);
// mqtt:// or mqtts://, a host of [A-Za-z0-9.-] (or a bracketed IPv6 address of hex digits and
// ':'), an optional port 1-65535, nothing after it.
bool validBrokerUrl(const std::string& s, std::string& why);
bool brokerUrlIsTls(const std::string& url);  // mqtts://
bool validWifiSsid(const std::string& s);
bool validWifiPass(const std::string& s);
// Every field, as stored. A record that fails this is treated as unreadable.
bool validIdentity(const MeterIdentity& id, std::string& why);

// What the build allows and has (the glue's compile-time settings).
struct IdentityPolicy {
    bool allowPlainMqtt = false;  // METER_ALLOW_PLAIN_MQTT: a bench broker without TLS
    bool imageHasCa = false;      // MQTT_CA_PEM is not empty
    bool devIdentity = false;     // METER_DEV_IDENTITY: the compiled development identity may be used
};
// Whether this build can connect with `id`: a valid record, mqtt:// only if allowed, and a CA
// for mqtts:// (the identity's or the image's: ESP-IDF 4.4's esp-tls refuses a TLS connection
// with no way to verify the server).
bool identityUsable(const MeterIdentity& id, const IdentityPolicy& policy, std::string& why);

// The CA: PEM certificate blocks, each "-----BEGIN CERTIFICATE-----", base64 lines, "-----END
// CERTIFICATE-----". The DER inside each must be one well-formed SEQUENCE (not parsed further:
// mbedtls does that when it connects).
bool parseCaPem(const std::string& pem, std::vector<std::vector<uint8_t>>& ders, std::string& why);
std::string derToPem(const std::vector<std::vector<uint8_t>>& ders);
bool wellFormedDerSequence(const std::vector<uint8_t>& der);
std::string base64Encode(const uint8_t* data, size_t len);

// The record in "id", little-endian:
//   [0] 'I', [1] version 1, then meterNo, mqttUser, mqttPass, brokerUrl (each u8 length +
//   bytes), caPem (u16 length + bytes), wifiSsid, wifiPass (u8 length + bytes), then a CRC-32
//   of everything before.
std::vector<uint8_t> encodeIdentity(const MeterIdentity& id);
// false unless the layout, the CRC and every field (validIdentity) are right.
bool decodeIdentity(const std::vector<uint8_t>& v, MeterIdentity& out);

// The record in "owner": [0] 'O', [1] version 1, [2] length, meterNo, CRC-32 of the rest.
std::vector<uint8_t> encodeOwner(const std::string& meterNo);
bool decodeOwner(const std::vector<uint8_t>& v, std::string& meterNo);

// The identity namespace (nvs_open_from_partition / nvs_get_blob / nvs_set_blob / nvs_erase_key
// on the device). Unlike KvStore it tells a missing key from a storage that failed.
class IdentityStore {
public:
    virtual ~IdentityStore() = default;
    enum class Read { Ok, Missing, Failed };
    virtual Read get(const char* key, std::vector<uint8_t>& out) = 0;
    virtual bool put(const char* key, const uint8_t* data, size_t len) = 0;  // written and committed
    virtual bool erase(const char* key) = 0;                                 // erased and committed
};

enum class IdentityRead { Ok, Missing, Unreadable, StorageFailed };
IdentityRead readIdentity(IdentityStore& store, MeterIdentity& out);
IdentityRead readOwner(IdentityStore& store, std::string& owner);

// The identity this boot runs with, decided once in setup().
struct BootIdentity {
    enum class Source { Stored, Development, None };
    Source source = Source::None;
    MeterIdentity identity;  // Stored / Development
    std::string why;         // None: why the meter does not connect (printed on the console)
    std::string owner;       // the meter number the board's state belongs to, or empty
};
const char* sourceName(BootIdentity::Source s);

// Reads the identity and the owner. The stored identity is used when it is readable, usable by
// this build and its meter number is the owner's; with no stored identity at all (never
// provisioned, or unprovisioned) and policy.devIdentity, `dev` is used under the same rules. A
// record that is there but unreadable is never replaced by the development identity. When
// there is an identity to run with and no owner yet, the owner record is written (the meter
// state the core is about to use belongs to this meter number from now on).
BootIdentity resolveBootIdentity(IdentityStore& store, const IdentityPolicy& policy, const MeterIdentity* dev);

// One line about an identity for the console: meterNo, user, the password's length (never the
// password), url, the CA (where from, and each certificate's SHA-256) and the Wi-Fi (SSID only).
std::string describeIdentity(const MeterIdentity& id);

}  // namespace meter

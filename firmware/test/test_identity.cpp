// The meter's identity in NVS: field rules, the record, the CA certificates, and which identity
// a boot runs with (stored, development, none) and whose meter state the board holds.
#include <doctest/doctest.h>
#include <mbedtls/x509_crt.h>

#include <string>
#include <vector>

#include "keys/test_ca.h"
#include "meter/host_fakes.h"
#include "meter/identity.h"

using namespace meter;

namespace {

MeterIdentity sample() {
    MeterIdentity id;
    id.meterNo = "MTR-0042_a";
    id.mqttUser = "MTR-0042_a";
    id.mqttPass = "s3cret pass!";
    id.brokerUrl = "mqtts://mqtt.example.com:8883";
    return id;
}

std::vector<uint8_t> der(const char* b64) {
    std::vector<uint8_t> out;
    REQUIRE(base64Decode(b64, out));
    return out;
}

int mbedtlsParse(const std::string& pem) {
    mbedtls_x509_crt chain;
    mbedtls_x509_crt_init(&chain);
    // What esp-tls does with esp_mqtt's cert_pem: PEM text including its terminating NUL.
    int rc = mbedtls_x509_crt_parse(&chain, reinterpret_cast<const unsigned char*>(pem.c_str()), pem.size() + 1);
    int n = 0;
    for (const mbedtls_x509_crt* c = &chain; rc == 0 && c != nullptr && c->raw.len > 0; c = c->next) ++n;
    mbedtls_x509_crt_free(&chain);
    return rc == 0 ? n : rc;
}

}  // namespace

TEST_CASE("identity: the meter number is 1-32 of A-Z a-z 0-9 _ - as PROTOCOL.md says") {
    CHECK(validMeterNo("METER001"));
    CHECK(validMeterNo("a"));
    CHECK(validMeterNo("A-b_9"));
    CHECK(validMeterNo(std::string(32, 'x')));
    CHECK_FALSE(validMeterNo(""));
    CHECK_FALSE(validMeterNo(std::string(33, 'x')));
    for (const char* bad : {"a/b", "a+b", "a#b", "a b", "a.b", "a\tb", "caf\xc3\xa9", "a\nb", "+", "#", "/"}) {
        CAPTURE(bad);
        CHECK_FALSE(validMeterNo(bad));
    }
}

TEST_CASE("identity: broker URLs are mqtts:// or mqtt://, a host and an optional port, nothing else") {
    std::string why;
    for (const char* good : {"mqtts://mqtt.example.com:8883", "mqtts://mqtt.example.com", "mqtt://192.168.1.10:1883",
                             "mqtts://[fd00::1]:8883", "mqtts://a:1", "mqtts://a:65535"}) {
        CAPTURE(good);
        CHECK(validBrokerUrl(good, why));
    }
    for (const char* bad : {"", "mqtts://", "http://mqtt.example.com", "ws://h:80", "mqtts://h:0", "mqtts://h:65536",
                            "mqtts://h:08883", "mqtts://h:", "mqtts://h/path", "mqtts://user@h", "mqtts://h h",
                            "mqtts://-h", "mqtts://.h", "mqtts://[]:1", "mqtts://[::1", "MQTTS://h", "mqtts://h:88a3"}) {
        CAPTURE(bad);
        CHECK_FALSE(validBrokerUrl(bad, why));
    }
    CHECK_FALSE(validBrokerUrl("mqtts://" + std::string(193, 'h'), why));  // 201 characters
    CHECK(brokerUrlIsTls("mqtts://h"));
    CHECK_FALSE(brokerUrlIsTls("mqtt://h"));
}

TEST_CASE("identity: user, password and Wi-Fi rules") {
    CHECK(validMqttUser("METER001"));
    CHECK_FALSE(validMqttUser(""));
    CHECK_FALSE(validMqttUser("a b"));
    CHECK_FALSE(validMqttUser(std::string(65, 'u')));
    CHECK(validMqttPass("with space and %"));
    CHECK(validMqttPass(std::string(128, 'p')));
    CHECK_FALSE(validMqttPass(""));
    CHECK_FALSE(validMqttPass(std::string(129, 'p')));
    CHECK_FALSE(validMqttPass(std::string("nul\0in", 6)));
    CHECK_FALSE(validMqttPass("tab\there"));
    CHECK(validWifiSsid(""));
    CHECK(validWifiSsid("Caf\xc3\xa9 Wi-Fi"));
    CHECK_FALSE(validWifiSsid(std::string(33, 's')));
    CHECK_FALSE(validWifiSsid("a\x01"));
    CHECK(validWifiPass(""));
    CHECK(validWifiPass("8 chars!"));
    CHECK(validWifiPass(std::string(64, 'a')));  // the PSK in hex
    CHECK_FALSE(validWifiPass(std::string(64, 'g')));
    CHECK_FALSE(validWifiPass("7 chars"));
    CHECK_FALSE(validWifiPass(std::string(65, 'a')));
    MeterIdentity id = sample();
    std::string why;
    id.wifiPass = "password";
    CHECK_FALSE(validIdentity(id, why));  // a Wi-Fi password needs its SSID
    CHECK(why == "wifipass without ssid");
    id.wifiSsid = "site";
    CHECK(validIdentity(id, why));
}

TEST_CASE("identity record: round trip, and any damage makes it unreadable") {
    MeterIdentity id = sample();
    id.caPem = test_ca::kRsaPem;
    id.wifiSsid = "Site 7";
    id.wifiPass = "wifi-password";
    const std::vector<uint8_t> rec = encodeIdentity(id);
    MeterIdentity back;
    REQUIRE(decodeIdentity(rec, back));
    CHECK(back == id);

    MeterIdentity minimal = sample();
    REQUIRE(decodeIdentity(encodeIdentity(minimal), back));
    CHECK(back == minimal);
    CHECK(back.caPem.empty());

    for (size_t i = 0; i < rec.size(); ++i) {
        std::vector<uint8_t> bad = rec;
        bad[i] ^= 0x01;
        CAPTURE(i);
        CHECK_FALSE(decodeIdentity(bad, back));
    }
    for (size_t n = 0; n < rec.size(); ++n) {
        CAPTURE(n);
        CHECK_FALSE(decodeIdentity(std::vector<uint8_t>(rec.begin(), rec.begin() + static_cast<long>(n)), back));
    }
    std::vector<uint8_t> longer = rec;
    longer.push_back(0);
    CHECK_FALSE(decodeIdentity(longer, back));

    // A record with a correct CRC around a field that breaks the rules is still refused.
    MeterIdentity wrong = sample();
    wrong.meterNo = "METER/1";
    CHECK_FALSE(decodeIdentity(encodeIdentity(wrong), back));
    wrong = sample();
    wrong.brokerUrl = "http://h";
    CHECK_FALSE(decodeIdentity(encodeIdentity(wrong), back));
    wrong = sample();
    wrong.caPem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    CHECK_FALSE(decodeIdentity(encodeIdentity(wrong), back));
    CHECK(back == minimal);  // a failed decode leaves the output alone
}

TEST_CASE("owner record: round trip and damage") {
    std::string m;
    const std::vector<uint8_t> rec = encodeOwner("METER001");
    REQUIRE(decodeOwner(rec, m));
    CHECK(m == "METER001");
    for (size_t i = 0; i < rec.size(); ++i) {
        std::vector<uint8_t> bad = rec;
        bad[i] ^= 0x80;
        CHECK_FALSE(decodeOwner(bad, m));
    }
    CHECK_FALSE(decodeOwner(encodeOwner("bad/no"), m));
    CHECK_FALSE(decodeOwner({}, m));
}

TEST_CASE("CA: the PEM written from DER is openssl's, mbedtls parses it, fingerprints match") {
    const std::vector<uint8_t> rsa = der(test_ca::kRsaBase64), ec = der(test_ca::kEcBase64);
    CHECK(wellFormedDerSequence(rsa));
    CHECK(wellFormedDerSequence(ec));
    CHECK(derToPem({rsa}) == test_ca::kRsaPem);
    CHECK(derToPem({ec}) == test_ca::kEcPem);
    const std::string both = derToPem({rsa, ec});
    CHECK(both == std::string(test_ca::kRsaPem) + test_ca::kEcPem);
    CHECK(mbedtlsParse(both) == 2);
    CHECK(mbedtlsParse(test_ca::kEcPem) == 1);

    std::vector<std::vector<uint8_t>> ders;
    std::string why;
    REQUIRE(parseCaPem(both, ders, why));
    REQUIRE(ders.size() == 2);
    CHECK(ders[0] == rsa);
    CHECK(ders[1] == ec);
    std::string crlf;
    for (char c : std::string(test_ca::kEcPem)) crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
    CHECK(parseCaPem(crlf, ders, why));
    CHECK_FALSE(parseCaPem("", ders, why));
    CHECK_FALSE(parseCaPem("-----BEGIN CERTIFICATE-----\n", ders, why));
    CHECK_FALSE(parseCaPem("junk\n" + std::string(test_ca::kEcPem), ders, why));

    MeterIdentity id = sample();
    id.caPem = both;
    const std::string d = describeIdentity(id);
    CHECK(d.find(std::string("sha256:") + test_ca::kRsaSha256 + ",sha256:" + test_ca::kEcSha256) != std::string::npos);
}

TEST_CASE("CA: DER must be one SEQUENCE whose length covers exactly the bytes") {
    std::vector<uint8_t> ec = der(test_ca::kEcBase64);
    std::vector<uint8_t> t = ec;
    t.pop_back();
    CHECK_FALSE(wellFormedDerSequence(t));
    t = ec;
    t.push_back(0);
    CHECK_FALSE(wellFormedDerSequence(t));
    t = ec;
    t[0] = 0x31;
    CHECK_FALSE(wellFormedDerSequence(t));
    CHECK(wellFormedDerSequence({0x30, 0x00}));
    CHECK(wellFormedDerSequence({0x30, 0x01, 0x05}));
    CHECK_FALSE(wellFormedDerSequence({0x30, 0x81, 0x01, 0x05}));  // long form for a short length
    CHECK_FALSE(wellFormedDerSequence({0x30, 0x80}));              // indefinite length: not DER
    CHECK_FALSE(wellFormedDerSequence({}));
    CHECK(base64Encode(reinterpret_cast<const uint8_t*>("Man"), 3) == "TWFu");
    CHECK(base64Encode(reinterpret_cast<const uint8_t*>("Ma"), 2) == "TWE=");
    CHECK(base64Encode(reinterpret_cast<const uint8_t*>("M"), 1) == "TQ==");
}

TEST_CASE("identity usable: mqtt:// only where the build allows it, mqtts:// needs a CA") {
    IdentityPolicy policy;
    std::string why;
    MeterIdentity id = sample();
    CHECK_FALSE(identityUsable(id, policy, why));  // mqtts, no CA anywhere: esp-tls would refuse to connect
    CHECK(why.find("CA") != std::string::npos);
    policy.imageHasCa = true;
    CHECK(identityUsable(id, policy, why));
    policy.imageHasCa = false;
    id.caPem = test_ca::kEcPem;
    CHECK(identityUsable(id, policy, why));
    id.brokerUrl = "mqtt://192.168.1.10:1883";
    CHECK_FALSE(identityUsable(id, policy, why));
    CHECK(why.find("METER_ALLOW_PLAIN_MQTT") != std::string::npos);
    policy.allowPlainMqtt = true;
    CHECK(identityUsable(id, policy, why));
    id.meterNo = "";
    CHECK_FALSE(identityUsable(id, policy, why));
}

TEST_CASE("boot identity: nothing stored means no identity, unless the build allows the development one") {
    MemIdentityStore store;
    IdentityPolicy policy;
    policy.imageHasCa = true;
    BootIdentity b = resolveBootIdentity(store, policy, nullptr);
    CHECK(b.source == BootIdentity::Source::None);
    CHECK(b.why == "no identity provisioned");
    CHECK(store.writes == 0);

    MeterIdentity dev = sample();
    dev.meterNo = dev.mqttUser = "DEV001";
    dev.brokerUrl = "mqtt://192.168.1.10:1883";
    b = resolveBootIdentity(store, policy, &dev);  // the flag is off
    CHECK(b.source == BootIdentity::Source::None);
    policy.devIdentity = true;
    b = resolveBootIdentity(store, policy, &dev);  // on, but plain MQTT is not allowed
    CHECK(b.source == BootIdentity::Source::None);
    CHECK(b.why.find("the development identity cannot be used") == 0);
    CHECK(store.writes == 0);
    policy.allowPlainMqtt = true;
    b = resolveBootIdentity(store, policy, &dev);
    CHECK(b.source == BootIdentity::Source::Development);
    CHECK(b.identity == dev);
    CHECK(b.owner == "DEV001");  // the meter state this board now builds is the development meter's
    std::string owner;
    CHECK(readOwner(store, owner) == IdentityRead::Ok);
    CHECK(owner == "DEV001");
    CHECK(store.data.count(kKeyIdentity) == 0);  // the development identity is never written as the identity
}

TEST_CASE("boot identity: the stored one, bound to the meter state's owner") {
    MemIdentityStore store;
    IdentityPolicy policy;
    policy.imageHasCa = true;
    policy.devIdentity = true;
    MeterIdentity dev = sample();
    dev.meterNo = "DEV001";
    const MeterIdentity id = sample();
    const std::vector<uint8_t> rec = encodeIdentity(id);
    store.put(kKeyIdentity, rec.data(), rec.size());

    BootIdentity b = resolveBootIdentity(store, policy, &dev);
    CHECK(b.source == BootIdentity::Source::Stored);  // a stored identity wins over the development one
    CHECK(b.identity == id);
    CHECK(b.owner == id.meterNo);  // adopted: a board from before owners, or the first boot
    const size_t writes = store.writes;
    b = resolveBootIdentity(store, policy, &dev);
    CHECK(b.source == BootIdentity::Source::Stored);
    CHECK(store.writes == writes);  // the owner is written once

    SUBCASE("an owner record that is damaged is written again") {
        store.corrupt(kKeyOwner);
        b = resolveBootIdentity(store, policy, nullptr);
        CHECK(b.source == BootIdentity::Source::Stored);
        std::string owner;
        CHECK(readOwner(store, owner) == IdentityRead::Ok);
        CHECK(owner == id.meterNo);
    }
    SUBCASE("another owner: the board does not run as this meter") {
        const std::vector<uint8_t> other = encodeOwner("OTHER-9");
        store.put(kKeyOwner, other.data(), other.size());
        const size_t w = store.writes;
        b = resolveBootIdentity(store, policy, &dev);
        CHECK(b.source == BootIdentity::Source::None);
        CHECK(b.why.find("belongs to meter OTHER-9") != std::string::npos);
        CHECK(store.writes == w);
    }
    SUBCASE("an unreadable identity is not replaced by the development one") {
        store.corrupt(kKeyIdentity);
        b = resolveBootIdentity(store, policy, &dev);
        CHECK(b.source == BootIdentity::Source::None);
        CHECK(b.why.find("unreadable") != std::string::npos);
    }
    SUBCASE("NVS that cannot be read") {
        store.failReads = true;
        b = resolveBootIdentity(store, policy, &dev);
        CHECK(b.source == BootIdentity::Source::None);
        CHECK(b.why == "the identity storage (NVS) could not be read");
    }
    SUBCASE("a stored identity this build cannot use") {
        policy.imageHasCa = false;
        b = resolveBootIdentity(store, policy, &dev);
        CHECK(b.source == BootIdentity::Source::None);
        CHECK(b.why.find("the identity cannot be used by this build: mqtts:// needs the broker's CA") == 0);
    }
}

TEST_CASE("describeIdentity: lengths of secrets, never the secrets") {
    MeterIdentity id = sample();
    id.wifiSsid = "Caf\xc3\xa9 100%";
    id.wifiPass = "wifi-secret-123";
    const std::string d = describeIdentity(id);
    CHECK(d.find(id.mqttPass) == std::string::npos);
    CHECK(d.find("wifi-secret") == std::string::npos);
    CHECK(d.find("pass=(12 characters, not shown)") != std::string::npos);
    CHECK(d.find("ssid:Caf%C3%A9%20100%25(password 15 characters, not shown)") != std::string::npos);
    CHECK(d.find("ca=image") != std::string::npos);
    CHECK(d.find("url=mqtts://mqtt.example.com:8883") != std::string::npos);
}

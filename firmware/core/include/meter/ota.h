// Over-the-air updates: the command (firmware/PROTOCOL-ext.md, "OTA"), the signature check, and
// the state machine download -> verify -> restart -> pending -> valid, or failed / rolled back.
// The platform (esp_https_ota and esp_ota_ops on the device, fakes on the host) only moves bytes
// and partitions; every decision is here, and devtools/sim/meter_core.py repeats it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "meter/interfaces.h"

namespace meter {

constexpr size_t kMaxOtaUrlBytes = 256;
constexpr size_t kMaxFwVersionBytes = 31;
constexpr size_t kMaxSignatureBytes = 72;  // DER-encoded ECDSA P-256 signature

struct OtaCommand {
    std::string url;
    std::string version;
    std::string sha256;                // 64 lowercase hex digits
    std::vector<uint8_t> signature;    // DER
    std::string cmdId;
};

// false with `error` set when the command cannot be used; out.cmdId is still filled in when
// the payload had a usable one, so that the rejection can be answered.
bool decodeOtaCommand(const std::string& payload, OtaCommand& out, std::string& error, bool requireHttps);

// The bytes the release signature covers: "smartmeter-fw\n<version>\n<sha256 hex>\n".
std::string otaManifest(const std::string& version, const std::string& sha256Hex);
bool validFwVersion(const std::string& v);
bool base64Decode(const std::string& in, std::vector<uint8_t>& out);

// ECDSA P-256 with SHA-256 over a message.
class SignatureVerifier {
public:
    virtual ~SignatureVerifier() = default;
    virtual bool verify(const uint8_t* message, size_t len, const uint8_t* signature, size_t sigLen) = 0;
};

// The mbedtls implementation (mbedtls 2.28 on ESP-IDF 4.4 and on the host); the public key is
// the 65-byte uncompressed point compiled into the firmware.
class EcdsaP256Verifier : public SignatureVerifier {
public:
    explicit EcdsaP256Verifier(const uint8_t publicKey[65]);
    bool verify(const uint8_t* message, size_t len, const uint8_t* signature, size_t sigLen) override;

private:
    uint8_t key_[65];
};

bool sha256(const uint8_t* data, size_t len, uint8_t out[32]);

class OtaPlatform {
public:
    virtual ~OtaPlatform() = default;
    enum class Fetch { InProgress, Done, Failed };
    // Starts writing the image at `url` into the inactive app slot (in the background).
    virtual bool beginFetch(const std::string& url) = 0;
    virtual Fetch pollFetch(std::string& error) = 0;
    // SHA-256 of every byte the finished fetch wrote.
    virtual bool fetchedSha256(uint8_t out[32]) = 0;
    virtual void abortFetch() = 0;
    // Validates the written image and makes it the boot image (esp_https_ota_finish).
    virtual bool activate(std::string& error) = 0;
    virtual void restart() = 0;         // esp_restart(): does not return on the device
    virtual bool markValid() = 0;       // esp_ota_mark_app_valid_cancel_rollback()
    virtual void rollback() = 0;        // esp_ota_mark_app_invalid_rollback_and_reboot()
};

enum class OtaState : uint8_t { Idle = 0, Downloading, Verifying, Rebooting, Pending, Valid, Failed, RolledBack };
const char* otaStateName(OtaState s);

struct OtaConfig {
    bool requireHttps = true;
    uint32_t downloadTimeoutMs = 600000;  // a fetch taking longer is abandoned
    // A new image that has not had a report acknowledged this long after it booted rolls back.
    uint32_t confirmTimeoutMs = 900000;
    uint32_t restartDelayMs = 2000;       // lets the "restarting" status leave before the restart
};

// The record in NVS (key "ota"), written at every transition:
//   [0] version 1, [1] state, then length-prefixed strings target version, cmdId, previous fw,
//   error, then the 32-byte sha256 of the target and the 32-byte sha256 of the last image that
//   rolled back (all zero: none), then a CRC-32 of everything before.
constexpr const char* kKeyOta = "ota";

struct OtaEvent {
    bool error = false;
    std::string message;
    std::string cmdId;
};

class OtaManager {
public:
    OtaManager(const OtaConfig& cfg, KvStore& kv, OtaPlatform& platform, SignatureVerifier& verifier);

    // At boot, with the version this image reports and the reset reason: finishes what the
    // previous boot started (a restart into the new image, a rollback, an interrupted fetch).
    void begin(const std::string& runningFw, const std::string& resetReason, uint64_t nowMs);
    void onCommand(const std::string& payload, uint64_t nowMs);
    enum class Action { None, Restart, Rollback };
    // Drives the fetch; Restart / Rollback: the caller saves its state, then calls
    // restartNow() / rollbackNow().
    Action loop(uint64_t nowMs);
    void restartNow();
    void rollbackNow();
    // A consumption report was acknowledged by the broker: proof that the new image works.
    void onReportAcked(uint64_t nowMs);

    bool takeEvent(OtaEvent& out);
    OtaState state() const { return state_; }
    const std::string& targetVersion() const { return target_; }
    const std::string& error() const { return error_; }
    bool busy() const { return state_ == OtaState::Downloading || state_ == OtaState::Verifying || state_ == OtaState::Rebooting; }

private:
    void fail(OtaState to, const std::string& error);
    void event(bool error, const std::string& message);
    void save();
    bool load();

    OtaConfig cfg_;
    KvStore& kv_;
    OtaPlatform& platform_;
    SignatureVerifier& verifier_;
    std::string running_;

    OtaState state_ = OtaState::Idle;
    std::string target_;
    std::string cmdId_;
    std::string previous_;
    std::string error_;
    uint8_t sha_[32] = {};
    uint8_t failedSha_[32] = {};
    uint64_t since_ = 0;  // fetch start, or boot of the pending image
    uint64_t restartAt_ = 0;
    bool rollbackDue_ = false;
    std::vector<OtaEvent> events_;
};

}  // namespace meter

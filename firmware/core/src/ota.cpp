#include "meter/ota.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "meter/flash_ring.h"

namespace meter {
namespace {

void putString(std::vector<uint8_t>& b, const std::string& s) {
    b.push_back(static_cast<uint8_t>(s.size()));
    b.insert(b.end(), s.begin(), s.end());
}
bool getString(const std::vector<uint8_t>& b, size_t& at, std::string& out) {
    if (at >= b.size() || at + 1 + b[at] > b.size()) return false;
    out.assign(reinterpret_cast<const char*>(b.data() + at + 1), b[at]);
    at += 1 + b[at];
    return true;
}
bool isZero(const uint8_t* p, size_t n) {
    return std::all_of(p, p + n, [](uint8_t b) { return b == 0; });
}
bool fromHex(const std::string& s, uint8_t* out, size_t n) {
    if (s.size() != 2 * n) return false;
    auto val = [](char c) { return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1; };
    for (size_t i = 0; i < n; ++i) {
        int hi = val(s[2 * i]), lo = val(s[2 * i + 1]);
        if (hi < 0 || lo < 0) return false;
        out[i] = static_cast<uint8_t>(hi * 16 + lo);
    }
    return true;
}
// Resets that mean the image itself failed (a pending image that does this rolls back at once).
bool crashReset(const std::string& reason) {
    return reason == "panic" || reason == "task_wdt" || reason == "int_wdt" || reason == "wdt";
}

}  // namespace

std::string otaManifest(const std::string& version, const std::string& sha256Hex) {
    return "smartmeter-fw\n" + version + "\n" + sha256Hex + "\n";
}

bool validFwVersion(const std::string& v) {
    if (v.empty() || v.size() > kMaxFwVersionBytes) return false;
    for (char c : v) {
        bool ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' ||
                  c == '_' || c == '+' || c == '-';
        if (!ok) return false;
    }
    return true;
}

bool base64Decode(const std::string& in, std::vector<uint8_t>& out) {
    // Standard alphabet, padded to a multiple of 4, '=' only at the end: exactly one encoding
    // per byte string, as `base64.b64encode` and `openssl base64` write it.
    static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    out.clear();
    if (in.empty() || in.size() % 4 != 0) return false;
    size_t pad = 0;
    if (in[in.size() - 1] == '=') ++pad;
    if (in[in.size() - 2] == '=') ++pad;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < in.size() - pad; ++i) {
        const char* at = std::strchr(alphabet, in[i]);
        if (at == nullptr || in[i] == '\0') return false;
        acc = (acc << 6) | static_cast<uint32_t>(at - alphabet);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out.push_back(static_cast<uint8_t>((acc >> bits) & 0xFF));
        }
    }
    // The bits left over must be zero, else two strings would decode to the same bytes.
    return (acc & ((1u << bits) - 1)) == 0;
}

const char* otaStateName(OtaState s) {
    switch (s) {
        case OtaState::Downloading: return "downloading";
        case OtaState::Verifying: return "verifying";
        case OtaState::Rebooting: return "rebooting";
        case OtaState::Pending: return "pending";
        case OtaState::Valid: return "valid";
        case OtaState::Failed: return "failed";
        case OtaState::RolledBack: return "rolledback";
        default: return "idle";
    }
}

OtaManager::OtaManager(const OtaConfig& cfg, KvStore& kv, OtaPlatform& platform, SignatureVerifier& verifier)
    : cfg_(cfg), kv_(kv), platform_(platform), verifier_(verifier) {}

void OtaManager::save() {
    std::vector<uint8_t> b;
    b.push_back(1);
    b.push_back(static_cast<uint8_t>(state_));
    putString(b, target_);
    putString(b, cmdId_);
    putString(b, previous_);
    putString(b, error_.substr(0, 120));
    b.insert(b.end(), sha_, sha_ + 32);
    b.insert(b.end(), failedSha_, failedSha_ + 32);
    uint32_t crc = crc32(b.data(), b.size());
    for (int i = 0; i < 4; ++i) b.push_back(static_cast<uint8_t>(crc >> (8 * i)));
    kv_.put(kKeyOta, b.data(), b.size());
}

bool OtaManager::load() {
    std::vector<uint8_t> b;
    if (!kv_.get(kKeyOta, b) || b.size() < 2 + 4 + 64 + 4) return false;
    uint32_t crc = 0;
    for (int i = 3; i >= 0; --i) crc = (crc << 8) | b[b.size() - 4 + static_cast<size_t>(i)];
    if (crc32(b.data(), b.size() - 4) != crc || b[0] != 1 || b[1] > static_cast<uint8_t>(OtaState::RolledBack)) {
        return false;
    }
    size_t at = 2;
    std::string target, cmdId, previous, error;
    if (!getString(b, at, target) || !getString(b, at, cmdId) || !getString(b, at, previous) ||
        !getString(b, at, error) || at + 64 + 4 != b.size()) {
        return false;
    }
    state_ = static_cast<OtaState>(b[1]);
    target_ = target;
    cmdId_ = cmdId;
    previous_ = previous;
    error_ = error;
    std::memcpy(sha_, b.data() + at, 32);
    std::memcpy(failedSha_, b.data() + at + 32, 32);
    return true;
}

void OtaManager::event(bool error, const std::string& message) {
    OtaEvent e;
    e.error = error;
    e.message = message;
    e.cmdId = cmdId_;
    events_.push_back(e);
}

bool OtaManager::takeEvent(OtaEvent& out) {
    if (events_.empty()) return false;
    out = events_.front();
    events_.erase(events_.begin());
    return true;
}

void OtaManager::fail(OtaState to, const std::string& error) {
    state_ = to;
    error_ = error;
    if (to == OtaState::RolledBack) std::memcpy(failedSha_, sha_, 32);
    save();
    event(true, std::string("OTA ") + target_ + (to == OtaState::RolledBack ? " rolled back: " : " failed: ") + error);
}

void OtaManager::begin(const std::string& runningFw, const std::string& resetReason, uint64_t nowMs) {
    running_ = runningFw;
    if (!load()) {
        state_ = OtaState::Idle;
        return;
    }
    switch (state_) {
        case OtaState::Downloading:
        case OtaState::Verifying:
            // A reset or power cut during the fetch: the half-written slot is not the boot slot.
            fail(OtaState::Failed, "interrupted by a reboot");
            break;
        case OtaState::Rebooting:
            if (running_ == target_) {
                state_ = OtaState::Pending;
                since_ = nowMs;
                save();
                event(false, "OTA " + target_ + ": running, waiting for an acknowledged report");
            } else {
                // The new image never reported in: the bootloader went back to the old one.
                fail(OtaState::RolledBack, "the new image did not boot");
            }
            break;
        case OtaState::Pending:
            if (running_ != target_) {
                fail(OtaState::RolledBack, error_.empty() ? "the new image did not boot" : error_);
            } else if (crashReset(resetReason)) {
                // The new image crashed before it proved itself: back to the old one now.
                error_ = "the new image crashed (" + resetReason + ")";
                save();
                rollbackDue_ = true;
            } else {
                since_ = nowMs;  // a power cut: the new image gets a full confirmation period
            }
            break;
        default:
            break;
    }
}

void OtaManager::onCommand(const std::string& payload, uint64_t nowMs) {
    OtaCommand cmd;
    std::string why;
    if (!decodeOtaCommand(payload, cmd, why, cfg_.requireHttps)) {
        if (why == "not a JSON object") return;  // like any malformed command: ignored
        OtaEvent e;
        e.error = true;
        e.message = "OTA command rejected: " + why;
        e.cmdId = cmd.cmdId;
        events_.push_back(e);
        return;
    }
    uint8_t sha[32];
    fromHex(cmd.sha256, sha, 32);
    if (busy()) {
        if (std::memcmp(sha, sha_, 32) == 0) return;  // the same command delivered again (QoS 1)
        OtaEvent e;
        e.error = true;
        e.message = "OTA " + cmd.version + " refused: busy with " + target_;
        e.cmdId = cmd.cmdId;
        events_.push_back(e);
        return;
    }
    if (cmd.version == running_) {
        OtaEvent e;
        e.message = "OTA " + cmd.version + ": already running";
        e.cmdId = cmd.cmdId;
        events_.push_back(e);
        return;
    }
    if (!isZero(failedSha_, 32) && std::memcmp(sha, failedSha_, 32) == 0) {
        OtaEvent e;
        e.error = true;
        e.message = "OTA " + cmd.version + " refused: this image rolled back before";
        e.cmdId = cmd.cmdId;
        events_.push_back(e);
        return;
    }
    target_ = cmd.version;
    cmdId_ = cmd.cmdId;
    previous_ = running_;
    error_.clear();
    std::memcpy(sha_, sha, 32);
    const std::string manifest = otaManifest(cmd.version, cmd.sha256);
    if (!verifier_.verify(reinterpret_cast<const uint8_t*>(manifest.data()), manifest.size(), cmd.signature.data(),
                          cmd.signature.size())) {
        fail(OtaState::Failed, "bad signature");
        return;
    }
    if (!platform_.beginFetch(cmd.url)) {
        fail(OtaState::Failed, "the download could not start");
        return;
    }
    state_ = OtaState::Downloading;
    since_ = nowMs;
    save();
    event(false, "OTA " + target_ + ": downloading");
}

OtaManager::Action OtaManager::loop(uint64_t nowMs) {
    if (rollbackDue_) return Action::Rollback;
    switch (state_) {
        case OtaState::Downloading: {
            std::string err;
            OtaPlatform::Fetch f = platform_.pollFetch(err);
            if (f == OtaPlatform::Fetch::InProgress) {
                if (nowMs - since_ > cfg_.downloadTimeoutMs) {
                    platform_.abortFetch();
                    fail(OtaState::Failed, "download timed out");
                }
                break;
            }
            if (f == OtaPlatform::Fetch::Failed) {
                fail(OtaState::Failed, "download failed: " + err);
                break;
            }
            state_ = OtaState::Verifying;
            uint8_t got[32];
            if (!platform_.fetchedSha256(got) || std::memcmp(got, sha_, 32) != 0) {
                platform_.abortFetch();
                fail(OtaState::Failed, "sha256 mismatch");
                break;
            }
            if (!platform_.activate(err)) {
                fail(OtaState::Failed, "image rejected: " + err);
                break;
            }
            state_ = OtaState::Rebooting;
            restartAt_ = nowMs + cfg_.restartDelayMs;
            save();
            event(false, "OTA " + target_ + ": verified, restarting");
            break;
        }
        case OtaState::Rebooting:
            if (nowMs >= restartAt_) return Action::Restart;
            break;
        case OtaState::Pending:
            if (nowMs - since_ > cfg_.confirmTimeoutMs) {
                error_ = "no acknowledged report within the confirmation time";
                save();
                return Action::Rollback;
            }
            break;
        default:
            break;
    }
    return Action::None;
}

void OtaManager::restartNow() { platform_.restart(); }

void OtaManager::rollbackNow() {
    rollbackDue_ = false;
    platform_.rollback();
}

void OtaManager::onReportAcked(uint64_t /*nowMs*/) {
    if (state_ != OtaState::Pending || rollbackDue_) return;
    if (!platform_.markValid()) return;  // tried again at the next acknowledged report
    state_ = OtaState::Valid;
    save();
    event(false, "OTA " + target_ + ": confirmed");
}

// ---- verification (mbedtls 2.28: ESP-IDF 4.4 bundles it, Debian's libmbedtls-dev on the host) ----

}  // namespace meter

#include <mbedtls/ecdsa.h>
#include <mbedtls/sha256.h>

namespace meter {

bool sha256(const uint8_t* data, size_t len, uint8_t out[32]) {
    return mbedtls_sha256_ret(data, len, out, 0) == 0;
}

EcdsaP256Verifier::EcdsaP256Verifier(const uint8_t publicKey[65]) { std::memcpy(key_, publicKey, 65); }

bool EcdsaP256Verifier::verify(const uint8_t* message, size_t len, const uint8_t* signature, size_t sigLen) {
    uint8_t digest[32];
    if (!sha256(message, len, digest)) return false;
    mbedtls_ecdsa_context ctx;
    mbedtls_ecdsa_init(&ctx);
    bool ok = mbedtls_ecp_group_load(&ctx.grp, MBEDTLS_ECP_DP_SECP256R1) == 0 &&
              mbedtls_ecp_point_read_binary(&ctx.grp, &ctx.Q, key_, sizeof key_) == 0 &&
              mbedtls_ecp_check_pubkey(&ctx.grp, &ctx.Q) == 0 &&
              mbedtls_ecdsa_read_signature(&ctx, digest, sizeof digest, signature, sigLen) == 0;
    mbedtls_ecdsa_free(&ctx);
    return ok;
}

}  // namespace meter

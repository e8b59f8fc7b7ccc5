// Provisioning over the serial console, and the meter without an identity.
//
// The console reads lines (CR or LF ends one) and answers each with one or more lines. Commands
// (README.md "Provisioning a meter"):
//   help
//   identity                              what the meter runs with, what is stored, whose state it holds
//   provision meterNo=M pass=P url=U [user=N] [ca=B64DER[,B64DER...]] [ssid=S] [wifipass=W]
//   rotate pass=P                         a new MQTT password, everything else kept
//   unprovision meterNo=M                 erases the identity (not the meter state); M must be the stored one
// Values are key=value, separated by spaces; %XX (two hex digits) stands for one byte, so a
// space is %20 and a % is %25. Keys are case-insensitive. Nothing the operator typed is ever
// repeated back except through describeIdentity() (no password, only its length); an error names
// the field or the argument's position, never its value. A successful provision, rotate or
// unprovision is read back from NVS and confirmed, then the meter restarts to use it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "meter/identity.h"
#include "meter/interfaces.h"
#include "meter/numeric.h"
#include "meter/ota.h"

namespace meter {

constexpr size_t kMaxConsoleLine = 6144;  // a provision line with a CA of two certificates

// Bytes to lines. Backspace/DEL removes the last byte; a tab is a space; any other control byte
// spoils the line (answered with an error when it ends). Longer lines are dropped whole.
class LineAssembler {
public:
    explicit LineAssembler(size_t maxLine = kMaxConsoleLine) : max_(maxLine) {}
    // true when `c` ended a line: then line(), overflowed() and spoiled() describe it.
    bool feed(uint8_t c);
    const std::string& line() const { return done_; }
    bool overflowed() const { return doneOverflow_; }
    bool spoiled() const { return doneSpoiled_; }

private:
    size_t max_;
    std::string cur_, done_;
    bool overflow_ = false, spoiled_ = false;
    bool doneOverflow_ = false, doneSpoiled_ = false;
};

struct ConsoleCommand {
    enum class Verb { Empty, Help, Identity, Provision, Rotate, Unprovision };
    Verb verb = Verb::Empty;
    std::map<std::string, std::string> fields;  // lower-case key -> decoded value
};
// false with `error` (which never quotes the line) when the line is not a command this console
// knows with the fields it takes.
bool parseConsoleLine(const std::string& line, ConsoleCommand& out, std::string& error);
// "%41b" -> "Ab"; false on a % not followed by two hex digits.
bool percentDecode(const std::string& in, std::string& out);
// `ca=` on the console: base64 (standard, padded) of one or more DER certificates, separated by
// ','. openssl x509 -in ca.pem -outform der | base64 -w0
bool caFromConsole(const std::string& value, std::string& pem, std::string& why);

class ProvisioningConsole {
public:
    using Output = std::function<void(const std::string& line)>;
    ProvisioningConsole(IdentityStore& store, const IdentityPolicy& policy, BootIdentity running, Output out);

    void feed(const uint8_t* data, size_t n);
    void handleLine(const std::string& line);
    // A new identity (or none) was stored and confirmed: the glue restarts (deliberately).
    bool restartRequested() const { return restart_; }

private:
    void help();
    void show();
    void provision(const ConsoleCommand& cmd);
    void rotate(const ConsoleCommand& cmd);
    void unprovision(const ConsoleCommand& cmd);
    // Writes the owner (when there is none yet) and the identity, reads both back.
    bool store(const MeterIdentity& id, const char* verb);
    void say(const std::string& line) { out_(line); }

    IdentityStore& store_;
    IdentityPolicy policy_;
    BootIdentity running_;
    Output out_;
    LineAssembler lines_;
    bool restart_ = false;
};

// The meter with no identity it can use: it does not connect (no Wi-Fi, no MQTT), meters
// nothing, holds the relay open, and says why on the console at boot and every remindEveryMs.
// OTA keeps running from its stored record, so an image that arrived by OTA and finds no
// identity (a board updated from firmware that had it compiled in) is not confirmed and rolls
// back after OtaConfig::confirmTimeoutMs, unless the meter is provisioned meanwhile.
class UnprovisionedCore {
public:
    UnprovisionedCore(std::string fwVersion, Clock& clock, Relay& relay, std::string resetReason, std::string why,
                      uint32_t remindEveryMs = 60000);
    void attachOta(OtaManager& ota) { ota_ = &ota; }
    void begin();
    // Restart / Rollback as OtaManager::loop returns them; the caller restarts.
    OtaManager::Action loop();
    // The next line for the console, if any.
    bool takeNotice(std::string& line);
    uint64_t uptimeMs() const { return uptime_.total(); }
    const std::string& why() const { return why_; }

private:
    void remind();
    std::string fw_;
    Clock& clock_;
    Relay& relay_;
    std::string resetReason_;
    std::string why_;
    uint32_t remindEveryMs_;
    OtaManager* ota_ = nullptr;
    UptimeCounter uptime_;
    uint64_t lastRemind_ = 0;
    std::vector<std::string> notices_;
};

}  // namespace meter

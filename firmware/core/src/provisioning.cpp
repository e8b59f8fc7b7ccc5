#include "meter/provisioning.h"

#include <set>
#include <utility>
#include <vector>

namespace meter {
namespace {

int hexValue(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

std::string lower(std::string s) {
    for (char& c : s) {
        if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
    }
    return s;
}

struct VerbSpec {
    const char* name;
    ConsoleCommand::Verb verb;
    std::vector<const char*> required;
    std::vector<const char*> optional;
};

const std::vector<VerbSpec>& verbs() {
    static const std::vector<VerbSpec> v = {
        {"help", ConsoleCommand::Verb::Help, {}, {}},
        {"identity", ConsoleCommand::Verb::Identity, {}, {}},
        {"provision", ConsoleCommand::Verb::Provision, {"meterno", "pass", "url"}, {"user", "ca", "ssid", "wifipass"}},
        {"rotate", ConsoleCommand::Verb::Rotate, {"pass"}, {}},
        {"unprovision", ConsoleCommand::Verb::Unprovision, {"meterno"}, {}},
    };
    return v;
}

// The field's name as the help text spells it.
std::string shown(const std::string& key) { return key == "meterno" ? "meterNo" : key; }

constexpr size_t kMaxCaCertificates = 4;

}  // namespace

// ---- lines ---------------------------------------------------------------------------------------

bool LineAssembler::feed(uint8_t c) {
    if (c == '\r' || c == '\n') {
        if (cur_.empty() && !overflow_ && !spoiled_) return false;  // CR LF, or an empty line
        done_ = std::move(cur_);
        doneOverflow_ = overflow_;
        doneSpoiled_ = spoiled_;
        cur_.clear();
        overflow_ = spoiled_ = false;
        return true;
    }
    if (overflow_) return false;
    if (c == 0x08 || c == 0x7F) {
        if (!cur_.empty()) cur_.pop_back();
        return false;
    }
    if (c == '\t') c = ' ';
    if (c < 0x20) {
        spoiled_ = true;
        return false;
    }
    if (cur_.size() >= max_) {
        overflow_ = true;
        cur_.clear();
        cur_.shrink_to_fit();
        return false;
    }
    cur_ += static_cast<char>(c);
    return false;
}

bool percentDecode(const std::string& in, std::string& out) {
    out.clear();
    for (size_t i = 0; i < in.size(); ++i) {
        if (in[i] != '%') {
            out += in[i];
            continue;
        }
        if (i + 2 >= in.size()) return false;
        const int hi = hexValue(in[i + 1]), lo = hexValue(in[i + 2]);
        if (hi < 0 || lo < 0) return false;
        out += static_cast<char>(hi * 16 + lo);
        i += 2;
    }
    return true;
}

bool parseConsoleLine(const std::string& line, ConsoleCommand& out, std::string& error) {
    out = ConsoleCommand();
    std::vector<std::string> tokens;
    std::string cur;
    for (char c : line) {
        if (c == ' ' || c == '\t') {
            if (!cur.empty()) tokens.push_back(std::move(cur));
            cur.clear();
        } else {
            cur += c;
        }
    }
    if (!cur.empty()) tokens.push_back(std::move(cur));
    if (tokens.empty()) return true;  // Verb::Empty

    const std::string verb = lower(tokens[0]);
    const VerbSpec* spec = nullptr;
    for (const auto& v : verbs()) {
        if (verb == v.name) spec = &v;
    }
    if (spec == nullptr) {
        error = "unknown command (type help)";  // not repeated: it could be a password typed on its own
        return false;
    }
    out.verb = spec->verb;
    for (size_t i = 1; i < tokens.size(); ++i) {
        const std::string& t = tokens[i];
        const std::string pos = "argument " + std::to_string(i);
        const size_t eq = t.find('=');
        if (eq == std::string::npos || eq == 0) {
            error = pos + " is not key=value";
            return false;
        }
        const std::string key = lower(t.substr(0, eq));
        bool known = false;
        for (const char* k : spec->required) known = known || key == k;
        for (const char* k : spec->optional) known = known || key == k;
        if (!known) {
            error = pos + " is not a field of " + spec->name + " (type help)";
            return false;
        }
        if (out.fields.count(key) != 0) {
            error = shown(key) + " given twice";
            return false;
        }
        std::string value;
        if (!percentDecode(t.substr(eq + 1), value)) {
            error = shown(key) + ": a % must be followed by two hex digits (%25 for a %)";
            return false;
        }
        if (value.empty()) {
            error = shown(key) + " is empty";
            return false;
        }
        out.fields[key] = std::move(value);
    }
    for (const char* k : spec->required) {
        if (out.fields.count(k) == 0) {
            error = std::string(spec->name) + " needs " + shown(k) + "= (type help)";
            return false;
        }
    }
    return true;
}

bool caFromConsole(const std::string& value, std::string& pem, std::string& why) {
    std::vector<std::vector<uint8_t>> ders;
    size_t at = 0;
    while (true) {
        const size_t comma = value.find(',', at);
        const std::string part = value.substr(at, comma == std::string::npos ? std::string::npos : comma - at);
        std::vector<uint8_t> der;
        if (ders.size() == kMaxCaCertificates) {
            why = "ca: at most 4 certificates";
            return false;
        }
        if (!base64Decode(part, der) || !wellFormedDerSequence(der)) {
            why = "ca: certificate " + std::to_string(ders.size() + 1) +
                  " is not base64 of a DER certificate (openssl x509 -outform der | base64 -w0)";
            return false;
        }
        ders.push_back(std::move(der));
        if (comma == std::string::npos) break;
        at = comma + 1;
    }
    pem = derToPem(ders);
    if (pem.size() > kMaxCaPemBytes) {
        why = "ca: more than 4096 bytes as PEM";
        return false;
    }
    return true;
}

// ---- the console -------------------------------------------------------------------------------

ProvisioningConsole::ProvisioningConsole(IdentityStore& store, const IdentityPolicy& policy, BootIdentity running,
                                         Output out)
    : store_(store), policy_(policy), running_(std::move(running)), out_(std::move(out)) {}

void ProvisioningConsole::feed(const uint8_t* data, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (!lines_.feed(data[i])) continue;
        if (lines_.overflowed()) {
            say("error: line longer than " + std::to_string(kMaxConsoleLine) + " bytes, ignored");
        } else if (lines_.spoiled()) {
            say("error: control character in the line, ignored");
        } else {
            handleLine(lines_.line());
        }
    }
}

void ProvisioningConsole::handleLine(const std::string& line) {
    ConsoleCommand cmd;
    std::string error;
    if (!parseConsoleLine(line, cmd, error)) {
        say("error: " + error);
        return;
    }
    switch (cmd.verb) {
        case ConsoleCommand::Verb::Empty: break;
        case ConsoleCommand::Verb::Help: help(); break;
        case ConsoleCommand::Verb::Identity: show(); break;
        case ConsoleCommand::Verb::Provision: provision(cmd); break;
        case ConsoleCommand::Verb::Rotate: rotate(cmd); break;
        case ConsoleCommand::Verb::Unprovision: unprovision(cmd); break;
    }
}

void ProvisioningConsole::help() {
    say("commands (one a line; key=value separated by spaces; %XX is one byte: %20 a space, %25 a %):");
    say("  identity");
    say("  provision meterNo=<meter number> pass=<MQTT password> url=mqtts://<host>[:<port>] [user=<MQTT user, default "
        "meterNo>] [ca=<base64 DER>[,<base64 DER>...]] [ssid=<Wi-Fi> [wifipass=<Wi-Fi password>]]");
    say("  rotate pass=<new MQTT password>");
    say("  unprovision meterNo=<the stored meter number>");
    say("turn off your terminal's local echo before typing a password; the meter never prints one");
}

void ProvisioningConsole::show() {
    if (running_.source == BootIdentity::Source::None) {
        say("identity: running none: " + running_.why);
    } else {
        say(std::string("identity: running ") + sourceName(running_.source) + " " + describeIdentity(running_.identity));
    }
    MeterIdentity stored;
    switch (readIdentity(store_, stored)) {
        case IdentityRead::Ok: say("identity: stored " + describeIdentity(stored)); break;
        case IdentityRead::Missing: say("identity: stored none"); break;
        case IdentityRead::Unreadable: say("identity: stored unreadable (provision it again)"); break;
        case IdentityRead::StorageFailed: say("identity: stored ? (NVS could not be read)"); break;
    }
    std::string owner;
    switch (readOwner(store_, owner)) {
        case IdentityRead::Ok: say("identity: meter state belongs to " + owner); break;
        case IdentityRead::Missing: say("identity: meter state belongs to no meter yet"); break;
        case IdentityRead::Unreadable: say("identity: meter state owner unreadable"); break;
        case IdentityRead::StorageFailed: say("identity: meter state owner ? (NVS could not be read)"); break;
    }
}

bool ProvisioningConsole::store(const MeterIdentity& id, const char* verb) {
    const std::string v = verb;
    std::string owner;
    const IdentityRead ownerRead = readOwner(store_, owner);
    if (ownerRead != IdentityRead::Ok) {
        const std::vector<uint8_t> rec = encodeOwner(id.meterNo);
        if (!store_.put(kKeyOwner, rec.data(), rec.size())) {
            say(v + ": FAILED writing NVS (owner): nothing changed");
            return false;
        }
    }
    const std::vector<uint8_t> rec = encodeIdentity(id);
    if (!store_.put(kKeyIdentity, rec.data(), rec.size())) {
        say(v + ": FAILED writing NVS (identity): the stored identity may be the old one (type identity)");
        return false;
    }
    MeterIdentity back;
    if (readIdentity(store_, back) != IdentityRead::Ok || back != id || readOwner(store_, owner) != IdentityRead::Ok ||
        owner != id.meterNo) {
        say(v + ": FAILED: NVS does not read back what was written (type identity)");
        return false;
    }
    say(v + ": ok, stored and read back: " + describeIdentity(back));
    return true;
}

void ProvisioningConsole::provision(const ConsoleCommand& cmd) {
    const auto& f = cmd.fields;
    MeterIdentity id;
    id.meterNo = f.at("meterno");
    id.mqttPass = f.at("pass");
    id.brokerUrl = f.at("url");
    id.mqttUser = f.count("user") ? f.at("user") : id.meterNo;
    if (f.count("ssid")) id.wifiSsid = f.at("ssid");
    if (f.count("wifipass")) id.wifiPass = f.at("wifipass");
    std::string why;
    if (f.count("ca") && !caFromConsole(f.at("ca"), id.caPem, why)) {
        say("provision: refused, nothing written: " + why);
        return;
    }
    if (!identityUsable(id, policy_, why)) {
        say("provision: refused, nothing written: " + why);
        return;
    }
    std::string owner;
    const IdentityRead ownerRead = readOwner(store_, owner);
    MeterIdentity stored;
    const IdentityRead storedRead = readIdentity(store_, stored);
    if (ownerRead == IdentityRead::StorageFailed || storedRead == IdentityRead::StorageFailed) {
        say("provision: refused, nothing written: NVS could not be read");
        return;
    }
    // The meter state on this board (balance, register history, unsent reports) belongs to one
    // meter number; another one would be billed with it.
    std::string bound;
    if (ownerRead == IdentityRead::Ok) bound = owner;
    else if (storedRead == IdentityRead::Ok) bound = stored.meterNo;
    if (!bound.empty() && bound != id.meterNo) {
        say("provision: refused, nothing written: this board holds the meter state of " + bound +
            "; it can be provisioned only as " + bound + " (to reuse the board for another meter, erase its flash: README.md)");
        return;
    }
    if (storedRead == IdentityRead::Ok && stored == id && ownerRead == IdentityRead::Ok &&
        running_.source == BootIdentity::Source::Stored && running_.identity == id) {
        say("provision: unchanged: " + describeIdentity(id));
        return;
    }
    if (store(id, "provision")) {
        say("provision: restarting to connect as " + id.meterNo);
        restart_ = true;
    }
}

void ProvisioningConsole::rotate(const ConsoleCommand& cmd) {
    MeterIdentity stored;
    switch (readIdentity(store_, stored)) {
        case IdentityRead::Ok: break;
        case IdentityRead::Missing: say("rotate: refused: no identity is stored (provision first)"); return;
        case IdentityRead::Unreadable: say("rotate: refused: the stored identity is unreadable (provision it again)"); return;
        case IdentityRead::StorageFailed: say("rotate: refused: NVS could not be read"); return;
    }
    MeterIdentity id = stored;
    id.mqttPass = cmd.fields.at("pass");
    std::string why;
    if (!identityUsable(id, policy_, why)) {
        say("rotate: refused, nothing written: " + why);
        return;
    }
    if (id == stored && running_.source == BootIdentity::Source::Stored && running_.identity == id) {
        say("rotate: unchanged: that is the stored password");
        return;
    }
    if (store(id, "rotate")) {
        say("rotate: restarting to connect with the new password");
        restart_ = true;
    }
}

void ProvisioningConsole::unprovision(const ConsoleCommand& cmd) {
    const std::string& meterNo = cmd.fields.at("meterno");
    MeterIdentity stored;
    std::string owner;
    const IdentityRead ownerRead = readOwner(store_, owner);
    switch (readIdentity(store_, stored)) {
        case IdentityRead::Ok:
            if (stored.meterNo != meterNo) {
                say("unprovision: refused: the stored identity is not that meter number (type identity)");
                return;
            }
            break;
        case IdentityRead::Missing: say("unprovision: nothing to do: no identity is stored"); return;
        case IdentityRead::Unreadable:
            if (ownerRead == IdentityRead::Ok && owner != meterNo) {
                say("unprovision: refused: the meter state belongs to another meter number (type identity)");
                return;
            }
            break;
        case IdentityRead::StorageFailed: say("unprovision: refused: NVS could not be read"); return;
    }
    if (!store_.erase(kKeyIdentity)) {
        say("unprovision: FAILED erasing the identity in NVS (type identity)");
        return;
    }
    if (readIdentity(store_, stored) != IdentityRead::Missing) {
        say("unprovision: FAILED: the identity is still in NVS (type identity)");
        return;
    }
    say("unprovision: ok, the identity of " + meterNo +
        " is erased (the meter state stays, and stays " + (ownerRead == IdentityRead::Ok ? owner : meterNo) + "'s)");
    say("unprovision: restarting without an identity: relay open, not connecting");
    restart_ = true;
}

// ---- no identity ---------------------------------------------------------------------------------

UnprovisionedCore::UnprovisionedCore(std::string fwVersion, Clock& clock, Relay& relay, std::string resetReason,
                                     std::string why, uint32_t remindEveryMs)
    : fw_(std::move(fwVersion)),
      clock_(clock),
      relay_(relay),
      resetReason_(std::move(resetReason)),
      why_(std::move(why)),
      remindEveryMs_(remindEveryMs),
      uptime_(clock.millis()) {}

void UnprovisionedCore::begin() {
    uptime_.update(clock_.millis());
    relay_.set(false);  // safe state: no energy flows that no meter accounts for
    if (ota_ != nullptr) {
        ota_->begin(fw_, resetReason_, uptime_.total());
        OtaEvent e;
        while (ota_->takeEvent(e)) notices_.push_back("[meter] " + e.message);
    }
    remind();
}

void UnprovisionedCore::remind() {
    lastRemind_ = uptime_.total();
    notices_.push_back("[meter] not connecting: " + why_ + ". Relay open, nothing metered. Type help to provision.");
    if (ota_ != nullptr && ota_->state() == OtaState::Pending) {
        notices_.push_back("[meter] firmware " + fw_ +
                           " came by OTA and is not confirmed: it rolls back to the previous image at the end of its "
                           "confirmation time unless the meter is provisioned and reports before then");
    }
}

OtaManager::Action UnprovisionedCore::loop() {
    const uint64_t now = uptime_.update(clock_.millis());
    OtaManager::Action a = OtaManager::Action::None;
    if (ota_ != nullptr) {
        a = ota_->loop(now);
        OtaEvent e;
        while (ota_->takeEvent(e)) notices_.push_back("[meter] " + e.message);
    }
    if (now - lastRemind_ >= remindEveryMs_) remind();
    return a;
}

bool UnprovisionedCore::takeNotice(std::string& line) {
    if (notices_.empty()) return false;
    line = std::move(notices_.front());
    notices_.erase(notices_.begin());
    return true;
}

}  // namespace meter

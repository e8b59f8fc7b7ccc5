// Runs a meter trace (firmware/trace/README.md) through the portable core with in-memory
// hardware and prints every effect as one JSON line. `python -m devtools.sim.trace_runner`
// does the same with the Python port; tests/simulator/test_contract.py compares the two, and
// `trace_runner TRACE.jsonl --expect TRACE.expected` (the ctest entries) compares the output
// with the reviewed golden file line by line.
#include <cjson/cJSON.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "meter/boot_guard.h"
#include "meter/flash_ring.h"
#include "meter/host_fakes.h"
#include "meter/meter_core.h"
#include "meter/ota.h"

using namespace meter;

namespace {

constexpr size_t kSlotBytes = 64;  // FlashRing header (11) + packed report (48) fits

std::vector<std::string> g_output;

void emit(cJSON* line) {
    char* text = cJSON_PrintUnformatted(line);
    std::cout << text << '\n';
    g_output.emplace_back(text);
    cJSON_free(text);
    cJSON_Delete(line);
}

// 0 when the output equals the golden file line for line; else prints the first difference.
int compareWithGolden(const char* path) {
    std::ifstream in(path);
    if (!in) {
        std::fprintf(stderr, "cannot open golden file %s\n", path);
        return 1;
    }
    std::vector<std::string> expected;
    std::string line;
    while (std::getline(in, line)) expected.push_back(line);
    size_t n = std::max(expected.size(), g_output.size());
    for (size_t i = 0; i < n; ++i) {
        const std::string got = i < g_output.size() ? g_output[i] : "<end of output>";
        const std::string want = i < expected.size() ? expected[i] : "<end of golden file>";
        if (got != want) {
            std::fprintf(stderr, "line %zu differs from %s\n  expected: %s\n  actual:   %s\n", i + 1, path,
                         want.c_str(), got.c_str());
            return 1;
        }
    }
    return 0;
}

void emitMessage(const char* event, const std::string& topic, const std::string& payload, int qos, bool retain) {
    cJSON* o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", event);
    cJSON_AddStringToObject(o, "topic", topic.c_str());
    cJSON_AddNumberToObject(o, "qos", qos);
    cJSON_AddBoolToObject(o, "retain", retain);
    cJSON_AddStringToObject(o, "payload", payload.c_str());
    emit(o);
}

// What the broker receives (FakeEspMqtt calls it at each transmission): msgId for QoS 1, and
// dup when esp_mqtt sends a message again after a reconnect.
void emitDelivery(const FakeEspMqtt::Delivery& d) {
    cJSON* o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", "publish");
    cJSON_AddStringToObject(o, "topic", d.topic.c_str());
    cJSON_AddNumberToObject(o, "qos", d.qos);
    cJSON_AddBoolToObject(o, "retain", d.retain);
    if (d.qos > 0) cJSON_AddNumberToObject(o, "msgId", d.id);
    if (d.dup) cJSON_AddBoolToObject(o, "dup", true);
    cJSON_AddStringToObject(o, "payload", d.payload.c_str());
    emit(o);
}

void emitExpired(int id) {
    cJSON* o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", "expired");
    cJSON_AddNumberToObject(o, "msgId", id);
    emit(o);
}

void emitRestart(const std::string& into, const std::string& reason) {
    cJSON* o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", "restart");
    cJSON_AddStringToObject(o, "into", into.c_str());
    cJSON_AddStringToObject(o, "reason", reason.c_str());
    emit(o);
}

std::vector<uint8_t> unhex(const std::string& h) {
    std::vector<uint8_t> out;
    for (size_t i = 0; i + 1 < h.size(); i += 2) {
        out.push_back(static_cast<uint8_t>(std::stoul(h.substr(i, 2), nullptr, 16)));
    }
    return out;
}

// Resets after which RTC memory still holds what was written before.
bool softReset(const std::string& reason) {
    return reason == "software" || reason == "task_wdt" || reason == "int_wdt" || reason == "wdt" ||
           reason == "panic" || reason == "deepsleep";
}

class PrintingRelay : public Relay {
public:
    void set(bool closed) override {
        cJSON* o = cJSON_CreateObject();
        cJSON_AddStringToObject(o, "event", "relay");
        cJSON_AddBoolToObject(o, "closed", closed);
        emit(o);
    }
};

double num(const cJSON* o, const char* key, double fallback) {
    const cJSON* v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : fallback;
}

std::string str(const cJSON* o, const char* key, const std::string& fallback) {
    const cJSON* v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsString(v) ? std::string(v->valuestring) : fallback;
}

MeterConfig configFrom(const cJSON* c) {
    MeterConfig cfg;
    cfg.meterNo = str(c, "meterNo", cfg.meterNo);
    cfg.fwVersion = str(c, "fw", cfg.fwVersion);
    cfg.reportIntervalMs = static_cast<uint32_t>(num(c, "reportIntervalMs", cfg.reportIntervalMs));
    cfg.sampleIntervalMs = static_cast<uint32_t>(num(c, "sampleIntervalMs", cfg.sampleIntervalMs));
    cfg.sensorFailTimeoutMs = static_cast<uint32_t>(num(c, "sensorFailTimeoutMs", cfg.sensorFailTimeoutMs));
    cfg.persistIntervalMs = static_cast<uint32_t>(num(c, "persistIntervalMs", cfg.persistIntervalMs));
    cfg.statusIntervalMs = static_cast<uint32_t>(num(c, "statusIntervalMs", cfg.statusIntervalMs));
    cfg.seqBlock = static_cast<uint32_t>(num(c, "seqBlock", cfg.seqBlock));
    cfg.replayBatch = static_cast<uint32_t>(num(c, "replayBatch", cfg.replayBatch));
    cfg.lowBalanceThreshold = num(c, "lowBalanceThreshold", cfg.lowBalanceThreshold);
    cfg.ratedMaxKw = num(c, "ratedMaxKw", cfg.ratedMaxKw);
    cfg.bootGapMs = static_cast<uint32_t>(num(c, "bootGapMs", cfg.bootGapMs));
    cfg.registerToleranceKwh = num(c, "registerToleranceKwh", cfg.registerToleranceKwh);
    cfg.maxInflight = static_cast<uint32_t>(num(c, "maxInflight", cfg.maxInflight));
    cfg.maxOutboxBytes = static_cast<uint32_t>(num(c, "maxOutboxBytes", cfg.maxOutboxBytes));
    cfg.outboxExpiryMs = static_cast<uint32_t>(num(c, "outboxExpiryMs", cfg.outboxExpiryMs));
    return cfg;
}

// The command payload of a trace step: a JSON string is sent byte for byte, anything else is
// serialised compactly, with the string "$regId" replaced by the meter's current regId (so that
// a trace can address the history the meter has at that point).
std::string payloadOf(const cJSON* step, const std::string& regId) {
    const cJSON* p = cJSON_GetObjectItemCaseSensitive(step, "payload");
    if (cJSON_IsString(p)) return p->valuestring;
    char* text = cJSON_PrintUnformatted(p);
    std::string out = text ? text : "";
    cJSON_free(text);
    const std::string token = "\"$regId\"";
    for (size_t at = out.find(token); at != std::string::npos; at = out.find(token, at)) {
        out.replace(at, token.size(), "\"" + regId + "\"");
        at += regId.size() + 2;
    }
    return out;
}

}  // namespace

int main(int argc, char** argv) {
    const char* golden = nullptr;
    if (argc == 4 && std::string(argv[2]) == "--expect") {
        golden = argv[3];
    } else if (argc != 2) {
        std::fprintf(stderr, "usage: %s TRACE.jsonl [--expect GOLDEN]\n", argv[0]);
        return 2;
    }
    std::ifstream in(argv[1]);
    if (!in) {
        std::fprintf(stderr, "cannot open %s\n", argv[1]);
        return 2;
    }

    MeterConfig cfg;
    uint64_t loopStepMs = 1000;
    size_t capacity = 64;
    std::string resetReason = "poweron";
    int rssi = -65;

    ManualClock clock;
    std::unique_ptr<MemKv> kv(new MemKv());
    std::unique_ptr<XorShiftRandom> rng(new XorShiftRandom(1));
    std::unique_ptr<XorShiftRandom> msgIds;
    std::unique_ptr<MemFlash> flash;
    std::unique_ptr<FlashRing> ring;
    FakeEnergy energy;
    PrintingRelay relay;
    std::unique_ptr<FakeEspMqtt> mqtt;
    std::unique_ptr<MemRetained> rtc(new MemRetained());
    MemRetained guardRtc;
    BootGuardConfig guardCfg;
    std::unique_ptr<BootGuard> guard;
    std::unique_ptr<MeterCore> core;
    std::unique_ptr<SafeModeCore> safe;
    // OTA, when the trace configures a public key.
    FakeOtaPlatform otaPlatform(clock);
    OtaConfig otaCfg;
    std::vector<uint8_t> otaKey;
    std::unique_ptr<EcdsaP256Verifier> verifier;
    std::unique_ptr<OtaManager> ota;
    std::string runningFw, previousFw;

    auto boot = [&](const std::string& reason) {
        guard.reset(new BootGuard(guardRtc, guardCfg));
        bool safeMode = guard->begin();
        MeterConfig running = cfg;
        running.fwVersion = runningFw;
        if (verifier) ota.reset(new OtaManager(otaCfg, *kv, otaPlatform, *verifier));
        core.reset();
        safe.reset();
        if (safeMode) {
            safe.reset(new SafeModeCore(running, clock, relay, *mqtt, reason, guard->fastBoots()));
            if (ota) safe->attachOta(*ota);
            safe->setWifiRssi(rssi);
            safe->begin();
            return;
        }
        ring.reset(new FlashRing(*flash, kSlotBytes));  // recovery scan, as after a real reset
        core.reset(new MeterCore(running, clock, *kv, *ring, relay, energy, *mqtt, *rng, reason));
        core->attachRetained(*rtc);
        if (ota) core->attachOta(*ota);
        core->setWifiRssi(rssi);
        core->begin();
    };
    // Any reset: RAM and the client's outbox are lost; RTC memory survives soft resets; once an
    // image is activated (the boot partition points at it), the next boot of any kind runs it,
    // and one that panics at boot is reset once more (reason panic).
    std::function<void(const std::string&, uint32_t)> reset = [&](const std::string& reason, uint32_t startMillis) {
        bool switched = false;
        FakeOtaPlatform::Image img;
        if (otaPlatform.haveNext && ota) {
            img = otaPlatform.next;
            otaPlatform.haveNext = false;
            previousFw = runningFw;
            runningFw = ota->targetVersion();  // the version the signed manifest named
            switched = true;
        }
        if (!softReset(reason)) {
            rtc->clear();
            guardRtc.clear();
        }
        mqtt->powerCut();
        otaPlatform.reset();
        clock.restart(startMillis);
        boot(reason);
        if (switched && img.crashes) {
            emitRestart(runningFw, "panic");
            reset("panic", 0);
        }
    };
    // What the device does after OTA's restart() / rollback().
    auto followPlatform = [&]() {
        if (otaPlatform.restartRequested) {
            emitRestart(otaPlatform.haveNext && ota ? ota->targetVersion() : runningFw, "software");
            guard->clear();
            reset("software", 0);
        } else if (otaPlatform.rollbackRequested) {
            otaPlatform.haveNext = false;
            runningFw = previousFw;
            emitRestart(runningFw, "software");
            guard->clear();
            reset("software", 0);
        }
    };

    std::string line;
    int lineNo = 0;
    while (std::getline(in, line)) {
        ++lineNo;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        cJSON* step = cJSON_Parse(line.c_str());
        if (!cJSON_IsObject(step)) {
            std::fprintf(stderr, "line %d: not a JSON object\n", lineNo);
            cJSON_Delete(step);
            return 2;
        }
        const std::string op = str(step, "op", "");
        if (op == "config") {
            cfg = configFrom(step);
            loopStepMs = static_cast<uint64_t>(num(step, "loopStepMs", 1000));
            capacity = static_cast<size_t>(num(step, "bufferCapacity", 64));
            resetReason = str(step, "resetReason", resetReason);
            rssi = static_cast<int>(num(step, "wifiRssi", rssi));
            clock.restart(static_cast<uint32_t>(num(step, "startMillis", 0)));
            rng.reset(new XorShiftRandom(static_cast<uint32_t>(num(step, "rngSeed", 1))));
            // One slot per sector: the ring then holds exactly `capacity` reports and drops the
            // oldest one at a time, the rule the Python port implements with a bounded deque.
            flash.reset(new MemFlash(capacity * kSlotBytes, kSlotBytes));
            mqtt.reset(new FakeEspMqtt(clock, static_cast<uint32_t>(num(step, "outboxExpiryMs", 30000))));
            mqtt->onTransmit = emitDelivery;
            mqtt->onExpired = emitExpired;
            mqtt->reportDeleted = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "reportDeleted"));
            uint32_t idSeed = static_cast<uint32_t>(num(step, "msgIdSeed", 0));
            if (idSeed != 0) {
                msgIds.reset(new XorShiftRandom(idSeed));
                mqtt->idSource = msgIds.get();
            }
            mqtt->disconnect();  // the first connect is a step of its own
            runningFw = cfg.fwVersion;
            guardCfg.maxFastBoots = static_cast<uint32_t>(num(step, "maxFastBoots", guardCfg.maxFastBoots));
            guardCfg.stableAfterMs = static_cast<uint32_t>(num(step, "stableAfterMs", guardCfg.stableAfterMs));
            guardCfg.safeModeMs = static_cast<uint32_t>(num(step, "safeModeMs", guardCfg.safeModeMs));
            const std::string keyHex = str(step, "otaPublicKey", "");
            if (!keyHex.empty()) {
                otaKey = unhex(keyHex);
                if (otaKey.size() != 65) {
                    std::fprintf(stderr, "line %d: otaPublicKey must be 65 bytes of hex\n", lineNo);
                    return 2;
                }
                verifier.reset(new EcdsaP256Verifier(otaKey.data()));
                otaCfg.requireHttps = !cJSON_IsFalse(cJSON_GetObjectItemCaseSensitive(step, "otaRequireHttps"));
                otaCfg.confirmTimeoutMs = static_cast<uint32_t>(num(step, "otaConfirmTimeoutMs", otaCfg.confirmTimeoutMs));
                otaCfg.downloadTimeoutMs = static_cast<uint32_t>(num(step, "otaDownloadTimeoutMs", otaCfg.downloadTimeoutMs));
                otaPlatform.fetchMs = static_cast<uint64_t>(num(step, "otaFetchMs", 5000));
                const cJSON* images = cJSON_GetObjectItemCaseSensitive(step, "otaImages");
                const cJSON* image = nullptr;
                cJSON_ArrayForEach(image, images) {
                    FakeOtaPlatform::Image img;
                    img.bytes = str(image, "text", "");
                    img.version = str(image, "version", "");
                    img.crashes = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(image, "crashes"));
                    img.invalid = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(image, "invalid"));
                    otaPlatform.images[image->string] = img;
                }
            }
            boot(resetReason);
        } else if (!core && !safe) {
            std::fprintf(stderr, "line %d: the first step must be config\n", lineNo);
            cJSON_Delete(step);
            return 2;
        } else if (op == "advance") {
            uint64_t remaining = static_cast<uint64_t>(num(step, "ms", 0));
            while (remaining > 0) {
                uint64_t d = remaining < loopStepMs ? remaining : loopStepMs;
                clock.advance(d);
                remaining -= d;
                if (safe) {
                    mqtt->serviceInto(*safe);
                    OtaManager::Action a = safe->loop();
                    if (a == OtaManager::Action::Restart) ota->restartNow();
                    if (a == OtaManager::Action::Rollback) ota->rollbackNow();
                    if (!otaPlatform.restartRequested && !otaPlatform.rollbackRequested &&
                        guard->safeModeOver(safe->uptimeMs())) {
                        emitRestart(runningFw, "software");  // safe mode is over: try a normal boot
                        reset("software", 0);
                    }
                } else {
                    mqtt->serviceInto(*core);
                    core->loop();
                    guard->loop(core->uptimeMs());
                }
                followPlatform();
            }
        } else if (op == "energy") {
            energy.setKwh(num(step, "kwh", 0));
        } else if (op == "sensor_fail") {
            energy.fail();
        } else if (op == "time_sync") {
            clock.sync(static_cast<uint64_t>(num(step, "unixMs", 0)));
        } else if (op == "rssi") {
            rssi = static_cast<int>(num(step, "dbm", rssi));
            if (safe) safe->setWifiRssi(rssi);
            else core->setWifiRssi(rssi);
        } else if (op == "connect") {
            Message will = safe ? safe->willMessage() : core->willMessage();
            emitMessage("will", will.topic, will.payload, will.qos, will.retain);
            mqtt->connect();
            if (safe) safe->onConnected();
            else core->onConnected();
        } else if (op == "disconnect") {
            mqtt->disconnect();
            if (safe) safe->onDisconnected();
            else core->onDisconnected();
        } else if (op == "acks") {
            mqtt->acking = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "on"));
        } else if (op == "blackhole") {
            mqtt->blackhole = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(step, "on"));
        } else if (op == "balance_cmd" || op == "relay_cmd" || op == "ota_cmd" || op == "message") {
            std::string topic = op == "message" ? str(step, "topic", "")
                                : "smartmeter/" + cfg.meterNo + "/command/" + op.substr(0, op.size() - 4);
            if (safe) safe->onMessage(topic, payloadOf(step, ""));
            else core->onMessage(topic, payloadOf(step, core->regId()));
            followPlatform();
        } else if (op == "reboot" || op == "wipe_nvs" || op == "corrupt_state" || op == "wipe_ring" ||
                   op == "swap_board") {
            // Storage faults happen while the meter is down; each of these ops ends with a boot.
            if (op == "wipe_nvs") kv->wipe();
            if (op == "corrupt_state") kv->corrupt(str(step, "key", kKeyState));
            if (op == "wipe_ring" || op == "swap_board") {
                flash.reset(new MemFlash(capacity * kSlotBytes, kSlotBytes));
            }
            if (op == "swap_board") {
                kv.reset(new MemKv());  // a new board under the same meterNo
                rtc->clear();
                guardRtc.clear();
            }
            reset(str(step, "reason", op == "reboot" ? "software" : "poweron"),
                  static_cast<uint32_t>(num(step, "startMillis", 0)));
        } else {
            std::fprintf(stderr, "line %d: unknown op '%s'\n", lineNo, op.c_str());
            cJSON_Delete(step);
            return 2;
        }
        cJSON_Delete(step);
    }
    if (!core && !safe) {
        std::fprintf(stderr, "empty trace\n");
        return 2;
    }

    cJSON* o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "event", "final");
    if (safe) {
        cJSON_AddBoolToObject(o, "safeMode", true);
        cJSON_AddNumberToObject(o, "fastBoots", guard->fastBoots());
        cJSON_AddStringToObject(o, "fw", runningFw.c_str());
        cJSON_AddStringToObject(o, "otaState", ota ? otaStateName(ota->state()) : "none");
        cJSON_AddNumberToObject(o, "outbox", static_cast<double>(mqtt->size()));
        emit(o);
        return golden ? compareWithGolden(golden) : 0;
    }
    cJSON_AddStringToObject(o, "fw", runningFw.c_str());
    cJSON_AddStringToObject(o, "otaState", ota ? otaStateName(ota->state()) : "none");
    // Unrounded, exact: the local balances must be the same double on both sides.
    cJSON_AddRawToObject(o, "balance", jsonNumber(core->balance()).c_str());
    cJSON_AddRawToObject(o, "energyTotal", jsonNumber(core->energyTotal()).c_str());
    cJSON_AddBoolToObject(o, "relayClosed", core->relayClosed());
    cJSON_AddStringToObject(o, "override", relayOverrideName(core->relayOverride()));
    cJSON_AddStringToObject(o, "condition", core->condition());
    cJSON_AddStringToObject(o, "regId", core->regId().c_str());
    cJSON_AddRawToObject(o, "unbilledKwh", jsonNumber(core->unbilledKwh()).c_str());
    cJSON_AddNumberToObject(o, "nextSeq", static_cast<double>(core->nextSeq()));
    cJSON_AddNumberToObject(o, "buffered", static_cast<double>(ring->size()));
    cJSON_AddNumberToObject(o, "inflight", static_cast<double>(core->inflight()));
    cJSON_AddNumberToObject(o, "outbox", static_cast<double>(mqtt->size()));
    emit(o);
    return golden ? compareWithGolden(golden) : 0;
}

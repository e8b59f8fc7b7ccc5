// ESP32 glue: binds the portable meter core (firmware/core) to Arduino-ESP32 2.0.17 / ESP-IDF 4.4
// (PlatformIO espressif32@6.9.0). Everything that decides money, relay state, OTA, safe mode or
// the meter's identity lives in the core and is tested on the host; this file moves bytes between
// the core and the hardware, Wi-Fi, NVS, flash partitions, the serial console and esp_mqtt.
// The image carries no meter identity: it is read from NVS (meter/identity.h), provisioned over
// the serial console (meter/provisioning.h); without one the meter does not connect.
// It is NOT built for the device on the project's CI machine (no ESP32 toolchain there; it is
// compiled against declaration-only stubs): README.md lists every API used and where it was checked.
//
// Threads: esp_mqtt runs its own task and calls mqttEvent() with its API lock held. The handler
// never waits and never calls the client: it copies the event into one of two FreeRTOS queues
// with a zero timeout and returns. loop() drains the queues, so the core is single-threaded.
// A command that does not fit (the queue is full) cannot be refused (esp_mqtt acknowledges it
// once the handler returns), so it is counted and loop() says so in an error status.
// The OTA download runs in a task of its own (esp_https_ota blocks); loop() keeps metering and
// feeding the watchdog meanwhile.

#include <Arduino.h>
#include <WiFi.h>
#include <bootloader_random.h>
#include <driver/gpio.h>
#include <esp_attr.h>
#include <esp_https_ota.h>
#include <esp_ota_ops.h>
#include <esp_partition.h>
#include <esp_sntp.h>
#include <esp_system.h>
#include <esp_task_wdt.h>
#include <mbedtls/sha256.h>
#include <mqtt_client.h>
#include <nvs.h>
#include <nvs_flash.h>
#include <sys/time.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <string>

#if __has_include("meter_config.h")
#include "meter_config.h"
#else
#error "Copy esp32/include/meter_config.example.h to esp32/include/meter_config.h and fill it in"
#endif
#if __has_include("ota_public_key.h")
#include "ota_public_key.h"
#else
#error "Generate the OTA release key: python firmware/tools/sign_firmware.py keygen --out <private.pem> --header firmware/esp32/include/ota_public_key.h"
#endif

#include "meter/backoff.h"
#include "meter/boot_guard.h"
#include "meter/flash_ring.h"
#include "meter/identity.h"
#include "meter/meter_core.h"
#include "meter/numeric.h"
#include "meter/ota.h"
#include "meter/provisioning.h"
#include "meter/pzem.h"

// The identity is per meter and lives in NVS; an image that still compiles one in would hand it
// to every meter it is installed on.
#if defined(METER_NO) || defined(MQTT_USERNAME) || defined(MQTT_PASSWORD) || defined(MQTT_URI)
#error "meter_config.h defines a meter identity (METER_NO/MQTT_USERNAME/MQTT_PASSWORD/MQTT_URI): remove it. Meters are provisioned over the serial console (README.md); a bench board may use DEV_* with METER_DEV_IDENTITY=1"
#endif
#ifndef METER_DEV_IDENTITY
#define METER_DEV_IDENTITY 0
#endif
#ifndef METER_ALLOW_PLAIN_MQTT
#define METER_ALLOW_PLAIN_MQTT 0
#endif
#if METER_DEV_IDENTITY
#pragma message("METER_DEV_IDENTITY=1: unprovisioned meters running this image connect as DEV_METER_NO. Never sign or roll it out (sign_firmware.py refuses it).")
#endif

// Arduino-ESP32 validates a pending OTA image in initArduino() before setup() when it is built
// with CONFIG_APP_ROLLBACK_ENABLE, unless this returns true. The core decides (OtaManager).
extern "C" bool verifyRollbackLater() { return true; }

namespace {

// Arduino's millis() is unsigned long, 32 bits on the ESP32: the core's wrap-safe arithmetic is
// on uint32_t.
uint32_t nowMs() { return static_cast<uint32_t>(::millis()); }

void logError(const char* what, esp_err_t err) { Serial.printf("[meter] %s failed: %s\n", what, esp_err_to_name(err)); }

// The CA that verifies the broker and the firmware server: the identity's, else the fleet CA
// compiled into the image (MQTT_CA_PEM, the same for every meter). Set once in setup().
std::string g_caPem;

// ---- retained RAM (RTC slow memory, not initialised at boot) -------------------------------------

struct RtcBlob {
    uint32_t magic;
    uint32_t len;
    uint8_t data[64];
};
RTC_NOINIT_ATTR RtcBlob g_rtcState;
RTC_NOINIT_ATTR RtcBlob g_rtcGuard;
constexpr uint32_t kRtcMagic = 0x4D455452;  // the core's records carry their own CRC as well

class RtcStore : public meter::RetainedStore {
public:
    explicit RtcStore(RtcBlob& blob) : blob_(blob) {}
    bool load(std::vector<uint8_t>& out) override {
        if (blob_.magic != kRtcMagic || blob_.len > sizeof blob_.data) return false;
        out.assign(blob_.data, blob_.data + blob_.len);
        return true;
    }
    void store(const uint8_t* d, size_t n) override {
        if (n > sizeof blob_.data) return;  // the core's records are 61 and 10 bytes
        std::memcpy(blob_.data, d, n);
        blob_.len = static_cast<uint32_t>(n);
        blob_.magic = kRtcMagic;
    }
    void clear() { blob_.magic = 0; }

private:
    RtcBlob& blob_;
};

// ---- hardware adapters -------------------------------------------------------------------------

std::atomic<bool> g_timeSynced{false};
void onTimeSynced(struct timeval*) { g_timeSynced = true; }

class EspClock : public meter::Clock {
public:
    uint32_t millis() const override { return nowMs(); }
    bool unixMillis(uint64_t& out) const override {
        if (!g_timeSynced) return false;  // PROTOCOL.md: untrusted time is sent as ms since boot
        struct timeval tv;
        if (gettimeofday(&tv, nullptr) != 0) return false;
        out = static_cast<uint64_t>(tv.tv_sec) * 1000ULL + static_cast<uint64_t>(tv.tv_usec / 1000);
        return true;
    }
};

// The hardware RNG. setup() draws with the SAR ADC entropy source enabled
// (bootloader_random_enable) because Wi-Fi, the RF noise source, is not up yet.
class EspRandom : public meter::Random {
public:
    uint32_t next32() override { return esp_random(); }
};

// NVS through the ESP-IDF API, every return value checked (Arduino's Preferences hides them).
// The core writes at most once a minute plus payments, relay changes and new histories.
class NvsKv : public meter::KvStore {
public:
    bool begin() {
        esp_err_t err = nvs_open("meter", NVS_READWRITE, &handle_);
        if (err != ESP_OK) logError("nvs_open", err);
        open_ = err == ESP_OK;
        return open_;
    }
    bool get(const char* key, std::vector<uint8_t>& out) override {
        if (!open_) return false;
        size_t n = 0;
        esp_err_t err = nvs_get_blob(handle_, key, nullptr, &n);
        if (err != ESP_OK) {
            if (err != ESP_ERR_NVS_NOT_FOUND) logError("nvs_get_blob (size)", err);
            return false;
        }
        out.resize(n);
        err = nvs_get_blob(handle_, key, out.data(), &n);
        if (err != ESP_OK) logError("nvs_get_blob", err);
        return err == ESP_OK && n == out.size();
    }
    bool put(const char* key, const uint8_t* data, size_t len) override {
        if (!open_) return false;
        esp_err_t err = nvs_set_blob(handle_, key, data, len);
        if (err == ESP_OK) err = nvs_commit(handle_);
        if (err != ESP_OK) logError("nvs_set_blob/commit", err);
        return err == ESP_OK;
    }

private:
    nvs_handle_t handle_ = 0;
    bool open_ = false;
};

// The identity: namespace "ident" in the NVS partition "ident" (partitions.csv), which
// initArduino() never formats (it erases only the first NVS partition, "nvs", when that has no
// free pages), or in the default partition on a board whose partition table predates "ident"
// (tables do not change by OTA). Never erased by this firmware; `unprovision` erases one key.
constexpr const char* kIdentPartition = "ident";

class NvsIdentityStore : public meter::IdentityStore {
public:
    bool begin() {
        esp_err_t err = nvs_flash_init_partition(kIdentPartition);
        if (err == ESP_OK) {
            partition_ = kIdentPartition;
        } else if (err == ESP_ERR_NOT_FOUND) {
            partition_ = NVS_DEFAULT_PART_NAME;
            Serial.println("[meter] no 'ident' partition (an older partition table): the identity is in the 'nvs' partition");
        } else {
            // Not formatted here: the identity may still be in it (README.md, "Where it is stored").
            logError("nvs_flash_init_partition(ident)", err);
            return false;
        }
        err = nvs_open_from_partition(partition_, meter::kIdentityNamespace, NVS_READWRITE, &handle_);
        if (err != ESP_OK) {
            logError("nvs_open_from_partition(ident)", err);
            return false;
        }
        open_ = true;
        return true;
    }
    const char* partition() const { return partition_; }
    Read get(const char* key, std::vector<uint8_t>& out) override {
        if (!open_) return Read::Failed;
        size_t n = 0;
        esp_err_t err = nvs_get_blob(handle_, key, nullptr, &n);
        if (err == ESP_ERR_NVS_NOT_FOUND) return Read::Missing;
        if (err != ESP_OK) {
            logError("nvs_get_blob (ident, size)", err);
            return Read::Failed;
        }
        out.resize(n);
        err = nvs_get_blob(handle_, key, out.data(), &n);
        if (err != ESP_OK) {
            logError("nvs_get_blob (ident)", err);
            return Read::Failed;
        }
        if (n != out.size()) return Read::Failed;
        return Read::Ok;
    }
    bool put(const char* key, const uint8_t* data, size_t len) override {
        if (!open_) return false;
        esp_err_t err = nvs_set_blob(handle_, key, data, len);
        if (err == ESP_OK) err = nvs_commit(handle_);
        if (err != ESP_OK) logError("nvs_set_blob/commit (ident)", err);
        return err == ESP_OK;
    }
    bool erase(const char* key) override {
        if (!open_) return false;
        esp_err_t err = nvs_erase_key(handle_, key);
        if (err == ESP_ERR_NVS_NOT_FOUND) err = ESP_OK;  // already gone
        if (err == ESP_OK) err = nvs_commit(handle_);
        if (err != ESP_OK) logError("nvs_erase_key/commit (ident)", err);
        return err == ESP_OK;
    }

private:
    const char* partition_ = NVS_DEFAULT_PART_NAME;
    nvs_handle_t handle_ = 0;
    bool open_ = false;
};

// The "reports" data partition (partitions.csv) as raw NOR flash for the FlashRing.
class PartitionFlash : public meter::FlashRegion {
public:
    bool begin() {
        part_ = esp_partition_find_first(ESP_PARTITION_TYPE_DATA, static_cast<esp_partition_subtype_t>(0x40),
                                         "reports");
        return part_ != nullptr;
    }
    size_t size() const override { return part_ ? part_->size : 0; }
    size_t sectorSize() const override { return SPI_FLASH_SEC_SIZE; }
    bool read(size_t off, uint8_t* out, size_t len) override {
        return esp_partition_read(part_, off, out, len) == ESP_OK;
    }
    bool program(size_t off, const uint8_t* data, size_t len) override {
        return esp_partition_write(part_, off, data, len) == ESP_OK;
    }
    bool eraseSector(size_t sector) override {
        return esp_partition_erase_range(part_, sector * SPI_FLASH_SEC_SIZE, SPI_FLASH_SEC_SIZE) == ESP_OK;
    }

private:
    const esp_partition_t* part_ = nullptr;
};

// A RAM-only log for a board flashed without the "reports" partition: the meter still works,
// it just cannot keep reports across a power cut.
class RamLog : public meter::RecordLog {
public:
    bool append(const uint8_t* d, size_t n) override {
        if (items_.size() >= 256) items_.erase(items_.begin());
        items_.push_back({nextKey_++, std::vector<uint8_t>(d, d + n)});
        return true;
    }
    bool peekAt(size_t index, std::vector<uint8_t>& out, uint32_t& key) override {
        if (index >= items_.size()) return false;
        out = items_[index].data;
        key = items_[index].key;
        return true;
    }
    bool consume(uint32_t key) override {
        for (auto it = items_.begin(); it != items_.end(); ++it) {
            if (it->key == key) {
                items_.erase(it);
                return true;
            }
        }
        return false;
    }
    size_t size() const override { return items_.size(); }

private:
    struct Item {
        uint32_t key;
        std::vector<uint8_t> data;
    };
    std::vector<Item> items_;
    uint32_t nextKey_ = 1;
};

// The relay driver. Its safe state is open (no energy the meter does not account for):
// RELAY_ACTIVE_HIGH 1 -> safe level LOW, RELAY_ACTIVE_HIGH 0 (active-low module) -> HIGH. The
// level is written before the pin becomes an output, so an active-low relay does not close for
// a moment at boot; until this code runs the pin floats, so the driver needs a pull resistor to
// its safe level (README.md, wiring).
constexpr int kRelaySafeLevel = RELAY_ACTIVE_HIGH ? 0 : 1;

class GpioRelay : public meter::Relay {
public:
    bool begin() {
        const gpio_num_t pin = static_cast<gpio_num_t>(RELAY_PIN);
        esp_err_t err = gpio_set_level(pin, kRelaySafeLevel);
        if (err == ESP_OK) {
            gpio_config_t io = {};
            io.pin_bit_mask = 1ULL << RELAY_PIN;
            io.mode = GPIO_MODE_OUTPUT;
            io.pull_up_en = GPIO_PULLUP_DISABLE;
            io.pull_down_en = GPIO_PULLDOWN_DISABLE;
            io.intr_type = GPIO_INTR_DISABLE;
            err = gpio_config(&io);
        }
        if (err == ESP_OK) err = gpio_set_level(pin, kRelaySafeLevel);  // gpio_config kept it; be sure
        if (err != ESP_OK) logError("relay gpio", err);
        return err == ESP_OK;
    }
    void set(bool closed) override {
        esp_err_t err = gpio_set_level(static_cast<gpio_num_t>(RELAY_PIN), closed ? 1 - kRelaySafeLevel : kRelaySafeLevel);
        if (err != ESP_OK) logError("relay gpio_set_level", err);
    }
};

// PZEM-004T v3 on UART2 (9600 8N1, Modbus RTU); framing and CRC are in the core (pzem.h).
class PzemEnergy : public meter::EnergySource {
public:
    void begin() {
        Serial2.begin(9600, SERIAL_8N1, PZEM_RX_PIN, PZEM_TX_PIN);
        Serial2.setTimeout(120);  // a full 25-byte answer takes ~26 ms at 9600 baud
    }
    bool readKwh(double& kwh) override {
        while (Serial2.available()) Serial2.read();  // drop a late answer to an earlier request
        uint8_t req[meter::pzem::kRequestBytes];
        meter::pzem::buildReadRequest(PZEM_ADDRESS, req);
        if (Serial2.write(req, sizeof req) != sizeof req) return false;
        Serial2.flush();
        uint8_t resp[meter::pzem::kResponseBytes];
        size_t n = Serial2.readBytes(resp, sizeof resp);
        uint32_t wh = 0;
        if (!meter::pzem::parseEnergyWh(resp, n, PZEM_ADDRESS, wh)) return false;
        kwh = wh / 1000.0;
        return true;
    }
};

// ---- OTA: esp_https_ota into the inactive slot, in a task of its own ------------------------------

class EspOtaPlatform : public meter::OtaPlatform {
public:
    bool beginFetch(const std::string& url) override {
        if (state_ == kRunning || handle_ != nullptr) return false;
        url_ = url;
        cancel_ = false;
        state_ = kRunning;
        // The download blocks for minutes: a task of its own, at the loop's priority.
        if (xTaskCreate(&EspOtaPlatform::task, "ota", 8192, this, 1, nullptr) != pdPASS) {
            state_ = kIdle;
            return false;
        }
        return true;
    }
    Fetch pollFetch(std::string& error) override {
        int s = state_;
        if (s == kRunning) return Fetch::InProgress;
        if (s == kDone) return Fetch::Done;
        error = error_;
        return Fetch::Failed;
    }
    bool fetchedSha256(uint8_t out[32]) override {
        if (state_ != kDone) return false;
        std::memcpy(out, sha_, 32);
        return true;
    }
    void abortFetch() override {
        if (state_ == kRunning) {
            cancel_ = true;  // the task owns the handle until it stops; it aborts by itself
            return;
        }
        if (handle_ != nullptr) {
            esp_err_t err = esp_https_ota_abort(handle_);
            if (err != ESP_OK) logError("esp_https_ota_abort", err);
            handle_ = nullptr;
        }
        state_ = kIdle;
    }
    bool activate(std::string& error) override {
        if (handle_ == nullptr) {
            error = "nothing downloaded";
            return false;
        }
        // Validates the image (esp_image_verify) and points the boot partition at it.
        esp_err_t err = esp_https_ota_finish(handle_);
        handle_ = nullptr;
        state_ = kIdle;
        if (err != ESP_OK) error = esp_err_to_name(err);
        return err == ESP_OK;
    }
    // A deliberate restart: the boot-loop guard must not count the next boot.
    void restart() override {
        if (onRestart) onRestart();
        esp_restart();
    }
    bool markValid() override {
        esp_err_t err = esp_ota_mark_app_valid_cancel_rollback();
        if (err != ESP_OK) logError("esp_ota_mark_app_valid_cancel_rollback", err);
        return err == ESP_OK;
    }
    void rollback() override {
        if (onRestart) onRestart();
        // Marks this image invalid and restarts into the other slot; returns only on failure.
        esp_err_t err = esp_ota_mark_app_invalid_rollback_and_reboot();
        logError("esp_ota_mark_app_invalid_rollback_and_reboot", err);
        const esp_partition_t* other = esp_ota_get_next_update_partition(nullptr);
        if (other != nullptr && esp_ota_set_boot_partition(other) == ESP_OK) esp_restart();
    }

    void (*onRestart)() = nullptr;

private:
    enum { kIdle, kRunning, kDone, kFailed };

    static void task(void* arg) {
        static_cast<EspOtaPlatform*>(arg)->run();
        vTaskDelete(nullptr);
    }
    void fail(const char* what, esp_err_t err) {
        error_ = std::string(what) + ": " + esp_err_to_name(err);
        if (handle_ != nullptr) {
            esp_https_ota_abort(handle_);
            handle_ = nullptr;
        }
        state_ = kFailed;
    }
    void run() {
        esp_http_client_config_t http = {};
        http.url = url_.c_str();
        // The broker's CA signs the firmware server's certificate too. Without one esp-tls refuses
        // https (no way to verify the server), and the update fails.
        http.cert_pem = g_caPem.empty() ? nullptr : g_caPem.c_str();
        http.timeout_ms = 15000;
        http.keep_alive_enable = true;
        esp_https_ota_config_t cfg = {};
        cfg.http_config = &http;
        esp_https_ota_handle_t h = nullptr;
        esp_err_t err = esp_https_ota_begin(&cfg, &h);
        if (err != ESP_OK) return fail("esp_https_ota_begin", err);
        handle_ = h;
        while ((err = esp_https_ota_perform(h)) == ESP_ERR_HTTPS_OTA_IN_PROGRESS) {
            if (cancel_) return fail("download", ESP_FAIL);  // the core gave up (timeout)
            vTaskDelay(1);
        }
        if (err != ESP_OK) return fail("esp_https_ota_perform", err);
        if (!esp_https_ota_is_complete_data_received(h)) return fail("download", ESP_ERR_INVALID_SIZE);
        // SHA-256 of the bytes as written, read back from the slot (esp_https_ota does not hand
        // the data over), compared by the core with the signed manifest's.
        const esp_partition_t* slot = esp_ota_get_next_update_partition(nullptr);
        int len = esp_https_ota_get_image_len_read(h);
        if (slot == nullptr || len <= 0) return fail("image length", ESP_ERR_INVALID_SIZE);
        mbedtls_sha256_context ctx;
        mbedtls_sha256_init(&ctx);
        bool ok = mbedtls_sha256_starts_ret(&ctx, 0) == 0;
        static uint8_t buf[4096];
        for (int off = 0; ok && off < len; off += sizeof buf) {
            size_t n = std::min(static_cast<size_t>(len - off), sizeof buf);
            ok = esp_partition_read(slot, static_cast<size_t>(off), buf, n) == ESP_OK &&
                 mbedtls_sha256_update_ret(&ctx, buf, n) == 0;
        }
        ok = ok && mbedtls_sha256_finish_ret(&ctx, sha_) == 0;
        mbedtls_sha256_free(&ctx);
        if (!ok) return fail("read back", ESP_FAIL);
        state_ = kDone;
    }

    std::string url_;
    std::string error_;
    std::atomic<int> state_{kIdle};
    std::atomic<bool> cancel_{false};
    esp_https_ota_handle_t handle_ = nullptr;
    uint8_t sha_[32] = {};
};

// ---- MQTT (esp_mqtt: QoS 1 with an outbox; PubSubClient cannot publish QoS 1) ----------------

struct Event {
    enum Kind : uint8_t { Connected, Disconnected, Published, Deleted } kind;
    int msgId;
};
struct Command {
    uint16_t topicLen;
    uint16_t dataLen;
    char topic[96];
    char data[meter::kMaxPayloadBytes];
};

QueueHandle_t g_events;
QueueHandle_t g_commands;
std::atomic<uint32_t> g_commandsLost{0};
std::atomic<uint32_t> g_eventsLost{0};
esp_mqtt_client_handle_t g_mqtt;
esp_mqtt_client_config_t g_mqttCfg = {};
std::string g_commandFilter;  // smartmeter/{meterNo}/command/#
std::string g_willTopic, g_willPayload;

class EspMqttPublisher : public meter::Publisher {
public:
    int publish(const std::string& topic, const std::string& payload, int qos, bool retain) override {
        if (!g_mqtt) return -1;
        // enqueue, not publish: it only adds to the outbox (the client's task sends), so loop()
        // never waits on the network. store = true also queues QoS 0 (statuses).
        return esp_mqtt_client_enqueue(g_mqtt, topic.c_str(), payload.data(), static_cast<int>(payload.size()), qos,
                                       retain ? 1 : 0, true);
    }
    size_t outboxBytes() override {
        int n = g_mqtt ? esp_mqtt_client_get_outbox_size(g_mqtt) : 0;
        return n > 0 ? static_cast<size_t>(n) : 0;
    }
};

void postEvent(Event::Kind kind, int msgId) {
    Event e{kind, msgId};
    if (xQueueSend(g_events, &e, 0) != pdTRUE) ++g_eventsLost;  // a lost PUBACK: resent after the expiry
}

// Runs in esp_mqtt's task with its API lock held: no waiting, no client calls.
void mqttEvent(void*, esp_event_base_t, int32_t eventId, void* eventData) {
    auto* ev = static_cast<esp_mqtt_event_handle_t>(eventData);
    switch (static_cast<esp_mqtt_event_id_t>(eventId)) {
        case MQTT_EVENT_CONNECTED: postEvent(Event::Connected, 0); break;
        case MQTT_EVENT_DISCONNECTED: postEvent(Event::Disconnected, 0); break;
        case MQTT_EVENT_PUBLISHED: postEvent(Event::Published, ev->msg_id); break;
        case MQTT_EVENT_DELETED: postEvent(Event::Deleted, ev->msg_id); break;
        case MQTT_EVENT_DATA: {
            static Command c;  // only the MQTT task runs this handler; static keeps it off its stack
            // Commands are one small JSON object: a fragmented (oversized) message is refused, as
            // the core would refuse it anyway.
            if (ev->current_data_offset != 0 || ev->data_len != ev->total_data_len ||
                ev->data_len > static_cast<int>(sizeof c.data) || ev->topic_len > static_cast<int>(sizeof c.topic)) {
                ++g_commandsLost;
                break;
            }
            c.topicLen = static_cast<uint16_t>(ev->topic_len);
            c.dataLen = static_cast<uint16_t>(ev->data_len);
            std::memcpy(c.topic, ev->topic, ev->topic_len);
            std::memcpy(c.data, ev->data, ev->data_len);
            if (xQueueSend(g_commands, &c, 0) != pdTRUE) ++g_commandsLost;
            break;
        }
        default:
            break;
    }
}

// ---- the meter ----------------------------------------------------------------------------------

EspClock g_clock;
EspRandom g_random;
NvsKv g_kv;
PartitionFlash g_flash;
std::unique_ptr<meter::RecordLog> g_log;
GpioRelay g_relay;
PzemEnergy g_energy;
EspMqttPublisher g_publisher;
RtcStore g_stateRtc(g_rtcState);
RtcStore g_guardRtc(g_rtcGuard);
EspOtaPlatform g_otaPlatform;
meter::EcdsaP256Verifier g_verifier(kOtaPublicKey);
std::unique_ptr<meter::OtaManager> g_ota;
std::unique_ptr<meter::BootGuard> g_guard;
std::unique_ptr<meter::MeterCore> g_core;
std::unique_ptr<meter::SafeModeCore> g_safe;
std::unique_ptr<meter::UnprovisionedCore> g_unprov;  // no usable identity: no network, relay open
NvsIdentityStore g_identityStore;
meter::BootIdentity g_boot;  // never changed after setup(): g_mqttCfg points into it
std::unique_ptr<meter::ProvisioningConsole> g_console;
const char* g_wifiSsid = WIFI_SSID;
const char* g_wifiPass = WIFI_PASSWORD;

meter::Backoff g_wifiBackoff(4000, 120000);  // association takes seconds: start at 2-4 s
meter::Backoff g_mqttBackoff(2000, 120000);
uint32_t g_nextWifiAttemptMs = 0;
uint32_t g_wifiWaitMs = 0;
bool g_mqttStarted = false;
bool g_mqttConnected = false;
bool g_reconnectDue = false;
uint32_t g_reconnectAtMs = 0;
uint32_t g_reconnectWaitMs = 0;
uint32_t g_offlineSinceMs = 0;
uint32_t g_lostReported = 0;

const char* resetReasonName(esp_reset_reason_t r) {
    switch (r) {
        case ESP_RST_POWERON: return "poweron";
        case ESP_RST_EXT: return "external";
        case ESP_RST_SW: return "software";
        case ESP_RST_PANIC: return "panic";
        case ESP_RST_INT_WDT: return "int_wdt";
        case ESP_RST_TASK_WDT: return "task_wdt";
        case ESP_RST_WDT: return "wdt";
        case ESP_RST_DEEPSLEEP: return "deepsleep";
        case ESP_RST_BROWNOUT: return "brownout";
        case ESP_RST_SDIO: return "sdio";
        default: return "unknown";
    }
}

// RTC memory is trusted after the resets that keep it (the core's records carry a CRC too).
bool keepsRtc(esp_reset_reason_t r) {
    return r == ESP_RST_SW || r == ESP_RST_PANIC || r == ESP_RST_INT_WDT || r == ESP_RST_TASK_WDT ||
           r == ESP_RST_WDT || r == ESP_RST_DEEPSLEEP;
}

meter::Message willMessage() { return g_safe ? g_safe->willMessage() : g_core->willMessage(); }

// The Last Will carries the state at the time of the (re)connect. Called only while the client
// is stopped or waiting to reconnect (it then holds no lock).
bool refreshWill() {
    meter::Message will = willMessage();
    g_willTopic = will.topic;
    g_willPayload = will.payload;
    g_mqttCfg.lwt_topic = g_willTopic.c_str();
    g_mqttCfg.lwt_msg = g_willPayload.c_str();
    g_mqttCfg.lwt_msg_len = static_cast<int>(g_willPayload.size());
    g_mqttCfg.lwt_qos = will.qos;
    g_mqttCfg.lwt_retain = will.retain ? 1 : 0;
    esp_err_t err = esp_mqtt_set_config(g_mqtt, &g_mqttCfg);
    if (err != ESP_OK) logError("esp_mqtt_set_config", err);
    return err == ESP_OK;
}

void maintainWifi(uint32_t now) {
    if (WiFi.status() == WL_CONNECTED) {
        g_wifiBackoff.reset();
        if (!g_mqttStarted) {
            refreshWill();
            esp_err_t err = esp_mqtt_client_start(g_mqtt);
            if (err != ESP_OK) logError("esp_mqtt_client_start", err);
            g_mqttStarted = err == ESP_OK;
        }
        return;
    }
    if (meter::elapsedMs(now, g_nextWifiAttemptMs) < g_wifiWaitMs) return;
    WiFi.disconnect();
    if (WiFi.begin(g_wifiSsid, g_wifiPass) == WL_CONNECT_FAILED) Serial.println("[meter] WiFi.begin failed");
    g_nextWifiAttemptMs = now;
    g_wifiWaitMs = g_wifiBackoff.nextDelayMs(esp_random());
}

// Reconnects are ours (disable_auto_reconnect): esp_mqtt copies reconnect_timeout_ms before it
// posts MQTT_EVENT_DISCONNECTED, so a delay set in reaction to a failure would only apply to
// the next one. Here the delay is chosen when the failure is seen and applies to this attempt.
void maintainMqtt(uint32_t now) {
    if (!g_reconnectDue || meter::elapsedMs(now, g_reconnectAtMs) < g_reconnectWaitMs) return;
    if (WiFi.status() != WL_CONNECTED) return;  // maintainWifi first
    g_reconnectDue = false;
    refreshWill();
    esp_err_t err = esp_mqtt_client_reconnect(g_mqtt);
    if (err != ESP_OK) {
        logError("esp_mqtt_client_reconnect", err);
        g_reconnectDue = true;  // not waiting yet (still disconnecting): try again shortly
        g_reconnectAtMs = now;
        g_reconnectWaitMs = 1000;
    }
}

void drainEvents() {
    Event e;
    while (xQueueReceive(g_events, &e, 0) == pdTRUE) {
        switch (e.kind) {
            case Event::Connected:
                g_mqttConnected = true;
                g_mqttBackoff.reset();  // the next failure starts the back-off from the bottom
                // Persistent session: the broker keeps the subscription, this renews it.
                if (esp_mqtt_client_subscribe(g_mqtt, g_commandFilter.c_str(), 1) < 0) {
                    Serial.println("[meter] subscribe failed");
                }
                if (g_safe) g_safe->onConnected();
                else g_core->onConnected();
                break;
            case Event::Disconnected:
                if (g_mqttConnected) g_offlineSinceMs = nowMs();
                g_mqttConnected = false;
                if (g_safe) g_safe->onDisconnected();
                else g_core->onDisconnected();
                g_reconnectDue = true;
                g_reconnectAtMs = nowMs();
                g_reconnectWaitMs = g_mqttBackoff.nextDelayMs(esp_random());
                break;
            case Event::Published:
                if (g_core) g_core->onPublished(e.msgId);
                break;
            case Event::Deleted:
                if (g_core) g_core->onPublishDropped(e.msgId);
                break;
        }
    }
    static Command c;
    while (xQueueReceive(g_commands, &c, 0) == pdTRUE) {
        std::string topic(c.topic, c.topicLen), data(c.data, c.dataLen);
        if (g_safe) g_safe->onMessage(topic, data);
        else g_core->onMessage(topic, data);
    }
}

// A deliberate restart: the state goes to flash and the boot-loop guard does not count it.
void restartDeliberately() {
    if (g_core) g_core->persistNow();
    g_guard->clear();
    esp_restart();
}

// The serial console's receive buffer: a provision line with a CA (~2-6 KiB) arrives at 115200
// baud (11.5 bytes/ms) while loop() may be in a 120 ms PZEM read. Set before Serial.begin().
constexpr size_t kConsoleRxBytes = 8192;

void consoleOut(const std::string& line) { Serial.printf("%s\n", line.c_str()); }

// Feeds what the console received to the provisioning console, at most 2 KiB per loop() (the
// UART buffer holds the rest), and restarts once a new identity is stored and confirmed.
void pollConsole() {
    uint8_t buf[256];
    size_t n = 0;
    for (size_t budget = 0; budget < 2048 && Serial.available() > 0; ++budget) {
        const int c = Serial.read();
        if (c < 0) break;
        buf[n++] = static_cast<uint8_t>(c);
        if (n == sizeof buf) {
            g_console->feed(buf, n);
            n = 0;
        }
    }
    if (n > 0) g_console->feed(buf, n);
    if (g_console->restartRequested()) {
        Serial.flush();
        restartDeliberately();
    }
}

#if METER_DEV_IDENTITY
// Referenced at boot, so it is in the image: sign_firmware.py refuses to sign an image holding it.
const char kDevImageMarker[] = "SMARTMETER-DEV-IDENTITY-IMAGE";

meter::MeterIdentity devIdentity() {
    meter::MeterIdentity id;
    id.meterNo = DEV_METER_NO;
    id.mqttUser = DEV_MQTT_USERNAME;
    id.mqttPass = DEV_MQTT_PASSWORD;
    id.brokerUrl = DEV_MQTT_URI;
    return id;
}
#endif

// Which identity this boot runs with (stored, development, or none and why).
void resolveIdentity() {
    meter::IdentityPolicy policy;
    policy.allowPlainMqtt = METER_ALLOW_PLAIN_MQTT != 0;
    policy.imageHasCa = sizeof(MQTT_CA_PEM) > 1;
    policy.devIdentity = METER_DEV_IDENTITY != 0;
    if (!g_identityStore.begin()) Serial.println("[meter] the identity storage is unavailable");
#if METER_DEV_IDENTITY
    Serial.printf("[meter] DEVELOPMENT IMAGE (%s): an unprovisioned board connects as %s\n", kDevImageMarker, DEV_METER_NO);
    const meter::MeterIdentity dev = devIdentity();
    g_boot = meter::resolveBootIdentity(g_identityStore, policy, &dev);
#else
    g_boot = meter::resolveBootIdentity(g_identityStore, policy, nullptr);
#endif
    g_console.reset(new meter::ProvisioningConsole(g_identityStore, policy, g_boot, consoleOut));
    if (g_boot.source == meter::BootIdentity::Source::None) {
        Serial.printf("[meter] no usable identity: %s\n", g_boot.why.c_str());
        return;
    }
    const meter::MeterIdentity& id = g_boot.identity;
    // describeIdentity never includes a password.
    Serial.printf("[meter] identity (%s, partition %s): %s\n", meter::sourceName(g_boot.source),
                  g_identityStore.partition(), meter::describeIdentity(id).c_str());
    g_caPem = id.caPem.empty() ? std::string(MQTT_CA_PEM) : id.caPem;
    if (!id.wifiSsid.empty()) {
        g_wifiSsid = id.wifiSsid.c_str();
        g_wifiPass = id.wifiPass.empty() ? nullptr : id.wifiPass.c_str();
    }
}

}  // namespace

void setup() {
    const bool bigRx = Serial.setRxBufferSize(kConsoleRxBytes) == kConsoleRxBytes;
    Serial.begin(115200);
    const esp_reset_reason_t rr = esp_reset_reason();
    const char* reason = resetReasonName(rr);
    Serial.printf("=== ESP32 Smart Meter (%s), reset: %s ===\n", FW_VERSION, reason);
    if (!bigRx) Serial.println("[meter] Serial.setRxBufferSize failed: long console lines may be cut");
    // Brown-out detection stays as the Arduino core's sdkconfig enables it: a sagging supply
    // resets the chip instead of corrupting flash writes, and the reset reason reports it.

    // The relay goes to its safe state before anything else can fail or take time.
    g_relay.begin();
    if (!keepsRtc(rr)) {
        g_stateRtc.clear();
        g_guardRtc.clear();
    }

    esp_err_t err = esp_task_wdt_init(WATCHDOG_TIMEOUT_S, true);  // a hung loop reboots (task_wdt)
    if (err == ESP_OK) err = esp_task_wdt_add(nullptr);
    if (err != ESP_OK) logError("esp_task_wdt", err);

    meter::BootGuardConfig guardCfg;
    guardCfg.maxFastBoots = BOOT_GUARD_MAX_FAST_BOOTS;
    guardCfg.stableAfterMs = BOOT_GUARD_STABLE_AFTER_MS;
    guardCfg.safeModeMs = SAFE_MODE_MS;
    g_guard.reset(new meter::BootGuard(g_guardRtc, guardCfg));
    const bool safeMode = g_guard->begin();

    resolveIdentity();
    if (!g_kv.begin()) Serial.println("[meter] NVS unavailable: the state lives in RTC memory and the ring only");
    meter::OtaConfig otaCfg;  // https only, the defaults of ota.h
    g_otaPlatform.onRestart = [] { g_guard->clear(); };
    g_ota.reset(new meter::OtaManager(otaCfg, g_kv, g_otaPlatform, g_verifier));

    if (g_boot.source == meter::BootIdentity::Source::None) {
        // No Wi-Fi, no MQTT, no metering: the relay stays open. OTA only finishes what the last
        // boot started, so an image that came by OTA and finds no identity rolls back.
        g_unprov.reset(new meter::UnprovisionedCore(FW_VERSION, g_clock, g_relay, reason, g_boot.why));
        g_unprov->attachOta(*g_ota);
        g_unprov->begin();
        return;
    }

    g_events = xQueueCreate(32, sizeof(Event));
    g_commands = xQueueCreate(6, sizeof(Command));
    if (g_events == nullptr || g_commands == nullptr) {
        Serial.println("[meter] queues: out of memory, restarting");
        esp_restart();
    }

    meter::MeterConfig cfg;
    cfg.meterNo = g_boot.identity.meterNo;
    cfg.fwVersion = FW_VERSION;
    cfg.reportIntervalMs = REPORT_INTERVAL_MS;
    cfg.sensorFailTimeoutMs = SENSOR_FAIL_TIMEOUT_MS;
    cfg.lowBalanceThreshold = LOW_BALANCE_KWH;
    cfg.ratedMaxKw = RATED_MAX_KW;

    if (safeMode) {
        // Neither the stored state nor the report ring is read: either may be what crashes.
        Serial.printf("[meter] %u fast reboots: safe mode\n", static_cast<unsigned>(g_guard->fastBoots()));
        g_safe.reset(new meter::SafeModeCore(cfg, g_clock, g_relay, g_publisher, reason, g_guard->fastBoots()));
        g_safe->attachOta(*g_ota);
        g_safe->begin();
    } else {
        g_energy.begin();
        if (g_flash.begin()) {
            g_log.reset(new meter::FlashRing(g_flash, 64));
        } else {
            Serial.println("[meter] no 'reports' partition: reports kept in RAM only");
            g_log.reset(new RamLog());
        }
        g_core.reset(new meter::MeterCore(cfg, g_clock, g_kv, *g_log, g_relay, g_energy, g_publisher, g_random, reason));
        g_core->attachRetained(g_stateRtc);
        g_core->attachOta(*g_ota);
        bootloader_random_enable();   // true random numbers before Wi-Fi, for a regId drawn at begin()
        g_core->begin();              // relay set from the restored balance before any network exists
        bootloader_random_disable();  // before Wi-Fi or the ADC are used
    }

    sntp_set_time_sync_notification_cb(onTimeSynced);
    configTime(0, 0, NTP_SERVER_1, NTP_SERVER_2);

    const meter::MeterIdentity& id = g_boot.identity;
    g_commandFilter = "smartmeter/" + id.meterNo + "/command/#";
    g_mqttCfg.uri = id.brokerUrl.c_str();
    g_mqttCfg.client_id = id.meterNo.c_str();
    g_mqttCfg.username = id.mqttUser.c_str();
    g_mqttCfg.password = id.mqttPass.c_str();
    g_mqttCfg.cert_pem = g_caPem.empty() ? nullptr : g_caPem.c_str();  // empty only for mqtt:// (METER_ALLOW_PLAIN_MQTT)
    g_mqttCfg.keepalive = 30;
    // Persistent session: balance commands published while the meter is offline are queued by
    // the broker and delivered on reconnect.
    g_mqttCfg.disable_clean_session = true;
    g_mqttCfg.disable_auto_reconnect = true;  // maintainMqtt() decides when
    g_mqttCfg.buffer_size = 2048;
    g_mqtt = esp_mqtt_client_init(&g_mqttCfg);
    if (g_mqtt == nullptr) {
        Serial.println("[meter] esp_mqtt_client_init failed, restarting");
        esp_restart();
    }
    err = esp_mqtt_client_register_event(g_mqtt, static_cast<esp_mqtt_event_id_t>(ESP_EVENT_ANY_ID), mqttEvent,
                                         nullptr);
    if (err != ESP_OK) {
        logError("esp_mqtt_client_register_event", err);
        esp_restart();
    }

    if (!WiFi.mode(WIFI_STA)) Serial.println("[meter] WiFi.mode failed");
    WiFi.setAutoReconnect(false);  // our back-off decides when to retry
    g_offlineSinceMs = nowMs();
}

void loop() {
    esp_task_wdt_reset();
    pollConsole();

    if (g_unprov) {
        const meter::OtaManager::Action a = g_unprov->loop();
        std::string line;
        while (g_unprov->takeNotice(line)) consoleOut(line);
        if (a == meter::OtaManager::Action::Rollback) g_ota->rollbackNow();
        else if (a == meter::OtaManager::Action::Restart) g_ota->restartNow();
        g_guard->loop(g_unprov->uptimeMs());
        delay(10);
        return;
    }

    uint32_t now = nowMs();
    maintainWifi(now);
    maintainMqtt(now);
    drainEvents();
    const int rssi = WiFi.status() == WL_CONNECTED ? WiFi.RSSI() : 0;

    if (g_safe) {
        g_safe->setWifiRssi(rssi);
        meter::OtaManager::Action a = g_safe->loop();
        if (a == meter::OtaManager::Action::Restart) {
            g_ota->restartNow();
        } else if (a == meter::OtaManager::Action::Rollback) {
            g_ota->rollbackNow();
        } else if (g_guard->safeModeOver(g_safe->uptimeMs())) {
            esp_restart();  // try a normal boot (the guard's count was cleared)
        }
    } else {
        g_core->setWifiRssi(rssi);
        g_core->loop();  // restarts through EspOtaPlatform when an update or a rollback is due
        g_guard->loop(g_core->uptimeMs());
    }

    // Commands the queue could not take were acknowledged to the broker all the same: say so
    // (the backend's resync brings the balance again).
    uint32_t lost = g_commandsLost + g_eventsLost;
    if (lost != g_lostReported && g_mqttConnected) {
        g_lostReported = lost;
        Serial.printf("[meter] %u commands/events did not fit the queues\n", static_cast<unsigned>(lost));
        if (g_core) g_core->commandsLost(lost);
    }

    if (!g_mqttConnected && meter::elapsedMs(now, g_offlineSinceMs) >= REBOOT_AFTER_OFFLINE_MS) {
        restartDeliberately();  // stale Wi-Fi/TLS state is the usual cause of a long outage
    }
    delay(10);
}

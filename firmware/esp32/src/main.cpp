// ESP32 glue: binds the portable meter core (firmware/core) to Arduino and ESP-IDF.
// Everything that decides money or relay state lives in the core and is tested on the host;
// this file only moves bytes between the core and the hardware, Wi-Fi and esp_mqtt.
//
// Threads: esp_mqtt runs its own task. Its event handler never touches the core; it copies
// events into a FreeRTOS queue that loop() drains, so the core is single-threaded.

#include <Arduino.h>
#include <ArduinoOTA.h>
#include <Preferences.h>
#include <WiFi.h>
#include <bootloader_random.h>
#include <esp_partition.h>
#include <esp_sntp.h>
#include <esp_system.h>
#include <esp_task_wdt.h>
#include <mqtt_client.h>
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

#include "meter/backoff.h"
#include "meter/flash_ring.h"
#include "meter/meter_core.h"
#include "meter/numeric.h"
#include "meter/pzem.h"

namespace {

// ---- hardware adapters -------------------------------------------------------------------------

std::atomic<bool> g_timeSynced{false};

void onTimeSynced(struct timeval*) { g_timeSynced = true; }

class EspClock : public meter::Clock {
public:
    uint32_t millis() const override { return ::millis(); }
    bool unixMillis(uint64_t& out) const override {
        if (!g_timeSynced) return false;  // PROTOCOL.md: untrusted time is sent as ms since boot
        struct timeval tv;
        gettimeofday(&tv, nullptr);
        out = static_cast<uint64_t>(tv.tv_sec) * 1000ULL + static_cast<uint64_t>(tv.tv_usec / 1000);
        return true;
    }
};

// The hardware RNG. Before Wi-Fi starts it has no RF noise, so setup() draws with the SAR ADC
// entropy source enabled (bootloader_random_enable) around MeterCore::begin().
class EspRandom : public meter::Random {
public:
    uint32_t next32() override { return esp_random(); }
};

// NVS through Arduino's Preferences: wear-levelled and power-safe; the core throttles writes.
class NvsKv : public meter::KvStore {
public:
    void begin() { prefs_.begin("meter", false); }
    bool get(const char* key, std::vector<uint8_t>& out) override {
        size_t n = prefs_.getBytesLength(key);
        if (n == 0) return false;
        out.resize(n);
        return prefs_.getBytes(key, out.data(), n) == n;
    }
    bool put(const char* key, const uint8_t* data, size_t len) override {
        return prefs_.putBytes(key, data, len) == len;
    }

private:
    Preferences prefs_;
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
// it just cannot keep reports across a reboot.
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

class GpioRelay : public meter::Relay {
public:
    void begin() { pinMode(RELAY_PIN, OUTPUT); }
    void set(bool closed) override { digitalWrite(RELAY_PIN, (closed == (RELAY_ACTIVE_HIGH != 0)) ? HIGH : LOW); }
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
        Serial2.write(req, sizeof req);
        Serial2.flush();
        uint8_t resp[meter::pzem::kResponseBytes];
        size_t n = Serial2.readBytes(resp, sizeof resp);
        uint32_t wh = 0;
        if (!meter::pzem::parseEnergyWh(resp, n, PZEM_ADDRESS, wh)) return false;
        kwh = wh / 1000.0;
        return true;
    }
};

// ---- MQTT (esp_mqtt: QoS 1 with an outbox; PubSubClient cannot publish QoS 1) ----------------

struct Inbound {
    enum Kind : uint8_t { Connected, Disconnected, Data } kind;
    uint16_t topicLen;
    uint16_t dataLen;
    char topic[96];
    char data[meter::kMaxPayloadBytes];
};

QueueHandle_t g_inbound;
esp_mqtt_client_handle_t g_mqtt;
esp_mqtt_client_config_t g_mqttCfg = {};
std::atomic<int> g_inflight{0};
std::string g_commandFilter;  // smartmeter/{meterNo}/command/#
std::string g_willTopic, g_willPayload;

class EspMqttPublisher : public meter::Publisher {
public:
    int publish(const std::string& topic, const std::string& payload, int qos, bool retain) override {
        // Flow control: a refused report stays in the flash ring; without this, replaying a
        // long outage would move the whole ring into the outbox in RAM.
        if (!g_mqtt || (qos > 0 && g_inflight >= 8)) return -1;
        int id = esp_mqtt_client_enqueue(g_mqtt, topic.c_str(), payload.data(), static_cast<int>(payload.size()), qos,
                                         retain ? 1 : 0, true);
        if (id < 0) return -1;
        if (qos > 0) ++g_inflight;
        return id;
    }
};

void mqttEvent(void*, esp_event_base_t, int32_t eventId, void* eventData) {
    auto* ev = static_cast<esp_mqtt_event_handle_t>(eventData);
    static Inbound item;  // only the MQTT task runs this handler; static keeps it off its stack
    switch (static_cast<esp_mqtt_event_id_t>(eventId)) {
        case MQTT_EVENT_CONNECTED:
            esp_mqtt_client_subscribe(g_mqtt, g_commandFilter.c_str(), 1);
            item.kind = Inbound::Connected;
            xQueueSend(g_inbound, &item, portMAX_DELAY);
            break;
        case MQTT_EVENT_DISCONNECTED:
            // Unacknowledged messages are resent from the outbox or expire there; either way
            // they no longer count against the window.
            g_inflight = 0;
            item.kind = Inbound::Disconnected;
            xQueueSend(g_inbound, &item, portMAX_DELAY);
            break;
        case MQTT_EVENT_PUBLISHED:
            if (g_inflight > 0) --g_inflight;
            break;
        case MQTT_EVENT_DATA:
            // Commands are one small JSON object: a fragmented (oversized) message is dropped.
            if (ev->current_data_offset != 0 || ev->data_len != ev->total_data_len ||
                ev->data_len > static_cast<int>(sizeof item.data) || ev->topic_len > static_cast<int>(sizeof item.topic)) {
                break;
            }
            item.kind = Inbound::Data;
            item.topicLen = static_cast<uint16_t>(ev->topic_len);
            item.dataLen = static_cast<uint16_t>(ev->data_len);
            memcpy(item.topic, ev->topic, ev->topic_len);
            memcpy(item.data, ev->data, ev->data_len);
            xQueueSend(g_inbound, &item, pdMS_TO_TICKS(1000));
            break;
        default:
            break;
    }
}

// ---- the meter ----------------------------------------------------------------------------------

EspClock g_clock;
NvsKv g_kv;
PartitionFlash g_flash;
std::unique_ptr<meter::RecordLog> g_log;
GpioRelay g_relay;
PzemEnergy g_energy;
EspMqttPublisher g_publisher;
EspRandom g_random;
std::unique_ptr<meter::MeterCore> g_core;

meter::Backoff g_wifiBackoff(4000, 120000);  // association takes seconds: start at 2-4 s
meter::Backoff g_mqttBackoff(2000, 120000);
uint32_t g_nextWifiAttemptMs = 0;
uint32_t g_wifiWaitMs = 0;
bool g_mqttStarted = false;
bool g_otaStarted = false;
bool g_mqttConnected = false;
uint32_t g_offlineSinceMs = 0;

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

// The will carries the state at the time of the (re)connect; the core builds it.
void refreshWillAndBackoff() {
    meter::Message will = g_core->willMessage();
    g_willTopic = will.topic;
    g_willPayload = will.payload;
    g_mqttCfg.lwt_topic = g_willTopic.c_str();
    g_mqttCfg.lwt_msg = g_willPayload.c_str();
    g_mqttCfg.lwt_msg_len = static_cast<int>(g_willPayload.size());
    g_mqttCfg.lwt_qos = will.qos;
    g_mqttCfg.lwt_retain = will.retain ? 1 : 0;
    g_mqttCfg.reconnect_timeout_ms = static_cast<int>(g_mqttBackoff.nextDelayMs(esp_random()));
    esp_mqtt_set_config(g_mqtt, &g_mqttCfg);
}

// The OTA update hook (ArduinoOTA on the LAN, password-protected; off without a password).
void startOta() {
    ArduinoOTA.setHostname(METER_NO);
    ArduinoOTA.setPassword(OTA_PASSWORD);
    // Persist the meter state first (the device reboots into the new image) and open the relay
    // so that no energy flows unmetered while the flash is being rewritten.
    ArduinoOTA.onStart([] {
        g_core->persistNow();
        g_relay.set(false);
    });
    // A failed update restarts the old image, which restores the relay from the saved state.
    ArduinoOTA.onError([](ota_error_t) { ESP.restart(); });
    ArduinoOTA.begin();
}

void maintainWifi(uint32_t now) {
    if (WiFi.status() == WL_CONNECTED) {
        g_wifiBackoff.reset();
        if (!g_otaStarted && std::strlen(OTA_PASSWORD) > 0) {
            startOta();  // needs the network up (mDNS, UDP)
            g_otaStarted = true;
        }
        if (!g_mqttStarted) {
            refreshWillAndBackoff();
            esp_mqtt_client_start(g_mqtt);  // esp_mqtt reconnects by itself from now on
            g_mqttStarted = true;
        }
        return;
    }
    if (meter::elapsedMs(now, g_nextWifiAttemptMs) < g_wifiWaitMs) return;
    WiFi.disconnect();
    WiFi.begin(WIFI_SSID, WIFI_PASSWORD);
    g_nextWifiAttemptMs = now;
    g_wifiWaitMs = g_wifiBackoff.nextDelayMs(esp_random());
}

void drainInbound() {
    static Inbound item;
    while (xQueueReceive(g_inbound, &item, 0) == pdTRUE) {
        switch (item.kind) {
            case Inbound::Connected:
                g_mqttConnected = true;
                g_mqttBackoff.reset();
                g_core->onConnected();
                break;
            case Inbound::Disconnected:
                if (g_mqttConnected) g_offlineSinceMs = millis();
                g_mqttConnected = false;
                g_core->onDisconnected();
                refreshWillAndBackoff();  // next attempt: fresh will, jittered delay
                break;
            case Inbound::Data:
                g_core->onMessage(std::string(item.topic, item.topicLen), std::string(item.data, item.dataLen));
                break;
        }
    }
}

}  // namespace

void setup() {
    Serial.begin(115200);
    // Brown-out detection stays as the Arduino core's sdkconfig enables it: a sagging supply
    // resets the chip instead of corrupting flash writes, and the reset reason reports it.
    const char* reason = resetReasonName(esp_reset_reason());
    Serial.printf("=== ESP32 Smart Meter %s (%s), reset: %s ===\n", METER_NO, FW_VERSION, reason);

    esp_task_wdt_init(WATCHDOG_TIMEOUT_S, true);  // a hung loop reboots (reason task_wdt)
    esp_task_wdt_add(nullptr);

    g_relay.begin();
    g_energy.begin();
    g_kv.begin();
    if (g_flash.begin()) {
        g_log.reset(new meter::FlashRing(g_flash, 64));
    } else {
        Serial.println("no 'reports' partition: offline reports kept in RAM only");
        g_log.reset(new RamLog());
    }

    meter::MeterConfig cfg;
    cfg.meterNo = METER_NO;
    cfg.fwVersion = FW_VERSION;
    cfg.reportIntervalMs = REPORT_INTERVAL_MS;
    cfg.sensorFailTimeoutMs = SENSOR_FAIL_TIMEOUT_MS;
    cfg.lowBalanceThreshold = LOW_BALANCE_KWH;
    g_core.reset(new meter::MeterCore(cfg, g_clock, g_kv, *g_log, g_relay, g_energy, g_publisher, g_random, reason));
    bootloader_random_enable();  // true random numbers before Wi-Fi, for a regId drawn at begin()
    g_core->begin();             // relay set from the persisted balance before any network exists
    bootloader_random_disable(); // before Wi-Fi or the ADC are used

    sntp_set_time_sync_notification_cb(onTimeSynced);
    configTime(0, 0, NTP_SERVER_1, NTP_SERVER_2);

    g_inbound = xQueueCreate(4, sizeof(Inbound));
    g_commandFilter = g_core->topic("command/#");
    g_mqttCfg.uri = MQTT_URI;
    g_mqttCfg.client_id = METER_NO;
    g_mqttCfg.username = MQTT_USERNAME;
    g_mqttCfg.password = MQTT_PASSWORD;
    g_mqttCfg.cert_pem = MQTT_CA_PEM;
    g_mqttCfg.keepalive = 30;
    // Persistent session: balance commands published while the meter is offline are queued by
    // the broker and delivered on reconnect.
    g_mqttCfg.disable_clean_session = true;
    g_mqttCfg.buffer_size = 2048;
    g_mqtt = esp_mqtt_client_init(&g_mqttCfg);
    esp_mqtt_client_register_event(g_mqtt, static_cast<esp_mqtt_event_id_t>(ESP_EVENT_ANY_ID), mqttEvent, nullptr);

    WiFi.mode(WIFI_STA);
    WiFi.setAutoReconnect(false);  // our back-off decides when to retry
    g_offlineSinceMs = millis();

}

void loop() {
    esp_task_wdt_reset();
    uint32_t now = millis();
    maintainWifi(now);
    drainInbound();
    g_core->setWifiRssi(WiFi.status() == WL_CONNECTED ? WiFi.RSSI() : 0);
    g_core->loop();
    if (g_otaStarted) ArduinoOTA.handle();
    if (!g_mqttConnected && meter::elapsedMs(now, g_offlineSinceMs) >= REBOOT_AFTER_OFFLINE_MS) {
        g_core->persistNow();
        ESP.restart();
    }
    delay(10);
}

#pragma once
// Arduino-ESP32 2.0.x WiFi (WiFiSTA.h, WiFiGeneric.h): the members main.cpp uses.
#include <cstdint>
typedef enum { WL_IDLE_STATUS = 0, WL_NO_SSID_AVAIL = 1, WL_CONNECTED = 3, WL_CONNECT_FAILED = 4,
               WL_DISCONNECTED = 6 } wl_status_t;
typedef enum { WIFI_MODE_NULL = 0, WIFI_MODE_STA = 1 } wifi_mode_t;
#define WIFI_STA WIFI_MODE_STA
class WiFiClass {
public:
    wl_status_t status();
    wl_status_t begin(const char* ssid, const char* passphrase = nullptr, int32_t channel = 0,
                      const uint8_t* bssid = nullptr, bool connect = true);
    bool disconnect(bool wifioff = false, bool eraseap = false);
    bool mode(wifi_mode_t m);
    bool setAutoReconnect(bool autoReconnect);
    int8_t RSSI();
};
extern WiFiClass WiFi;

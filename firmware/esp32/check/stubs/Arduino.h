#pragma once
// Arduino-ESP32 2.0.x: the members main.cpp uses (HardwareSerial.h, Stream.h, esp32-hal.h).
#include <cstddef>
#include <cstdint>
#include "esp_system.h"
#include "freertos/FreeRTOS.h"
#define SERIAL_8N1 0x800001c
extern "C" unsigned long millis();
extern "C" void delay(uint32_t ms);
class HardwareSerial {
public:
    void begin(unsigned long baud, uint32_t config = SERIAL_8N1, int8_t rxPin = -1, int8_t txPin = -1,
               bool invert = false, unsigned long timeout_ms = 20000UL, uint8_t rxfifo_full_thrhd = 112);
    void setTimeout(unsigned long timeout);
    size_t setRxBufferSize(size_t new_size);  // before begin(); 0 on failure
    int available();
    int read();
    size_t write(const uint8_t* buffer, size_t size);
    void flush();
    size_t readBytes(uint8_t* buffer, size_t length);
    size_t printf(const char* format, ...) __attribute__((format(printf, 2, 3)));
    size_t println(const char* s);
};
extern HardwareSerial Serial;
extern HardwareSerial Serial2;
void configTime(long gmtOffset_sec, int daylightOffset_sec, const char* server1, const char* server2 = nullptr,
                const char* server3 = nullptr);

// Reconnect back-off for Wi-Fi and MQTT: exponential, capped near 2 minutes, with jitter so
// that thousands of meters coming back after a grid outage do not hit the broker in lockstep.
#pragma once

#include <cstdint>

namespace meter {

class Backoff {
public:
    explicit Backoff(uint32_t baseMs = 1000, uint32_t capMs = 120000) : baseMs_(baseMs), capMs_(capMs) {}

    // Delay before the next attempt, given a uniformly random 32-bit number (esp_random() on the
    // device). "Equal jitter": half the exponential step is fixed, half random, so a meter never
    // retries in a tight loop yet meters spread out.
    uint32_t nextDelayMs(uint32_t random32);
    void reset() { attempts_ = 0; }
    uint32_t attempts() const { return attempts_; }

private:
    uint32_t baseMs_;
    uint32_t capMs_;
    uint32_t attempts_ = 0;
};

}  // namespace meter

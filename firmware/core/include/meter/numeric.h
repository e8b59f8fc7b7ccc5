// Small arithmetic rules that the Python simulator (devtools/sim/meter_core.py) repeats
// word for word: the contract test compares both sides' payloads, so each rule exists once here
// and once there, with the same operations in the same order.
#pragma once

#include <cmath>
#include <cstdint>

namespace meter {

// Milliseconds from `since` to `now` on a 32-bit millis() counter. Unsigned subtraction is
// modulo 2^32, so the result is right across the wrap at 49.7 days as long as the real gap is
// below 2^32 ms; comparing `now >= since + interval` instead breaks at the wrap.
inline uint32_t elapsedMs(uint32_t now, uint32_t since) { return static_cast<uint32_t>(now - since); }

// Payload numbers carry 6 decimals (1 mWh resolution is below the PZEM's 1 Wh register step).
// floor(x*1e6 + 0.5) / 1e6 is "round half up"; Python writes math.floor(x * 1e6 + 0.5) / 1e6.
// Both are IEEE doubles with the same three operations, so the results are bit-identical.
inline double round6(double x) { return std::floor(x * 1e6 + 0.5) / 1e6; }

// Extends the 32-bit millis() into a 64-bit uptime that never wraps: used for "ms since boot"
// timestamps before SNTP sync and for the status `uptime`.
class UptimeCounter {
public:
    explicit UptimeCounter(uint32_t bootMillis) : last_(bootMillis) {}
    uint64_t update(uint32_t nowMillis) {
        total_ += elapsedMs(nowMillis, last_);
        last_ = nowMillis;
        return total_;
    }
    uint64_t total() const { return total_; }

private:
    uint32_t last_;
    uint64_t total_ = 0;
};

}  // namespace meter

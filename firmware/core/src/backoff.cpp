#include "meter/backoff.h"

namespace meter {

uint32_t Backoff::nextDelayMs(uint32_t random32) {
    uint64_t step = baseMs_;
    // Shift with a bound so that attempt 40 does not overflow into a short delay.
    for (uint32_t i = 0; i < attempts_ && step < capMs_; ++i) step *= 2;
    if (step > capMs_) step = capMs_;
    ++attempts_;
    uint64_t half = step / 2;
    return static_cast<uint32_t>(half + random32 % (step - half + 1));
}

}  // namespace meter

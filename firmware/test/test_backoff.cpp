#include <doctest/doctest.h>

#include "meter/backoff.h"

using meter::Backoff;

TEST_CASE("back-off doubles, is jittered within [step/2, step] and caps near two minutes") {
    Backoff b(1000, 120000);
    uint32_t steps[] = {1000, 2000, 4000, 8000, 16000, 32000, 64000, 120000, 120000, 120000};
    for (uint32_t step : steps) {
        Backoff lo = b, hi = b;
        CHECK(lo.nextDelayMs(0) == step / 2);
        CHECK(hi.nextDelayMs(0xFFFFFFFFu) <= step);
        uint32_t d = b.nextDelayMs(123456789u);
        CHECK(d >= step / 2);
        CHECK(d <= step);
    }
    for (int i = 0; i < 100; ++i) CHECK(b.nextDelayMs(0xFFFFFFFFu) <= 120000);  // no overflow
    b.reset();
    CHECK(b.nextDelayMs(0) == 500);
}

TEST_CASE("different random numbers spread the retries") {
    Backoff a(1000, 120000), c(1000, 120000);
    for (int i = 0; i < 7; ++i) {
        a.nextDelayMs(1);
        c.nextDelayMs(1);
    }
    CHECK(a.nextDelayMs(7) != c.nextDelayMs(40000));
}

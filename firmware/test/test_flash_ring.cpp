// The offline ring: order, recovery, overflow, and power cuts in the middle of writes.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "meter/flash_ring.h"
#include "meter/host_fakes.h"

using namespace meter;

namespace {
std::vector<uint8_t> rec(int i) {
    std::string s = "record-" + std::to_string(i);
    return std::vector<uint8_t>(s.begin(), s.end());
}
bool append(FlashRing& r, int i) {
    auto v = rec(i);
    return r.append(v.data(), v.size());
}
// Pops everything, returning the record numbers in order.
std::vector<int> drain(FlashRing& r) {
    std::vector<int> out;
    std::vector<uint8_t> v;
    while (r.peekOldest(v)) {
        out.push_back(std::stoi(std::string(v.begin() + 7, v.end())));
        r.popOldest();
    }
    return out;
}
std::vector<int> range(int from, int to) {
    std::vector<int> v;
    for (int i = from; i <= to; ++i) v.push_back(i);
    return v;
}
}  // namespace

TEST_CASE("records come back oldest-first, also after a reboot") {
    MemFlash flash(8 * 64, 64);
    {
        FlashRing ring(flash, 64);
        for (int i = 1; i <= 5; ++i) REQUIRE(append(ring, i));
        std::vector<uint8_t> v;
        REQUIRE(ring.peekOldest(v));
        REQUIRE(ring.popOldest());  // 1 consumed before the reboot
    }
    FlashRing after(flash, 64);
    CHECK(after.size() == 4);
    CHECK(drain(after) == range(2, 5));
    FlashRing again(flash, 64);
    CHECK(again.size() == 0);
    REQUIRE(append(again, 6));
    CHECK(drain(again) == std::vector<int>{6});
}

TEST_CASE("a full ring with one slot per sector drops exactly the oldest record") {
    MemFlash flash(4 * 64, 64);
    FlashRing ring(flash, 64);
    for (int i = 1; i <= 7; ++i) REQUIRE(append(ring, i));
    CHECK(ring.size() == 4);
    CHECK(ring.droppedRecords() == 3);
    FlashRing after(flash, 64);
    CHECK(drain(after) == range(4, 7));
}

TEST_CASE("with several slots per sector, wrapping erases the oldest sector") {
    MemFlash flash(4 * 256, 256);  // 4 sectors of 4 slots
    FlashRing ring(flash, 64);
    for (int i = 1; i <= 17; ++i) REQUIRE(append(ring, i));
    // Slot 16 wrapped to slot 0: sector 0 (records 1-4) was erased for record 17.
    CHECK(ring.size() == 13);
    FlashRing after(flash, 64);
    CHECK(drain(after) == range(5, 17));
}

TEST_CASE("a power cut at any byte of an append loses at most that record") {
    // Record 4 lands at a sector start when a sector holds one slot (erase + body + commit byte)
    // and mid-sector when it holds four (body + commit byte): both paths are cut at every byte.
    for (size_t sectorSlots : {1u, 4u}) {
        int tornSeen = 0, wholeSeen = 0;
        for (size_t cut = 0; cut < 64 + 64; ++cut) {
            CAPTURE(sectorSlots);
            CAPTURE(cut);
            MemFlash flash(8 * 64, 64 * sectorSlots);
            bool lost;
            {
                FlashRing ring(flash, 64);
                for (int i = 1; i <= 3; ++i) REQUIRE(append(ring, i));
                flash.cutPowerAfter(cut);
                bool ok = append(ring, 4);
                lost = flash.powerLost();
                CHECK(ok == !lost);
            }
            flash.restorePower();
            FlashRing recovered(flash, 64);
            // The commit byte is written last: an interrupted append leaves no record at all.
            CHECK(drain(recovered) == (lost ? range(1, 3) : range(1, 4)));
            (lost ? tornSeen : wholeSeen)++;
            // The ring keeps working after the cut: the torn slot is skipped or erased.
            REQUIRE(append(recovered, 5));
            REQUIRE(append(recovered, 6));
            FlashRing later(flash, 64);
            CHECK(drain(later) == std::vector<int>{5, 6});
        }
        CHECK(tornSeen > 10);
        CHECK(wholeSeen > 10);
    }
}

TEST_CASE("a power cut while marking a record consumed replays it, never loses it") {
    MemFlash flash(8 * 64, 64);
    {
        FlashRing ring(flash, 64);
        for (int i = 1; i <= 3; ++i) REQUIRE(append(ring, i));
        flash.cutPowerAfter(0);
        ring.popOldest();
    }
    flash.restorePower();
    FlashRing after(flash, 64);
    CHECK(drain(after) == range(1, 3));
}

TEST_CASE("a corrupted record fails its CRC and is skipped") {
    MemFlash flash(8 * 64, 64);
    {
        FlashRing ring(flash, 64);
        for (int i = 1; i <= 3; ++i) REQUIRE(append(ring, i));
    }
    const uint8_t flip = 0x00;  // clear a payload byte of record 2 (slot 1)
    REQUIRE(flash.program(64 + FlashRing::kHeaderBytes + 2, &flip, 1));
    FlashRing after(flash, 64);
    CHECK(drain(after) == std::vector<int>{1, 3});
}

TEST_CASE("oversized records are refused") {
    MemFlash flash(4 * 64, 64);
    FlashRing ring(flash, 64);
    std::vector<uint8_t> big(ring.maxPayload() + 1, 1);
    CHECK_FALSE(ring.append(big.data(), big.size()));
    CHECK(ring.size() == 0);
}

TEST_CASE("crc32 matches the standard check value") {
    const char* s = "123456789";
    CHECK(crc32(reinterpret_cast<const uint8_t*>(s), 9) == 0xCBF43926u);
}

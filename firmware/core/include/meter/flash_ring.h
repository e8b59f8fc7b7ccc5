// A power-safe fixed-size ring of records on NOR flash (the offline report buffer).
//
// Flash is divided into equal slots; each slot holds one record:
//   [0]      state byte: 0xFF empty, 0xFE committed, 0xFC consumed (each step only clears bits,
//            so it is programmed in place without an erase)
//   [1..4]   record counter (u32 LE), strictly increasing over the ring's life
//   [5..6]   payload length (u16 LE)
//   [7..10]  CRC-32 over counter, length and payload
//   [11..]   payload
// A record is written body first and committed by its state byte last. A power cut in the
// middle leaves a slot that is not committed or whose CRC fails: recovery skips it, and the
// records before it are untouched because nothing is ever rewritten in place (rewriting a file
// in place is a known boot-loop cause in ESP32 energy firmware).
// When the ring is full, the sector holding the oldest records is erased before reuse: the
// newest reports matter most, since each one carries the whole energy register.
// Records are consumed in any order (a report is consumed when its PUBACK arrives, and the
// broker may acknowledge a resent report after a newer one); the key of a record is its counter.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <vector>

#include "meter/interfaces.h"

namespace meter {

uint32_t crc32(const uint8_t* data, size_t len, uint32_t crc = 0);

class FlashRing : public RecordLog {
public:
    static constexpr size_t kHeaderBytes = 11;
    static constexpr uint8_t kEmpty = 0xFF;
    static constexpr uint8_t kCommitted = 0xFE;
    static constexpr uint8_t kConsumed = 0xFC;

    // slotSize must divide the flash's sector size; the flash size must be a whole number of
    // sectors with at least two sectors, so that erasing one never empties the ring entirely.
    FlashRing(FlashRegion& flash, size_t slotSize);

    // Rebuilds the in-RAM index from flash (called by the constructor; after a reboot the
    // constructor of a new FlashRing over the same flash is the recovery).
    void recover();

    bool append(const uint8_t* data, size_t len) override;
    bool peekAt(size_t index, std::vector<uint8_t>& out, uint32_t& key) override;
    bool consume(uint32_t key) override;
    bool peekNewest(std::vector<uint8_t>& out) override;
    size_t size() const override { return pending_.size(); }

    size_t slotCount() const { return slotCount_; }
    size_t maxPayload() const { return slotSize_ - kHeaderBytes; }
    size_t droppedRecords() const { return dropped_; }

private:
    bool readSlot(size_t slot, std::vector<uint8_t>& payload, uint32_t& counter, uint8_t& state);
    bool slotBlank(size_t slot);
    void eraseSectorOf(size_t slot);

    FlashRegion& flash_;
    size_t slotSize_;
    size_t slotCount_;
    size_t slotsPerSector_;
    size_t writeSlot_ = 0;   // next slot to try
    uint32_t nextCounter_ = 1;
    struct Pending {
        size_t slot;
        uint32_t counter;  // the record's key
    };
    std::deque<Pending> pending_;  // committed, not consumed, oldest first
    bool haveNewest_ = false;     // newestSlot_ holds the highest-counter record (any state)
    size_t newestSlot_ = 0;
    size_t dropped_ = 0;
};

}  // namespace meter

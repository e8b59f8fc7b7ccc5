#include "meter/flash_ring.h"

#include <algorithm>
#include <utility>

namespace meter {

uint32_t crc32(const uint8_t* data, size_t len, uint32_t crc) {
    // Bitwise CRC-32 (IEEE 802.3, reflected): no 1 KiB table in RAM for a 48-byte record.
    crc = ~crc;
    for (size_t i = 0; i < len; ++i) {
        crc ^= data[i];
        for (int k = 0; k < 8; ++k) crc = (crc >> 1) ^ (0xEDB88320u & (0u - (crc & 1u)));
    }
    return ~crc;
}

namespace {
void putU32(uint8_t* p, uint32_t v) {
    for (int i = 0; i < 4; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint32_t getU32(const uint8_t* p) {
    return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8) |
           (static_cast<uint32_t>(p[2]) << 16) | (static_cast<uint32_t>(p[3]) << 24);
}
}  // namespace

FlashRing::FlashRing(FlashRegion& flash, size_t slotSize)
    : flash_(flash),
      slotSize_(slotSize),
      slotCount_(flash.size() / slotSize),
      slotsPerSector_(flash.sectorSize() / slotSize) {
    recover();
}

bool FlashRing::readSlot(size_t slot, std::vector<uint8_t>& payload, uint32_t& counter, uint8_t& state) {
    uint8_t h[kHeaderBytes];
    if (!flash_.read(slot * slotSize_, h, sizeof h)) return false;
    state = h[0];
    if (state != kCommitted && state != kConsumed) return false;
    counter = getU32(h + 1);
    size_t len = static_cast<size_t>(h[5]) | (static_cast<size_t>(h[6]) << 8);
    if (len > maxPayload()) return false;
    payload.resize(len);
    if (len && !flash_.read(slot * slotSize_ + kHeaderBytes, payload.data(), len)) return false;
    uint32_t crc = crc32(h + 1, 6);
    crc = crc32(payload.data(), len, crc);
    return crc == getU32(h + 7);
}

bool FlashRing::slotBlank(size_t slot) {
    std::vector<uint8_t> buf(slotSize_);
    if (!flash_.read(slot * slotSize_, buf.data(), buf.size())) return false;
    return std::all_of(buf.begin(), buf.end(), [](uint8_t b) { return b == 0xFF; });
}

void FlashRing::recover() {
    pending_.clear();
    haveNewest_ = false;
    std::vector<std::pair<uint32_t, size_t>> live;  // (counter, slot) of unconsumed records
    uint32_t maxCounter = 0;
    size_t maxSlot = slotCount_ - 1;  // so that an empty ring starts writing at slot 0
    std::vector<uint8_t> payload;
    for (size_t s = 0; s < slotCount_; ++s) {
        uint32_t counter;
        uint8_t state;
        if (!readSlot(s, payload, counter, state)) continue;  // empty, torn or corrupt
        if (counter >= maxCounter) {
            maxCounter = counter;
            maxSlot = s;
            haveNewest_ = true;
            newestSlot_ = s;
        }
        if (state == kCommitted) live.emplace_back(counter, s);
    }
    std::sort(live.begin(), live.end());
    for (const auto& e : live) pending_.push_back({e.second, e.first});
    nextCounter_ = maxCounter + 1;
    writeSlot_ = (maxSlot + 1) % slotCount_;
}

void FlashRing::eraseSectorOf(size_t slot) {
    size_t sector = slot / slotsPerSector_;
    size_t first = sector * slotsPerSector_;
    size_t last = first + slotsPerSector_;
    size_t before = pending_.size();
    pending_.erase(std::remove_if(pending_.begin(), pending_.end(),
                                  [&](const Pending& p) { return p.slot >= first && p.slot < last; }),
                   pending_.end());
    dropped_ += before - pending_.size();
    flash_.eraseSector(sector);
}

bool FlashRing::append(const uint8_t* data, size_t len) {
    if (len > maxPayload()) return false;
    // Find a blank slot: a slot left torn by a power cut is skipped, and entering a new sector
    // erases it first. At most one full turn, because an erased sector is blank.
    for (size_t tries = 0; tries <= slotCount_; ++tries) {
        size_t slot = writeSlot_;
        if (slot % slotsPerSector_ == 0) eraseSectorOf(slot);
        writeSlot_ = (writeSlot_ + 1) % slotCount_;
        if (!slotBlank(slot)) continue;

        std::vector<uint8_t> body(kHeaderBytes - 1 + len);
        putU32(body.data(), nextCounter_);
        body[4] = static_cast<uint8_t>(len & 0xFF);
        body[5] = static_cast<uint8_t>(len >> 8);
        uint32_t crc = crc32(body.data(), 6);
        crc = crc32(data, len, crc);
        putU32(body.data() + 6, crc);
        std::copy(data, data + len, body.begin() + 10);
        if (!flash_.program(slot * slotSize_ + 1, body.data(), body.size())) return false;
        const uint8_t commit = kCommitted;
        if (!flash_.program(slot * slotSize_, &commit, 1)) return false;
        pending_.push_back({slot, nextCounter_});
        ++nextCounter_;
        haveNewest_ = true;
        newestSlot_ = slot;
        return true;
    }
    return false;
}

bool FlashRing::peekAt(size_t index, std::vector<uint8_t>& out, uint32_t& key) {
    while (index < pending_.size()) {
        uint32_t counter;
        uint8_t state;
        const Pending p = pending_[index];
        if (readSlot(p.slot, out, counter, state) && state == kCommitted && counter == p.counter) {
            key = p.counter;
            return true;
        }
        // Went bad since recovery (flash fault): drop it, keep the rest.
        pending_.erase(pending_.begin() + static_cast<long>(index));
        ++dropped_;
    }
    return false;
}

bool FlashRing::peekNewest(std::vector<uint8_t>& out) {
    // Consumed records stay readable until their sector is erased for reuse, and the sector
    // being written is the one erased last, so the newest record survives replay and reboots.
    uint32_t counter;
    uint8_t state;
    return haveNewest_ && readSlot(newestSlot_, out, counter, state);
}

bool FlashRing::consume(uint32_t key) {
    for (auto it = pending_.begin(); it != pending_.end(); ++it) {
        if (it->counter != key) continue;
        // A power cut before this byte lands sends the record once more after reboot: a
        // duplicate that the backend absorbs (same regId and seq), never a loss.
        const uint8_t consumed = kConsumed;
        bool ok = flash_.program(it->slot * slotSize_, &consumed, 1);
        pending_.erase(it);
        return ok;
    }
    return false;
}

}  // namespace meter

// PZEM-004T v3 Modbus-RTU framing, kept portable so that it is tested on the host; the ESP32
// glue only moves these bytes over the UART. The energy register (input registers 0x0005 low
// word, 0x0006 high word) counts whole Wh in the sensor's own non-volatile memory.
#pragma once

#include <cstddef>
#include <cstdint>

namespace meter {
namespace pzem {

constexpr uint8_t kDefaultAddress = 0xF8;  // the PZEM's "general" address (single sensor on the bus)
constexpr size_t kRequestBytes = 8;
constexpr size_t kResponseBytes = 25;  // addr, fn, byte count (20), 10 registers, CRC

uint16_t crc16(const uint8_t* data, size_t len);  // CRC-16/MODBUS

// "Read input registers 0..9" request.
void buildReadRequest(uint8_t address, uint8_t out[kRequestBytes]);

// Parses a full response; false on wrong length, address, function, byte count or CRC.
bool parseEnergyWh(const uint8_t* frame, size_t len, uint8_t address, uint32_t& energyWh);

}  // namespace pzem
}  // namespace meter

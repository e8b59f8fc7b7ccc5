#include "meter/pzem.h"

namespace meter {
namespace pzem {

uint16_t crc16(const uint8_t* data, size_t len) {
    uint16_t crc = 0xFFFF;
    for (size_t i = 0; i < len; ++i) {
        crc ^= data[i];
        for (int k = 0; k < 8; ++k) crc = (crc & 1) ? static_cast<uint16_t>((crc >> 1) ^ 0xA001) : static_cast<uint16_t>(crc >> 1);
    }
    return crc;
}

void buildReadRequest(uint8_t address, uint8_t out[kRequestBytes]) {
    out[0] = address;
    out[1] = 0x04;  // read input registers
    out[2] = 0x00;  // start register 0x0000
    out[3] = 0x00;
    out[4] = 0x00;  // 10 registers
    out[5] = 0x0A;
    uint16_t crc = crc16(out, 6);
    out[6] = static_cast<uint8_t>(crc & 0xFF);  // Modbus sends the CRC low byte first
    out[7] = static_cast<uint8_t>(crc >> 8);
}

bool parseEnergyWh(const uint8_t* f, size_t len, uint8_t address, uint32_t& energyWh) {
    if (len != kResponseBytes || f[0] != address || f[1] != 0x04 || f[2] != 20) return false;
    uint16_t crc = crc16(f, len - 2);
    if (f[len - 2] != (crc & 0xFF) || f[len - 1] != (crc >> 8)) return false;
    // Register n starts at byte 3 + 2n, big-endian within the register.
    auto reg = [f](int n) { return static_cast<uint32_t>((f[3 + 2 * n] << 8) | f[4 + 2 * n]); };
    energyWh = reg(5) | (reg(6) << 16);
    return true;
}

}  // namespace pzem
}  // namespace meter

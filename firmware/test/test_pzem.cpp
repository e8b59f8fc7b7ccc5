#include <doctest/doctest.h>

#include "meter/pzem.h"

using namespace meter::pzem;

namespace {
// A response frame as the PZEM sends it, with the energy register set to `wh`.
void frame(uint8_t out[kResponseBytes], uint32_t wh) {
    uint8_t f[kResponseBytes] = {kDefaultAddress, 0x04, 20};
    f[3] = 0x08;  // voltage 230.0 V (2300 in 0.1 V)
    f[4] = 0xFC;
    f[3 + 10] = static_cast<uint8_t>((wh >> 8) & 0xFF);  // register 5: low word
    f[4 + 10] = static_cast<uint8_t>(wh & 0xFF);
    f[3 + 12] = static_cast<uint8_t>((wh >> 24) & 0xFF);  // register 6: high word
    f[4 + 12] = static_cast<uint8_t>((wh >> 16) & 0xFF);
    uint16_t crc = crc16(f, kResponseBytes - 2);
    f[23] = static_cast<uint8_t>(crc & 0xFF);
    f[24] = static_cast<uint8_t>(crc >> 8);
    for (size_t i = 0; i < kResponseBytes; ++i) out[i] = f[i];
}
}  // namespace

TEST_CASE("CRC-16/MODBUS check value and the read request") {
    const uint8_t check[] = {'1', '2', '3', '4', '5', '6', '7', '8', '9'};
    CHECK(crc16(check, sizeof check) == 0x4B37);
    uint8_t req[kRequestBytes];
    buildReadRequest(0x01, req);
    const uint8_t expected[kRequestBytes] = {0x01, 0x04, 0x00, 0x00, 0x00, 0x0A, 0x70, 0x0D};
    for (size_t i = 0; i < kRequestBytes; ++i) CHECK(req[i] == expected[i]);
}

TEST_CASE("the 32-bit energy register is decoded from two words, and bad frames are refused") {
    uint8_t f[kResponseBytes];
    frame(f, 0x0012ABCDu);
    uint32_t wh = 0;
    REQUIRE(parseEnergyWh(f, kResponseBytes, kDefaultAddress, wh));
    CHECK(wh == 0x0012ABCDu);
    CHECK_FALSE(parseEnergyWh(f, kResponseBytes, 0x01, wh));      // another sensor's answer
    CHECK_FALSE(parseEnergyWh(f, kResponseBytes - 1, kDefaultAddress, wh));
    f[12] ^= 0x01;  // line noise
    CHECK_FALSE(parseEnergyWh(f, kResponseBytes, kDefaultAddress, wh));
}

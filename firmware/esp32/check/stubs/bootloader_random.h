#pragma once
extern "C" void bootloader_random_enable(void);
extern "C" void bootloader_random_disable(void);

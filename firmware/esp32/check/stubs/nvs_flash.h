#pragma once
// ESP-IDF 4.4 nvs_flash.h: the function main.cpp uses.
#include "esp_err.h"
#include "nvs.h"
extern "C" esp_err_t nvs_flash_init_partition(const char* partition_label);

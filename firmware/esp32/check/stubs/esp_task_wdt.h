#pragma once
#include <cstdint>
#include "esp_err.h"
#include "freertos/FreeRTOS.h"
extern "C" esp_err_t esp_task_wdt_init(uint32_t timeout, bool panic);
extern "C" esp_err_t esp_task_wdt_add(TaskHandle_t handle);
extern "C" esp_err_t esp_task_wdt_reset(void);

#pragma once
#include "esp_err.h"
#include "esp_partition.h"
extern "C" esp_err_t esp_ota_mark_app_valid_cancel_rollback(void);
extern "C" esp_err_t esp_ota_mark_app_invalid_rollback_and_reboot(void);
extern "C" const esp_partition_t* esp_ota_get_next_update_partition(const esp_partition_t* start_from);
extern "C" esp_err_t esp_ota_set_boot_partition(const esp_partition_t* partition);

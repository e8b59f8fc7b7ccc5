#pragma once
#include <cstddef>
#include <cstdint>
#include "esp_err.h"
#define NVS_DEFAULT_PART_NAME "nvs"
typedef uint32_t nvs_handle_t;
typedef enum { NVS_READONLY, NVS_READWRITE } nvs_open_mode_t;
extern "C" esp_err_t nvs_open(const char* name, nvs_open_mode_t open_mode, nvs_handle_t* out_handle);
extern "C" esp_err_t nvs_get_blob(nvs_handle_t handle, const char* key, void* out_value, size_t* length);
extern "C" esp_err_t nvs_set_blob(nvs_handle_t handle, const char* key, const void* value, size_t length);
extern "C" esp_err_t nvs_commit(nvs_handle_t handle);
extern "C" esp_err_t nvs_open_from_partition(const char* part_name, const char* name, nvs_open_mode_t open_mode,
                                             nvs_handle_t* out_handle);
extern "C" esp_err_t nvs_erase_key(nvs_handle_t handle, const char* key);

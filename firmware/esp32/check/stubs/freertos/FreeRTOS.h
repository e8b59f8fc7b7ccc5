#pragma once
#include <cstdint>
typedef int BaseType_t;
typedef unsigned int UBaseType_t;
typedef uint32_t TickType_t;
typedef void* TaskHandle_t;
typedef void* QueueHandle_t;
typedef void (*TaskFunction_t)(void*);
#define pdTRUE 1
#define pdPASS 1
extern "C" QueueHandle_t xQueueCreate(UBaseType_t uxQueueLength, UBaseType_t uxItemSize);  // a macro on the device
extern "C" BaseType_t xQueueSend(QueueHandle_t xQueue, const void* pvItemToQueue, TickType_t xTicksToWait);
extern "C" BaseType_t xQueueReceive(QueueHandle_t xQueue, void* pvBuffer, TickType_t xTicksToWait);
extern "C" BaseType_t xTaskCreate(TaskFunction_t pvTaskCode, const char* const pcName, const uint32_t usStackDepth,
                                  void* const pvParameters, UBaseType_t uxPriority, TaskHandle_t* const pvCreatedTask);
extern "C" void vTaskDelete(TaskHandle_t xTaskToDelete);
extern "C" void vTaskDelay(const TickType_t xTicksToDelay);

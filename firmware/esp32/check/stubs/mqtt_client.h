#pragma once
#include <cstddef>
#include <cstdint>
#include "esp_err.h"
typedef const char* esp_event_base_t;
typedef void (*esp_event_handler_t)(void* event_handler_arg, esp_event_base_t event_base, int32_t event_id,
                                    void* event_data);
#define ESP_EVENT_ANY_ID -1
typedef struct esp_mqtt_client* esp_mqtt_client_handle_t;
typedef enum {
    MQTT_EVENT_ANY = -1, MQTT_EVENT_ERROR = 0, MQTT_EVENT_CONNECTED, MQTT_EVENT_DISCONNECTED, MQTT_EVENT_SUBSCRIBED,
    MQTT_EVENT_UNSUBSCRIBED, MQTT_EVENT_PUBLISHED, MQTT_EVENT_DATA, MQTT_EVENT_BEFORE_CONNECT, MQTT_EVENT_DELETED,
} esp_mqtt_event_id_t;
typedef struct {  // the fields main.cpp reads
    esp_mqtt_event_id_t event_id;
    esp_mqtt_client_handle_t client;
    char* data;
    int data_len;
    int total_data_len;
    int current_data_offset;
    char* topic;
    int topic_len;
    int msg_id;
} esp_mqtt_event_t;
typedef esp_mqtt_event_t* esp_mqtt_event_handle_t;
typedef struct {  // the fields main.cpp sets
    const char* uri;
    const char* client_id;
    const char* username;
    const char* password;
    const char* lwt_topic;
    const char* lwt_msg;
    int lwt_qos;
    int lwt_retain;
    int lwt_msg_len;
    int disable_clean_session;
    int keepalive;
    bool disable_auto_reconnect;
    int buffer_size;
    const char* cert_pem;
} esp_mqtt_client_config_t;
extern "C" esp_mqtt_client_handle_t esp_mqtt_client_init(const esp_mqtt_client_config_t* config);
extern "C" esp_err_t esp_mqtt_client_start(esp_mqtt_client_handle_t client);
extern "C" esp_err_t esp_mqtt_client_reconnect(esp_mqtt_client_handle_t client);
extern "C" int esp_mqtt_client_subscribe(esp_mqtt_client_handle_t client, const char* topic, int qos);
extern "C" int esp_mqtt_client_enqueue(esp_mqtt_client_handle_t client, const char* topic, const char* data, int len,
                                       int qos, int retain, bool store);
extern "C" esp_err_t esp_mqtt_set_config(esp_mqtt_client_handle_t client, const esp_mqtt_client_config_t* config);
extern "C" esp_err_t esp_mqtt_client_register_event(esp_mqtt_client_handle_t client, esp_mqtt_event_id_t event,
                                                    esp_event_handler_t event_handler, void* event_handler_arg);
extern "C" int esp_mqtt_client_get_outbox_size(esp_mqtt_client_handle_t client);

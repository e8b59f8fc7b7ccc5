from django.apps import AppConfig


class MqttWorkerConfig(AppConfig):
    name = "mqtt_worker"
    verbose_name = "MQTT worker"

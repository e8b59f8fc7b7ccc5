from django.apps import AppConfig


class MqttWorkerConfig(AppConfig):
    name = "mqtt_worker"
    verbose_name = "MQTT worker"

    def ready(self):
        from meters.outbox import register_command_dispatcher
        # Services write command rows and call the dispatchers after commit; the Celery task
        # publishes them. If this hint is lost, the beat sweep publishes the rows anyway.
        register_command_dispatcher(_dispatch_to_celery)


def _dispatch_to_celery(command_ids: list[int]) -> None:
    from mqtt_worker.tasks import publish_meter_commands

    publish_meter_commands.delay(command_ids)

"""Writes of the MQTT side's own rows: dead letters (PROTOCOL.md "Bad input") and the backend's
broker users; and the export of every broker account into the broker's files."""

from datetime import datetime
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Max
from django.utils import timezone

from core.broker_auth import SERVICE_USERNAME_HELP, mosquitto_hash, mosquitto_verify, new_password, valid_service_username
from core.errors import InvalidInput
from meters.selectors import meter_broker_accounts, meter_broker_accounts_marker
from mqtt_worker.broker_files import ServiceAccount, reload_broker, write_auth_files
from mqtt_worker.models import BrokerServiceUser, DeadLetter


def dead_letters_store(*, letters: list[tuple[str, bytes, str]], client_id: str, at: datetime | None = None) -> None:
    """Keep messages the worker could not accept, raw, with the reason: (topic, payload, reason)."""
    at = at or timezone.now()
    DeadLetter.objects.bulk_create(
        DeadLetter(topic=topic[:255], payload=payload, reason=reason[:255], received_at=at, client_id=client_id[:64])
        for topic, payload, reason in letters
    )


def service_user_set(*, username: str, can_ingest: bool, can_publish: bool, password: str | None = None) -> str:
    """Create or update a backend broker user; returns its password (a new random one unless
    given). A password that already matches keeps its hash, so running this again with the same
    settings changes nothing the exporter would notice."""
    if not valid_service_username(username):
        raise InvalidInput(f"A backend broker user is named {SERVICE_USERNAME_HELP}, got {username!r}", field="username")
    if not (can_ingest or can_publish):
        raise InvalidInput("A backend broker user ingests, publishes or both", field="username")
    password = password or new_password()
    with transaction.atomic():
        user = BrokerServiceUser.objects.select_for_update().filter(username=username).first()
        if user is not None and mosquitto_verify(password, user.password_hash) and (user.can_ingest, user.can_publish) == (
            can_ingest, can_publish
        ):
            return password
        BrokerServiceUser.objects.update_or_create(
            username=username,
            defaults={"can_ingest": can_ingest, "can_publish": can_publish, "password_hash": mosquitto_hash(password),
                      "changed_at": timezone.now()},
        )
    return password


def service_users_from_settings() -> list[str]:
    """The broker users that MQTT_URL (the worker) and MQTT_PUBLISHER_URL (the command publisher)
    name, with the passwords they carry: how `make run` keeps its broker and its .env in step.
    One user named by both does both jobs."""
    wanted: dict[str, dict] = {}
    for config, job in ((settings.MQTT, "can_ingest"), (settings.MQTT_PUBLISHER, "can_publish")):
        if not config.get("username"):
            continue
        if not config.get("password"):
            raise InvalidInput(f"The broker URL for {config['username']} carries no password", field="username")
        entry = wanted.setdefault(config["username"], {"password": config["password"], "can_ingest": False,
                                                       "can_publish": False})
        if entry["password"] != config["password"]:
            raise InvalidInput(f"MQTT_URL and MQTT_PUBLISHER_URL give {config['username']} different passwords")
        entry[job] = True
    for username, entry in wanted.items():
        service_user_set(username=username, **entry)
    return sorted(wanted)


def broker_accounts_marker() -> tuple:
    """Changes whenever any broker account does (what `mqtt_auth watch` polls)."""
    services = tuple(BrokerServiceUser.objects.aggregate(n=Count("pk"), last=Max("changed_at")).values())
    return meter_broker_accounts_marker() + services


def broker_accounts_export(*, directory: Path | None = None, reload: bool = False, pid_file: Path | None = None) -> bool:
    """Write the broker's password and ACL files from the database (settings.MQTT_AUTH_DIR by
    default) and, with `reload`, SIGHUP the broker when they changed. True when they changed."""
    services = [
        ServiceAccount(u.username, u.password_hash, u.can_ingest, u.can_publish)
        for u in BrokerServiceUser.objects.order_by("username")
    ]
    changed = write_auth_files(Path(directory or settings.MQTT_AUTH_DIR), meters=meter_broker_accounts(), services=services)
    if changed and reload:
        reload_broker(Path(pid_file or settings.MQTT_BROKER_PID_FILE))
    return changed

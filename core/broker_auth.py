"""Broker credentials, written once: Mosquitto's password hash, the passwords we issue and the
backend's broker usernames. No Django here (the meters, the MQTT side and the tools share it).

The database keeps each password only as the hash Mosquitto's `password_file` holds
(`mosquitto_passwd`'s `$7$` format: PBKDF2-SHA512), so the broker's files can be regenerated
from the database at any time and nobody can read a password back. Mosquitto's own iteration
count is kept: the passwords are random (192 bits, never chosen by a person), so a brute force is
hopeless at any count, while the broker pays the count on every connect of every meter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

MOSQUITTO_HASH_ITERATIONS = 101
_SALT_BYTES = 12
_HASH = re.compile(r"^\$7\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")

# The backend's broker users. A "." is not allowed in a meterNo (core.rules), so these names
# can never be a meter's: the ACL's `%u` patterns give them no meter's topics.
SERVICE_USERNAME = re.compile(r"^backend\.[a-z0-9_-]{1,40}$")
SERVICE_USERNAME_HELP = "backend.<name> (lower-case letters, digits, _ or -)"


def new_password() -> str:
    """A password for a meter or a backend process: 32 URL-safe characters (192 random bits)."""
    return secrets.token_urlsafe(24)


def mosquitto_hash(password: str, *, salt: bytes | None = None, iterations: int = MOSQUITTO_HASH_ITERATIONS) -> str:
    """The `password_file` form of `password`, exactly as `mosquitto_passwd` writes it."""
    if not password:
        raise ValueError("an empty password cannot be hashed")
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def mosquitto_verify(password: str, stored: str) -> bool:
    match = _HASH.fullmatch(stored or "")
    if match is None or not password:
        return False
    iterations, salt, digest = int(match[1]), base64.b64decode(match[2]), base64.b64decode(match[3])
    return hmac.compare_digest(hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations), digest)


def valid_service_username(value: object) -> bool:
    return isinstance(value, str) and SERVICE_USERNAME.fullmatch(value) is not None

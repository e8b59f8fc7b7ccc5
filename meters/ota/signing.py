"""Release signatures (firmware/PROTOCOL-ext.md): ECDSA P-256 / SHA-256 over the manifest
`smartmeter-fw\\n<version>\\n<sha256>\\n`, DER, base64 on the wire.

The backend only verifies: images are signed where the private key lives, with
`python firmware/tools/sign_firmware.py sign` (the private key never comes near the server).
The public key is OTA_PUBLIC_KEY: the 65-byte uncompressed point in hex (130 digits, `04…`),
as `sign_firmware.py keygen` prints it; the same key is compiled into the firmware.
"""

import base64
import binascii
import hashlib

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from django.conf import settings

from core.errors import InvalidInput
from core.rules import OTA_SIGNATURE_MAX_BYTES, ota_manifest


def public_key_point(text: str) -> bytes:
    """The uncompressed P-256 point from its hex form; InvalidInput if it is not one."""
    cleaned = "".join(text.split()).lower().removeprefix("0x")
    try:
        point = bytes.fromhex(cleaned)
    except ValueError:
        raise InvalidInput("OTA_PUBLIC_KEY must be 130 hex digits (04…), as sign_firmware.py keygen prints") from None
    if len(point) != 65 or point[0] != 4:
        raise InvalidInput("OTA_PUBLIC_KEY must be the 65-byte uncompressed P-256 point (04…)")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError:
        raise InvalidInput("OTA_PUBLIC_KEY is not a point on P-256") from None
    return point


def configured_key() -> bytes:
    """The fleet's release key from settings; InvalidInput when it is not set (no rollouts then)."""
    text = getattr(settings, "OTA_PUBLIC_KEY", "")
    if not text:
        raise InvalidInput("OTA_PUBLIC_KEY is not set: firmware releases cannot be checked or rolled out")
    return public_key_point(text)


def key_fingerprint(point: bytes) -> str:
    return hashlib.sha256(point).hexdigest()[:16]


def signature_der(signature_b64: str) -> bytes:
    """The DER bytes of a signature as the meter decodes it: standard padded base64, 8-72 bytes."""
    if not isinstance(signature_b64, str):
        raise InvalidInput("The signature must be base64 text", field="signature")
    text = signature_b64.strip()
    try:
        der = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("The signature is not valid base64", field="signature") from None
    if base64.b64encode(der).decode() != text or not (8 <= len(der) <= OTA_SIGNATURE_MAX_BYTES):
        raise InvalidInput("The signature must be standard padded base64 of a DER ECDSA signature", field="signature")
    return der


def signature_valid(*, point: bytes, version: str, sha256_hex: str, signature_b64: str) -> bool:
    """Whether the signature verifies with `point` over the release manifest."""
    der = signature_der(signature_b64)
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    try:
        key.verify(der, ota_manifest(version, sha256_hex), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True

"""The ``mosquitto_pwhash`` filter: a Mosquitto 2.0 password-file hash, computed on the controller.

``"{{ password | mosquitto_pwhash(username ~ '@' ~ inventory_hostname) }}"`` gives
``$7$<iterations>$<salt>$<hash>``, the PBKDF2-HMAC-SHA512 format that
``mosquitto_passwd`` writes and Mosquitto 2.0 reads. The salt (12 bytes, as
mosquitto_passwd's) is itself derived with PBKDF2 from the password and the
context string instead of drawn at random, so the same password gives the same
line on every run: the role templates the hashed file and stays idempotent, and
no clear-text copy of the passwords is ever written to the host. Guessing a
password from its salt costs as much as from its hash.
"""

from __future__ import annotations

import base64
import hashlib

SALT_LEN = 12  # Mosquitto refuses any other salt length
HASH_LEN = 64  # SHA-512
DEFAULT_ITERATIONS = 101  # mosquitto_passwd's default


def mosquitto_pwhash(password: str, context: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    if not password:
        raise ValueError("mosquitto_pwhash: empty password")
    iterations = int(iterations)
    if iterations < 1:
        raise ValueError("mosquitto_pwhash: iterations must be at least 1")
    pw = str(password).encode()
    salt = hashlib.pbkdf2_hmac(
        "sha512", pw, b"mosquitto_pwhash salt:" + str(context).encode(), iterations, SALT_LEN
    )
    digest = hashlib.pbkdf2_hmac("sha512", pw, salt, iterations, HASH_LEN)
    b64 = base64.b64encode
    return f"$7${iterations}${b64(salt).decode()}${b64(digest).decode()}"


class FilterModule:
    def filters(self) -> dict:
        return {"mosquitto_pwhash": mosquitto_pwhash}

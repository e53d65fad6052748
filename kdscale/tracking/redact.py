"""Keep credentials out of everything kdscale records (MLflow params, tags, artifacts, summary.json).

Two kinds of secret reach a job: values of credential-like environment variables (AWS keys,
MLflow tokens, database passwords — fsspec, boto and MLflow read them implicitly, and a user may
paste one into a spec), and passwords embedded in URIs (``postgresql://user:pw@host/db``,
``https://user:token@host``). Both are replaced by ``***`` wherever a string is recorded. Redaction
is by value, so a secret that was copied into any field is caught, not only known field names.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
SECRET_NAME = re.compile(r"(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY|SESSION_KEY)", re.I)
MIN_SECRET_LENGTH = 8  # shorter values ("true", "us-east-1") would mask unrelated text
# The password runs to the *last* "@" of the URI (as SQLAlchemy and urllib read an unescaped one), so a
# password holding "/" or "@" (``postgresql://u:p@ss/w@host/db``) is masked whole.
_URI_PASSWORD = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s'\"]*):(?P<password>[^\s'\"]+)@(?=[^@\s'\"]*(?:[\s'\"]|$))"
)


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of credential-like environment variables, longest first (so a secret that contains
    another is masked whole)."""
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, secrets: list[str] | None = None) -> str:
    text = _URI_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, MASK)
    return text


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """``value`` with every string in it (dict keys and values, list items) redacted."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, str):
        return redact_text(value, secrets)
    if isinstance(value, dict):
        return {redact(k, secrets): redact(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, secrets) for v in value)
    return value

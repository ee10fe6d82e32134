"""Secrets kept out of everything llmtune writes or prints: recipe values and environment tokens."""

from __future__ import annotations

import os
import re

SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def scrub(text: str) -> str:
    """Remove the values of secret-looking environment variables from text."""
    for var, value in os.environ.items():
        if value and len(value) >= 6 and SECRET_NAME.search(var):
            text = text.replace(value, f"${{env:{var}}}")
    return text


def redact(data, secrets: dict):
    """`data` with secret values put back as the `${env:VAR}` references they came from."""
    if isinstance(data, dict):
        return {k: redact(v, secrets) for k, v in data.items()}
    if isinstance(data, list):
        return [redact(v, secrets) for v in data]
    if isinstance(data, str):
        for var, value in secrets.items():
            if value:
                data = data.replace(value, f"${{env:{var}}}")
    return data

"""The one credential the suite uses wherever a secret is needed.

`tests/conftest.py` runs every test with DEBUG logging and fails the session if this
value, or its Basic-auth encoding, ever appears in a log record."""

import base64

SECRET = "Pt-Audit-9f3Kq7-Secret"


def secret_forms(user: str = "") -> list[str]:
    forms = [SECRET]
    if user:
        forms.append(base64.b64encode(f"{user}:{SECRET}".encode()).decode())
    return forms

"""Fixtures shared by every test: the mirror, the real upstream, the fake upstream; and the
secret audit: the whole suite runs with DEBUG logging, and no log record may ever carry
the suite's one credential (tests/secrets.py), in clear or Basic-encoded."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.fake_upstream.fixtures import *  # noqa: F403
from tests.mirror import *  # noqa: F403
from tests.secrets import secret_forms
from tests.upstream.fixtures import *  # noqa: F403

# The users the suite pairs with the secret, so the Basic forms can be recognised too.
_AUDITED_USERS = ("robot", "alice", "bob", "me", "bot")


class SecretAudit(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.needles = {form for user in _AUDITED_USERS for form in secret_forms(user)}
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:
            text = str(record.msg)
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        for needle in self.needles:
            if needle in text:
                self.leaks.append(f"{record.name}: {text[:300]}")


@pytest.fixture(scope="session", autouse=True)
def secret_audit() -> Iterator[SecretAudit]:
    audit = SecretAudit()
    root = logging.getLogger()
    level = root.level
    root.addHandler(audit)
    root.setLevel(logging.DEBUG)
    yield audit
    root.removeHandler(audit)
    root.setLevel(level)
    assert audit.leaks == [], f"a secret reached the logs: {audit.leaks[:3]}"

"""Fixtures shared by every test: the mirror, the real upstream, the fake upstream."""

from tests.fake_upstream.fixtures import *  # noqa: F403
from tests.mirror import *  # noqa: F403
from tests.upstream.fixtures import *  # noqa: F403

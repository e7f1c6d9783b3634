"""Integration-test fixtures: ``env``, a private run directory with the CLI
pointed at it (clusterenv.Env); every cluster a test started is stopped and
swept afterwards, even when the test failed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clusterenv import Env, make_env


@pytest.fixture
def env() -> Iterator[Env]:
    yield from make_env()

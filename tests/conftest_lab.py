"""Lab fixtures; a test module gets them with pytest_plugins = ["conftest_lab"]."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pgleap.lab import Lab, LabServer


@pytest.fixture(scope="module")
def module_lab() -> Iterator[Lab]:
    """A Lab shared by one test module; every server it started is stopped afterwards."""
    with Lab() as shared:
        yield shared


@pytest.fixture(scope="module")
def pg10_primary(module_lab: Lab) -> LabServer:
    """A running PostgreSQL 10 primary (SCRAM auth)."""
    return module_lab.primary(10)


@pytest.fixture(scope="module")
def pg17_primary(module_lab: Lab) -> LabServer:
    """A running PostgreSQL 17 primary (SCRAM auth)."""
    return module_lab.primary(17)

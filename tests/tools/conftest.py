from __future__ import annotations

from collections.abc import Iterator

import pytest

from agentd.tools.build import ToolArtefact
from agentd.tools.components import ComponentSet, open_components
from tests.tools.support import LIMITS, session_artefact


@pytest.fixture(scope="session")
def artefact(tmp_path_factory: pytest.TempPathFactory) -> ToolArtefact:
    return session_artefact(tmp_path_factory)


@pytest.fixture(scope="session")
def sandbox(artefact: ToolArtefact) -> Iterator[ComponentSet]:
    box = open_components(artefact, LIMITS, pool_size=2)
    yield box
    box.close()

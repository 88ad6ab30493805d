"""A private Redis Cluster for tests that break one (taskd issue 15): `local_cluster`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devtools.cluster import LocalCluster


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A started 3-master, 3-replica cluster shared by the tests of one module (forming one
    takes seconds); a module's tests heal what they break, the next module gets a new one."""
    with LocalCluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster

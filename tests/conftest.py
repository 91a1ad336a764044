"""Shared test configuration: the Hypothesis profile and the network-namespace lab fixtures."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# Virtual-time tests are CPU-bound and fast; a per-example deadline only adds flakiness on busy CI hosts.
settings.register_profile("meshmq", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("meshmq")


def _load_netns() -> Any:
    """tools/netns.py (tools/ is not a package)."""
    path = Path(__file__).resolve().parent.parent / "tools" / "netns.py"
    spec = importlib.util.spec_from_file_location("meshmq_tools_netns", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def make_lab() -> Iterator[Callable[[int], Any]]:
    """``make_lab(n)``: n hosts on one switch in network namespaces, removed after the test
    even when it fails. Skips, saying why, where namespaces cannot be made (not root, no
    iproute2 and no way to install it)."""
    netns = _load_netns()
    try:
        netns.ensure_iproute2()
    except netns.LabUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    labs: list[Any] = []

    def make(hosts: int) -> Any:
        lab = netns.Lab(hosts).__enter__()
        labs.append(lab)
        return lab

    try:
        yield make
    finally:
        for lab in labs:
            lab.close()


@pytest.fixture
def loss_rules() -> Any:
    """tools/netns.py, once ``Lab.lose`` can work here (nft present, or installed, and
    accepted by the kernel). Skips, saying why, where it cannot."""
    netns = _load_netns()
    try:
        netns.ensure_nft()
    except netns.LabUnavailable as exc:
        pytest.skip(f"packet loss injection unavailable: {exc}")
    return netns


@pytest.fixture(autouse=True)
def data_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Agents of each test (and the processes it starts) keep their state and keys in
    directories of the test's own, never in ~/.meshmq."""
    root = tmp_path_factory.mktemp("meshmq-data")
    monkeypatch.setenv("MESHMQ_DATA_DIR", str(root))
    # Keys too: the test's agents share a development authority of their own.
    monkeypatch.setenv("MESHMQ_HOME", str(tmp_path_factory.mktemp("meshmq-home")))
    return root


@pytest.fixture
def mesh() -> str:
    """A mesh name of this test's own, so that concurrent tests never meet."""
    return "t" + uuid.uuid4().hex[:12]

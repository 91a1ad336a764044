"""The public surface is what we mean it to be, and the pure core stays pure."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import meshmq
import meshmq._errors
import meshmq.testing

PACKAGE_DIR = Path(meshmq.__file__).parent
CORE_MODULES = ["_errors", "_topics", "_wire", "_message", "_routing", "_records", "_node", "_stream", "_seal", "_tap", "_expr", "_policy", "_schema", "_registry", "testing"]
IMPURE = ("zmq", "zeroconf", "lmdb", "asyncio", "threading")


def test_public_names_are_exactly_these() -> None:
    assert sorted(meshmq.__all__) == [
        "Agent",
        "AgentClosed",
        "AsyncAgent",
        "Backpressure",
        "CertificateError",
        "Config",
        "ConfigError",
        "CorruptStore",
        "DeadLetter",
        "Health",
        "HealthCheck",
        "MeshError",
        "MeshTimeout",
        "Message",
        "NoResponders",
        "NotPermitted",
        "OutboxFull",
        "PayloadError",
        "PeerInfo",
        "PeerQueueFull",
        "ProtocolError",
        "RateLimited",
        "RemoteError",
        "RequestTimeout",
        "RouteEntry",
        "SchemaError",
        "StoreError",
        "Subscription",
        "SubscriptionFull",
        "Tap",
        "TapEvent",
        "TopicError",
        "UsageError",
        "__version__",
    ]
    assert len(set(meshmq.__all__)) == len(meshmq.__all__)


def test_every_public_name_is_importable() -> None:
    for name in meshmq.__all__:
        assert getattr(meshmq, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from meshmq import *", namespace)  # noqa: S102 - the star import users may write
    assert set(meshmq.__all__) <= set(namespace)


def test_public_classes_live_in_private_modules_but_say_they_are_public() -> None:
    for name in meshmq.__all__:
        obj = getattr(meshmq, name)
        if inspect.isclass(obj):
            assert obj.__module__.startswith("meshmq._"), name
            assert obj.__doc__, f"{name} has no docstring"


def test_every_error_derives_from_mesh_error() -> None:
    errors = [getattr(meshmq, n) for n in meshmq.__all__ if inspect.isclass(getattr(meshmq, n))
              and issubclass(getattr(meshmq, n), BaseException)]
    assert len(errors) == 21
    for exc in errors:
        assert issubclass(exc, meshmq.MeshError), exc
    # and every error the package defines is public
    defined = {n for n, o in vars(meshmq._errors).items() if inspect.isclass(o) and issubclass(o, BaseException)
               and o.__module__ == "meshmq._errors"}
    assert defined == set(meshmq._errors.__all__)
    assert defined <= set(meshmq.__all__)


def test_errors_are_split_by_whose_fault_it_is() -> None:
    assert issubclass(meshmq.ConfigError, meshmq.UsageError)
    assert issubclass(meshmq.TopicError, meshmq.UsageError)
    assert issubclass(meshmq.PayloadError, meshmq.UsageError)
    assert issubclass(meshmq.UsageError, ValueError)
    assert not issubclass(meshmq.ProtocolError, meshmq.UsageError)
    assert issubclass(meshmq.PeerQueueFull, meshmq.Backpressure)
    assert issubclass(meshmq.OutboxFull, meshmq.Backpressure)
    assert issubclass(meshmq.SubscriptionFull, meshmq.Backpressure)
    assert not issubclass(meshmq.SubscriptionFull, meshmq.OutboxFull)  # no outbox holds such messages
    assert issubclass(meshmq.RequestTimeout, meshmq.MeshTimeout)
    assert issubclass(meshmq.MeshTimeout, TimeoutError)
    assert issubclass(meshmq.CorruptStore, meshmq.StoreError) and not issubclass(meshmq.StoreError, meshmq.UsageError)
    assert issubclass(meshmq.NotPermitted, meshmq.UsageError) and not issubclass(meshmq.CertificateError, meshmq.UsageError)


def test_errors_carry_their_fields() -> None:
    err = meshmq.PeerQueueFull("n1", "billing", 500, 5.0)
    assert (err.node, err.service, err.queued, err.timeout) == ("n1", "billing", 500, 5.0)
    assert "billing" in str(err) and "5s" in str(err)
    full = meshmq.SubscriptionFull("jobs.>", 10_000, 5.0)
    assert (full.pattern, full.queued, full.timeout) == ("jobs.>", 10_000, 5.0)
    assert "'jobs.>'" in str(full) and "10000 messages" in str(full) and "5s" in str(full)
    assert meshmq.NoResponders("orders.get").topic == "orders.get"
    assert meshmq.ConfigError("mesh", "bad").field == "mesh"
    assert meshmq.TopicError("a..b", "empty").problem == "empty"
    corrupt = meshmq.CorruptStore("/d/store", "bad checksums", [f"out:{i}" for i in range(30)], 30)
    assert corrupt.count == 30 and corrupt.damaged[0] == "out:0" and "out:19" in str(corrupt)
    assert "out:20" not in str(corrupt) and "quarantine_store=True" in str(corrupt)


def test_testing_helpers_are_public() -> None:
    for name in meshmq.testing.__all__:
        assert getattr(meshmq.testing, name) is not None
    assert (PACKAGE_DIR / "py.typed").exists()


# --- purity of the core ----------------------------------------------------------------

_PROBE = """
import importlib, json, sys, types
# Load the module under test without running meshmq/__init__.py (which imports the agent),
# so that only the module's own imports are measured.
pkg = types.ModuleType("meshmq")
pkg.__path__ = [{package_dir!r}]
sys.modules["meshmq"] = pkg
before = set(sys.modules)
importlib.import_module("meshmq." + {module!r})
print(json.dumps(sorted(set(sys.modules) - before)))
"""


def _run_isolated(code: str) -> subprocess.CompletedProcess[str]:
    # -S: no site module, so that .pth hooks of the environment (some import threading)
    # do not load anything before the probe runs; the search path is handed over instead.
    paths = [str(PACKAGE_DIR.parent), *(p for p in sys.path if p and os.path.isdir(p))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env,
                          timeout=60, check=False)


def test_a_clean_interpreter_has_none_of_the_impure_modules() -> None:
    proc = _run_isolated("import sys, json; print(json.dumps(sorted(sys.modules)))")
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout)
    assert not [m for m in loaded if m.split(".")[0] in IMPURE]  # else the purity probe proves nothing


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_imports_no_io(module: str) -> None:
    proc = _run_isolated(_PROBE.format(package_dir=str(PACKAGE_DIR), module=module))
    assert proc.returncode == 0, proc.stderr
    imported = json.loads(proc.stdout)
    assert f"meshmq.{module}" in imported
    offenders = [m for m in imported if m.split(".")[0] in IMPURE]
    assert not offenders, f"meshmq.{module} imports {offenders}"


def test_the_purity_probe_sees_the_shell_modules() -> None:
    proc = _run_isolated(_PROBE.format(package_dir=str(PACKAGE_DIR), module="_agent"))
    assert proc.returncode == 0, proc.stderr
    imported = {m.split(".")[0] for m in json.loads(proc.stdout)}
    assert {"zmq", "asyncio", "threading"} <= imported


def test_importing_the_test_helpers_through_the_package_stays_pure() -> None:
    proc = _run_isolated("import sys, json, meshmq.testing; print(json.dumps(sorted(sys.modules)))")
    assert proc.returncode == 0, proc.stderr
    assert not [m for m in json.loads(proc.stdout) if m.split(".")[0] in IMPURE]


_CLOCK_CALLS = {"time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "perf_counter_ns", "sleep"}


def _clock_reads(source: str) -> list[str]:
    """Every use of the time module and of datetime.now/utcnow/today, found in the code
    (docstrings and comments may mention them)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name == "time"]
        elif isinstance(node, ast.ImportFrom) and node.module == "time":
            found.append(f"from time import {', '.join(a.name for a in node.names)}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "time" and node.attr in _CLOCK_CALLS:
                found.append(f"time.{node.attr}")
            elif node.value.id == "datetime" and node.attr in {"now", "utcnow", "today"}:
                found.append(f"datetime.{node.attr}")
    return found


def test_the_clock_probe_finds_clock_reads() -> None:
    assert _clock_reads("import time\nt = time.monotonic()") == ["import time", "time.monotonic"]
    assert _clock_reads("from time import monotonic as m") == ["from time import monotonic"]
    assert _clock_reads("x = datetime.now()") == ["datetime.now"]
    assert _clock_reads('"""Like time.monotonic."""\n# time.time()') == []


@pytest.mark.parametrize("module", CORE_MODULES)
def test_core_module_never_reads_the_clock(module: str) -> None:
    source = (PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8")
    found = _clock_reads(source)
    assert not found, f"meshmq/{module}.py reads the clock: {found}; take `now` as an argument"

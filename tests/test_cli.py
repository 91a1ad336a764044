"""The ``meshmq`` command line: parsing and output in-process, pub/sub/peers across real processes.

Processes talk over loopback only (``MESHMQ_INTERFACES=127.0.0.1``), each test
in a mesh of its own, so concurrent runs and other meshmq programs on the
machine cannot interfere. Every wait has a deadline; processes a test starts
are ended by PID in teardown.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import meshmq
from meshmq._cli import _arrivals, _until, main, message_json, message_line, parse_data, parse_headers
from meshmq._message import FORMAT_BYTES, FORMAT_MSGPACK, Message

LOOPBACK = "127.0.0.1"
MESSAGE_ID = re.compile(r"^[0-9a-f]{32}$")
COMMANDS = ("pub", "sub", "peers", "routes", "doctor", "demo", "config", "dlq", "outbox", "authority", "cert")


def unique_mesh() -> str:
    return "t-" + uuid.uuid4().hex[:16]


def cli_env(home: Path) -> dict[str, str]:
    """The environment of a meshmq process under test: loopback only, state in a temp dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHMQ_")}
    env["MESHMQ_INTERFACES"] = LOOPBACK
    # Keys where the test's own agents have theirs: one development authority for both.
    env["MESHMQ_HOME"] = os.environ.get("MESHMQ_HOME", str(home))
    env["MESHMQ_DATA_DIR"] = str(home / "data")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Spawned:
    """A process started by a test, its output collected line by line by reader threads."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: object, into: list[str]) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._changed:
                into.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        """Wait until ``predicate()`` holds (checked on each new line), or fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)):
                    if predicate():
                        return
                    pytest.fail(f"{what} within {timeout}s; rc={self.proc.poll()}\n"
                                f"stdout: {self.stdout}\nstderr: {self.stderr}")
                self._changed.wait(min(remaining, 0.5))

    def finish(self, timeout: float) -> int:
        """Wait for the process to exit and for its output to be read."""
        rc = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout)
        return rc

    def end(self) -> None:
        """End the process if it still runs (by its PID: SIGTERM, then SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def spawn(home: Path) -> Iterator[Callable[..., Spawned]]:
    started: list[Spawned] = []

    def start(*args: str) -> Spawned:
        process = Spawned([sys.executable, "-m", "meshmq", *args], cli_env(home))
        started.append(process)
        return process

    yield start
    for process in started:
        process.end()


def run_cli(home: Path, *args: str, timeout: float = 30, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshmq", *args], capture_output=True, text=True,
                          timeout=timeout, env=cli_env(home), input=input)


def start_sub(spawn: Callable[..., Spawned], *args: str) -> Spawned:
    """``meshmq sub ...``, returned once it says it is listening (its agent is up and subscribed)."""
    sub = spawn("sub", *args)
    sub.wait_for(lambda: any("listening on" in line for line in sub.stderr), 20, "sub did not start listening")
    return sub


# --- in-process: parsing, help, errors, formats -------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command_exits_0(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: meshmq {command}")
    assert out.count(f"meshmq {command}") >= 2  # the usage line, and examples in the epilog
    if command not in ("config", "authority"):  # the commands that start no agent and open no store
        assert "--mesh NAME" in out and "--seed ENDPOINT" in out


def test_main_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"    {command} " in out


BAD_INPUT = [
    (["pub", "orders..placed", "x"], "token 2 is empty"),
    (["pub", "orders.*", "x"], "wildcards"),
    (["pub", "a b", "x"], "whitespace"),
    (["pub", "orders.placed", "x", "--header", "no-equals-sign"], "NAME=VALUE"),
    (["pub", "orders.placed", "x", "--header", "=value"], "NAME=VALUE"),
    (["pub", "orders.placed", "x", "--count", "0"], "--count"),
    (["pub", "orders.placed", "x", "--timeout", "soon"], "--timeout"),
    (["pub", "orders.placed"], "DATA"),
    (["sub", "orders.>.x"], "'>' may only be the last token"),
    (["sub", "orders.*", "--count", "-3"], "--count"),
    (["peers", "--mesh", "no spaces allowed"], "mesh"),
    (["peers", "--seed", "not-an-endpoint"], "seeds"),
    (["peers", "--interface", "not-an-ip"], "interfaces"),
    (["peers", "--service", "bad service"], "service name"),
    (["demo", "--orders", "many"], "--orders"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize(("argv", "expected"), BAD_INPUT, ids=[" ".join(a) or "nothing" for a, _ in BAD_INPUT])
def test_bad_input_exits_2_with_one_line(argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("meshmq: error: ")
    assert expected in lines[0]


def test_bad_environment_variable_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESHMQ_PROBE_INTERVAL", "a while")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshmq: error: invalid config probe_interval: MESHMQ_PROBE_INTERVAL=")
    assert "Traceback" not in err


def test_config_lists_every_setting(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MESHMQ_MESH", "staging")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for name, variable, default, help_text in meshmq.Config.describe():
        assert variable in out
        assert help_text.replace("``", "'") in out
    assert re.search(r"MESHMQ_MESH +default: default +\(set: staging\)", out)
    assert re.search(r"MESHMQ_PROBE_INTERVAL +default: 0.5\n", out)


def test_config_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "--json"]) == 0
    settings = {s["variable"]: s for s in json.loads(capsys.readouterr().out)}
    assert settings.keys() == {variable for _, variable, _, _ in meshmq.Config.describe()}
    assert settings["MESHMQ_INTERFACES"]["default"] == [LOOPBACK]
    assert settings["MESHMQ_DISCOVERY"]["default"] is True


@pytest.mark.parametrize(("text", "raw", "expected"), [
    ('{"orderId": "ORD-1", "items": [1, 2]}', False, {"orderId": "ORD-1", "items": [1, 2]}),
    ("42", False, 42),
    ('"42"', False, "42"),
    ("hello world", False, "hello world"),
    ("null", False, None),
    ('{"a": 1}', True, b'{"a": 1}'),
    ("h\u00e9", True, "h\u00e9".encode()),
])
def test_parse_data(text: str, raw: bool, expected: object) -> None:
    assert parse_data(text, raw) == expected


def test_parse_headers() -> None:
    assert parse_headers(["trace=abc", "empty=", "eq=a=b"]) == {"trace": "abc", "empty": "", "eq": "a=b"}


def _message(data: bytes, fmt: int, key: str | None = None) -> Message:
    return Message(bytes(range(16)), 1_700_000_000.25, "orders.placed", "OrderPlaced", "order-service",
                   "ab" * 8, 1, {"trace": "t1"}, key, fmt, data)


def test_message_json_structured_and_bytes() -> None:
    import msgpack

    obj = json.loads(message_json(_message(msgpack.packb({"orderId": "ORD-1", "blob": b"\x00\x01"}), FORMAT_MSGPACK)))
    assert obj["data"] == {"orderId": "ORD-1", "blob": base64.b64encode(b"\x00\x01").decode()}
    assert obj["id"] == bytes(range(16)).hex()
    assert obj["time"] == "2023-11-14T22:13:20.250000+00:00"
    assert (obj["topic"], obj["type"], obj["source"], obj["headers"]) == (
        "orders.placed", "OrderPlaced", "order-service", {"trace": "t1"})
    obj = json.loads(message_json(_message(b"\xff\xfe", FORMAT_BYTES)))
    assert "data" not in obj and base64.b64decode(obj["data_base64"]) == b"\xff\xfe"


def test_message_line_shows_topic_type_source_key_and_data() -> None:
    import msgpack

    line = message_line(_message(msgpack.packb({"orderId": "ORD-1"}), FORMAT_MSGPACK, key="CUST-1"))
    assert re.match(r"^\d\d:\d\d:\d\d\.\d{3}  orders\.placed  OrderPlaced  order-service  key=CUST-1  "
                    r'\{"orderId": "ORD-1"\}$', line)
    assert message_line(_message(b"raw", FORMAT_BYTES)).endswith("order-service  b'raw'")


def test_until_says_how_a_reading_command_ends() -> None:
    assert _until(None, "message", None) == "Ctrl-C"
    assert _until(1, "line", None) == "1 line"
    assert _until(3, "message", 2.5) == "3 messages or 2.5s"
    assert _until(None, "line", 10.0) == "10s"


class _Source:
    """A blocking subscription or tap as ``_arrivals`` sees it: ``get`` and ``closed``."""

    def __init__(self, items: list[object | None], closes: bool) -> None:
        self.items, self.closes, self.closed, self.waits = items, closes, False, []

    def get(self, timeout: float) -> object | None:
        self.waits.append(timeout)
        if self.items:
            return self.items.pop(0)
        self.closed = self.closes
        if not self.closed:
            time.sleep(timeout)  # what a real get does when nothing comes: wait it out
        return None


def test_arrivals_skip_empty_waits_and_end_when_the_source_closes() -> None:
    source = _Source(["a", None, "b"], closes=True)
    assert list(_arrivals(source, None)) == ["a", "b"]
    assert source.waits == [0.5] * 4  # the last wait found it closed


def test_arrivals_end_at_the_deadline() -> None:
    source = _Source([], closes=False)
    assert list(_arrivals(source, 0.05)) == []  # returns by itself: the deadline bounds it
    assert len(source.waits) == 1 and 0 < source.waits[0] <= 0.05
    assert list(_arrivals(_Source(["x"], closes=False), 0.0)) == []  # no time: nothing is read


# --- across processes --------------------------------------------------------------------------


@pytest.mark.integration
def test_python_m_meshmq_help_and_bad_input(home: Path) -> None:
    ok = run_cli(home, "pub", "--help")
    assert ok.returncode == 0 and "usage: meshmq pub" in ok.stdout
    bad = run_cli(home, "pub", "bad..topic", "x")
    assert bad.returncode == 2
    assert bad.stderr.startswith("meshmq: error: ") and len(bad.stderr.splitlines()) == 1


@pytest.mark.integration
def test_pub_reaches_sub_in_another_process(spawn: Callable[..., Spawned], home: Path) -> None:
    mesh = unique_mesh()
    sub = start_sub(spawn, "orders.>", "--mesh", mesh, "--count", "1", "--timeout", "15")
    pub = run_cli(home, "pub", "orders.placed", '{"orderId": "ORD-0042", "totalAmount": 9.5}',
                  "--type", "OrderPlaced", "--key", "CUST-7", "--header", "trace=t-1", "--mesh", mesh)
    assert pub.returncode == 0, pub.stderr
    assert MESSAGE_ID.match(pub.stdout.strip()), pub.stdout
    assert "warning" not in pub.stderr
    assert sub.finish(20) == 0, sub.stderr
    assert len(sub.stdout) == 1
    line = sub.stdout[0]
    assert "orders.placed  OrderPlaced  meshmq-cli  key=CUST-7" in line
    assert '{"orderId": "ORD-0042", "totalAmount": 9.5}' in line


@pytest.mark.integration
def test_pub_count_and_raw_bytes_reach_sub_json(spawn: Callable[..., Spawned], home: Path) -> None:
    mesh = unique_mesh()
    sub = start_sub(spawn, "files.*", "--json", "--mesh", mesh, "--count", "2", "--timeout", "15")
    pub = run_cli(home, "pub", "files.chunk", "caf\u00e9", "--raw", "--count", "2", "--service", "uploader",
                  "--mesh", mesh)
    assert pub.returncode == 0, pub.stderr
    ids = pub.stdout.split()
    assert len(ids) == 2 and all(MESSAGE_ID.match(i) for i in ids)
    assert sub.finish(20) == 0, sub.stderr
    received = [json.loads(line) for line in sub.stdout]
    assert [m["id"] for m in received] == ids
    for m in received:
        assert base64.b64decode(m["data_base64"]) == "caf\u00e9".encode()
        assert (m["topic"], m["source"], m["type"]) == ("files.chunk", "uploader", None)


@pytest.mark.integration
def test_sub_json_from_an_agent(spawn: Callable[..., Spawned]) -> None:
    mesh = unique_mesh()
    sub = start_sub(spawn, "orders.placed", "--json", "--mesh", mesh, "--count", "3", "--timeout", "15")
    with meshmq.Agent("order-service", mesh=mesh, interfaces=[LOOPBACK]) as agent:
        agent.wait_for_subscribers("orders.placed", count=1, timeout=10)
        order = {"orderId": "ORD-0001", "items": [{"productId": "SKU-1", "quantity": 2, "price": 4.5}]}
        agent.publish("orders.placed", order, type="OrderPlaced", headers={"trace": "abc"})
        agent.publish("orders.placed", "plain text")
        agent.publish("orders.placed", b"\x00\xff")
    assert sub.finish(20) == 0, sub.stderr
    first, second, third = (json.loads(line) for line in sub.stdout)
    assert first["data"] == order and first["type"] == "OrderPlaced" and first["headers"] == {"trace": "abc"}
    assert first["source"] == "order-service"
    assert second["data"] == "plain text"
    assert base64.b64decode(third["data_base64"]) == b"\x00\xff"


@pytest.mark.integration
def test_pub_without_subscribers_warns_and_exits_0(home: Path) -> None:
    result = run_cli(home, "pub", "nobody.listens", "hello", "--mesh", unique_mesh(), "--timeout", "0.3")
    assert result.returncode == 0
    assert MESSAGE_ID.match(result.stdout.strip())
    assert result.stderr.startswith("meshmq: warning: no subscriber of 'nobody.listens'")
    assert "published to no one" in result.stderr


@pytest.mark.integration
def test_sub_exits_1_when_count_not_reached_within_timeout(home: Path) -> None:
    started = time.monotonic()
    result = run_cli(home, "sub", "quiet.topic", "--mesh", unique_mesh(), "--count", "1", "--timeout", "1")
    assert result.returncode == 1
    assert "0 of 1 messages received within 1s" in result.stderr
    assert time.monotonic() - started < 15


@pytest.mark.integration
def test_sub_timeout_without_count_exits_0(home: Path) -> None:
    result = run_cli(home, "sub", "quiet.topic", "--mesh", unique_mesh(), "--timeout", "0.5")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sub_interrupted_exits_130_quietly(spawn: Callable[..., Spawned], sig: signal.Signals) -> None:
    sub = start_sub(spawn, "orders.>", "--mesh", unique_mesh())
    os.kill(sub.proc.pid, sig)
    assert sub.finish(15) == 130
    assert not any("Traceback" in line for line in sub.stderr), sub.stderr


@pytest.mark.integration
def test_bad_queue_group_exits_2(home: Path) -> None:
    result = run_cli(home, "sub", "orders.>", "--queue", "not a group", "--mesh", unique_mesh(), "--timeout", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("meshmq: error: queue group 'not a group'")
    assert len(result.stderr.splitlines()) == 1


@pytest.mark.integration
def test_peers_shows_a_running_agent(home: Path) -> None:
    mesh = unique_mesh()
    with meshmq.Agent("peer-probe", mesh=mesh, interfaces=[LOOPBACK]) as agent:
        agent.subscribe("probe.*", queue="workers")
        agent.subscribe("other.>")
        table = run_cli(home, "peers", "--mesh", mesh, "--wait", "5")
        as_json = run_cli(home, "peers", "--mesh", mesh, "--wait", "5", "--json")
        node, endpoint = agent.node_id, agent.endpoints[0]
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["SERVICE", "NODE", "ENDPOINT", "STATE", "SUBSCRIPTIONS", "LAST", "SEEN"]
    assert len(rows) == 1
    assert rows[0].split()[:6] == ["peer-probe", node, endpoint, "alive", "probe.*@workers,", "other.>"]
    assert re.search(r"\d+\.\ds ago$", rows[0])
    assert as_json.returncode == 0, as_json.stderr
    [peer] = json.loads(as_json.stdout)
    assert (peer["service"], peer["node"], peer["endpoint"], peer["state"]) == ("peer-probe", node, endpoint, "alive")
    assert peer["subscriptions"] == [{"pattern": "probe.*", "group": "workers"},
                                     {"pattern": "other.>", "group": None}]
    assert 0 <= peer["last_seen_seconds_ago"] < 5


@pytest.mark.integration
def test_peers_in_an_empty_mesh(home: Path) -> None:
    result = run_cli(home, "peers", "--mesh", unique_mesh(), "--wait", "0.3")
    assert result.returncode == 0
    assert result.stdout == ""
    assert "no peers found" in result.stderr


@pytest.mark.integration
def test_routes_show_patterns_groups_and_who_gets_a_topic(home: Path) -> None:
    mesh = unique_mesh()
    with meshmq.Agent("inventory", mesh=mesh, interfaces=[LOOPBACK]) as inv, \
            meshmq.Agent("audit", mesh=mesh, interfaces=[LOOPBACK]) as audit:
        inv.subscribe("orders.*", queue="workers")
        audit.subscribe("orders.>")
        audit.subscribe("billing.>")
        table = run_cli(home, "routes", "--mesh", mesh, "--wait", "5")
        for_topic = run_cli(home, "routes", "--mesh", mesh, "--wait", "5", "--topic", "orders.placed", "--json")
        text_topic = run_cli(home, "routes", "--mesh", mesh, "--wait", "5", "--topic", "orders.placed")
        bad = run_cli(home, "routes", "--mesh", mesh, "--topic", "orders.*")
        inv_node, audit_node = inv.node_id, audit.node_id
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["PATTERN", "GROUP", "SERVICE", "NODE"]
    assert [r.split() for r in rows] == [
        ["billing.>", "-", "audit", audit_node],
        ["orders.*", "workers", "inventory", inv_node],
        ["orders.>", "-", "audit", audit_node],
    ]
    assert for_topic.returncode == 0, for_topic.stderr
    assert json.loads(for_topic.stdout) == [
        {"pattern": "orders.*", "group": "workers", "service": "inventory", "node": inv_node},
        {"pattern": "orders.>", "group": None, "service": "audit", "node": audit_node},
    ]
    assert text_topic.stdout.splitlines()[0] == "orders.placed: 2 copies per message"
    assert bad.returncode == 2 and "meshmq: error:" in bad.stderr and "wildcards" in bad.stderr

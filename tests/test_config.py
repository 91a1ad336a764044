"""Config: defaults, MESHMQ_* variables, keyword overrides, and validation errors that name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from meshmq import Config, ConfigError, UsageError


def test_defaults() -> None:
    cfg = Config.load(env={})
    assert cfg == Config()
    assert cfg.mesh == "default"
    assert cfg.interfaces == ("127.0.0.1",)  # loopback unless a deployment opts in
    assert cfg.bind is None and cfg.seeds == () and cfg.discovery is True and cfg.data_dir is None
    assert (cfg.probe_interval, cfg.probe_timeout, cfg.indirect_probes) == (0.5, 0.2, 3)
    assert (cfg.gossip_interval, cfg.gossip_fanout, cfg.gossip_entries) == (0.2, 3, 32)
    assert cfg.max_frame_bytes == 4 * 1024 * 1024
    assert cfg.max_payload_bytes == 1024 * 1024
    assert (cfg.max_topic_length, cfg.max_topic_tokens) == (256, 32)
    assert (cfg.max_header_count, cfg.max_header_bytes) == (64, 16 * 1024)
    assert (cfg.max_batch_messages, cfg.max_batch_bytes) == (256, 256 * 1024)
    assert (cfg.max_subscriptions, cfg.max_peers) == (10_000, 4096)
    assert (cfg.peer_queue_messages, cfg.peer_queue_bytes) == (250_000, 128 * 1024 * 1024)
    assert cfg.subscription_queue_messages == 10_000
    assert (cfg.publish_timeout, cfg.socket_hwm, cfg.stop_timeout) == (5.0, 1000, 2.0)


def test_every_setting_is_described_with_its_variable() -> None:
    described = Config.describe()
    assert [d[0] for d in described] == [f.name for f in dataclasses.fields(Config)]
    for name, var, default, help_ in described:
        assert var == "MESHMQ_" + name.upper()
        assert default == getattr(Config(), name)
        assert help_, f"{name} has no docstring"


def test_environment_variables_are_parsed() -> None:
    cfg = Config.load(env={
        "MESHMQ_MESH": "prod",
        "MESHMQ_INTERFACES": "127.0.0.1, ::1",
        "MESHMQ_BIND": "tcp://127.0.0.1:7400",
        "MESHMQ_SEEDS": "tcp://10.0.0.5:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk,tcp://10.0.0.6:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk,",
        "MESHMQ_DISCOVERY": "off",
        "MESHMQ_DATA_DIR": "/var/lib/meshmq",
        "MESHMQ_PROBE_INTERVAL": "0.25",
        "MESHMQ_SUSPICION_MULT": "2",
        "MESHMQ_MAX_PEERS": "1_000",
        "MESHMQ_PROBE_INTERVALL": "99",  # a typo'd name is not a setting
        "PATH": "/usr/bin",
    })
    assert cfg.mesh == "prod"
    assert cfg.interfaces == ("127.0.0.1", "::1")
    assert cfg.bind == "tcp://127.0.0.1:7400"
    assert cfg.seeds == ("tcp://10.0.0.5:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk", "tcp://10.0.0.6:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk")
    assert cfg.discovery is False
    assert cfg.data_dir == Path("/var/lib/meshmq")
    assert cfg.probe_interval == 0.25
    assert cfg.suspicion_mult == 2.0 and isinstance(cfg.suspicion_mult, float)
    assert cfg.max_peers == 1000


@pytest.mark.parametrize(("raw", "expected"), [
    ("1", True), ("true", True), ("Yes", True), (" ON ", True),
    ("0", False), ("false", False), ("no", False), ("OFF", False),
])
def test_boolean_variables(raw: str, expected: bool) -> None:
    assert Config.load(env={"MESHMQ_DISCOVERY": raw}).discovery is expected


def test_empty_variables_are_ignored() -> None:
    assert Config.load(env={"MESHMQ_MESH": "", "MESHMQ_PROBE_INTERVAL": ""}) == Config()


def test_load_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHMQ_MESH", "from-env")
    assert Config.load().mesh == "from-env"


def test_keyword_overrides_win_over_the_environment() -> None:
    env = {"MESHMQ_TOMBSTONE_TTL": "5", "MESHMQ_MESH": "from-env"}
    cfg = Config.load(env=env, tombstone_ttl=7, seeds=["tcp://127.0.0.1:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"])
    assert cfg.tombstone_ttl == 7.0 and isinstance(cfg.tombstone_ttl, float)
    assert cfg.seeds == ("tcp://127.0.0.1:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk",)
    assert cfg.mesh == "from-env"


def test_overrides_accept_natural_forms() -> None:
    cfg = Config.load(env={}, max_peers="10", discovery="no", data_dir="/tmp/x", bind=None,
                      interfaces="127.0.0.1,::1", probe_interval=1)
    assert cfg.max_peers == 10
    assert cfg.discovery is False
    assert cfg.data_dir == Path("/tmp/x")
    assert cfg.interfaces == ("127.0.0.1", "::1")
    assert cfg.probe_interval == 1.0


def test_a_base_config_is_taken_as_is() -> None:
    # An explicit Config is not re-read from the environment (the module docstring's
    # "defaults, then MESHMQ_*, then overrides" applies when no base is given).
    base = Config(mesh="explicit")
    cfg = Config.load(base, env={"MESHMQ_MESH": "from-env", "MESHMQ_MAX_PEERS": "3"}, max_peers=5)
    assert cfg.mesh == "explicit" and cfg.max_peers == 5
    assert Config.load(base, env={"MESHMQ_MESH": "from-env"}) is base


@pytest.mark.parametrize(("var", "raw", "field"), [
    ("MESHMQ_MAX_PEERS", "many", "max_peers"),
    ("MESHMQ_MAX_PEERS", "1.5", "max_peers"),
    ("MESHMQ_PROBE_TIMEOUT", "3s", "probe_timeout"),
    ("MESHMQ_DISCOVERY", "maybe", "discovery"),
])
def test_unparsable_variables_name_the_variable(var: str, raw: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env={var: raw})
    assert info.value.field == field
    assert var in str(info.value) and repr(raw) in str(info.value)


@pytest.mark.parametrize(("env", "field", "problem"), [
    ({"MESHMQ_MESH": "my mesh"}, "mesh", "letters, digits"),
    ({"MESHMQ_MESH": "-x"}, "mesh", "letters, digits"),
    ({"MESHMQ_MESH": "m" * 64}, "mesh", "1-63"),
    ({"MESHMQ_INTERFACES": "eth0"}, "interfaces", "not an IP address"),
    ({"MESHMQ_INTERFACES": ","}, "interfaces", "at least one"),
    ({"MESHMQ_BIND": "127.0.0.1:7400"}, "bind", "not a ZeroMQ endpoint"),
    ({"MESHMQ_SEEDS": "localhost"}, "seeds", "not an endpoint"),
    ({"MESHMQ_SEEDS": "tcp://127.0.0.1:7400"}, "seeds", "lacks the node's key"),
    ({"MESHMQ_SEEDS": "tcp://127.0.0.1:7400#short"}, "seeds", "not an endpoint"),
    ({"MESHMQ_PROBE_INTERVAL": "0"}, "probe_interval", "greater than zero"),
    ({"MESHMQ_PROBE_INTERVAL": "nan"}, "probe_interval", "greater than zero"),
    ({"MESHMQ_PROBE_TIMEOUT": "0.5"}, "probe_timeout", "less than probe_interval"),
    ({"MESHMQ_SUSPICION_MAX_MULT": "0.5"}, "suspicion_max_mult", "at least 1"),
    ({"MESHMQ_GOSSIP_ENTRIES": "300"}, "gossip_entries", "wire limit of 256"),
    ({"MESHMQ_INDIRECT_PROBES": "0"}, "indirect_probes", "greater than zero"),
    ({"MESHMQ_MAX_PEERS": "-1"}, "max_peers", "greater than zero"),
    ({"MESHMQ_SOCKET_HWM": "0"}, "socket_hwm", "greater than zero"),
    ({"MESHMQ_MAX_PAYLOAD_BYTES": str(8 * 1024 * 1024)}, "max_frame_bytes", "every valid message fits"),
])
def test_invalid_values_name_the_field(env: dict[str, str], field: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env=env)
    assert info.value.field == field
    assert problem in info.value.problem
    assert str(info.value).startswith(f"invalid config {field}:")


def test_valid_endpoints() -> None:
    cfg = Config.load(env={}, bind="tcp://127.0.0.1:*, ipc:///tmp/m.sock",
                      seeds=["tcp://[::1]:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk", "tcp://host.example:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk", "inproc://x#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"])
    assert cfg.seeds[0] == "tcp://[::1]:7400#kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"


@pytest.mark.parametrize(("overrides", "field"), [
    ({"max_peers": 2.5}, "max_peers"),
    ({"max_peers": True}, "max_peers"),
    ({"discovery": 1}, "discovery"),
    ({"seeds": [1]}, "seeds"),
    ({"seeds": 5}, "seeds"),
    ({"probe_interval": False}, "probe_interval"),
    ({"probe_interval": "soon"}, "probe_interval"),
    ({"mesh": 5}, "mesh"),
    ({"bind": 7400}, "bind"),
    ({"data_dir": 5}, "data_dir"),
])
def test_overrides_of_the_wrong_type_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env={}, **overrides)
    assert info.value.field == field


def test_unknown_override_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        Config.load(env={}, probe_intreval=3)
    assert info.value.field == "probe_intreval"
    assert "unknown setting" in str(info.value) and "probe_interval" in str(info.value)  # lists the known names
    with pytest.raises(ConfigError, match="unknown setting"):
        Config().replace(bogus=1)


def test_config_errors_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        Config.load(env={"MESHMQ_MAX_PEERS": "x"})
    with pytest.raises(ValueError):
        Config.load(env={"MESHMQ_MAX_PEERS": "x"})


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mesh = "other"  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        cfg.not_a_field = 1  # type: ignore[attr-defined]
    replaced = cfg.replace(mesh="other")
    assert replaced.mesh == "other" and cfg.mesh == "default"
    assert hash(cfg) == hash(Config())


def test_replace_validates() -> None:
    with pytest.raises(ConfigError) as info:
        Config().replace(probe_interval=0.1)  # probe_timeout 0.2 >= 0.1
    assert info.value.field == "probe_timeout"


@pytest.mark.parametrize("kwargs", [{"max_peers": "10"}, {"max_peers": 2.5}, {"discovery": "no"}, {"mesh": 5}])
def test_direct_construction_checks_types(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Config(**kwargs)

"""Packet loss injected in a lab host really loses about the share asked for, and no more.

Datagrams go over the host's own loopback, inside its namespace; nothing leaves it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.netns]

DATAGRAMS = 2000

# Run inside the host: send numbered datagrams to itself over 127.0.0.1, then read until
# every one is accounted for, received or counted by the loss rule (argv[2:] lists the
# rule's table); a deadline bounds the wait if they never add up.
COUNT_OVER_LOOPBACK = r"""
import json, re, select, socket, subprocess, sys, time
sent, table = int(sys.argv[1]), sys.argv[2:]
rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
rx.bind(("127.0.0.1", 0))
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
failed = 0
for i in range(sent):
    try:
        tx.sendto(i.to_bytes(4, "big"), rx.getsockname())
    except OSError:
        failed += 1

def dropped():
    out = subprocess.run(table, capture_output=True, text=True, timeout=10).stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))

seen = set()
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    if select.select([rx], [], [], 0.1)[0]:
        seen.add(int.from_bytes(rx.recv(16), "big"))
    elif len(seen) + dropped() >= sent:
        break
print(json.dumps({"sent": sent, "send_failed": failed, "received": len(seen), "dropped": dropped()}))
"""


def count_over_loopback(lab: Any, netns: Any, host: Any = None) -> dict[str, int]:
    """Send DATAGRAMS to itself inside ``host`` (default the first) and count what arrived."""
    host = host if host is not None else lab.hosts[0]
    table = ["nft", "list", "table", "inet", netns.LOSS_TABLE]
    done = lab.run(host, [sys.executable, "-c", COUNT_OVER_LOOPBACK, str(DATAGRAMS), *table], timeout=60)
    assert done.returncode == 0, done.stderr
    result: dict[str, int] = json.loads(done.stdout)
    return result


def test_ten_percent_loss_drops_about_one_datagram_in_ten(make_lab: Callable[[int], Any], loss_rules: Any) -> None:
    lab = make_lab(1)
    lab.lose(lab.hosts[0], 10, device="lo")
    result = count_over_loopback(lab, loss_rules)
    # The sender cannot tell (as on a wire), and every datagram is either received or counted dropped.
    assert result["send_failed"] == 0
    assert result["received"] + result["dropped"] == DATAGRAMS, result
    # Binomial(2000, 0.9): the standard deviation of the share is 0.0067, so this is over 7 of them.
    assert 0.85 <= result["received"] / DATAGRAMS <= 0.95, result


def test_no_loss_and_removed_loss_lose_nothing(make_lab: Callable[[int], Any], loss_rules: Any) -> None:
    lab = make_lab(1)
    host = lab.hosts[0]
    assert count_over_loopback(lab, loss_rules)["received"] == DATAGRAMS
    lab.lose(host, 50)
    lab.lose(host, 0)
    assert lab.dropped(host) == 0
    assert count_over_loopback(lab, loss_rules) == {"sent": DATAGRAMS, "send_failed": 0, "received": DATAGRAMS,
                                                    "dropped": 0}


def test_loss_is_only_in_the_host_it_was_asked_for(make_lab: Callable[[int], Any], loss_rules: Any) -> None:
    lab = make_lab(2)
    lab.lose(lab.hosts[1], 100)
    assert count_over_loopback(lab, loss_rules, lab.hosts[1])["received"] == 0
    assert count_over_loopback(lab, loss_rules, lab.hosts[0])["received"] == DATAGRAMS
    assert lab.run(lab.hosts[0], ["nft", "list", "ruleset"]).stdout.strip() == ""


def test_no_live_agent_is_declared_dead_under_ten_percent_loss(loss_rules: Any) -> None:
    """A short run of the soak (tools/loss_soak.py; docs/benchmarks.md has the 5-minute one):
    real agent processes in a lab host losing 10 % of its packets."""
    import subprocess
    from pathlib import Path

    tool = Path(__file__).resolve().parent.parent / "tools" / "loss_soak.py"
    done = subprocess.run([sys.executable, str(tool), "--agents", "5", "--duration", "20", "--loss", "10"],
                          capture_output=True, text=True, timeout=120)
    summaries = [json.loads(line) for line in done.stdout.splitlines() if '"event": "summary"' in line]
    assert len(summaries) == 1, done.stdout[-2000:] + done.stderr
    summary = summaries[0]
    assert summary["packets_dropped"] > 100  # the loss was real
    assert summary["false_deaths"] == [] and summary["deaths_counted_by_agents"] == 0, summary
    assert summary["other_departures"] == [], summary
    assert done.returncode == 0, done.stderr

"""Test hosts in Linux network namespaces: several "machines" on one, joined by a switch.

Each lab makes a switch namespace holding a bridge, and N host namespaces, each
with one veth link to the bridge and a private address (10.77.<lab>.<i>/24) that
exists only inside the lab. Nothing is added to the root namespace, so traffic
can only flow between the lab's own hosts; closing the lab deletes every
namespace, and with them every link. Needs root and iproute2. Each host's
loopback is up, so processes inside one host can also talk over 127.0.0.1
(that host's own loopback, not the machine's).

Packet loss is injected with an nftables rule inside a host's namespace (this
kernel family may lack the netem qdisc; nf_tables' ``numgen`` does the same
job for loss). Rules live only in the lab's namespaces and vanish with them.
Needs nftables' ``nft`` as well.

    with Lab(3) as lab:
        proc = lab.popen(lab.hosts[0], [sys.executable, "-c", "..."])
        lab.cut(lab.hosts[2]); lab.heal(lab.hosts[2])
        lab.lose(lab.hosts[1], 10)          # 10% of the packets reaching h2 are lost
        lab.lose(lab.hosts[1], 0)           # and no more

From a shell (to experiment by hand; ``down`` removes every lab left behind):

    python tools/netns.py up 3      # prints the hosts and how to enter them
    python tools/netns.py down
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

PREFIX = "mqlab"


class LabUnavailable(RuntimeError):
    """This machine cannot make namespaces (not root, or no iproute2), or cannot inject
    packet loss in them (no nft, or a kernel without nf_tables' numgen)."""


def _ensure_command(command: str, package: str, install: bool) -> None:
    """Make sure ``command`` exists; as root with apt-get, install Debian's ``package`` if not."""
    if os.geteuid() != 0:
        raise LabUnavailable("network namespaces need root")
    if shutil.which(command):
        return
    if install and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for step in (["update", "-qq"], ["install", "-y", "-qq", package]):
            subprocess.run(["apt-get", *step], check=False, env=env, timeout=300,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not shutil.which(command):
        raise LabUnavailable(f"{package} ('{command}') is not installed and could not be installed")


def ensure_iproute2(install: bool = True) -> None:
    """Make sure ``ip`` exists; as root with apt-get, install iproute2 if it is missing."""
    _ensure_command("ip", "iproute2", install)


def ensure_nft(install: bool = True) -> None:
    """Make sure ``nft`` exists and the kernel takes the loss rule; as root with apt-get,
    install nftables if it is missing.

    The rule is tried once in a throwaway network namespace (``unshare --net``), so that
    a kernel without nf_tables or numgen is reported here, and the machine's own
    namespace is never touched.
    """
    _ensure_command("nft", "nftables", install)
    if not shutil.which("unshare"):
        raise LabUnavailable("cannot try the loss rule: util-linux's 'unshare' is missing")
    probe = subprocess.run(["unshare", "--net", "nft", "-f", "-"], input=_loss_ruleset(10, None),
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        raise LabUnavailable(f"the kernel refuses the loss rule (nf_tables with numgen needed): "
                             f"{probe.stderr.strip()}")


LOSS_TABLE = "mqlab_loss"
BLOCK_TABLE = "mqlab_block"
_INTERFACE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")  # what Linux takes, less what could break the nft script


def _loss_ruleset(percent: float, device: str | None) -> str:
    """An nft script that (re)places the one loss rule of a namespace, atomically.

    The rule drops packets as they *arrive* (prerouting hook), not as they leave:

    - Each packet is drawn exactly once. A packet passes its sender's output hook and
      its receiver's prerouting hook once each (on loopback both are the same host's);
      a rule on both would lose ``1 - (1 - p)**2``. The switch namespace has no rule.
    - The sender cannot tell, as on a lossy wire (and as with netem). A drop on the
      output hook fails the send at once (``sendto`` gets EPERM, TCP sees local
      congestion and retries on its own timer), which is not what a lost packet does.

    A TCP retransmission is a new packet and draws again.
    """
    # numgen draws uniformly in [0, 10000): 0.01 % steps. Priority -300 runs before
    # conntrack, so dropped packets leave no state behind.
    threshold = round(percent * 100)
    match = f'iifname "{device}" ' if device is not None else ""
    if threshold < 10000:  # 10000 itself is out of numgen's range: 100 % needs no draw
        match += f"numgen random mod 10000 < {threshold} "
    return (f"table inet {LOSS_TABLE}\n"
            f"delete table inet {LOSS_TABLE}\n"
            f"table inet {LOSS_TABLE} {{\n"
            f"  chain arriving {{\n"
            f"    type filter hook prerouting priority -300; policy accept;\n"
            f"    {match}counter drop\n"
            f"  }}\n"
            f"}}\n")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclasses.dataclass(frozen=True)
class Host:
    name: str
    """The host's namespace."""
    address: str
    """Its private address, on its ``eth0``."""
    switch_port: str
    """Its link's other end, on the bridge in the switch namespace."""


class Lab:
    """N hosts on one switch, each in its own network namespace."""

    def __init__(self, hosts: int, *, subnet: int | None = None) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("a lab has 1 to 200 hosts")
        self.size = hosts
        self.id = secrets.token_hex(2)
        self.subnet = subnet if subnet is not None else secrets.randbelow(200) + 20
        self.switch = f"{PREFIX}{self.id}sw"
        self.hosts: list[Host] = []
        self._made: list[str] = []
        self.processes: list[subprocess.Popen[Any]] = []
        self._blocked: dict[Host, set[str]] = {}

    def __enter__(self) -> Lab:
        ensure_iproute2()
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        self._made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for i in range(1, self.size + 1):
            ns = f"{PREFIX}{self.id}h{i}"
            _ip("netns", "add", ns)
            self._made.append(ns)
            # Both ends are born in the host namespace, so none ever exists in the root one.
            port = f"p{i}"
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", port)
            _ip("-n", ns, "link", "set", port, "netns", self.switch)
            _ip("-n", self.switch, "link", "set", port, "master", "br0")
            _ip("-n", self.switch, "link", "set", port, "up")
            address = f"10.77.{self.subnet}.{i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.hosts.append(Host(ns, address, port))

    def add_interface(self, host: Host, name: str = "eth1") -> str:
        """Give ``host`` a second link to the switch, on a second subnet; return its address."""
        i = self.hosts.index(host) + 1
        port = f"q{i}"
        _ip("-n", host.name, "link", "add", name, "type", "veth", "peer", "name", port)
        _ip("-n", host.name, "link", "set", port, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0")
        _ip("-n", self.switch, "link", "set", port, "up")
        address = f"10.78.{self.subnet}.{i}"
        _ip("-n", host.name, "addr", "add", f"{address}/24", "dev", name)
        _ip("-n", host.name, "link", "set", name, "up")
        return address

    def popen(self, host: Host, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside ``host``; the lab ends it (by PID) when it closes."""
        proc = subprocess.Popen(["ip", "netns", "exec", host.name, *argv], **kwargs)
        self.processes.append(proc)
        return proc

    def run(self, host: Host, argv: Sequence[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", host.name, *argv], capture_output=True, text=True,
                              timeout=timeout)

    def cut(self, host: Host) -> None:
        """Unplug the host's cable: its switch port goes down."""
        _ip("-n", self.switch, "link", "set", host.switch_port, "down")

    def heal(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.switch_port, "up")

    def block_multicast(self, host: Host) -> None:
        """The switch stops forwarding multicast to this host (as a network that filters mDNS
        does); unicast still flows. Block every host to stop multicast everywhere."""
        proc = subprocess.run(["bridge", "-n", self.switch, "link", "set", "dev", host.switch_port,
                               "mcast_flood", "off"], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"bridge link set {host.switch_port} mcast_flood off: {proc.stderr.strip()}")

    def lose(self, host: Host, percent: float, *, device: str | None = None) -> None:
        """Make ``host`` lose ``percent`` % (0-100, in 0.01 steps) of the packets that
        arrive at it, each drawn independently; ``device`` (e.g. ``"lo"``) limits it to
        packets arriving on that interface.

        Replaces the host's previous loss rule; ``percent`` 0 removes it. Every packet is
        drawn once, by its receiver, unseen by its sender (see :func:`_loss_ruleset`):
        a host talking to itself over 127.0.0.1 loses ``percent`` % of its loopback
        packets; two lossy hosts lose ``percent`` % each way.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"loss must be 0 to 100 percent, got {percent!r}")
        if device is not None and not _INTERFACE.match(device):
            raise ValueError(f"{device!r} is not an interface name")
        if percent == 0:
            self.clear_loss(host)
            return
        self._nft(host, _loss_ruleset(percent, device))

    def separate(self, a: Host, b: Host) -> None:
        """Lose every packet between ``a`` and ``b`` (both ways), while both still reach the
        other hosts: a partial partition. :meth:`rejoin` undoes it."""
        self._blocked.setdefault(a, set()).add(b.address)
        self._blocked.setdefault(b, set()).add(a.address)
        self._apply_blocks(a)
        self._apply_blocks(b)

    def rejoin(self, a: Host, b: Host) -> None:
        """Undo :meth:`separate`."""
        self._blocked.get(a, set()).discard(b.address)
        self._blocked.get(b, set()).discard(a.address)
        self._apply_blocks(a)
        self._apply_blocks(b)

    def _apply_blocks(self, host: Host) -> None:
        addresses = sorted(self._blocked.get(host, ()))
        script = f"table inet {BLOCK_TABLE}\ndelete table inet {BLOCK_TABLE}\n"
        if addresses:
            script += (f"table inet {BLOCK_TABLE} {{\n"
                       f"  chain arriving {{\n"
                       f"    type filter hook prerouting priority -310; policy accept;\n"
                       f"    ip saddr {{ {', '.join(addresses)} }} counter drop\n"
                       f"  }}\n"
                       f"}}\n")
        self._nft(host, script)

    def clear_loss(self, host: Host) -> None:
        """Remove ``host``'s loss rule, if any."""
        self._nft(host, f"table inet {LOSS_TABLE}\ndelete table inet {LOSS_TABLE}\n")

    def dropped(self, host: Host) -> int:
        """Packets ``host``'s loss rule has dropped so far (0 without a rule)."""
        proc = self.run(host, ["nft", "list", "table", "inet", LOSS_TABLE])
        found = re.search(r"counter packets (\d+)", proc.stdout) if proc.returncode == 0 else None
        return int(found.group(1)) if found else 0

    def _nft(self, host: Host, script: str) -> None:
        if host not in self.hosts:
            raise ValueError(f"{host.name} is not a host of this lab")
        if not shutil.which("nft"):
            raise LabUnavailable("nftables ('nft') is missing: call ensure_nft() first")
        proc = subprocess.run(["ip", "netns", "exec", host.name, "nft", "-f", "-"], input=script,
                              capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise RuntimeError(f"nft in {host.name}: {proc.stderr.strip()}")

    def close(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()  # only the processes this lab started, by their PID
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self.processes.clear()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()


def leftover_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make a lab and leave it running")
    up.add_argument("hosts", type=int)
    sub.add_parser("down", help="delete every lab namespace left on this machine")
    args = ap.parse_args(argv)
    try:
        ensure_iproute2()
    except LabUnavailable as exc:
        print(f"netns: {exc}", file=sys.stderr)
        return 2
    if args.cmd == "up":
        lab = Lab(args.hosts)
        lab._build()
        for h in lab.hosts:
            print(f"{h.name}  {h.address}    enter: ip netns exec {h.name} bash")
        print("remove with: python tools/netns.py down")
        return 0
    for ns in leftover_namespaces():
        subprocess.run(["ip", "netns", "del", ns], timeout=30)
        print(f"deleted {ns}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

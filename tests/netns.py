"""Two "nodes" on one machine for the multi-node tests: Linux network namespaces joined by a veth pair.

Each node is a network namespace with its own address and hostname (commands run through `ip netns exec` and
`unshare --uts`, which sets the hostname), and `/etc/netns/<name>/hosts` so that every node's hostname resolves
there to its address on the link, as on a cluster. The filesystem is the machine's own, shared by both nodes as a
cluster shares its storage.

    with two_nodes() as (a, b):
        proc = a.popen(["python", "-m", "pipeline.pretrain", ...], cwd=project)
        b.freeze()          # what a crashed machine looks like: every process stopped, its link down (no TCP reset)
        b.kill()            # or every process of the node killed outright

Needs root, `ip` (iproute2) and `unshare` (util-linux); `netns_unavailable()` says why not, when not. Names carry the
owner's process id (`t5rmn-<pid>-a`), so concurrent test processes do not collide, and whatever a killed test process
left behind (namespaces and every process in them, links, hosts files, `/tmp/t5rmn-<pid>-*` scratch) is removed by the
next harness that starts.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PREFIX = "t5rmn"  # multi-node test harness: namespaces, hostnames, links, scratch
NAME = re.compile(rf"^{PREFIX}-(\d+)-[a-z]$")  # namespaces and hostnames: t5rmn-<owner pid>-<node letter>
LINK = re.compile(rf"^{PREFIX}(\d+)[a-z](@.*)?$")  # veth ends (at most 15 characters): t5rmn<owner pid><node letter>
NETNS_ETC = Path("/etc/netns")
SUBNET = "10.231.7"  # addresses live inside the namespaces only, so concurrent pairs may share them


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """None when namespaces can be made here, else the reason."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed"
    probe = f"{PREFIX}-{os.getpid()}-z"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    try:
        hostname = subprocess.run(
            ["ip", "netns", "exec", probe, "unshare", "--uts", "--", "sh", "-c", f"hostname {probe} && hostname"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if hostname.stdout.strip() != probe:
            return f"`unshare --uts` cannot set a hostname: {hostname.stderr.strip()}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespace_pids(name: str) -> list[int]:
    """The processes running in network namespace `name`."""
    proc = _ip("netns", "pids", name, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def _remove_namespace(name: str) -> None:
    for _ in range(3):  # kill what runs there first: a namespace with processes outlives its name
        pids = namespace_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.2)
    _ip("netns", "del", name, check=False)
    shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def remove_leftovers(owner: int | None = None) -> list[str]:
    """Remove the namespaces, links and hosts files of harnesses whose process is gone (or of `owner`)."""
    removed = []
    names = [line.split()[0] for line in _ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    if NETNS_ETC.is_dir():
        names += [p.name for p in NETNS_ETC.iterdir()]
    for name in sorted(set(names)):
        match = NAME.match(name)
        if match and (int(match.group(1)) == owner or not _alive(int(match.group(1)))):
            _remove_namespace(name)
            removed.append(name)
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}-*-*"):  # scratch of the harnesses (tests/slurm_nodes.py)
        match = re.match(rf"^{PREFIX}-(\d+)-", path.name)
        if match and (int(match.group(1)) == owner or not _alive(int(match.group(1)))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        parts = line.split(":")
        link = parts[1].strip() if len(parts) > 1 else ""
        match = LINK.match(link)
        if match and (int(match.group(1)) == owner or not _alive(int(match.group(1)))):
            _ip("link", "del", link.split("@")[0], check=False)
            removed.append(link)
    return removed


@dataclass
class Node:
    """One node: a network namespace, its hostname (the same name), its veth end and address."""

    name: str
    addr: str
    link: str

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this node: in its network namespace, under its hostname, with its /etc/hosts."""
        return ["ip", "netns", "exec", self.name, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *argv]  # fmt: skip

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start `argv` on this node (in a new session, so `kill()` of the test need not find it by name)."""
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.command(argv), **kwargs)

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), **kwargs)

    def pids(self) -> list[int]:
        return namespace_pids(self.name)

    def signal_all(self, signum: int) -> list[int]:
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        return pids

    def freeze(self) -> list[int]:
        """A crashed machine as its peers see it: every process stopped, then the link down (no TCP reset)."""
        pids = self.signal_all(signal.SIGSTOP)
        _ip("-n", self.name, "link", "set", self.link, "down")
        return pids

    def thaw(self) -> None:
        _ip("-n", self.name, "link", "set", self.link, "up")
        self.signal_all(signal.SIGCONT)

    def kill(self) -> list[int]:
        """Every process of the node killed outright (its peers see the connections close)."""
        return self.signal_all(signal.SIGKILL)

    def set_hosts(self, entries: dict[str, str]) -> None:
        """This node's /etc/hosts (`{hostname: IPv4 address}`), rewritten in place (`ip netns exec` bind-mounts it).

        Each address is listed IPv4-mapped too: torch's store accepts on a dual-stack socket and looks its peers up
        by that form, which the hosts file answers only when it lists it (else a warning per connection)."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback", "::ffff:127.0.0.1 localhost"]
        lines += [f"{prefix}{addr} {host}" for host, addr in entries.items() for prefix in ("", "::ffff:")]
        text = "\n".join(lines) + "\n"
        with (NETNS_ETC / self.name / "hosts").open("w") as f:
            f.write(text)


@contextlib.contextmanager
def two_nodes() -> Iterator[tuple[Node, Node]]:
    """Nodes `t5rmn-<pid>-a` (10.231.7.1) and `-b` (10.231.7.2), each resolving both hostnames; removed on exit
    with every process still running in them."""
    owner = os.getpid()
    remove_leftovers(owner)
    nodes = [Node(f"{PREFIX}-{owner}-{x}", f"{SUBNET}.{i + 1}", f"{PREFIX}{owner}{x}") for i, x in enumerate("ab")]
    try:
        for node in nodes:
            _ip("netns", "add", node.name)
            (NETNS_ETC / node.name).mkdir(parents=True, exist_ok=True)
            (NETNS_ETC / node.name / "resolv.conf").write_text("# no DNS: names come from /etc/hosts\n")
        a, b = nodes
        _ip("link", "add", a.link, "type", "veth", "peer", "name", b.link)
        for node in nodes:
            _ip("link", "set", node.link, "netns", node.name)
            _ip("-n", node.name, "addr", "add", f"{node.addr}/24", "dev", node.link)
            _ip("-n", node.name, "link", "set", node.link, "up")
            _ip("-n", node.name, "link", "set", "lo", "up")
            node.set_hosts({n.name: n.addr for n in nodes})
        yield a, b
    finally:
        for node in nodes:
            _remove_namespace(node.name)
        remove_leftovers(owner)

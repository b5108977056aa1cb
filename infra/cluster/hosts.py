"""Hosts of their own on one machine: the local cluster's worker nodes and its MLflow server, each in a Linux
network namespace with its own address on a private bridge (``local-cluster up --hosts``, root only).

    bridge vaebr<base port>  10.A.B.1/24   the head host (the root namespace: Ray's head, S3, PostgreSQL)
      veth v<port>m   ->  namespace vae<port>-mlflow     10.A.B.2    the tracking host (MLflow's server)
      veth v<port>w<k> -> namespace vae<port>-worker-<k>  10.A.B.<10+k> worker host k (a raylet)

A and B come from the cluster's base port, so two clusters on one machine get two subnets. Only these
addresses and loopback are used. Setting a host's veth down (``partition``) is a real network partition: its
packets go nowhere, TCP connections stall, and Ray's health checks fail; ``heal`` sets it up again.
Everything is made with ``ip`` (iproute2): ``ip netns``, ``ip link ... type veth|bridge``, ``ip addr``.
iproute2 rather than pyroute2: these are the commands an operator types to look at or repair the hosts
(``ip netns exec``, ``ip link show``), each change is one short command whose error text is passed on as is,
and running a process inside a namespace needs ``ip netns exec`` (or an equivalent setns helper) anyway.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

HEAD = "head"
TRACKING = "mlflow"
_NAMESPACE_DIR = Path("/var/run/netns")


class NetworkError(RuntimeError):
    """A namespace, veth or bridge could not be made or changed; the message names the command and why."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def available() -> str | None:
    """None when this machine can make the hosts, else why not (and the way out)."""
    if os.geteuid() != 0:
        return "separate hosts need root (network namespaces); run as root or leave out --hosts"
    try:
        _ip("netns", "list")
    except FileNotFoundError:
        return "`ip` (iproute2) is not installed: apt-get install iproute2, or leave out --hosts"
    except NetworkError as error:
        return f"network namespaces are not usable here ({error}); leave out --hosts"
    return None


@dataclasses.dataclass(frozen=True)
class HostNetwork:
    """Names and addresses of one cluster's hosts; :meth:`create` makes them, :meth:`remove` undoes it."""

    base_port: int

    @property
    def subnet(self) -> str:
        """``10.A.B`` of the /24: A in 200..249 and B from the base port (distinct for ports 20000-32767)."""
        return f"10.{200 + (self.base_port // 256) % 50}.{self.base_port % 256}"

    @property
    def bridge(self) -> str:
        """The Linux bridge joining the hosts (the head's interface), ``vaebr<base port>``."""
        return f"vaebr{self.base_port}"

    def namespace(self, host: str) -> str | None:
        """The namespace of ``host``; None for the head (the root namespace)."""
        return None if host == HEAD else f"vae{self.base_port}-{host}"

    def veth(self, host: str) -> str:
        """The root end of ``host``'s link (<= 15 characters, the kernel's limit)."""
        return f"v{self.base_port}m" if host == TRACKING else f"v{self.base_port}w{_worker_index(host)}"

    def address(self, host: str) -> str:
        """``host``'s IPv4 address: .1 the head, .2 the MLflow host, .10+K worker K.

        Raises:
            ValueError: ``host`` is not "head", "mlflow" or "worker-K" (K <= 200).
        """
        if host == HEAD:
            return f"{self.subnet}.1"
        if host == TRACKING:
            return f"{self.subnet}.2"
        return f"{self.subnet}.{10 + _worker_index(host)}"

    def exec_prefix(self, host: str) -> list[str]:
        """What runs a command on ``host``: ``ip netns exec <namespace>``, nothing for the head."""
        namespace = self.namespace(host)
        return [] if namespace is None else ["ip", "netns", "exec", namespace]

    def create(self, hosts: list[str]) -> None:
        """Make the bridge (the head's address on it) and one namespace + veth pair per host in ``hosts``.
        Leftovers of an earlier cluster on the same base port are removed first.

        Raises:
            NetworkError: an ``ip`` command failed (its message says which and why).
        """
        self.remove()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.address(HEAD)}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in hosts:
            self.add_host(host)

    def add_host(self, host: str) -> None:
        """Make ``host``'s namespace, with ``eth0`` at :meth:`address` joined to the bridge by a veth pair.

        Raises:
            ValueError: ``host`` is the head (it lives in the root namespace) or not a host name.
            NetworkError: an ``ip`` command failed (e.g. the namespace exists already).
        """
        namespace, outer = self.namespace(host), self.veth(host)
        if namespace is None:
            raise ValueError("the head lives in the root namespace")
        inner = f"{outer}i"
        _ip("netns", "add", namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", namespace)
        _ip("-n", namespace, "link", "set", inner, "name", "eth0")
        _ip("-n", namespace, "addr", "add", f"{self.address(host)}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("link", "set", outer, "master", self.bridge)
        _ip("link", "set", outer, "up")

    def remove(self) -> list[str]:
        """Delete this cluster's namespaces (their veths go with them) and its bridge; returns what it
        deleted. Processes still inside a namespace keep it alive until they exit: stop them first."""
        removed = []
        prefix = f"vae{self.base_port}-"
        for line in _ip("netns", "list", check=False).stdout.splitlines():
            name = line.split()[0] if line.strip() else ""
            if name.startswith(prefix):
                _ip("netns", "delete", name, check=False)
                removed.append(name)
        for link in (self.bridge, *self._leftover_veths()):
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "delete", link, check=False)
                removed.append(link)
        return removed

    def _leftover_veths(self) -> list[str]:
        out = _ip("-o", "link", "show", check=False).stdout
        return re.findall(rf"^\d+: (v{self.base_port}(?:m|w\d+))[@:]", out, flags=re.M)

    def set_link(self, host: str, up: bool) -> None:
        """Connect (``up``) or partition ``host``: its veth on the bridge up or down.

        Raises:
            ValueError: ``host`` is the head.
            NetworkError: ``host`` has no link (the cluster was not started with its hosts).
        """
        if host == HEAD:
            raise ValueError("the head is the root namespace; partition a worker host or the mlflow host")
        _ip("link", "set", self.veth(host), "up" if up else "down")

    def link_up(self, host: str) -> bool | None:
        """Whether ``host``'s link is up (None: no such link)."""
        done = _ip("-o", "link", "show", self.veth(host), check=False)
        if done.returncode != 0:
            return None
        flags = re.search(r"<([^>]*)>", done.stdout)
        return bool(flags) and "UP" in flags.group(1).split(",")


def _worker_index(host: str) -> int:
    match = re.fullmatch(r"worker-([1-9][0-9]*)", host)
    if not match or int(match.group(1)) > 200:
        raise ValueError(f"host {host!r}: 'head', 'mlflow' or 'worker-K' (K <= 200)")
    return int(match.group(1))

"""Kernel plumbing for the local cluster: namespaces, the underlay bridge, node and pod veths.

Everything here is a blocking netlink/procfs call with "ensure" semantics: a function describes
the desired state, creates what is missing, corrects what differs and treats EEXIST/ENOENT as
success, so re-running it is a no-op. Functions act on the calling thread's network namespace
(a node's agent runs inside its node namespace); :func:`in_netns` runs one in another namespace.

pyroute2 0.9 pitfalls this module works around:

- The sync ``IPRoute`` drives its own asyncio loop with ``run_until_complete``; created in a
  thread that already runs a loop it picks that loop and fails ("This event loop is already
  running"). Call these functions from a worker thread (``asyncio.to_thread``), never from a
  coroutine directly; :func:`_ipr` turns the failure into a clear message.
- ``IPRoute(netns=...)`` and ``pyroute2.netns.create`` fork a child process, and with the
  default ``flags=os.O_CREAT`` a mistyped name silently *creates* a namespace. Here a namespace
  is entered by ``setns(2)`` in a dedicated thread instead (network namespaces are per thread
  on Linux); a plain ``IPRoute()`` opens its socket in the calling thread, so it lands there.
- ``net_ns_fd`` given as a name is resolved under ``/var/run/netns``; paths such as
  ``/proc/<pid>/ns/net`` need an fd, which is what is passed here.
- ``link("get", ifname=...)`` raises ``NetlinkError`` ENODEV for a missing link; deleting a
  missing route raises ESRCH.
- ``route("del", ...)`` sends scope 0 (universe) where iproute2 sends "nowhere" (any), so a
  scope-link route is not found (ESRCH) unless its scope is passed along.
- The kernel may lack CONFIG_DUMMY (EOPNOTSUPP on "add"): see :func:`ensure_router`.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import functools
import hashlib
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from shared import proxy
from shared.errors import AlreadyExists, Internal, InvalidArgument, NotFound

NETNS_DIR = Path("/run/netns")

P = ParamSpec("P")
T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_BIND = 0x1000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: which kind of namespace it is
IFNAMSIZ = 16  # including the trailing NUL
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RT_TABLE_MAIN = 254
RTNH_F_ONLINK = 4
IFF_UP = 0x1
NODE_IFNAME = "eth0"
ROUTER_KINDS = ("dummy", "ifb")  # in order of preference
BLACKHOLE_METRIC = 4_000_000_000
# the underlay carries 1500-byte pod frames inside VXLAN (50 bytes of headers), as a data
# centre network with a raised MTU does: no fragmentation of the overlay, pods keep 1500
UNDERLAY_MTU = 1550

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class WiredEndpoint:
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_mac: str


# --- namespaces -----------------------------------------------------------------------------


def netns_path(name: str) -> Path:
    """Where the named namespace is bind-mounted (the ``ip netns`` convention)."""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"invalid network namespace name {name!r}", field="netns")
    return NETNS_DIR / name


def in_netns(netns: str | Path, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn`` in a fresh thread that entered ``netns`` (a name or a path); its result.

    setns(2) only moves the calling thread, so the caller's own namespace never changes, and
    the thread exits afterwards so no pooled thread is left in a foreign namespace. Inside,
    use /proc/thread-self, not /proc/self (that is the main thread's). Blocks until done.
    """
    path = Path(netns) if isinstance(netns, Path) or "/" in netns else netns_path(netns)
    fd = _open_netns(path)

    def enter_and_run() -> T:
        _check(_libc.setns(fd, CLONE_NEWNET), f"setns {path}")
        # Never let fn reconfigure the wrong namespace (the root one, say) by accident.
        if os.stat("/proc/thread-self/ns/net").st_ino != os.fstat(fd).st_ino:
            raise Internal(f"setns {path} did not switch the network namespace")
        return fn(*args, **kwargs)

    try:
        return _in_own_thread(f"netns:{path}", enter_and_run)
    finally:
        os.close(fd)


def ensure_netns(name: str) -> Path:
    """Create the named namespace if missing, with ``lo`` up inside; its path."""
    path = netns_path(name)
    if not _is_netns(path):
        # A plain file left by a crash between creating the mount point and binding it.
        path.unlink(missing_ok=True)
        _create_netns(path)
    in_netns(path, _set_up, "lo")
    return path


def delete_netns(name: str) -> None:
    """Kill the processes inside the named namespace (what ``pod exec`` started there: it
    must not outlive its pod), then unmount and remove it; its links die with its last user."""
    path = netns_path(name)
    kill_processes_in(path)
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point / already gone
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    path.unlink(missing_ok=True)


def kill_processes_in(path: Path) -> list[int]:
    """SIGKILL every process whose network namespace is the one bound at ``path`` (never this
    one); the pids signalled. Matched by the namespace's inode, so no other namespace's
    processes are touched, whoever made them."""
    try:
        target = path.stat()
    except FileNotFoundError:
        return []
    if not _is_netns(path):
        return []
    killed: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            ns = os.stat(entry / "ns" / "net")
            if (ns.st_dev, ns.st_ino) == (target.st_dev, target.st_ino):
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited meanwhile, or a kernel thread
    return killed


def list_netns(prefix: str) -> list[str]:
    """Names of the namespaces under /run/netns that start with ``prefix``."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


# --- root namespace: the local cluster's underlay -------------------------------------------


def _wrap_netlink(fn: Callable[P, T]) -> Callable[P, T]:
    """Turn a kernel refusal into the project's error type, naming the operation."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except NetlinkError as exc:
            raise Internal(f"{fn.__name__}: kernel refused: {os.strerror(exc.code)}") from exc

    return wrapper


@_wrap_netlink
def ensure_underlay(bridge: str, gateway: IPv4Interface, blackholes: Sequence[IPv4Network]) -> None:
    """Underlay bridge up with ``gateway``, and blackholes so the cluster's ranges stay local."""
    _check_ifname(bridge, "bridge")
    with _ipr() as ipr:
        link = _ensure_link(ipr, bridge, "bridge")
        # Before the link comes up, so it never sends router solicitations or DAD.
        _sysctl(f"net/ipv6/conf/{bridge}/disable_ipv6", "1", optional=True)
        _ensure_addr(ipr, _index(link), gateway)
        ipr.link("set", index=_index(link), state="up")
        for net in blackholes:
            # a low priority (high metric): the underlay's own connected route stays in front
            ipr.route("replace", dst=str(net), type="blackhole", priority=BLACKHOLE_METRIC)


@_wrap_netlink
def remove_underlay(bridge: str, blackholes: Sequence[IPv4Network]) -> None:
    """Delete the bridge and the blackhole routes, whichever of them still exist."""
    with _ipr() as ipr:
        _delete_link(ipr, bridge, "bridge")
        for net in blackholes:
            try:
                # type= makes the kernel match only our blackhole, not a real route.
                ipr.route("del", dst=str(net), type="blackhole", priority=BLACKHOLE_METRIC)
            except NetlinkError as exc:
                if exc.code != errno.ESRCH:
                    raise


@_wrap_netlink
def ensure_node(netns: str, bridge: str, address: IPv4Interface, root_ifname: str) -> None:
    """Node namespace on the underlay: ``root_ifname`` on ``bridge``, its peer ``eth0`` inside."""
    _check_ifname(root_ifname, "root_ifname")
    path = ensure_netns(netns)
    # Before eth0 exists, so the default.* values apply to it from birth.
    in_netns(path, _node_sysctls)
    with _ipr() as ipr:
        bridge_link = _get_link(ipr, bridge)
        if bridge_link is None:
            raise NotFound(f"underlay bridge {bridge} does not exist", field="bridge")
        link = _ensure_veth(ipr, root_ifname, path, NODE_IFNAME)
        _sysctl(f"net/ipv6/conf/{root_ifname}/disable_ipv6", "1", optional=True)
        ipr.link(
            "set", index=_index(link), master=_index(bridge_link), mtu=UNDERLAY_MTU, state="up"
        )
    in_netns(path, _configure_node_side, address)


@_wrap_netlink
def remove_node(netns: str, root_ifname: str) -> None:
    """Delete the node's root-side veth (its peer goes with it) and its namespace."""
    with _ipr() as ipr:
        _delete_link(ipr, root_ifname, "veth")
    delete_netns(netns)


# --- inside a node (the calling thread's namespace is the node's) ---------------------------


@_wrap_netlink
def ensure_router(device: str, router: IPv4Address) -> None:
    """Dummy ``device`` up with ``router``/32, the pods' gateway.

    Being a local address of the node, the node answers the pods' ARP for it on their veths.
    Kernels built without CONFIG_DUMMY get an ifb device instead, which behaves the same here:
    it only holds the address, and anything transmitted to it is dropped.
    """
    _check_ifname(device, "device")
    with _ipr() as ipr:
        link = _ensure_link(ipr, device, ROUTER_KINDS)
        _sysctl(f"net/ipv6/conf/{device}/disable_ipv6", "1", optional=True)
        _ensure_addr(ipr, _index(link), IPv4Interface(f"{router}/32"))
        ipr.link("set", index=_index(link), state="up")


@_wrap_netlink
def ensure_proxy_route() -> None:
    """Packets the datapath assigned to the L7 proxy's socket (``MARK_TO_PROXY``) are delivered
    locally whatever their destination address: a rule for the mark and a table whose only
    route is ``local 0.0.0.0/0 dev lo`` (shared/proxy.py).

    And no TIME_WAIT in the node's namespace. The proxy closes a client's connection first
    whenever the server did (``Connection: close``), which leaves the TIME_WAIT socket here,
    under the client's tuple; the client, which has none, soon reuses its port for a new
    connection. Its SYN, assigned to the listener (the datapath passes TIME_WAIT sockets by,
    they would look for a listener on the original port), is then dropped by the kernel as a
    duplicate of the TIME_WAIT socket: every reused port cost the client a SYN timeout. The
    same TIME_WAIT would refuse the proxy's upstream bound to the client's port (another node's
    pod). TIME_WAIT guards against old segments on lossy paths; these are veths and the
    underlay of one host."""
    _sysctl("net/ipv4/tcp_max_tw_buckets", "0")
    with _ipr() as ipr:
        lo = _index(_get_link(ipr, "lo"))
        ipr.route(
            "replace",
            dst="0.0.0.0/0",
            type="local",
            oif=lo,
            table=proxy.PROXY_ROUTE_TABLE,
            scope=RT_SCOPE_HOST,
        )
        rule = {
            "table": proxy.PROXY_ROUTE_TABLE,
            "priority": proxy.PROXY_RULE_PRIORITY,
            "fwmark": proxy.MARK_TO_PROXY,
            "fwmask": proxy.MARK_MAGIC_MASK,
        }
        try:
            ipr.rule("add", family=socket.AF_INET, **rule)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


@_wrap_netlink
def wire_endpoint(
    pod_netns: Path, ifname: str, host_ifname: str, address: IPv4Address, router: IPv4Address
) -> WiredEndpoint:
    """Veth from here into the pod: ``host_ifname`` here, ``ifname`` with ``address``/32 there.

    An existing pair is kept and its configuration corrected; a ``host_ifname`` whose peer is
    not ``ifname`` in ``pod_netns`` is replaced.
    """
    _check_ifname(ifname, "ifname")
    _check_ifname(host_ifname, "host_ifname")
    with _ipr() as ipr:
        link = _ensure_veth(ipr, host_ifname, pod_netns, ifname)
        index = _index(link)
        pod_mac = in_netns(pod_netns, _configure_pod_side, ifname, address, router)
        # rp_filter off: packets from the pod arrive here with a source only the BPF knows about.
        _sysctl(f"net/ipv4/conf/{host_ifname}/rp_filter", "0")
        _sysctl(f"net/ipv6/conf/{host_ifname}/disable_ipv6", "1", optional=True)
        ipr.link("set", index=index, state="up")
        _ensure_host_route(ipr, index, address)
        return WiredEndpoint(host_ifname, index, str(link.get("address")), pod_mac)


@_wrap_netlink
def unwire_endpoint(host_ifname: str) -> None:
    """Delete ``host_ifname`` if present; the pod's peer and the /32 route go with it."""
    with _ipr() as ipr:
        _delete_link(ipr, host_ifname, "veth")


@_wrap_netlink
def endpoint_wired(pod_netns: Path, ifname: str, host_ifname: str, address: IPv4Address) -> bool:
    """Whether ``host_ifname`` is up here, paired with ``ifname`` holding ``address`` in the pod."""
    with _ipr() as ipr:
        link = _get_link(ipr, host_ifname)
        if link is None or not int(link["flags"]) & IFF_UP:
            return False
        try:
            if not _peer_matches(ipr, link, pod_netns, ifname):
                return False
        except NotFound:
            return False
    return in_netns(pod_netns, _has_address, ifname, IPv4Interface(f"{address}/32"))


def host_ifname_for(key: str) -> str:
    """Stable host-side veth name for an endpoint key (fits IFNAMSIZ)."""
    return "lxc" + hashlib.sha256(key.encode()).hexdigest()[:11]


# --- helpers --------------------------------------------------------------------------------


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _check_ifname(name: str, field: str) -> None:
    if not name or len(name) >= IFNAMSIZ or "/" in name or name.strip() != name:
        raise InvalidArgument(
            f"invalid interface name {name!r} (1 to {IFNAMSIZ - 1} characters)", field=field
        )


def _open_netns(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound(f"network namespace {path} does not exist", field="netns") from None


def _is_netns(path: Path) -> bool:
    """Whether ``path`` is a bound network namespace (not just the empty mount-point file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        return fcntl.ioctl(fd, NS_GET_NSTYPE) == CLONE_NEWNET
    except OSError:  # ENOTTY: a regular file
        return False
    finally:
        os.close(fd)


def _create_netns(path: Path) -> None:
    """What ``ip netns add`` does, in a thread rather than a forked child."""
    _share_netns_dir()
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))

    def unshare_and_bind() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        rc = _libc.mount(b"/proc/thread-self/ns/net", os.fsencode(path), b"none", MS_BIND, None)
        _check(rc, f"bind mount {path}")

    try:
        # The thread that unshared exits, so only the bind mount keeps the namespace alive.
        _in_own_thread(f"netns-create:{path.name}", unshare_and_bind)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _in_own_thread(name: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a new thread that exits afterwards, so its namespace never leaks elsewhere."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]


def _share_netns_dir() -> None:
    """Make /run/netns a shared mount, as iproute2 does, so binds propagate to mount namespaces."""
    NETNS_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    target = os.fsencode(NETNS_DIR)
    if _libc.mount(b"", target, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _check(-1, f"make {NETNS_DIR} shared")
    _check(_libc.mount(target, target, b"none", MS_BIND | MS_REC, None), f"bind {NETNS_DIR}")
    _check(_libc.mount(b"", target, b"none", MS_SHARED | MS_REC, None), f"share {NETNS_DIR}")


def _sysctl(key: str, value: str, *, optional: bool = False) -> None:
    """Write /proc/sys/``key`` for the calling thread's namespace (net.* sysctls are per netns)."""
    try:
        Path("/proc/sys", key).write_text(value)
    except OSError:
        if not optional:
            raise


@contextmanager
def _ipr() -> Iterator[Any]:
    """An rtnetlink socket in the calling thread's network namespace."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("netns functions block: call them via asyncio.to_thread")
    ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _index(link: Any) -> int:
    return int(link["index"])


def _kind(link: Any) -> str | None:
    kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return None if kind is None else str(kind)


def _get_link(ipr: Any, name: str) -> Any | None:
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise


def _delete_link(ipr: Any, name: str, kind: str) -> None:
    """Delete link ``name`` if present; refuse if it is not a ``kind`` (so not one of ours)."""
    link = _get_link(ipr, name)
    if link is None:
        return
    if _kind(link) != kind:
        raise InvalidArgument(f"link {name} is not a {kind}; not deleting it", field="ifname")
    try:
        ipr.link("del", index=_index(link))
    except NetlinkError as exc:
        if exc.code != errno.ENODEV:  # gone meanwhile, e.g. with its peer
            raise


def _ensure_link(ipr: Any, name: str, kinds: str | tuple[str, ...]) -> Any:
    """Link ``name`` of one of ``kinds``, creating the first kind the kernel supports."""
    kinds = (kinds,) if isinstance(kinds, str) else kinds
    link = _get_link(ipr, name)
    for kind in kinds:
        if link is not None:
            break
        try:
            ipr.link("add", ifname=name, kind=kind)
        except NetlinkError as exc:
            if exc.code == errno.EOPNOTSUPP and kind != kinds[-1]:  # not built into the kernel
                continue
            if exc.code != errno.EEXIST:  # EEXIST: created concurrently, checked below
                raise
        link = _get_link(ipr, name)
    if link is None or _kind(link) not in kinds:
        raise AlreadyExists(f"link {name} exists and is not a {'/'.join(kinds)}", field="ifname")
    return link


def _set_up(name: str) -> None:
    with _ipr() as ipr:
        ipr.link("set", ifname=name, state="up")


def _ensure_addr(ipr: Any, index: int, iface: IPv4Interface) -> None:
    """``iface`` is the only IPv4 address on the link: a diff, not flush and refill."""
    have = {
        IPv4Interface(f"{a.get('local') or a.get('address')}/{a['prefixlen']}")
        for a in ipr.addr("dump", index=index, family=socket.AF_INET)
    }
    for stale in have - {iface}:
        ipr.addr("del", index=index, address=str(stale.ip), prefixlen=stale.network.prefixlen)
    if iface not in have:
        try:
            ipr.addr("add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise


def _veth_ends(ifname: str) -> tuple[int, int] | None:
    """(ifindex, peer ifindex) of veth ``ifname`` in the calling thread's namespace."""
    with _ipr() as ipr:
        link = _get_link(ipr, ifname)
        if link is None or _kind(link) != "veth":
            return None
        return _index(link), int(link.get("link") or 0)


def _peer_matches(ipr: Any, link: Any, peer_netns: Path, peer_ifname: str) -> bool:
    """Whether veth ``link`` here pairs with ``peer_ifname`` in ``peer_netns``.

    Checked both ways (indices are per namespace) and through the namespace id the kernel
    reports for the peer, so a look-alike in another namespace does not count.
    """
    nsid = link.get("link_netnsid")
    if _kind(link) != "veth" or nsid is None:
        return False
    fd = _open_netns(peer_netns)
    try:
        info = ipr.get_netnsid(fd=fd)
    finally:
        os.close(fd)
    if info is None or info["nsid"] != nsid:
        return False
    ends = in_netns(peer_netns, _veth_ends, peer_ifname)
    return ends == (int(link.get("link") or 0), _index(link))


def _ensure_veth(ipr: Any, name: str, peer_netns: Path, peer_ifname: str) -> Any:
    """Veth ``name`` here whose peer is ``peer_ifname`` in ``peer_netns``; its link message."""
    link = _get_link(ipr, name)
    if link is not None:
        if _kind(link) != "veth":  # never delete someone else's device that shares the name
            raise AlreadyExists(f"link {name} exists and is not a veth", field="ifname")
        if _peer_matches(ipr, link, peer_netns, peer_ifname):
            return link
        _delete_link(ipr, name, "veth")  # stale: its peer is gone, elsewhere or renamed
    fd = _open_netns(peer_netns)
    try:
        # The peer is born in the target namespace: no temporary name clash here.
        ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer_ifname, "net_ns_fd": fd})
    except NetlinkError as exc:
        if exc.code != errno.EEXIST:
            raise
        raise AlreadyExists(
            f"cannot create veth {name}: {peer_ifname} already exists in {peer_netns}",
            field="ifname",
        ) from exc
    finally:
        os.close(fd)
    link = _get_link(ipr, name)
    if link is None:
        raise Internal(f"veth {name} vanished right after it was created")
    return link


def _ensure_host_route(ipr: Any, index: int, address: IPv4Address) -> None:
    """``address``/32 is the only route through the pod's host-side veth."""
    for route in ipr.route("dump", family=socket.AF_INET, table=RT_TABLE_MAIN):
        dst = f"{route.get('dst') or '0.0.0.0'}/{route['dst_len']}"
        if route.get("oif") == index and dst != f"{address}/32":
            ipr.route("del", dst=dst, oif=index, scope=route["scope"], table=RT_TABLE_MAIN)
    # replace: a pod address still routed to a stale device moves to this one.
    ipr.route("replace", dst=f"{address}/32", oif=index, scope=RT_SCOPE_LINK)


def _node_sysctls() -> None:
    # A node routes between pods and the underlay; the BPF datapath, not rp_filter or ICMP
    # redirects, decides what is allowed (send_redirects is ORed with the per-device value).
    _sysctl("net/ipv4/ip_forward", "1")
    for scope in ("all", "default"):
        _sysctl(f"net/ipv4/conf/{scope}/rp_filter", "0")
        _sysctl(f"net/ipv4/conf/{scope}/send_redirects", "0")
        _sysctl(f"net/ipv6/conf/{scope}/disable_ipv6", "1", optional=True)


def _configure_node_side(address: IPv4Interface) -> None:
    with _ipr() as ipr:
        ipr.link("set", ifname="lo", state="up")
        link = _get_link(ipr, NODE_IFNAME)
        if link is None:
            raise Internal(f"{NODE_IFNAME} missing in the node namespace")
        _ensure_addr(ipr, _index(link), address)
        ipr.link("set", index=_index(link), mtu=UNDERLAY_MTU, state="up")


def _configure_pod_side(ifname: str, address: IPv4Address, router: IPv4Address) -> str:
    """Address, link state and routes inside the pod; the pod interface's MAC."""
    with _ipr() as ipr:
        ipr.link("set", ifname="lo", state="up")
        link = _get_link(ipr, ifname)
        if link is None:
            raise Internal(f"{ifname} missing in the pod namespace")
        index = _index(link)
        # the datapath is IPv4-only and drops what it cannot check: no IPv6 chatter from
        # the pod (router solicitations, DAD) before its link comes up
        _sysctl(f"net/ipv6/conf/{ifname}/disable_ipv6", "1", optional=True)
        _ensure_addr(ipr, index, IPv4Interface(f"{address}/32"))
        ipr.link("set", index=index, state="up")
        # With a /32 there is no connected subnet: the router is reachable on-link by fiat.
        ipr.route("replace", dst=f"{router}/32", oif=index, scope=RT_SCOPE_LINK)
        ipr.route("replace", dst="0.0.0.0/0", gateway=str(router), oif=index, flags=RTNH_F_ONLINK)
        return str(link.get("address"))


def _has_address(ifname: str, iface: IPv4Interface) -> bool:
    with _ipr() as ipr:
        link = _get_link(ipr, ifname)
        if link is None:
            return False
        return any(
            IPv4Interface(f"{a.get('local') or a.get('address')}/{a['prefixlen']}") == iface
            for a in ipr.addr("dump", index=_index(link), family=socket.AF_INET)
        )


# --- small lookups for the agent (calling thread's namespace) ---------------------------------


@_wrap_netlink
def link_index(ifname: str) -> int | None:
    """The ifindex of ``ifname`` here, or None when it does not exist."""
    with _ipr() as ipr:
        link = _get_link(ipr, ifname)
        return None if link is None else _index(link)


@_wrap_netlink
def interface_address(ifname: str) -> IPv4Address | None:
    """The first IPv4 address of ``ifname`` here, or None."""
    with _ipr() as ipr:
        link = _get_link(ipr, ifname)
        if link is None:
            return None
        for addr in ipr.get_addr(family=socket.AF_INET, index=_index(link)):
            return IPv4Address(addr.get_attr("IFA_ADDRESS"))
        return None


def resolve_netns(netns: str) -> Path:
    """A network namespace given as a name under /run/netns or as a path; it must exist."""
    path = Path(netns) if "/" in netns else netns_path(netns)
    if not path.exists():
        raise NotFound(f"network namespace {netns} does not exist", field="netns")
    return path


@_wrap_netlink
def link_mac(ifname: str) -> str | None:
    """The MAC address of ``ifname`` here, or None when it does not exist."""
    with _ipr() as ipr:
        link = _get_link(ipr, ifname)
        return None if link is None else str(link.get("address"))

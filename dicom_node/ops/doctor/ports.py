"""``dicom-node doctor``'s port checks: each socket ``serve`` would listen on is free, or held
by a running dicom-node.  The probe binds and closes a socket; /proc names the holder."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from dicom_node.config.settings import Settings
from dicom_node.ops.doctor.result import FAIL, OK, WARN, CheckResult, service_user


def _listeners(settings: Settings) -> list[tuple[str, str, str, int]]:
    """(name, setting, host, port) of every socket ``serve`` listens on with these settings."""
    found = []
    if settings.tls.port == 0 or settings.tls.plaintext:
        found.append(("DICOM port", "[node] port", settings.node.host, settings.node.port))
    if settings.tls.port:
        found.append(("DICOM TLS port", "[tls] port", settings.node.host, settings.tls.port))
    found.append(("web port", "[web] port", settings.web.host, settings.web.port))
    if settings.metrics.enabled and settings.metrics.port:
        found.append(
            ("metrics port", "[metrics] port", settings.metrics.host, settings.metrics.port)
        )
    return found


def check_ports(settings: Settings) -> list[CheckResult]:
    """Each listening port is free, or held by a running dicom-node (then it is ours)."""
    results: list[CheckResult] = []
    seen: dict[int, str] = {}
    for name, setting, host, port in _listeners(settings):
        label = f"{name} {port}"
        if port in seen:
            results.append(
                CheckResult(
                    label,
                    FAIL,
                    f"{setting} is the same port as {seen[port]}",
                    f"give {setting} a port of its own",
                )
            )
            continue
        seen[port] = setting
        results.append(_check_port(label, setting, host, port))
    return results


def _check_port(label: str, setting: str, host: str, port: int) -> CheckResult:
    error = _bind_error(host, port)
    if error is None:
        if port < 1024:
            return CheckResult(
                label,
                WARN,
                f"{host}:{port} is free, but below 1024 the service needs CAP_NET_BIND_SERVICE",
                "see the comment in the unit file",
            )
        return CheckResult(label, OK, f"{host}:{port} is free")
    if error.errno == errno.EACCES and port < 1024:
        return CheckResult(
            label,
            WARN,
            f"{service_user()} may not listen on {host}:{port} (below "
            "1024): the service needs CAP_NET_BIND_SERVICE",
            "use a port above 1023 (11112), or see the comment in the unit file",
        )
    if error.errno != errno.EADDRINUSE:
        return CheckResult(
            label,
            FAIL,
            f"cannot listen on {host}:{port} ({error.strerror})",
            f"set the host of {setting} to an address of this machine",
        )
    owner = _listening_process(port)
    if owner is not None and _is_dicom_node(owner[1]):
        return CheckResult(
            label,
            OK,
            f"{host}:{port} is in use by dicom-node (pid {owner[0]}): the node is running",
        )
    who = f"pid {owner[0]} ({' '.join(owner[1])[:60]})" if owner else "another program"
    return CheckResult(
        label,
        FAIL,
        f"{host}:{port} is in use by {who}",
        f"stop that program, or set {setting} to a free port",
    )


def _bind_error(host: str, port: int) -> OSError | None:
    """None when ``host:port`` could be listened on now, else the error binding it gave."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT
            probe.bind(address)
    except OSError as exc:
        return exc
    return None


def _is_dicom_node(argv: list[str]) -> bool:
    """The ``dicom-node`` console script, or ``python -m dicom_node``."""
    return any(Path(arg).name == "dicom-node" for arg in argv[:2]) or "dicom_node" in argv[1:3]


def _listening_process(port: int) -> tuple[int, list[str]] | None:
    """(pid, argv) of the process listening on TCP ``port``, when /proc shows it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(f"socket:[{fields[9]}]")
    for process in Path("/proc").iterdir():
        if not process.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (process / "fd").iterdir()):
                argv = (process / "cmdline").read_bytes().decode(errors="replace")
                return int(process.name), argv.rstrip("\0").split("\0")
        except OSError:
            continue
    return None

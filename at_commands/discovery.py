"""Find the modem's AT port through udev, from the USB layouts in the vendor profiles.

A tty whose USB interface number and VID:PID match a profile's ``UsbLayout`` is an AT
port; its role is ``primary`` or ``secondary`` (SPEC §2 ``[modem] port_role``). The
agent prefers the role it is configured for and falls back to the other one, so a data
connection manager can keep the primary port while simagent owns the secondary one.

The same table generates ``systemd/99-simagent.rules`` (stable ``/dev/simagent-at``
symlink and ``ID_MM_PORT_IGNORE=1`` for the port simagent owns)::

    python -m at_commands.discovery udev-rules > systemd/99-simagent.rules
    python -m at_commands.discovery list [--role primary|secondary]
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass

from at_commands.profiles import PROFILES, Profile, UsbLayout

ROLES = ("primary", "secondary")
SYMLINK = "simagent-at"


@dataclass(frozen=True)
class DiscoveredPort:
    devnode: str
    profile_name: str
    vid: int
    pid: int
    interface: int
    role: str  # "primary" | "secondary"


@dataclass(frozen=True)
class PortEvent:
    action: str  # "add" | "remove"
    port: DiscoveredPort


# ---------------------------------------------------------------------------
# Pure part: layouts -> which interface is which role, and which port wins.


def _profiles(profiles: Mapping[str, Profile] | Iterable[Profile]) -> list[Profile]:
    return list(profiles.values()) if isinstance(profiles, Mapping) else list(profiles)


def layout_roles(layout: UsbLayout) -> dict[int, str]:
    """Interface number -> role for one USB composition."""
    roles = {layout.primary_if: "primary"}
    if layout.secondary_if is not None:
        roles[layout.secondary_if] = "secondary"
    return roles


def owned_interface(layout: UsbLayout, role: str = "secondary") -> int:
    """The interface simagent takes on this layout: the wanted role, else the other one."""
    if role == "secondary" and layout.secondary_if is not None:
        return layout.secondary_if
    return layout.primary_if


def classify(devnode: str, vid: int, pid: int, interface: int, profiles) -> DiscoveredPort | None:
    """The AT port a tty at (VID, PID, interface) is, or None when no layout names it."""
    for profile in _profiles(profiles):
        for layout in profile.usb:
            if (layout.vid, layout.pid) == (vid, pid):
                role = layout_roles(layout).get(interface)
                if role:
                    return DiscoveredPort(devnode, profile.name, vid, pid, interface, role)
    return None


def wanted_port_expected(port: DiscoveredPort, role: str, profiles=None) -> bool:
    """True when `port` is only the fallback (not the wanted role) on a layout that has a
    port of the wanted role. The kernel creates a modem's ttys one interface after the
    other, so right after the first one appears the wanted one may not be there yet."""
    if port.role == role:
        return False
    for profile in _profiles(PROFILES if profiles is None else profiles):
        for layout in profile.usb if profile.name == port.profile_name else ():
            if (layout.vid, layout.pid) == (port.vid, port.pid) and role in layout_roles(layout).values():
                return True
    return False


def choose(ports: Iterable[DiscoveredPort], role: str = "secondary") -> DiscoveredPort | None:
    """Prefer the wanted role, fall back to the other; ties go to the lowest device node
    so the choice is stable across boots."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    ranked = sorted(ports, key=lambda p: (p.role != role, p.devnode))
    return ranked[0] if ranked else None


# ---------------------------------------------------------------------------
# udev shell (pyudev).


def _usb_identity(device) -> tuple[int, int, int] | None:
    """(VID, PID, interface number) from a tty's USB ancestors, or None (not USB)."""
    interface = vid = pid = None
    for parent in device.ancestors:
        if parent.subsystem != "usb":
            continue
        attrs = parent.attributes
        number = attrs.get("bInterfaceNumber")
        if number is not None:
            interface = int(number, 16) if interface is None else interface
            continue
        vendor, product = attrs.get("idVendor"), attrs.get("idProduct")
        if vendor is not None and product is not None:
            vid, pid = int(vendor, 16), int(product, 16)
            break
    if interface is None or vid is None or pid is None:
        return None
    return vid, pid, interface


def _port_of(device, profiles) -> DiscoveredPort | None:
    if not device.device_node:
        return None
    identity = _usb_identity(device)
    return classify(device.device_node, *identity, profiles) if identity else None


def _context(context):
    import pyudev

    return context if context is not None else pyudev.Context()


def list_at_ports(profiles=None, context=None) -> list[DiscoveredPort]:
    """Every tty present now that a profile layout names, sorted by device node."""
    profiles = PROFILES if profiles is None else profiles
    ports = (_port_of(d, profiles) for d in _context(context).list_devices(subsystem="tty"))
    return sorted((p for p in ports if p), key=lambda p: p.devnode)


def find_at_port(profiles=None, role: str = "secondary", context=None) -> DiscoveredPort | None:
    """The AT port simagent should open (``[modem] port = "auto"``), or None."""
    return choose(list_at_ports(profiles, context), role)


def watch(profiles=None, context=None) -> AsyncIterator[PortEvent]:
    """Add/remove of AT ports as they happen, on the running asyncio loop (the udev
    netlink socket is registered with ``loop.add_reader``; no thread).

    The monitor is subscribed when this returns, before iteration starts: a caller that
    looks at the present ports after calling watch() misses no port added in between."""
    import pyudev

    profiles = PROFILES if profiles is None else profiles
    monitor = pyudev.Monitor.from_netlink(_context(context))
    monitor.filter_by("tty")
    monitor.start()
    # At removal the sysfs parents are gone, so a removed port is recognised by the
    # device path under which it was announced.
    known: dict[str, DiscoveredPort] = {p_sys: p for p_sys, p in _present(profiles, context)}
    return _events(monitor, profiles, known)


async def _events(monitor, profiles, known: dict[str, DiscoveredPort]) -> AsyncIterator[PortEvent]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[PortEvent] = asyncio.Queue()

    def readable() -> None:
        while (device := monitor.poll(timeout=0)) is not None:
            if device.action == "remove":
                port = known.pop(device.sys_path, None)
                if port:
                    queue.put_nowait(PortEvent("remove", port))
            elif device.action in ("add", "change", "bind", "move"):
                port = _port_of(device, profiles)
                if port and known.get(device.sys_path) != port:
                    known[device.sys_path] = port
                    queue.put_nowait(PortEvent("add", port))

    loop.add_reader(monitor.fileno(), readable)
    try:
        while True:
            yield await queue.get()
    finally:
        loop.remove_reader(monitor.fileno())


def _usb_device(device):
    """The USB device (not interface) a device hangs off, or None."""
    return next((p for p in device.ancestors if p.subsystem == "usb" and p.device_type == "usb_device"), None)


def data_counters(devnode: str, context=None) -> dict | None:
    """Bytes through the network interfaces of the modem that owns AT port `devnode` (its
    USB device's `net` children: wwan0, usb0, ...), from their sysfs statistics; None when
    the port is not on a USB modem with a network interface (a pty, a TCP URL)."""
    context = _context(context)
    wanted = os.path.realpath(devnode)
    tty = next((d for d in context.list_devices(subsystem="tty") if d.device_node == wanted), None)
    modem = _usb_device(tty) if tty is not None else None
    if modem is None:
        return None
    counters = {"interfaces": [], "rx_bytes": 0, "tx_bytes": 0}
    for net in context.list_devices(subsystem="net"):
        parent = _usb_device(net)
        if parent is None or parent.sys_path != modem.sys_path:
            continue
        counters["interfaces"].append(net.sys_name)
        for key in ("rx_bytes", "tx_bytes"):
            counters[key] += int(net.attributes.get(f"statistics/{key}") or 0)
    return counters if counters["interfaces"] else None


def _present(profiles, context) -> list[tuple[str, DiscoveredPort]]:
    out = []
    for device in _context(context).list_devices(subsystem="tty"):
        port = _port_of(device, profiles)
        if port:
            out.append((device.sys_path, port))
    return out


# ---------------------------------------------------------------------------
# udev rule generation


def udev_rules(profiles=None, role: str = "secondary") -> str:
    """Text of ``99-simagent.rules`` for the interface simagent owns on every layout."""
    profiles = PROFILES if profiles is None else profiles
    lines = [
        "# simagent: stable symlink and ModemManager exclusion for the AT port simagent owns.",
        f"# Generated from at_commands/profiles.py (port_role = {role}) by:",
        "#   python -m at_commands.discovery udev-rules > systemd/99-simagent.rules",
        "# Do not edit; change the profiles and regenerate (a test compares the two).",
        "",
        'ACTION=="remove", GOTO="simagent_end"',
        'SUBSYSTEM!="tty", GOTO="simagent_end"',
        # ATTRS keys of one rule must all match the same parent, so the interface number
        # (on the usb_interface) is copied to a property first (as ModemManager does).
        'SUBSYSTEMS=="usb", ATTRS{bInterfaceNumber}=="?*", ENV{.SIMAGENT_IFNUM}="$attr{bInterfaceNumber}"',
        'ENV{.SIMAGENT_IFNUM}!="?*", GOTO="simagent_end"',
        "",
    ]
    seen: set[tuple[int, int, int]] = set()
    for profile in _profiles(profiles):
        for layout in profile.usb:
            interface = owned_interface(layout, role)
            if (layout.vid, layout.pid, interface) in seen:
                continue
            seen.add((layout.vid, layout.pid, interface))
            model = f" {layout.model}" if layout.model else ""
            lines.append(f"# {profile.name}{model}: {layout_roles(layout)[interface]} AT port")
            lines.append(
                f'ATTRS{{idVendor}}=="{layout.vid:04x}", ATTRS{{idProduct}}=="{layout.pid:04x}", '
                f'ENV{{.SIMAGENT_IFNUM}}=="{interface:02x}", '
                f'SYMLINK+="{SYMLINK}", GROUP="dialout", MODE="0660", ENV{{ID_MM_PORT_IGNORE}}="1"'
            )
    lines += ["", 'LABEL="simagent_end"', ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse  # here: the daemon imports this module and never needs it

    parser = argparse.ArgumentParser(prog="python -m at_commands.discovery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rules = sub.add_parser("udev-rules", help="print 99-simagent.rules generated from the profiles")
    rules.add_argument("--role", choices=ROLES, default="secondary")
    listing = sub.add_parser("list", help="list AT ports present now, the chosen one first")
    listing.add_argument("--role", choices=ROLES, default="secondary")
    args = parser.parse_args(argv)
    if args.command == "udev-rules":
        sys.stdout.write(udev_rules(role=args.role))
        return 0
    ports = list_at_ports()
    chosen = choose(ports, args.role)
    for port in sorted(ports, key=lambda p: p != chosen):
        mark = "*" if port == chosen else " "
        print(f"{mark} {port.devnode} {port.profile_name} {port.vid:04x}:{port.pid:04x} if{port.interface} {port.role}")
    return 0 if chosen else 69  # EX_UNAVAILABLE: no modem


if __name__ == "__main__":
    sys.exit(main())

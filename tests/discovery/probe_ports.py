"""Child process for the discovery tests: runs inside ``umockdev-run`` (fake /sys and
/dev) and prints what at_commands.discovery finds, as JSON.

    probe_ports.py PROFILES_JSON|real
PROFILES_JSON: [{"name", "usb": [[vid, pid, primary_if, secondary_if|null], ...]}, ...]
"""

import dataclasses
import json
import sys

from at_commands import discovery
from at_commands.profiles import Profile, UsbLayout


def profiles_from_json(text: str) -> list[Profile]:
    return [Profile(p["name"], usb=tuple(UsbLayout(*layout) for layout in p["usb"])) for p in json.loads(text)]


def main() -> None:
    profiles = None if sys.argv[1] == "real" else profiles_from_json(sys.argv[1])
    ports = discovery.list_at_ports(profiles)
    result = {
        "ports": [dataclasses.asdict(p) for p in ports],
        "chosen": {role: dataclasses.asdict(p) if (p := discovery.find_at_port(profiles, role)) else None for role in discovery.ROLES},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

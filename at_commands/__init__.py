"""AT command layer: sans-IO protocol core, serial client, parsers, vendor profiles,
and the fake modem used by tests."""

from .client import (ATClient, ATError, CommandAborted, CommandError, CommandTimeout, PortBusy,
                     PortLost, PortNotFound, Response)
from .commands import is_abortable, is_network_scan
from .modem import (Identity, Modem, ModemEvent, ModemRebooted, NetworkTime, Registration,
                    RegistrationChanged, Signal, SimBusy, SimInserted, SimRemoved)

__all__ = [
    "ATClient", "ATError", "CommandAborted", "CommandError", "CommandTimeout", "PortBusy", "PortLost", "PortNotFound",
    "Response", "Identity", "Modem", "ModemEvent", "ModemRebooted", "NetworkTime", "Registration",
    "RegistrationChanged", "Signal", "SimBusy", "SimInserted", "SimRemoved", "is_abortable", "is_network_scan",
]

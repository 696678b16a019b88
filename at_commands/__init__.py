"""AT command layer: sans-IO protocol core, serial client, parsers, vendor profiles,
and the fake modem used by tests."""

from .client import (ATClient, ATError, CommandError, CommandTimeout, PortBusy, PortLost,
                     PortNotFound, Response)
from .modem import (Identity, Modem, ModemEvent, ModemRebooted, NetworkTime, Registration,
                    RegistrationChanged, Signal, SimInserted, SimRemoved)

__all__ = [
    "ATClient", "ATError", "CommandError", "CommandTimeout", "PortBusy", "PortLost", "PortNotFound",
    "Response", "Identity", "Modem", "ModemEvent", "ModemRebooted", "NetworkTime", "Registration",
    "RegistrationChanged", "Signal", "SimInserted", "SimRemoved",
]

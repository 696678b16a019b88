"""AT command layer: sans-IO protocol core, serial client, parsers, vendor profiles,
and the fake modem used by tests."""

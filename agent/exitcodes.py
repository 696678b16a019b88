"""Process exit codes shared by the daemon and the CLI (SPEC §8)."""

OK = 0
CHECK_FAILED = 1  # a check failed or a binding violation was found
USAGE = 2
UNAVAILABLE = 69  # EX_UNAVAILABLE: modem not found or busy
TEMPFAIL = 75  # EX_TEMPFAIL: the state store cannot be used now (locked, I/O error, disk full)
CONFIG = 78  # EX_CONFIG: configuration error

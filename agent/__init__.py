"""simagent: machine-card binding agent for IoT terminals."""

__version__ = "0.2.0"
# No time this agent trusts can be earlier than its own release (SPEC §5): network time
# before it is rejected, and token expiry is never judged against an earlier floor.
BUILD_DATE = "2026-11-01"

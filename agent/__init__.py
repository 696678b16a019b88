"""simagent: machine-card binding agent for IoT terminals."""

__version__ = "0.1.0"

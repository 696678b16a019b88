"""The daemon (``simagent run``) and its services, on one event loop: the enforcer (the
radio gate's shell), the MQTT reporter, the platform commands, the control socket, the
offloaded heavy work, supervision and systemd notification."""

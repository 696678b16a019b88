"""The platform side (`simagent-platform`, SPEC §1): operator keys and tokens, commands
to terminals over MQTT, the fleet's retained status and its events. No daemon runs on
the platform side; each command connects, does its job and exits.

    keys.py   operator key pairs and the tokens they sign (the agent's verifier checks each)
    link.py   a blocking MQTT client for a broker URL (MQTT 5, falling back to 3.1.1)
    fleet.py  the fleet table and event lines from what terminals publish (pure)
    cli.py    the command line
"""

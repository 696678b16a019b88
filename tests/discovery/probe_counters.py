"""Child process: inside ``umockdev-run``, prints `discovery.data_counters` for each AT port
given on the command line, as JSON."""

import json
import sys

from at_commands import discovery

print(json.dumps({port: discovery.data_counters(port) for port in sys.argv[1:]}))

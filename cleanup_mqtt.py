"""Clear retained MQTT messages: ``python cleanup_mqtt.py PATTERN [BROKER] [PORT]``.

Kept for people who follow the standalone worker's docs; it is
``cl-tasks cleanup-mqtt`` (see README).
"""

import sys

from cl_tasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["cleanup-mqtt", *sys.argv[1:]]))

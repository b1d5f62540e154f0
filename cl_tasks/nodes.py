"""The worker's node name: unique by default, and a duplicate refused at start.

Celery names every worker ``celery@<host>`` unless told otherwise, so two workers
started on one host (``scripts/worker.sh`` twice) share one name: ``celery
status`` counts one node, their remote-control replies mix, and both consume
one control queue. Here:

* **Default names are unique.** Without ``-n/--hostname`` on the command line
  the node name is ``<WORKER_ID>@<host>`` when ``WORKER_ID`` is set, else
  ``celery-<6 hex digits>@<host>``, a new short id at each start (decided: a
  worker's name then differs across restarts, as its pid does; give ``-n`` or
  ``WORKER_ID`` for a stable one). ``-n`` given on the command line wins, and a
  worker made in code (``app.Worker(...)``, Celery's test worker) keeps its
  name. The rename happens at ``celeryd_init``, before anything uses the
  name, except ``--pidfile``/``--statedb`` patterns (``%n``), which Celery has
  formatted already: give ``-n`` with those.
* **A duplicate name is refused.** Before it consumes anything (at
  ``celeryd_after_setup``) a worker asks whether another live worker on the
  same broker has its name, and if so logs one line naming it and exits with
  code 1. The other worker consumes the control queue ``<name>.celery.pidbox``:
  a passive declare of that queue counts its live consumers on the SQLite
  broker, and is refused on RabbitMQ while another connection holds it
  (Celery declares it exclusive there); other brokers tell neither, so there
  every start asks. A worker found there must also answer a ping within
  :data:`PING_TIMEOUT`. So a crashed worker (whose consumer row on the SQLite
  broker lives on for ``CONSUMER_TTL``) never blocks its own restart; the
  price is that a duplicate that cannot answer then (``-P solo`` mid-task) is
  not seen. Two workers of one name started in the same instant may both pass.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import click
from celery import Celery, signals
from celery.utils.nodenames import gethostname, nodename
from click.core import ParameterSource

from cl_tasks.settings import current

logger = logging.getLogger(__name__)

#: Seconds a worker of the same name has to answer the start-up ping.
PING_TIMEOUT = 1.0
#: Transports whose passive queue declare counts the consumers of every process.
COUNTS_CONSUMERS = frozenset({"amqp", "sqlite"})
#: AMQP's reply code for a queue another connection holds exclusively.
RESOURCE_LOCKED = 405


def default_node_name(worker_id: str | None) -> str:
    """``WORKER_ID@host``, or ``celery-<short id>@host`` when no worker id is set."""
    return str(nodename(worker_id or f"celery-{uuid.uuid4().hex[:6]}", gethostname()))


def _named_by_user() -> bool:
    """Whether the node name was chosen (``-n`` on the command line, or a worker made in code)."""
    context = click.get_current_context(silent=True)
    if context is None or "hostname" not in context.params:
        return True
    return context.get_parameter_source("hostname") is not ParameterSource.DEFAULT


@signals.celeryd_init.connect
def name_node(sender: str | None = None, instance: Any = None, **_: Any) -> None:
    """Give a worker started without ``-n`` its unique default name."""
    if instance is None or _named_by_user():
        return
    instance.hostname = default_node_name(current().worker_id)


def name_in_use(app: Celery, name: str) -> bool:
    """Whether another live worker on ``app``'s broker has node name ``name`` (it answers a ping)."""
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        if conn.transport.driver_type in COUNTS_CONSUMERS:
            queue = app.control.mailbox.get_queue(name)
            try:
                declared = queue(conn.channel()).queue_declare(passive=True)
            except conn.channel_errors as exc:
                # RabbitMQ: 405 when another connection holds it exclusively (Celery's pidbox
                # queues are exclusive there); otherwise it is missing: nobody consumes it.
                if getattr(exc, "code", None) != RESOURCE_LOCKED:
                    return False
            else:
                if not declared.consumer_count:
                    return False
        return bool(app.control.ping(destination=[name], timeout=PING_TIMEOUT, connection=conn))


@signals.celeryd_after_setup.connect
def refuse_duplicate(sender: str | None = None, instance: Any = None, **_: Any) -> None:
    """Refuse to start under a node name another live worker has (one line, exit code 1)."""
    if not sender or instance is None:
        return
    app = instance.app
    try:
        taken = name_in_use(app, sender)
    except Exception as exc:  # the broker down: the worker's own connection retries and says so
        logger.warning("could not check whether another worker is named %s (%s); it starts", sender, exc)
        return
    if taken:
        logger.critical(
            "another worker named %s is running on this broker (%s); give this one another name"
            " (-n NAME@%%h or WORKER_ID) or stop the other",
            sender,
            app.connection_for_write().as_uri(),  # without the password
        )
        raise SystemExit(1)

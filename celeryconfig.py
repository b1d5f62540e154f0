"""Celery settings of cl_tasks: edit here, or set the environment variables (README).

Every environment variable is read once, through :func:`cl_tasks.settings.current`.
"""

from cl_tasks.settings import current

_settings = current()

broker_url = _settings.broker_url
result_backend = _settings.result_backend
# For CELERY_RESULT_BACKEND=db+sqlite://…: wait for the broker's writers, do not fail.
database_engine_options = {"connect_args": {"timeout": 60}}
result_extended = True

# Only JSON crosses the broker: pickle is refused by worker and client alike.
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
event_serializer = "json"

# Tasks are acknowledged after they ran, so a killed worker's tasks run again.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_send_task_events = True
task_send_sent_event = True

broker_connection_retry_on_startup = True
broker_transport_options: dict[str, object] = {
    "visibility_timeout": _settings.visibility_timeout,
    "polling_interval": 1.0,
}
if broker_url.startswith("sqlite:"):
    broker_transport_options["synchronous"] = _settings.sqlite_synchronous
if broker_url.startswith(("redis:", "rediss:")):
    # kombu's Redis transport looks for messages of dead workers only every ~100 s
    # (interval x throttle); look every quarter of the visibility timeout instead.
    broker_transport_options |= {
        "unacked_restore_interval": max(1.0, min(10.0, _settings.visibility_timeout / 4)),
        "unacked_restore_throttle": 1,
    }
worker_hijack_root_logger = True

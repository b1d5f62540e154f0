"""What crosses the broker: JSON task messages of a bounded size, and nothing a worker trips on.

Client side (checks :class:`cl_tasks.app.App` makes before it publishes):

* :func:`check_serializer`: a task is published only in a serializer the
  workers accept (``accept_content``, JSON): ``send_task(...,
  serializer="pickle")`` or a ``task_serializer`` edited to pickle raise
  :class:`~kombu.exceptions.ContentDisallowed` before anything is sent. (Celery
  itself checks ``accept_content`` only when it reads a message, so a client
  would publish pickle and leave the worker to refuse it.)
* :func:`encode_params`: a compute job's params become the JSON text its
  ``jobs`` row stores, once; past ``JOB_PARAMS_MAX_BYTES`` they raise
  :class:`JobParamsTooLarge` before the row or the message is written.

Worker side (:class:`Consumer`, set as ``worker_consumer``):

* A protocol-2 task message whose body decodes but is not ``[args, kwargs,
  embed]`` (a list, an object, an object) is refused: logged and rejected
  without requeue, which the SQLite broker keeps in its dead-letter table.
  Celery would instead fail on it later, or, for a body such as ``5``, stop the
  whole worker with "Unrecoverable error".
* Any other exception raised while a message is *received* (headers of the
  wrong type, a task name that is a list, …) rejects that one message the same
  way instead of stopping the worker. Broker connection errors still propagate,
  so Celery reconnects as usual. What happens once a task *runs* is untouched.

* Compressed bodies inflate with a bound on every broker: the worker's consumer
  replaces kombu's zlib, bz2 and lzma decoders with :func:`transports.compression.inflate`
  under the broker transport option ``max_inflated_bytes`` (64 MiB), so a bomb on
  RabbitMQ or Redis is refused in one line (rejected without requeue) instead of
  inflating unbounded in the worker's main process. The SQLite transport inflates
  with the same bound itself, and dead-letters a bomb.

Undecodable bodies (not JSON, a refused content type such as pickle) are left
to Celery and the transport, which already dead-letter them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu import compression
from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.serialization import prepare_accept_content

from transports.compression import DEFAULT_MAX_INFLATED_BYTES, InflateRefused, inflate
from transports.sqlite import SQLiteMessage

logger = logging.getLogger(__name__)

#: kombu's compression content types whose decoders get a bound, with their aliases.
BOUNDED_COMPRESSIONS = {
    "application/x-gzip": ["gzip", "zlib"],
    "application/x-bz2": ["bzip2", "bzip"],
    "application/x-lzma": ["lzma", "xz"],
}
#: Celery's protocol-2 body: positional args, keyword args, the canvas "embed" object.
BODY_SHAPE = "[args (a list), kwargs (an object), embed (an object)]"


class JobParamsTooLarge(ValueError):
    """Raised at submit when a job's params are past ``JOB_PARAMS_MAX_BYTES``."""


def params_too_large(size: int, limit: int) -> str | None:
    """The user's message when ``size`` bytes of params are past ``limit``, else None."""
    if size <= limit:
        return None
    return (
        f"params are {size:,} bytes; the limit is JOB_PARAMS_MAX_BYTES={limit:,}:"
        " pass large data as files under CL_SERVER_DIR (params name them), or raise the limit"
    )


def encode_params(task_type: str, params: dict[str, Any], limit: int) -> str:
    """``params`` as the JSON text a ``jobs`` row stores; raises past ``limit`` bytes.

    Raises :class:`kombu.exceptions.EncodeError` for a value JSON cannot hold (as
    Celery's serializer would) and :class:`JobParamsTooLarge` past the limit.
    """
    try:
        text = json.dumps(params)
    except (TypeError, ValueError) as exc:
        raise EncodeError(f"job of task type {task_type}: params are not JSON: {exc}") from exc
    problem = params_too_large(len(text.encode("utf-8")), limit)
    if problem:
        raise JobParamsTooLarge(f"job of task type {task_type}: {problem}")
    return text


def check_serializer(name: str, serializer: str, accept_content: Any) -> None:
    """Raise :class:`ContentDisallowed` unless workers accept ``serializer`` (task ``name``)."""
    accepted = prepare_accept_content(accept_content)
    if not prepare_accept_content([serializer]) <= accepted:
        raise ContentDisallowed(
            f"task {name}: serializer {serializer!r} is refused; only {sorted(accepted)}"
            " crosses the broker (accept_content), so workers would dead-letter the message"
        )


def body_problem(message: Any) -> str | None:
    """Why the decoded body of protocol-2 task ``message`` cannot be run, or None."""
    body = message.payload
    if isinstance(body, dict) and "args" in body:
        return None  # a protocol-1 style body: Celery converts and checks it itself
    if not isinstance(body, (list, tuple)) or len(body) != 3:
        return f"body is {_kind(body)}, not {BODY_SHAPE}"
    args, kwargs, embed = body
    if not isinstance(args, (list, tuple)) or not isinstance(kwargs, dict):
        return f"body holds {_kind(args)} and {_kind(kwargs)}, not {BODY_SHAPE}"
    if embed is not None and not isinstance(embed, dict):
        return f"body's embed is {_kind(embed)}, not an object"
    return None


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {json.dumps(value, default=repr)[:80]}"


def bound_compression(limit: int) -> None:
    """kombu's zlib, bz2 and lzma decoders inflate at most ``limit`` bytes in this process.

    kombu's own encoders are kept. Past the bound the decoder raises
    :class:`~transports.compression.InflateRefused`, which kombu hands to the
    consumer's ``on_decode_error``.
    """
    for content_type, aliases in BOUNDED_COMPRESSIONS.items():
        encoder, _ = compression.get_encoder(content_type)
        compression.register(encoder, _bounded_decoder(content_type, limit), content_type, aliases=aliases)


def _bounded_decoder(content_type: str, limit: int) -> Callable[[bytes], bytes]:
    def decode(body: bytes | str) -> bytes:
        return inflate(body.encode("utf-8") if isinstance(body, str) else body, content_type, limit)

    return decode


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, with one poisonous message unable to stop the worker."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = self.app.conf.broker_transport_options or {}
        bound_compression(int(options.get("max_inflated_bytes", DEFAULT_MAX_INFLATED_BYTES)))

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """A compression bomb is refused in one line; other undecodable bodies go Celery's way."""
        if isinstance(exc, InflateRefused):
            self._refuse(message, f"refused unread: {exc}")
            return
        super().on_decode_error(message, exc)

    def create_task_handler(self, *args: Any, **kwargs: Any) -> Callable[[Any], Any]:
        receive = super().create_task_handler(*args, **kwargs)

        def on_task_received(message: Any) -> Any:
            try:
                headers = message.headers
                if isinstance(headers, dict) and "task" in headers:
                    problem = body_problem(message)
                    if problem is not None:
                        return self._refuse(message, problem)
                return receive(message)
            except self.connection_errors:
                raise
            except ContentDisallowed as exc:
                return self.on_invalid_task(None, message, exc)
            except DecodeError as exc:
                return self.on_decode_error(message, exc)
            except Exception as exc:
                logger.exception("receiving a message failed")
                return self._refuse(message, f"receiving it failed: {exc!r}")

        return on_task_received

    def _refuse(self, message: Any, reason: str) -> None:
        headers = message.headers if isinstance(message.headers, dict) else {}
        logger.error(
            "refused task message %r (task %r): %s; rejected without requeue (dead letter)",
            headers.get("id"),
            headers.get("task"),
            reason,
        )
        if not message.acknowledged:
            if isinstance(message, SQLiteMessage):  # it keeps the reason in its dead-letter row
                message.dead_letter_reason = f"refused by the worker: {reason}"
            message.reject_log_error(logger, self.connection_errors)

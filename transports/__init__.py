"""kombu transports of cl_tasks; importing this package registers the ``sqlite`` alias.

``broker_url = "sqlite:////abs/path/media_store.db"`` then selects
:class:`transports.sqlite.Transport`. Importing does no I/O.
"""

from kombu.transport import TRANSPORT_ALIASES

TRANSPORT_ALIASES.setdefault("sqlite", "transports.sqlite:Transport")

__all__ = ["TRANSPORT_ALIASES"]

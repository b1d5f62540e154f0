"""cl_tasks: Celery over the cl_server ``media_store.db`` (see README.md)."""

from cl_tasks.app import app

__all__ = ["app"]

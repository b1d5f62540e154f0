"""cl_tasks: Celery over the cl_server ``media_store.db`` (see README.md).

``from cl_tasks import app, image_resize, image_conversion, submit_job``.
"""

from cl_tasks import signals  # noqa: F401 - connects the signal handlers
from cl_tasks.app import app
from cl_tasks.tasks import image_conversion, image_resize, submit_job

__all__ = ["app", "image_conversion", "image_resize", "submit_job"]

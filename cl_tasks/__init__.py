"""cl_tasks: Celery over the cl_server ``media_store.db`` (see README.md).

``from cl_tasks import app, image_resize, image_conversion, submit_job``.

Importing the package loads each concern's module; each connects the Celery
signals of its own concern (see docs/design.md for which module owns what).
"""

from cl_tasks import execution, intake, nodes, presence, startup  # noqa: F401 - connect their signal handlers
from cl_tasks.app import app
from cl_tasks.tasks import image_conversion, image_resize, submit_job

__all__ = ["app", "image_conversion", "image_resize", "submit_job"]

"""Side-by-side benchmarks of cl_tasks against other Celery brokers (see README)."""

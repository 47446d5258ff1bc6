"""The compute side: the Celery app, thin tasks, and the pure-PyTorch engine."""

"""Runnable examples: ``make demo`` (Celery) and ``make demo-threads``."""

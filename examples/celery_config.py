"""Celery settings shared by the example worker app and the programs that send it tasks.

Messages and results go through Redis: ``CELERY_BROKER_URL`` (default
``redis://localhost:6379/0``; the demo and the tests start one of their own,
``redis+socket://...``) and ``CELERY_RESULT_BACKEND`` (default: the same
server). A task is acknowledged only after it ran (``acks_late``), and a task
whose worker process died is handed back (``task_reject_on_worker_lost``), so a
crash loses no task. A message taken by a worker that died is delivered again
after ``BROKER_CELERY_VISIBILITY_TIMEOUT`` seconds (default one hour, Redis's
own default): set it above the longest a task may run, countdowns included.
``BROKER_CELERY_RESTORE_INTERVAL`` makes workers look for such messages every
that many seconds (tests use it with a short visibility timeout).
``BROKER_CELERY_QUEUE`` names the queue (default ``celery``).
Importing this module has no side effects.
"""

from __future__ import annotations

import os
from typing import Any

DEFAULT_URL = "redis://localhost:6379/0"
QUEUE_ENV = "BROKER_CELERY_QUEUE"
VISIBILITY_ENV = "BROKER_CELERY_VISIBILITY_TIMEOUT"
RESTORE_ENV = "BROKER_CELERY_RESTORE_INTERVAL"


def celery_settings() -> dict[str, Any]:
    """Settings for ``app.conf.update(...)``, read from the environment."""
    broker_url = os.environ.get("CELERY_BROKER_URL") or DEFAULT_URL
    visibility = float(os.environ.get(VISIBILITY_ENV) or 3600)
    queue = os.environ.get(QUEUE_ENV) or "celery"
    transport: dict[str, Any] = {"visibility_timeout": visibility}
    restore = os.environ.get(RESTORE_ENV)
    if restore:
        # How often a worker looks for messages of dead workers to hand back
        # (kombu's default: a look every 10 s, a full scan every tenth look).
        transport.update(unacked_restore_interval=float(restore), unacked_restore_throttle=1)
    return {
        "broker_url": broker_url,
        "result_backend": os.environ.get("CELERY_RESULT_BACKEND") or broker_url,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        "task_default_queue": queue,
        # Acknowledge after the task ran; a worker that dies hands its tasks back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        # Take one message per free slot: what a worker holds unacknowledged
        # waits for it alone.
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": visibility},
        "result_expires": 3600,
        # Leave standard error alone, so what the interpreter prints while it
        # exits is seen as it is.
        "worker_redirect_stdouts": False,
    }

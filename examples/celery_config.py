"""Celery settings shared by the example worker app and the programs that send it tasks.

With ``CELERY_BROKER_URL`` unset, messages go through kombu's filesystem
transport in a directory (``BROKER_CELERY_DIR``, or ``broker-celery-example``
in the temporary directory), so no message server is needed. Results are
files in the same directory unless ``CELERY_RESULT_BACKEND`` is set.
Importing this module has no side effects.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

DIR_ENV = "BROKER_CELERY_DIR"


def data_dir() -> Path:
    """The directory named by ``BROKER_CELERY_DIR``, or the default one."""
    configured = os.environ.get(DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / "broker-celery-example"


def celery_settings(base: Path | None = None) -> dict[str, Any]:
    """Settings for ``app.conf.update(...)``; creates the folders they name."""
    base = data_dir() if base is None else base
    settings: dict[str, Any] = {
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "broker_connection_retry_on_startup": True,
        # Leave standard error alone, so what the interpreter prints while it
        # exits is seen as it is.
        "worker_redirect_stdouts": False,
    }
    broker_url = os.environ.get("CELERY_BROKER_URL")
    if broker_url:
        settings["broker_url"] = broker_url
    else:
        folders = {name: base / name for name in ("queue", "processed", "control")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        settings["broker_url"] = "filesystem://"
        settings["broker_transport_options"] = {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
            "polling_interval": 0.05,
        }
        # Nobody broadcasts through a folder; stop the worker with SIGTERM.
        settings["worker_enable_remote_control"] = False
    backend = os.environ.get("CELERY_RESULT_BACKEND")
    if not backend:
        results = base / "results"
        results.mkdir(parents=True, exist_ok=True)
        backend = f"file://{results}"
    settings["result_backend"] = backend
    return settings

"""Logging filters named in gateway/settings.py's LOGGING."""

from __future__ import annotations

import logging


class NoTracebackFor403(logging.Filter):
    """Keep django.request's one-line "Forbidden" record, without the PermissionDenied trace.

    A user without a permission opening an admin page is an answer (403), not a failure.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "status_code", None) == 403:
            record.exc_info = None
            record.exc_text = None
        return True

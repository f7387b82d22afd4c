"""Imported by Python at start-up when this folder is on ``PYTHONPATH``: with ``SPAN_FILES``
set, the process writes its spans there (see spanfiles.py). The demo's stand-in for
``opentelemetry-instrument``."""

import os

if os.environ.get("SPAN_FILES"):
    import spanfiles

    spanfiles.configure(os.environ["SPAN_FILES"])

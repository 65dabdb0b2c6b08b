"""Logging set-up shared by the workflow scripts and the CLI."""

from __future__ import annotations

import logging
import sys


def setup_logging(log_path: str | None = None, level: int = logging.INFO) -> None:
    """Send stderr (tracebacks, tqdm bars, warnings) and logging to ``log_path`` (line-buffered)."""
    if log_path:
        sys.stderr = open(log_path, "w", buffering=1, encoding="utf-8")  # noqa: SIM115 (lives for the process)
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.captureWarnings(True)

"""Logging set-up shared by a node's processes: stderr, plus $FD_LOG_DIR/<name>.log when set."""

from __future__ import annotations

import logging
import os
from pathlib import Path


def setup_logging(name: str, level: int = logging.INFO) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    log_dir = os.environ.get("FD_LOG_DIR")
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(log_dir) / f"{name}.log"))
    fmt = f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=handlers, force=True)

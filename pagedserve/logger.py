"""The library's log output: like vLLM, the `pagedserve` logger prints INFO to stderr unless
the application configured it (set PAGEDSERVE_CONFIGURE_LOGGING=0 to leave it alone).
Called at the edges, never on import: LLM(), the CLI's main and the server's start-up."""
from __future__ import annotations

import logging
import os


def configure_default_logging() -> None:
    root = logging.getLogger("pagedserve")
    if os.environ.get("PAGEDSERVE_CONFIGURE_LOGGING", "1") == "0" or root.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)

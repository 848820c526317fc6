"""What every benchmark's JSON starts with (when, where, how it was run) and how it is written."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def provenance() -> dict[str, str]:
    """The run's date (UTC), machine and command line, for the head of a result file."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.platform()}",
        "command": "python " + " ".join(sys.argv),
    }


def write_result(path: Path, body: dict[str, Any]) -> None:
    """``body`` under the run's provenance, as indented JSON at ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**provenance(), **body}, indent=1, default=str))

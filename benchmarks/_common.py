"""What every benchmark record holds besides its figures: the machine and the time it was taken."""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

NOTABLE_FLAGS = ("avx2", "f16c", "avx512f", "avx512_fp16", "avx512_bf16", "amx_tile")


def machine() -> dict[str, Any]:
    """CPU model and notable flags, cores, Python, kernel and the load average when the run started."""
    cpu, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in NOTABLE_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": list(os.getloadavg()),
    }


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_record(folder: Path, name: str, doc: dict[str, Any], markdown: str) -> str:
    """folder/name.json and folder/name.md; returns the markdown."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (folder / f"{name}.md").write_text(markdown)
    return markdown

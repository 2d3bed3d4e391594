"""Result files: every benchmark JSON carries the machine, the command and the date, so a
figure can always be traced back to how it was measured."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    from pagedserve import __version__
    info: dict[str, Any] = {
        "hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "cpu_model": cpu_model(), "nproc": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "pagedserve": __version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def command_line() -> str:
    argv = list(sys.argv)
    if argv and (argv[0].endswith(("cli.py", "__main__.py")) or os.path.basename(argv[0]) == "pagedserve"):
        argv[0] = "pagedserve"
    return shlex.join(argv)


def envelope(kind: str, args: Any, body: dict[str, Any]) -> dict[str, Any]:
    """The standard wrapper: what ran, where, when, with which flags."""
    flags = {k: v for k, v in vars(args).items() if not callable(v)} if args is not None else {}
    return {"benchmark": kind, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command_line(), "machine": machine_info(), "args": flags, **body}


def default_filename(kind: str) -> str:
    return f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def save_result(result: dict[str, Any], filename: str) -> str:
    directory = os.path.dirname(os.path.abspath(filename))
    os.makedirs(directory, exist_ok=True)
    with open(filename, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2, default=str)
        f.write("\n")
    return filename

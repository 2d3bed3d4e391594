"""`python -m pagedserve.entrypoints.openai.api_server [--model M] ...`: the same server as
`pagedserve serve`, for users coming from vLLM."""
from __future__ import annotations

import sys

from pagedserve.cli import main as cli_main


def main(argv: list[str] | None = None) -> None:
    """`pagedserve serve` by another name."""
    raise SystemExit(cli_main(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()

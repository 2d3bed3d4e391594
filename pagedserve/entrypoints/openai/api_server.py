"""`python -m pagedserve.entrypoints.openai.api_server [--model M] ...`: the same server as
`pagedserve serve`, for users coming from vLLM."""
from __future__ import annotations

from pagedserve.server.serve import main

if __name__ == "__main__":
    main()

"""Entry points shaped like vLLM's (`python -m pagedserve.entrypoints.openai.api_server`)."""

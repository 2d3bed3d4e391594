# The two commands of the README. Both run the idempotent set-up first (scripts/setup.sh:
# .venv with torch pinned, the package, the default model checked by sha256).
SETUP := .venv/.pagedserve-setup
ARGS ?=

.PHONY: serve generate test setup
setup: $(SETUP)
$(SETUP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh

serve: $(SETUP)
	.venv/bin/pagedserve serve $(ARGS)

generate: $(SETUP)
	.venv/bin/pagedserve generate "The capital of France is" $(ARGS)

test: $(SETUP)
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 $(ARGS)

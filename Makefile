# Shortcuts for the usual commands; each target says what it runs.
# `make` alone lists them.

CARGO ?= cargo
COMPOSE ?= docker compose

.DEFAULT_GOAL := help

.PHONY: help migrate run demo test test-integration test-coverage fmt lint compose-up compose-down

help: ## list the targets
	@awk 'BEGIN { FS = ":.*## " } /^[a-z][a-z-]*:.*## / { printf "  %-18s %s\n", $$1, $$2 }' $(MAKEFILE_LIST)

migrate: ## apply the PostgreSQL migrations (delivertrack migrate)
	$(CARGO) run --release -- migrate

run: ## run the pipeline on RabbitMQ (delivertrack run)
	$(CARGO) run --release -- run

demo: ## run the demo on a simulated fleet, no external service (delivertrack demo)
	$(CARGO) run --release -- demo

test: ## the whole suite: services, fmt, clippy, nextest, doctests (scripts/test.sh)
	./scripts/test.sh

test-integration: ## the integration tests (tests/ of every crate) against the local services
	./scripts/test.sh --quick -- -E 'kind(test)'

# nextest runs here without scripts/test.sh, so the services' variables get the same
# defaults as there.
test-coverage: ## the suite under cargo-llvm-cov (report in target/llvm-cov)
	./scripts/test.sh --services
	@command -v cargo-llvm-cov >/dev/null || $(CARGO) install --locked cargo-llvm-cov
	@rustup component list --installed 2>/dev/null | grep -q '^llvm-tools' || rustup component add llvm-tools-preview
	DATABASE_URL="$${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}" \
	REDIS_HOST="$${REDIS_HOST:-127.0.0.1}" REDIS_PORT="$${REDIS_PORT:-6379}" \
	RABBITMQ_URL="$${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}" \
	$(CARGO) llvm-cov nextest --workspace

fmt: ## format the code (cargo fmt)
	$(CARGO) fmt --all

lint: ## clippy on everything, warnings are errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

compose-up: ## build and start the whole stack (needs JWT_SECRET, e.g. in .env)
	$(COMPOSE) up -d --build

compose-down: ## stop the stack (volumes are kept; add -v by hand to drop them)
	$(COMPOSE) down

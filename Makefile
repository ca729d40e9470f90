# gpugate build and test entry points. `make build` leaves an nginx-style layout in dist/;
# `make test` runs every test (unit, nginx, API, end-to-end) and is what CI runs.

SHELL := /bin/bash
CARGO ?= cargo
# Extra nginx configure flags for the vendored nginx build. Keep this value fixed:
# any change makes nginx-sys rebuild nginx from scratch.
export NGX_CONFIGURE_ARGS := --with-stream_ssl_preread_module

.PHONY: build test fuzz bench bench-api clean deps up down demo

build:
	$(CARGO) build --release --workspace --locked
	@objs=$$(ls -td target/release/build/nginx-sys-*/out/objs | head -n1); \
	mkdir -p dist/sbin dist/modules dist/bin dist/conf dist/logs; \
	install -m 0755 $$objs/nginx dist/sbin/nginx; \
	install -m 0755 target/release/libngx_stream_gpugate.so dist/modules/ngx_stream_gpugate_module.so; \
	install -m 0755 target/release/gpugate-routes dist/bin/gpugate-routes; \
	install -m 0755 target/release/gpugate-api dist/bin/gpugate-api; \
	install -m 0755 target/release/gpugate dist/bin/gpugate; \
	install -m 0644 nginx-conf/nginx.conf dist/conf/nginx.conf; \
	echo "dist/ ready: $$(dist/sbin/nginx -v 2>&1)"

# Every test; installs missing Debian packages first (a no-op when all are there).
test: deps build
	scripts/test.sh

# Schemathesis against a real API process, over the API's own OpenAPI document (also the last
# step of `make test`).
fuzz: deps build
	scripts/fuzz.sh

# Data plane vs the reload approach (ratios side by side; report also in .bench/), then what
# the gateways' activity reports cost them (reporting off vs on, same run).
bench: build
	scripts/bench.sh
	scripts/bench-api.sh activity --seconds 15

# Control plane: port allocation vs the seed's method, route activation, create latency.
bench-api:
	scripts/bench-api.sh

deps:
	scripts/install-deps.sh

# The stack (gateway, API, PostgreSQL) in Docker: images built as needed, ready, with a token.
up: deps build
	scripts/up.sh up

down:
	scripts/up.sh down

# A workspace through the API and an SSH session into it through the gateway.
demo: deps build
	scripts/up.sh demo

clean:
	$(CARGO) clean
	rm -rf dist

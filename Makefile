# wazuh-agent — build, test, demo, install.
#   make demo     end-to-end run against the bundled mock server
#   make test     unit + integration tests (what CI runs)

CARGO   ?= cargo
PREFIX  ?= /usr/local
DESTDIR ?=
BIN     := target/release/wazuh-agent

.PHONY: all build release test lint demo bench size install uninstall clean

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p wazuh-agent

test:
	$(CARGO) test --workspace

# Formatting and lints, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

demo:
	$(CARGO) build --workspace
	bash scripts/demo.sh target/debug

# Numbers, not pass/fail: throughput, RSS, idle cost (release builds). BENCH_ARGS=--quick for a short run.
bench:
	$(CARGO) build --release --workspace
	target/release/wazuh-bench --agent $(BIN) $(BENCH_ARGS)

# Size of the stripped release binary (the release profile strips).
size: release
	@bytes=$$(stat -c %s $(BIN)); \
	echo "$(BIN): $$bytes bytes ($$(awk "BEGIN {printf \"%.2f\", $$bytes/1048576}") MiB, stripped)"

install: release
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/wazuh-agent
	install -d -m 0755 $(DESTDIR)/etc/wazuh-agent
	@if [ -e $(DESTDIR)/etc/wazuh-agent/wazuh-agent.toml ]; then \
		echo "keeping existing $(DESTDIR)/etc/wazuh-agent/wazuh-agent.toml"; \
	else \
		install -m 0644 etc/wazuh-agent.toml $(DESTDIR)/etc/wazuh-agent/wazuh-agent.toml; \
	fi
	install -d -m 0700 $(DESTDIR)/var/lib/wazuh-agent

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/wazuh-agent
	@echo "kept /etc/wazuh-agent and /var/lib/wazuh-agent (configuration and credentials); remove them by hand if wanted"

clean:
	$(CARGO) clean

# wazuh-agent — build, test, demo, install.
#   make demo     end-to-end run against the bundled mock server
#   make test     unit + integration tests (what CI runs)

CARGO   ?= cargo
PREFIX  ?= /usr/local
DESTDIR ?=
BIN     := target/release/wazuh-agent

.PHONY: all build release test lint demo bench bench-fleet fuzz size loc install install-files uninstall deb cross clean

all: build

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --release -p wazuh-agent

# Some tests drive the init scripts (shellcheck, busybox), mount a tmpfs and drop
# privileges: they expect root, as CI has. deps.sh installs the tools when run as root.
# The library's tests once more without any optional part (the minimal build, see make size).
test:
	@sh scripts/deps.sh
	$(CARGO) test --workspace
	$(CARGO) test -p wazuh-agent --lib --no-default-features

# Formatting, lints and shell scripts, as CI checks them.
lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p wazuh-agent --lib --bins --no-default-features -- -D warnings
	@sh scripts/deps.sh
	shellcheck -s sh scripts/loc.sh scripts/init.d/wazuh-agent scripts/openrc/wazuh-agent scripts/procd/wazuh-agent scripts/deps.sh \
		scripts/deb/postinst scripts/deb/prerm scripts/deb/postrm
	shellcheck scripts/demo.sh

demo:
	$(CARGO) build --workspace
	bash scripts/demo.sh target/debug

# Numbers, not pass/fail: throughput, RSS, idle cost, FIM (release builds). BENCH_ARGS=--quick for a short run,
# BENCH_ARGS="--only core" or "--only fim" for one phase.
bench:
	$(CARGO) build --release -p wazuh-agent
	# Built on its own so its ureq features do not unify into the agent binary measured.
	$(CARGO) build --release -p wazuh-bench
	target/release/wazuh-bench --agent $(BIN) $(BENCH_ARGS)

# FLEET agents (default 200) against one mock: idle cost per agent, reconnection after an
# outage, the first second of a fleet-wide 503, renewal spread, an event burst, shutdown
# (docs/scaling.md). About 7 minutes; not in CI. FLEET_ARGS e.g. --agent PATH --idle 60.
FLEET ?= 200
bench-fleet:
	$(CARGO) build --release -p wazuh-agent
	$(CARGO) build --release -p wazuh-bench
	target/release/wazuh-fleet-bench --agent $(BIN) --agents $(FLEET) $(FLEET_ARGS)

# libFuzzer via cargo-fuzz on the parsers (ingest lines, queue recovery, JWT claims,
# config, commands, group files). cargo-fuzz needs nightly flags: RUSTC_BOOTSTRAP enables
# them on the stable toolchain. FUZZ_SECONDS per target; crashes land in fuzz/artifacts/.
FUZZ_SECONDS ?= 30
FUZZ_TARGETS := ingest_line queue_recovery jwt_claims config commands group_file
fuzz:
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		RUSTC_BOOTSTRAP=1 cargo fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

# Size of the stripped release binaries (the release profile strips): the default build (every module) and the
# minimal one (--no-default-features: no logcollector, inventory, gzip, group files, built-in roots), the latter in
# its own target dir so neither build overwrites the other. Each fails above its budget: the measured size plus a
# small margin (README, Footprint). The minimal binary must also refuse a module it lacks, naming the feature.
SIZE_BUDGET     ?= 3150000
SIZE_BUDGET_MIN ?= 2530000
MIN_DIR         := target/minimal
MIN_BIN         := $(MIN_DIR)/release/wazuh-agent
size: release
	$(CARGO) build --release -p wazuh-agent --no-default-features --target-dir $(MIN_DIR)
	@check() { bytes=$$(stat -c %s $$1); \
		echo "$$1: $$bytes bytes ($$(awk "BEGIN {printf \"%.2f\", $$bytes/1048576}") MiB, stripped; budget $$2)"; \
		if [ "$$bytes" -gt "$$2" ]; then echo "$$1: binary size over budget" >&2; exit 1; fi; }; \
	check $(BIN) $(SIZE_BUDGET) && check $(MIN_BIN) $(SIZE_BUDGET_MIN)
	@conf=$$(mktemp) && printf '[logcollector]\nfiles = ["/var/log/syslog"]\n' > $$conf; \
	out=$$($(MIN_BIN) --check-config --config $$conf 2>&1); rc=$$?; rm -f $$conf; \
	case "$$rc $$out" in *'logcollector.files'*'cargo feature "logcollector"'*) ;; \
	*) echo "the minimal build does not refuse logcollector.files (exit $$rc): $$out" >&2; exit 1 ;; esac; \
	[ $$rc -eq 1 ] && echo "$(MIN_BIN) refuses logcollector.files, naming the feature"

# Lines of the agent core per file (src/ without the unit-test modules).
loc:
	@sh scripts/loc.sh

# install: PREFIX (default /usr/local) for the binary; /etc and /var/lib whatever the
# PREFIX; DESTDIR for staging; INIT=sysv|openrc|systemd|procd picks the service file.
INIT ?=
# Paths written into the installed scripts.
SUBST := sed -e 's|/usr/local/bin/wazuh-agent|$(PREFIX)/bin/wazuh-agent|g' \
             -e 's|/usr/bin/wazuh-agent|$(PREFIX)/bin/wazuh-agent|g'

install: release install-files

install-files:
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin
	install -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/wazuh-agent
	install -d -m 0755 $(DESTDIR)/etc/wazuh-agent
	@if [ -e $(DESTDIR)/etc/wazuh-agent/wazuh-agent.toml ]; then \
		echo "keeping existing $(DESTDIR)/etc/wazuh-agent/wazuh-agent.toml"; \
	else \
		install -m 0644 etc/wazuh-agent.toml $(DESTDIR)/etc/wazuh-agent/wazuh-agent.toml; \
	fi
	install -d -m 0700 $(DESTDIR)/var/lib/wazuh-agent
	@case "$(INIT)" in \
	sysv) \
		install -d -m 0755 $(DESTDIR)/etc/init.d; \
		$(SUBST) scripts/init.d/wazuh-agent > $(DESTDIR)/etc/init.d/wazuh-agent; \
		chmod 0755 $(DESTDIR)/etc/init.d/wazuh-agent ;; \
	openrc) \
		install -d -m 0755 $(DESTDIR)/etc/init.d; \
		$(SUBST) scripts/openrc/wazuh-agent > $(DESTDIR)/etc/init.d/wazuh-agent; \
		chmod 0755 $(DESTDIR)/etc/init.d/wazuh-agent ;; \
	systemd) \
		install -d -m 0755 $(DESTDIR)/lib/systemd/system; \
		$(SUBST) scripts/systemd/wazuh-agent.service > $(DESTDIR)/lib/systemd/system/wazuh-agent.service; \
		chmod 0644 $(DESTDIR)/lib/systemd/system/wazuh-agent.service ;; \
	procd) \
		install -d -m 0755 $(DESTDIR)/etc/init.d; \
		$(SUBST) scripts/procd/wazuh-agent > $(DESTDIR)/etc/init.d/wazuh-agent; \
		chmod 0755 $(DESTDIR)/etc/init.d/wazuh-agent ;; \
	"") ;; \
	*) echo "INIT must be sysv, openrc, systemd or procd" >&2; exit 1 ;; \
	esac
	@case "$(INIT)" in sysv|systemd|procd) \
		install -d -m 0755 $(DESTDIR)/etc/default; \
		[ -e $(DESTDIR)/etc/default/wazuh-agent ] || install -m 0644 scripts/default.wazuh-agent $(DESTDIR)/etc/default/wazuh-agent ;; \
	esac

# The SysV script is self-contained; the respawn wrapper earlier versions installed in
# libexec goes too.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/wazuh-agent $(DESTDIR)$(PREFIX)/libexec/wazuh-agent/wazuh-agent-respawn
	-rmdir $(DESTDIR)$(PREFIX)/libexec/wazuh-agent 2>/dev/null
	@case "$(INIT)" in \
	sysv|openrc|procd) rm -f $(DESTDIR)/etc/init.d/wazuh-agent ;; \
	systemd) rm -f $(DESTDIR)/lib/systemd/system/wazuh-agent.service ;; \
	esac
	@echo "kept /etc/wazuh-agent, /etc/default/wazuh-agent and /var/lib/wazuh-agent (configuration and credentials)"

# Debian package with dpkg-deb: the release binary in /usr/bin, the config (agent.user =
# wazuh-agent) and /etc/default/wazuh-agent as conffiles, the systemd unit and the SysV
# script, maintainer scripts from scripts/deb/. DEB_BIN: a binary already built (CI reuses
# the one `make size` built); otherwise the release build. Writes wazuh-agent_<ver>_<arch>.deb.
DEB_BIN     ?=
DEB_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
DEB_ARCH    := $(shell dpkg --print-architecture 2>/dev/null)
DEB_OUT     ?= target/deb
DEB_STAGE   := $(DEB_OUT)/stage
DEB_FILE    := $(DEB_OUT)/wazuh-agent_$(DEB_VERSION)_$(DEB_ARCH).deb
DEB_SUBST   := sed -e 's|/usr/local/bin/wazuh-agent|/usr/bin/wazuh-agent|g'

deb: $(if $(DEB_BIN),,release)
	@test -n "$(DEB_ARCH)" || { echo "make deb needs dpkg (dpkg --print-architecture)" >&2; exit 1; }
	rm -rf $(DEB_STAGE) && mkdir -p $(DEB_STAGE)/DEBIAN
	install -d -m 0755 $(DEB_STAGE)/usr/bin $(DEB_STAGE)/etc/wazuh-agent $(DEB_STAGE)/etc/default \
		$(DEB_STAGE)/etc/init.d $(DEB_STAGE)/lib/systemd/system $(DEB_STAGE)/usr/share/doc/wazuh-agent
	install -d -m 0700 $(DEB_STAGE)/var/lib/wazuh-agent
	install -m 0755 $(or $(DEB_BIN),$(BIN)) $(DEB_STAGE)/usr/bin/wazuh-agent
	sed -e 's|^user = ""|user = "wazuh-agent"|' -e 's|^group = ""|group = "wazuh-agent"|' \
		etc/wazuh-agent.toml > $(DEB_STAGE)/etc/wazuh-agent/wazuh-agent.toml
	chmod 0644 $(DEB_STAGE)/etc/wazuh-agent/wazuh-agent.toml
	grep -q '^user = "wazuh-agent"$$' $(DEB_STAGE)/etc/wazuh-agent/wazuh-agent.toml
	$(DEB_SUBST) scripts/default.wazuh-agent > $(DEB_STAGE)/etc/default/wazuh-agent
	$(DEB_SUBST) scripts/init.d/wazuh-agent > $(DEB_STAGE)/etc/init.d/wazuh-agent
	$(DEB_SUBST) scripts/systemd/wazuh-agent.service > $(DEB_STAGE)/lib/systemd/system/wazuh-agent.service
	chmod 0644 $(DEB_STAGE)/etc/default/wazuh-agent $(DEB_STAGE)/lib/systemd/system/wazuh-agent.service
	chmod 0755 $(DEB_STAGE)/etc/init.d/wazuh-agent
	install -m 0644 README.md $(DEB_STAGE)/usr/share/doc/wazuh-agent/README.md
	printf '%s\n' /etc/default/wazuh-agent /etc/init.d/wazuh-agent /etc/wazuh-agent/wazuh-agent.toml \
		> $(DEB_STAGE)/DEBIAN/conffiles
	install -m 0755 scripts/deb/postinst scripts/deb/prerm scripts/deb/postrm $(DEB_STAGE)/DEBIAN/
	@glibc=$$(objdump -T $(DEB_STAGE)/usr/bin/wazuh-agent 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1); \
	depends="libc6$${glibc:+ (>= $$glibc)}"; \
	if objdump -p $(DEB_STAGE)/usr/bin/wazuh-agent 2>/dev/null | grep -q 'NEEDED.*libgcc_s'; then depends="$$depends, libgcc-s1"; fi; \
	size=$$(du -sk --exclude=DEBIAN $(DEB_STAGE) | cut -f1); \
	sed -e 's|@VERSION@|$(DEB_VERSION)|' -e 's|@ARCH@|$(DEB_ARCH)|' -e "s|@SIZE@|$$size|" -e "s|@DEPENDS@|$$depends|" \
		scripts/deb/control > $(DEB_STAGE)/DEBIAN/control
	dpkg-deb --root-owner-group --build $(DEB_STAGE) $(DEB_FILE)
	@echo "$(DEB_FILE)"

# Cross build, e.g. make cross TARGET=aarch64-unknown-linux-musl (needs the target installed
# with rustup and its C compiler for ring: CC_<target> and a linker; see README).
TARGET ?= aarch64-unknown-linux-musl
cross:
	$(CARGO) build --release -p wazuh-agent --target $(TARGET)
	@ls -l target/$(TARGET)/release/wazuh-agent

clean:
	$(CARGO) clean

# kuasar: VM-isolated containers for containerd. Run as root on Debian 12.
#   make deps     host packages (scripts/install-deps.sh; idempotent)
#   make build    release binaries: kuasar-vmm, containerd-shim-kuasar-vmm-v2, kuasarctl
#   make guest    guest image (kernel, initramfs with the agent) into /var/lib/kuasar
#   make images   OCI test images (busybox, pause) into /var/lib/kuasar/images
#   make demo     one container in a microVM through a private containerd
#   make test     fmt, clippy, unit tests, end-to-end tests
#   make check    fmt and clippy only
#   make bench    start-up time and memory figures
#   make clean-test  stop whatever a test, demo or bench left running
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# cargo is often only in ~/.cargo/bin, which a root shell may not have on its PATH.
CARGO_BIN := $(firstword $(wildcard $(CARGO_HOME)/bin) $(wildcard $(HOME)/.cargo/bin))
ifneq ($(CARGO_BIN),)
export PATH := $(CARGO_BIN):$(PATH)
endif
CARGO ?= cargo
# Each step's duration goes to target/step-times; scripts/test.sh prints them at its end.
TIMED := scripts/timed.sh

.PHONY: all deps build guest images demo test check bench clean-test

all: build

deps:
	@rm -f target/step-times
	$(TIMED) deps scripts/install-deps.sh

# The agent is built (statically, for the guest) by scripts/build-guest.sh.
build: deps
	$(TIMED) build $(CARGO) build --release --workspace --exclude kuasar-agent

guest: deps
	$(TIMED) guest scripts/build-guest.sh

images: deps
	$(TIMED) images scripts/build-test-images.sh

demo: deps build guest images
	scripts/demo.sh

test: deps build guest images
	scripts/test.sh

check:
	scripts/test.sh check

bench: deps build guest images
	scripts/bench.sh

clean-test:
	scripts/test.sh clean

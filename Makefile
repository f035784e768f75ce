# mkoverlay — the two commands a new user types: `make run` and `make test`.
SHELL := /bin/bash
.DEFAULT_GOAL := help
NODE_BIN := node_modules/.bin
EXAMPLE := examples/fleet.yaml
OUT ?= out
BOARD ?= rpi4
BASTION ?= eu
ARCH ?= amd64

.PHONY: help install build run pack test test-fast test-deps typecheck lint schema-check unit test-boot boot-deps bench bench-bastion bench-image bench-provisioner bench-shift bench-flash bench-pg clean

help:
	@echo "make run    - install, build, and build one overlay from $(EXAMPLE) into ./$(OUT)"
	@echo "make pack   - the npm package (mkoverlay-VERSION.tgz): npm install -g ./mkoverlay-VERSION.tgz"
	@echo "make test   - install test prerequisites (as root), type-check, lint, run every test"
	@echo "make bench  - factory-scale benchmarks (writes bench/results.md, bench/image-results.md)"
	@echo "make bench-bastion - the bastion at fleet scale, as root (writes bench/bastion-results.md)"

# npm ci when the lock file is there: the same tree on every station and in CI.
node_modules/.install-stamp: package.json package-lock.json
	npm ci --no-audit --no-fund
	@touch $@

install: node_modules/.install-stamp

# One bundle plus a chunk per lazily loaded command (scripts/bundle.mjs says why); tsc type-checks.
dist/.build-stamp: node_modules/.install-stamp scripts/bundle.mjs $(shell find src -name '*.ts')
	node scripts/bundle.mjs
	@touch $@

build: dist/.build-stamp

# What `npm publish` would ship; install it with `npm install -g ./mkoverlay-VERSION.tgz`.
pack: build
	npm pack --ignore-scripts

# The main job on the shipped example: embedded registry in ./$(OUT), overlay + line printed.
run: build
	MKOVERLAY_REGISTRY=$(OUT)/mkoverlay.db bin/mkoverlay --config $(EXAMPLE) --board $(BOARD) --bastion $(BASTION) --out $(OUT)
	@echo "# next: put mkoverlay on your PATH (npm link, or npm install -g .) and run 'mkoverlay init' (README.md)" >&2

# Real tools the tests run: sshd/ssh/ssh-keygen/ssh-keyscan, shellcheck, systemd-analyze/systemctl,
# GNU tar; for images: debugfs/e2fsck/mke2fs/filefrag, mkfs.vfat, mtools, sfdisk, bmaptool, zstd,
# fakeroot (the Buildroot recipe of docs/image-builders.md), setpriv; promtool (status metrics);
# tmux (the batch progress bar and init's questions on a real terminal), zsh and fish (completion);
# strace (--format dir syncs before the rename); jq and ss (docs/bastion.md's troubleshooting recipe). OpenSSH 10.x unpacked beside the system's sshd
# (scripts/ensure-openssh10.sh: bookworm-backports' openssh-server, the system's 9.2 untouched).
TEST_TOOLS := sshd:openssh-server ssh:openssh-client ssh-keygen:openssh-client ssh-keyscan:openssh-client shellcheck:shellcheck \
              systemd-analyze:systemd systemctl:systemd tar:tar \
              debugfs:e2fsprogs e2fsck:e2fsprogs mke2fs:e2fsprogs filefrag:e2fsprogs mkfs.vfat:dosfstools \
              mcopy:mtools sfdisk:fdisk bmaptool:bmap-tools zstd:zstd promtool:prometheus \
              fakeroot:fakeroot setpriv:util-linux tmux:tmux zsh:zsh fish:fish strace:strace jq:jq ss:iproute2
test-deps:
	@bash scripts/ensure-tools.sh $(TEST_TOOLS)
	@bash scripts/ensure-postgres.sh >/dev/null
	@bash scripts/ensure-openssh10.sh >/dev/null

typecheck: node_modules/.install-stamp
	$(NODE_BIN)/tsc -p tsconfig.json --noEmit

# eslint with typed rules (no-floating-promises, no-misused-promises), knip for dead exports,
# files and dependencies (knip.json), shellcheck.
lint: node_modules/.install-stamp
	$(NODE_BIN)/eslint .
	$(NODE_BIN)/knip
	shellcheck -S warning scripts/*.sh test/boot/*.sh bench/recipe.sh bench/device-loop.sh .ci/run overlays/common/usr/local/sbin/reverse-ssh-monitor overlays/common/usr/local/sbin/reverse-ssh-backoff

# The committed JSON Schemas must match the validators (editors and the config cache use them).
schema-check: build
	@for k in fleet:mkoverlay board:board os:os; do f=schema/$${k#*:}.schema.json; \
	  bin/mkoverlay schema $${k%%:*} | diff -u $$f - >/dev/null || { echo "$$f is stale: run 'bin/mkoverlay schema $${k%%:*} --out $$f'"; exit 1; }; done

unit: build
	$(NODE_BIN)/vitest run

test: test-deps boot-deps build typecheck lint schema-check unit

boot-deps:
	@MKOVERLAY_BOOT_ARCH=$(ARCH) bash test/boot/ensure-deps.sh

# A quick loop while working: the unit and cli tiers (vitest.config.ts lists the tiers).
test-fast: build typecheck lint
	$(NODE_BIN)/vitest run --project unit --project cli

test-boot: build boot-deps
	MKOVERLAY_BOOT_ARCH=$(ARCH) $(NODE_BIN)/vitest run test/boot

# Every bench script writes only under bench/ and exits non-zero, naming it, when a target is
# missed; `make bench` runs them all and fails at the end if any missed.
bench: build
	@s=0; node bench/run.mjs || s=1; \
	$(MAKE) --no-print-directory bench-image || s=1; \
	$(MAKE) --no-print-directory bench-provisioner || s=1; \
	$(MAKE) --no-print-directory bench-shift || s=1; \
	$(MAKE) --no-print-directory bench-flash || s=1; \
	$(MAKE) --no-print-directory bench-pg || s=1; exit $$s

# One build on a PostgreSQL registry of 10,000 devices against an empty one (issue 23: <= 1.25x).
bench-pg: build
	node bench/pg-growth.mjs

# A resumed shift (issue 22): 1,000 rows left of 10,000 against a fresh 1,000 (target ≤ 1.2×).
bench-shift: build
	set -o pipefail; node bench/shift.mjs | tee bench/shift-results.md

# As root: `mkoverlay flash` of 4 and 16 throttled loop cards at once against each card alone
# (issue 22: <= 1.15x the slowest alone, < 10 % of a core per card); fails naming a missed target.
bench-flash: build
	set -o pipefail; node bench/flash.mjs | tee bench/flash-results.md

# Per-device images (issue 14): a 2.5 GiB base; as root also XFS and btrfs loop file systems.
bench-image: build
	@bash scripts/ensure-tools.sh mkfs.xfs:xfsprogs mkfs.btrfs:btrfs-progs bmaptool:bmap-tools
	set -o pipefail; node bench/image.mjs | tee bench/image-results.md

# As root: what the rpi-sb-provisioner rootfs-mounted hook adds per device (issue 22).
bench-provisioner: build
	set -o pipefail; node bench/provisioner.mjs | tee bench/provisioner-results.md

# As root: sshd CPU per login at 10/10,000/40,000 devices, reconnect storm, revocation latency;
# then issue 20's fleet benchmarks on OpenSSH 9.2 and 10.x (bench/tunnel-storm.mjs): the storm of
# BENCH_STORM_N (1,000) devices from one address, BENCH_NB_REVOKED (10) revoked beside
# BENCH_NB_HEALTHY (100) healthy for BENCH_NB_MINUTES (30), CPU per login at BENCH_CPU_SIZES
# (10,40000) keys. Each device is a shell loop around the real reverse-ssh-backoff. Fails (after
# writing bench/bastion-results.md) when a target of the issue is missed, naming it.
bench-bastion: build
	@s=0; node bench/bastion.mjs || s=1; BENCH_FLEET_WRITE=1 node bench/tunnel-storm.mjs || s=1; exit $$s

clean:
	rm -rf dist out bench/work test-artifacts mkoverlay-*.tgz

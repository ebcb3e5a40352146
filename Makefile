# toktra-agent: build, run and test from a source checkout, as root on
# Debian 12. Every target installs what it needs, so a fresh machine works.

# Debian's interpreter: its files are readable by the unprivileged stages.
PYTHON ?= /usr/bin/python3
VENV := .venv
BUILD := build
BPF_OBJ := $(BUILD)/toktra_socket.bpf.o
VMLINUX_H := $(BUILD)/vmlinux.h
APT_BUILD := clang llvm libbpf-dev libbpf1 bpftool python3-venv
# Clients with their own TLS stacks (Go, Java; Node.js is on the machine
# with OpenSSL built in) for the ClientHello capture tests; qemu boots
# Debian 12's own kernel for tests/test_kernels.py.
APT_TEST := curl openssl iproute2 systemd-container debootstrap \
	golang-go openjdk-17-jdk-headless qemu-system-x86
DEPS_STAMP := $(VENV)/.deps-installed

.PHONY: all run test test-kernels lint fmt bpf deps host-deps user clean \
	nspawn-root deb

all: bpf $(DEPS_STAMP)

# Debian packages are installed only when one is missing, so repeated runs
# do not touch apt at all.
host-deps:
	@missing=$$(for p in $(APT_BUILD) $(APT_TEST); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
			apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(DEPS_STAMP): setup.cfg pyproject.toml | host-deps
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

deps: host-deps $(DEPS_STAMP)

# vmlinux.h comes from the build host's BTF; the object is CO-RE, so it
# loads on other kernels with BTF too.
$(VMLINUX_H): | host-deps
	@mkdir -p $(BUILD)
	@test -r /sys/kernel/btf/vmlinux || { echo "no /sys/kernel/btf/vmlinux: this kernel has no BTF" >&2; exit 1; }
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp
	mv $@.tmp $@

$(BPF_OBJ): bpf/toktra_socket.bpf.c bpf/toktra_socket.h $(VMLINUX_H)
	clang -g -O2 -Wall -Werror -target bpf -D__TARGET_ARCH_x86 \
		-I$(BUILD) -Ibpf -c $< -o $@.tmp
	llvm-strip -g $@.tmp -o $@.tmp2 2>/dev/null && mv $@.tmp2 $@.tmp || true
	mv $@.tmp $@

bpf: $(BPF_OBJ)

# The unprivileged stages run as this system user (the `user` key).
user:
	@id -u toktra >/dev/null 2>&1 || { echo "creating system user toktra"; \
		useradd --system --user-group --no-create-home --home-dir /nonexistent \
			--shell /usr/sbin/nologin toktra; }

# A Debian 12 tree that tests/test_systemd.py boots with systemd-nspawn to
# run the units under a real systemd. Built once with debootstrap (about
# 90 s), rebuilt only when missing; the test builds it too when needed.
NSPAWN_STAMP := $(BUILD)/nspawn-root.stamp

$(NSPAWN_STAMP): | host-deps $(DEPS_STAMP)
	$(VENV)/bin/python -m tests.nspawn build

nspawn-root: $(NSPAWN_STAMP)

# build/toktra-agent_<version>_amd64.deb, built with dpkg-deb from this
# checkout, the BPF object and the osquery SDK (pip, pinned by hash; see
# packaging/build_deb.py for the layout).
deb: bpf $(DEPS_STAMP)
	$(PYTHON) packaging/build_deb.py --pip $(VENV)/bin/pip --output $(BUILD)

run: all user
	$(VENV)/bin/toktra-agent run

test: all user
	$(VENV)/bin/python -m pytest -ra tests

# The capture suites inside a qemu guest on Debian 12's kernel (6.1), with
# this checkout's BPF object; the guest is built once in build/kernels/.
test-kernels: all user
	$(VENV)/bin/python -m pytest -ra tests/test_kernels.py

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff format --check agent tests bench packaging
	$(VENV)/bin/ruff check agent tests bench packaging

fmt: $(DEPS_STAMP)
	$(VENV)/bin/ruff format agent tests bench packaging
	$(VENV)/bin/ruff check --fix agent tests bench packaging

clean:
	rm -rf $(BUILD) $(VENV) *.egg-info

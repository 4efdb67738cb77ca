# X-Mark bundle: `make demo` runs the pipeline on built-in phantoms, `make test` runs lint and tests.
# Both create .venv from the pinned requirements (constraints.txt holds the exact versions) when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FAMILY ?= classic
DEMO_DIR ?= outputs/demo$(if $(filter-out classic,$(FAMILY)),_$(FAMILY))

.PHONY: venv venv-dev demo test test-monailabel test-deploy lint bench clean

$(VENV)/.runtime: requirements.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt -c constraints.txt
	touch $@

venv: $(VENV)/.runtime
venv-dev: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(PY) scripts/experiment.py run demo --out $(DEMO_DIR)$(if $(filter-out classic,$(FAMILY)), --family $(FAMILY))

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Two workers (one per core), a test file per worker so module fixtures are built once.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# MONAI Label 0.8.5 needs numpy < 2 (the bundle pins numpy 2): its tests run in their own environment, not in make test.
# SAM2_BUILD_CUDA=0: monailabel pulls in sam2, whose source build would otherwise compile CUDA kernels.
# pydicom stays 3 (the bundle's DICOM code needs it); pydicom-seg 0.4.1, which monailabel imports at start-up, imports a
# module pydicom 3 removed: scripts/patch_pydicom_seg.py moves that import, then the server's own import is checked.
MLVENV := .venv-monailabel
$(MLVENV)/.ready: requirements.txt requirements-monailabel.txt constraints-monailabel.txt scripts/patch_pydicom_seg.py
	test -x $(MLVENV)/bin/python || $(PYTHON) -m venv $(MLVENV)
	$(MLVENV)/bin/python -m pip install -q --upgrade pip
	SAM2_BUILD_CUDA=0 $(MLVENV)/bin/python -m pip install -q -r requirements-monailabel.txt -c constraints-monailabel.txt
	$(MLVENV)/bin/python scripts/patch_pydicom_seg.py
	$(MLVENV)/bin/python -c "import monailabel.interfaces.app"
	touch $@

test-monailabel: $(MLVENV)/.ready
	$(MLVENV)/bin/python -m pytest -q -p no:cacheprovider tests/ecosystem/test_monailabel.py

# MONAI Deploy App SDK 4.0 (Holoscan 4.6; its Triton client needs protobuf < 7): its own environment as well.
DEPVENV := .venv-deploy
$(DEPVENV)/.ready: requirements.txt requirements-deploy.txt constraints-deploy.txt
	test -x $(DEPVENV)/bin/python || $(PYTHON) -m venv $(DEPVENV)
	$(DEPVENV)/bin/python -m pip install -q --upgrade pip
	$(DEPVENV)/bin/python -m pip install -q -r requirements-deploy.txt -c constraints-deploy.txt
	touch $@

test-deploy: $(DEPVENV)/.ready
	$(DEPVENV)/bin/python -m pytest -q -p no:cacheprovider tests/ecosystem/test_monai_deploy.py

bench: $(VENV)/.dev
	$(PY) scripts/bench_data.py
	$(PY) scripts/bench_generator.py
	$(PY) scripts/bench_watermark.py
	$(PY) scripts/bench_verify.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache

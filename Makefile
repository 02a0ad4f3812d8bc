# Two commands from a fresh checkout:  make demo   and   make test
# Both create .venv (Python >= 3.11) and install the package into it when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
MPIRUN ?= $(VENV)/bin/mpirun
NP     ?= 3
STAMP  := $(VENV)/.osfed-installed
DEMO   := runs/demo-$(shell date +%Y%m%d-%H%M%S)
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test bench

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e '.[local-mpi,test,demo,report,tensorboard,generative]'
	@touch $(STAMP)

install: $(STAMP)

# FedAvg, OS-Fed and 3SFC on the embedded MNIST-5k (10 clients, Dirichlet 0.5), then a comparison table
demo: $(STAMP)
	$(MPIRUN) -n $(NP) $(PY) -m osfed_hpc run configs/mnist5k_fedavg.yaml out=$(DEMO)/fedavg
	$(MPIRUN) -n $(NP) $(PY) -m osfed_hpc run configs/mnist5k_osfed.yaml out=$(DEMO)/osfed
	$(MPIRUN) -n $(NP) $(PY) -m osfed_hpc run configs/mnist5k_sfc3.yaml out=$(DEMO)/sfc3
	$(PY) -m osfed_hpc report $(DEMO)/fedavg $(DEMO)/osfed $(DEMO)/sfc3

test: $(STAMP)
	$(PY) -m ruff check osfed_hpc tests benchmarks
	$(PY) -m pytest -q -n 2 -m "not mpi" tests
	$(MPIRUN) -n $(NP) $(PY) -m pytest -q --with-mpi -m mpi -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) benchmarks/run_all.py --quick

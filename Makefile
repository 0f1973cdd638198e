# Two commands do all set-up: `make test` and `make demo` (each creates .venv/ if missing).
PY := .venv/bin/python
STAMP := .venv/.fiber_d2_installed
# Test processes: one per core, at most 4 (each runs one intra-op thread; TEST_WORKERS=0 runs serially).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; echo $$n)

.PHONY: env test demo demo-ablation demo-vl web-test lint format

env:
	@bash scripts/setup_env.sh

test: env
	$(PY) -m pytest -q -n $(TEST_WORKERS) tests

# The main job: shapes world + tokenizer, coarse pre-training, fine-grained training initialised from
# it, evaluation (bbox AP, phrase-grounding and retrieval recall), prediction images in output/demo/.
demo: env
	$(PY) tools/pretrain_pipeline.py --output-dir output/demo --visualize 6 $(DEMO_ARGS)

# The same fine-grained budget without the coarse stage (the paper's claim in miniature).
demo-ablation: env
	$(PY) tools/pretrain_pipeline.py --skip-coarse --output-dir output/demo_ablation $(DEMO_ARGS)

# The high-level half: the image tower's pre-training and the coarse stage (each reused from
# output/demo_vl/ when present) -> retrieval, VQA, NLVR2 and captioning on the shapes world; summary
# table and pictures in output/demo_vl/ (DEMO_VL_ARGS=--ablation also runs every task from scratch).
demo-vl: env
	$(PY) tools/demo_vl.py --output-dir output/demo_vl $(DEMO_VL_ARGS)

# The browser demo (tools/web_demo.py) in real headless Chromium: installs the optional extras
# (Gradio, Playwright) into .venv and Chromium from the system packages when missing, then runs the test.
web-test: env
	$(PY) -m pip install -q 'gradio>=5' playwright
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		(apt-get update && apt-get install -y chromium) || \
		echo "web-test: could not install Chromium; the browser test will be skipped"
	$(PY) -m pytest -q -rs tests/tools/test_web_demo.py

lint: env
	$(PY) -m ruff check fiber_d2 tools tests projects
	$(PY) -m black --check -l 100 fiber_d2 tools tests projects

format: env
	$(PY) -m ruff check --fix fiber_d2 tools tests projects
	$(PY) -m black -l 100 fiber_d2 tools tests projects

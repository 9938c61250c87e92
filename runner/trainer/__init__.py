"""The trainer: what runs inside the container (or natively) on every host.

``python -m runner.trainer JOB_OR_RESOLVED_JSON --out RUN_DIR``. It imports
torch, transformers, datasets, tokenizers, safetensors and peft, and nothing
from the dispatch side. See docs/trainer.md.
"""

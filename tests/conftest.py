"""Test-session settings that must precede every import of triton, transformers and huggingface_hub."""

import os

# Triton decides when a kernel is decorated whether to compile or interpret it: interpret, so kernels run on CPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests build tiny models from configs and never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

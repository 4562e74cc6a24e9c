"""Shared pytest setup: GPU marker handling and a deterministic, single-threaded CPU default."""

import os

import pytest
import torch

# Tests never reach a model hub: every model and tokenizer is made locally or ships in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, str]:
    """Shared by the end-to-end tests: the real SmolLM2 tokenizer, a real-text jsonl, tiny Qwen3 (tied) and Llama."""
    from e2e_helpers import save_tiny_model, save_tokenizer, write_text_jsonl
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tiny_assets")
    tok = save_tokenizer(root / "tokenizer")
    vocab = len(AutoTokenizer.from_pretrained(tok))
    return {
        "tokenizer": str(tok),
        "data": str(write_text_jsonl(root / "train.jsonl")),
        "qwen3": str(save_tiny_model(root / "qwen3", "qwen3", vocab_size=vocab)),
        "llama": str(save_tiny_model(root / "llama", "llama", vocab_size=vocab)),
    }

"""A model folder for dummy-weight GPU runs: a real config from configs/ plus a locally trained tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

from sparseserve_vllm.models import _train_tokenizer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def model_dir(name: str, root: str = "/tmp/sparseserve-models") -> str:
    out = Path(root) / name
    if not (out / "tokenizer.json").exists():
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(CONFIGS / name / "config.json", out / "config.json")
        _train_tokenizer(out, 512)
    return str(out)

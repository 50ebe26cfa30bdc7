"""The embedded demo model: a tiny random-weight Qwen3-MoE and a tokenizer trained on the bundled
dataset, both built locally (no network) on first use and cached.

Cache: `$KT_CACHE_DIR` or `~/.cache/kt`, folder `tiny-qwen3-moe-<key>` where the key hashes the
model shape, the tokenizer recipe and the bundled dataset, so a change to any of them builds a new
one. The folder is written to a temporary name and renamed, so concurrent first runs are safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kt_sft.data.records import bundled_dataset
from kt_sft.data.templates import CHATML, CHATML_SPECIAL_TOKENS

__all__ = ["MODEL_OVERRIDES", "VOCAB_SIZE", "build_tokenizer", "cache_root", "embedded_model_dir"]

#: Tokenizer vocabulary (byte-level BPE): small, so the LM head is cheap.
VOCAB_SIZE = 512
PAD_TOKEN = "<|endoftext|>"
#: Shape of the demo model (Qwen3-MoE architecture; every layer is MoE).
MODEL_OVERRIDES: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "moe_intermediate_size": 128,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
SEED = 1234
_RECIPE_VERSION = 1  # bump when the build below changes in a way the key does not capture


def cache_root() -> Path:
    """`$KT_CACHE_DIR`, else `~/.cache/kt`."""
    env = os.environ.get("KT_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kt"


def _key() -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {
                "model": MODEL_OVERRIDES,
                "vocab": VOCAB_SIZE,
                "seed": SEED,
                "recipe": _RECIPE_VERSION,
                "template": CHATML,
            },
            sort_keys=True,
        ).encode()
    )
    h.update(bundled_dataset().read_bytes())
    return h.hexdigest()[:12]


def _training_texts() -> list[str]:
    """The bundled dataset rendered as ChatML text (what the tokenizer will see)."""
    texts = []
    with bundled_dataset().open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            texts.append(
                "".join(
                    f"<|im_start|>{t['role']}\n{t['content']}<|im_end|>\n" for t in rec["messages"]
                )
            )
    return texts


def build_tokenizer(vocab_size: int = VOCAB_SIZE) -> Any:
    """Train a byte-level BPE tokenizer on the bundled dataset; return a PreTrainedTokenizerFast
    with the ChatML chat template (eos = <|im_end|>, pad = <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD_TOKEN, *CHATML_SPECIAL_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN,
        additional_special_tokens=list(CHATML_SPECIAL_TOKENS),
    )
    fast.chat_template = CHATML
    fast.model_max_length = MODEL_OVERRIDES["max_position_embeddings"]
    return fast


def _build_model(vocab_size: int, eos_id: int, pad_id: int) -> Any:
    from kt_models import tiny

    return tiny.build(
        "qwen3_moe",
        seed=SEED,
        vocab_size=vocab_size,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=None,
        **MODEL_OVERRIDES,
    )


def embedded_model_dir(*, rebuild: bool = False, quiet: bool = False) -> Path:
    """Return the cached demo checkpoint directory (model + tokenizer), building it if needed."""
    root = cache_root()
    target = root / f"tiny-qwen3-moe-{_key()}"
    if (target / "config.json").is_file() and not rebuild:
        return target
    root.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"building the embedded demo model in {target} (first run only)", flush=True)
    from kt_models import tiny

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        tokenizer = build_tokenizer()
        model = _build_model(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.bos_token_id = None
        from transformers.utils import logging as hf_logging

        bars_were_on = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            tiny.save(model, tmp)
        finally:
            if bars_were_on:  # the CLI turns them off for the whole run: leave them off
                hf_logging.enable_progress_bar()
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to a broken folder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

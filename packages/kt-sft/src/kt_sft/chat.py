"""`kt-sft chat` / `generate`: load a base model (+ a PEFT adapter) and generate replies.

With kt (the default) the routed experts run in the engine's inference path; `--stock` loads the
plain transformers model instead, which is also how a user without kt would load the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ChatSession", "load_chat_session"]


@dataclass
class ChatSession:
    model: Any
    tokenizer: Any
    template: str | None
    has_adapter: bool
    use_kt: bool
    device: str

    def prompt_text(self, prompt: str, system: str | None = None) -> str:
        if self.template is None:
            return prompt
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return self.tokenizer.apply_chat_template(
            turns, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )

    def generate(
        self,
        prompt: str,
        *,
        system: str | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        base: bool = False,
    ) -> str:
        """Reply to `prompt`; `base=True` disables the adapter (the model before fine-tuning)."""
        import contextlib

        import torch

        text = self.prompt_text(prompt, system)
        enc = self.tokenizer(text, return_tensors="pt", add_special_tokens=self.template is None)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        kwargs: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False)
        ctx = (
            self.model.disable_adapter()
            if (base and self.has_adapter)
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), ctx:
            out = self.model.generate(**enc, **kwargs)
        new = out[0, enc["input_ids"].shape[1] :]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def close(self) -> None:
        if self.use_kt:
            import kt_sft

            kt_sft.close(self.model)


def load_chat_session(
    model: str,
    adapter: str | None = None,
    *,
    use_kt: bool = True,
    kt_options: dict[str, Any] | None = None,
    template: str = "auto",
    device: str = "auto",
    bf16: bool = False,
    trust_remote_code: bool = False,
) -> ChatSession:
    """Load tokenizer, base model and (optionally) an adapter for generation."""
    import torch

    from kt_sft.data.records import DataError
    from kt_sft.data.templates import resolve_template
    from kt_sft.train.artifacts import find_adapter_dir
    from kt_sft.train.modeling import (
        ModelLoadError,
        load_base_model,
        load_tokenizer,
        resolve_model_path,
    )

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    try:
        chat_template: str | None = resolve_template(tokenizer, template, tokenizer_path=path)
    except DataError:
        chat_template = None  # plain continuation of the prompt
    options = dict(kt_options or {})
    adapter_dir = find_adapter_dir(adapter) if adapter is not None else None
    if adapter_dir is not None:
        _check_adapter_base(adapter_dir, path)
        rank, alpha = _expert_lora_shape(adapter_dir)
        options.setdefault("kt_lora_rank", rank)
        if alpha:
            options.setdefault("kt_lora_alpha", alpha)
        options.update(
            {k: v for k, v in _lora_experts_options(adapter_dir).items() if k not in options}
        )
    else:
        options.setdefault("kt_lora_rank", 0)
    base = load_base_model(
        path,
        use_kt=use_kt,
        kt_options=options,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        device=device,
        trust_remote_code=trust_remote_code,
    )
    base.config.use_cache = True
    if adapter_dir is None:
        net = base
    elif use_kt and _lora_experts_options(adapter_dir):
        import kt_sft  # the adapter carries kt's LoRA experts beside the PEFT tensors

        net = kt_sft.load_adapter(base, str(adapter_dir))
    else:  # a standard PEFT adapter: PEFT's own loader (kt's hooks route the experts)
        from peft import PeftModel

        try:
            net = PeftModel.from_pretrained(base, str(adapter_dir))
        except RuntimeError as exc:
            mismatches = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
            if not mismatches:
                raise
            raise ModelLoadError(
                f"adapter {adapter_dir} does not fit the model {path} (trained on another "
                f"model?): {'; '.join(mismatches[:3])}"
            ) from exc
    has_adapter = adapter_dir is not None
    net.eval()
    return ChatSession(net, tokenizer, chat_template, has_adapter, use_kt, device)


def _expert_lora_shape(adapter_dir: Path) -> tuple[int, float | None]:
    """(rank, alpha) the engine needs for this adapter: its r when it has expert LoRA, else 0."""
    import json

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    on_experts = bool(cfg.get("target_parameters")) or "experts" in str(cfg.get("target_modules"))
    alpha = cfg.get("lora_alpha")
    return (int(cfg.get("r", 8)) if on_experts else 0), (float(alpha) if alpha else None)


def _lora_experts_options(adapter_dir: Path) -> dict[str, Any]:
    """KTConfig options that recreate the kt LoRA experts saved with an adapter (if any)."""
    import json

    meta_file = adapter_dir / "kt_adapter.json"
    if not meta_file.is_file():
        return {}
    modules = json.loads(meta_file.read_text()).get("modules") or {}
    if not modules:
        return {}
    first = next(iter(modules.values()))
    return {
        "kt_lora_experts": int(first["num_experts"]),
        "kt_lora_expert_intermediate_size": int(first["width"]),
    }


def _check_adapter_base(adapter_dir: Path, model_path: str) -> None:
    """Refuse an adapter whose recorded base model is a different demo build (a common mix-up:
    an adapter trained on one embedded model loaded on a rebuilt one). Adapters written by this
    version record `embedded` instead of the build's path; a wrong build then fails the shape
    check when the adapter loads."""
    import json

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    recorded = cfg.get("base_model_name_or_path") or ""
    if (
        "tiny-qwen3-moe-" in recorded
        and "tiny-qwen3-moe-" in model_path
        and Path(recorded).name != Path(model_path).name
    ):
        raise ValueError(
            f"adapter {adapter_dir} was trained on {recorded}, not on "
            f"{model_path}; retrain it with this kt-sft version"
        )

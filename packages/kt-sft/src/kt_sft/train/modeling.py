"""Model side of `kt-sft train` / `chat`: find the checkpoint, load the tokenizer and the model
(routed experts in the kt engine, or stock for comparison), and attach PEFT LoRA."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from kt_sft.train.schema import EMBEDDED, ConfigError

__all__ = [
    "ModelLoadError",
    "apply_lora",
    "build_lora_config",
    "linear_module_names",
    "load_base_model",
    "load_tokenizer",
    "resolve_model_path",
]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(RuntimeError):
    """The base model or its tokenizer cannot be loaded; the message says which and why."""


def resolve_model_path(name: str, *, quiet: bool = False) -> str:
    """`embedded` -> the cached demo checkpoint (built on first use); a local directory -> itself;
    a Hub id (`org/name`) is passed through to transformers (its own cache); anything else that
    does not exist is an error."""
    if name == EMBEDDED:
        from kt_sft.train.embedded import embedded_model_dir

        return str(embedded_model_dir(quiet=quiet))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model path {path} has no config.json: 'model_name_or_path' must "
                "be a Hugging Face checkpoint directory"
            )
        return str(path)
    if path.exists():
        raise ConfigError(
            f"model path {path} is a file; 'model_name_or_path' must be a "
            "checkpoint directory (config.json + *.safetensors)"
        )
    if _HUB_ID.match(name) and not name.startswith((".", "~")):
        return name
    raise ConfigError(
        f"model path not found: {path} ('model_name_or_path' must be a local "
        f"checkpoint directory, a Hub id, or `{EMBEDDED}` for the demo model)"
    )


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path}: {exc}") from exc
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ModelLoadError(f"the tokenizer at {path} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(
    path: str,
    *,
    use_kt: bool,
    kt_options: dict[str, Any],
    dtype: Any,
    device: str,
    trust_remote_code: bool = False,
) -> Any:
    """Load the causal LM; with `use_kt` the routed experts go to the engine (kt_sft.load_model)."""
    hf_kwargs: dict[str, Any] = {"dtype": dtype}
    if trust_remote_code:
        hf_kwargs["trust_remote_code"] = True
    try:
        if use_kt:
            import kt_sft

            model = kt_sft.load_model(
                path, kt_sft.KTConfig.from_dict(kt_options), device=device, **hf_kwargs
            )
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)
            if device != "cpu":
                model.to(device)
    except (OSError, ValueError, KeyError) as exc:
        # unsupported architectures, missing shards and the like: keep the library's message
        raise ModelLoadError(f"cannot load the model {path}: {exc}") from exc
    model.config.use_cache = False
    return model


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of the nn.Linear modules LoRA `all` targets: every linear layer except the LM
    head, routers / gates and anything inside the routed experts."""
    from torch import nn

    names = set()
    for full, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        parts = full.split(".")
        leaf = parts[-1]
        if (
            "experts" in parts[:-1]
            or leaf in ("lm_head", "gate", "router", "score")
            or leaf.endswith(("_gate", "router"))
        ):
            continue
        if mod.out_features == model.config.vocab_size:  # output heads under other names
            continue
        names.add(leaf)
    return sorted(names)


def _expert_targets(model: Any, use_kt: bool) -> dict[str, Any]:
    if use_kt:
        import kt_sft

        return dict(kt_sft.default_expert_lora_targets(model))
    # stock model: fused transformers experts take target_parameters
    from kt_models import get_arch_spec

    spec = get_arch_spec(model)
    if spec.expert_storage == "fused":
        attr = f"{spec.moe_block_attr}.{spec.experts_attr}"
        return {"target_parameters": [f"{attr}.gate_up_proj", f"{attr}.down_proj"]}
    return {"target_modules": list(spec.proj_names)}


def _merge_modules(a: Any, b: Any) -> Any:
    """Union of two PEFT target_modules values (lists of suffixes or full-match regexes)."""
    if a is None or b is None:
        return b if a is None else a
    if isinstance(a, str) or isinstance(b, str):

        def rx(v: Any) -> str:
            return v if isinstance(v, str) else rf".*\.(?:{'|'.join(map(re.escape, v))})"

        return f"(?:{rx(a)})|(?:{rx(b)})"
    return sorted(set(a) | set(b))


def build_lora_config(
    model: Any, *, targets: list[str], rank: int, alpha: float, dropout: float, use_kt: bool
) -> Any:
    """The peft.LoraConfig for `lora_target` (`all`, `experts`, or module names)."""
    from peft import LoraConfig

    want_experts = "all" in targets or "experts" in targets
    modules: list[str] | None = None
    if "all" in targets:
        modules = linear_module_names(model) + [t for t in targets if t not in ("all", "experts")]
    else:
        modules = [t for t in targets if t != "experts"] or None
    kwargs: dict[str, Any] = {}
    if want_experts:
        kwargs = _expert_targets(model, use_kt)
    if dropout and kwargs.get("target_parameters"):
        raise ConfigError(
            f"'lora_dropout' {dropout:g} cannot be used with LoRA on the routed experts (PEFT's "
            "target_parameters adapters have no dropout); set lora_dropout: 0, or leave the "
            "experts out of lora_target (e.g. q_proj,k_proj,v_proj,o_proj)"
        )
    kwargs["target_modules"] = _merge_modules(kwargs.get("target_modules"), modules)
    if kwargs["target_modules"] is None:
        kwargs.pop("target_modules")
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM", **kwargs
    )


def apply_lora(model: Any, lora_config: Any, targets: list[str], *, use_kt: bool) -> Any:
    """get_peft_model (kt's, which binds the expert LoRA to the engines, when `use_kt`)."""
    if use_kt:
        from kt_sft import get_peft_model
    else:
        from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config)
    except ValueError as exc:
        if "not found" in str(exc) or "match" in str(exc):
            names = sorted(
                {
                    n.split(".")[-1]
                    for n, _ in model.named_modules()
                    if n and not n.split(".")[-1].isdigit()
                }
            )
            raise ConfigError(
                f"'lora_target' {','.join(targets)} matches no module of the model "
                f"({exc}); module names in this model: "
                f"{', '.join(names[:40])}"
            ) from exc
        raise

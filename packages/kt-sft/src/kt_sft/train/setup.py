"""What a training run builds before its first step: the output folder, the tokenized data,
the model with its LoRA adapters, and the optimizer with its learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt_sft.train import artifacts
from kt_sft.train.ranks import Ranks
from kt_sft.train.report import log
from kt_sft.train.schema import EMBEDDED, ConfigError, TrainConfig
from kt_sft.train.step_checkpoints import check_world_size, resolve_resume

__all__ = [
    "TrainData",
    "build_model",
    "build_optimizer",
    "device_of",
    "kt_options",
    "load_data",
    "lr_lambda",
    "prepare_output",
]


def device_of(cfg: TrainConfig) -> str:
    """`cfg.device` with `auto` resolved (CUDA when torch sees a device)."""
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def prepare_output(
    cfg: TrainConfig, ranks: Ranks
) -> tuple[Path, artifacts.PreviousRun, Path | None]:
    """Rank 0 prepares output_dir; every rank finds the checkpoint to resume from. Every rank
    raises the same error when one of them fails. Returns (output_dir, the previous run there,
    the checkpoint to resume from or None)."""
    resuming = cfg.resume_from_checkpoint is not None
    output_dir = Path(cfg.output_dir).expanduser()
    error: BaseException | None = None
    resume_path: Path | None = None
    previous = artifacts.PreviousRun(output_dir, [])
    try:
        if ranks.is_main:
            output_dir, previous = artifacts.prepare_output_dir(
                cfg.output_dir, overwrite=cfg.overwrite_output_dir, resuming=resuming
            )
        resume_path = resolve_resume(cfg, output_dir)
        if resume_path is not None:
            check_world_size(resume_path, ranks)
    except (ConfigError, artifacts.OutputDirError) as exc:
        error = exc
    ranks.agree(error)
    return output_dir, previous, resume_path


@dataclass
class TrainData:
    """The tokenized training set and the step count it gives."""

    model_path: str
    tokenizer: Any
    data: Any  # kt_sft.data's prepared dataset: .examples, .formats, .num_tokens, ...
    global_batch: int  # examples per micro-batch over all ranks
    total_steps: int


def load_data(cfg: TrainConfig, ranks: Ranks, *, quiet: bool) -> TrainData:
    """Resolve the model path, load the tokenizer and tokenize the data (before the slow model
    load, so bad data fails early)."""
    from kt_sft.data import Columns, prepare_dataset, resolve_dataset_paths
    from kt_sft.train import modeling

    model_path = ranks.main_first(
        lambda: modeling.resolve_model_path(cfg.model_name_or_path, quiet=quiet)
    )
    tok_path = (
        modeling.resolve_model_path(cfg.tokenizer_name_or_path, quiet=True)
        if cfg.tokenizer_name_or_path
        else model_path
    )
    tokenizer = modeling.load_tokenizer(tok_path, trust_remote_code=cfg.trust_remote_code)
    data = prepare_dataset(
        resolve_dataset_paths(cfg.datasets, EMBEDDED),
        tokenizer,
        dataset_format=cfg.dataset_format,
        columns=Columns(
            cfg.text_column, cfg.prompt_column, cfg.completion_column, cfg.messages_column
        ),
        template=cfg.template,
        cutoff_len=cfg.cutoff_len,
        max_samples=cfg.max_samples,
        train_on_prompt=cfg.train_on_prompt,
        tokenizer_path=tok_path,
    )
    global_batch = cfg.per_device_train_batch_size * ranks.world_size
    micro_per_epoch = math.ceil(len(data.examples) / global_batch)
    if cfg.max_steps > 0:
        total_steps = cfg.max_steps
    else:
        total_steps = max(
            1, math.ceil(cfg.num_train_epochs * micro_per_epoch / cfg.gradient_accumulation_steps)
        )
    if not quiet:
        fmts = ", ".join(f"{k} {v}" for k, v in sorted(data.formats.items()))
        dropped = (
            f", {data.num_dropped} dropped (nothing to train within cutoff_len)"
            if data.num_dropped
            else ""
        )
        procs = f" x {ranks.world_size} processes" if ranks.active else ""
        log(
            f"data: {len(data.examples)} examples ({fmts}){dropped}, {data.num_tokens} tokens; "
            f"{total_steps} steps of {cfg.per_device_train_batch_size} x "
            f"{cfg.gradient_accumulation_steps} examples{procs}"
        )
    return TrainData(model_path, tokenizer, data, global_batch, total_steps)


def kt_options(cfg: TrainConfig, output_dir: Path, *, main: bool = True) -> dict[str, Any]:
    """The kt_* options for KTConfig: the engine's LoRA rank/alpha follow lora_rank/lora_alpha
    (rank 0 = frozen experts when lora_target leaves them out), and with `profile` the engine's
    own Chrome trace goes to output_dir/engine_trace.json (rank 0's engine only)."""
    options = dict(cfg.kt)
    on_experts = any(t in ("all", "experts") for t in cfg.lora_targets)
    given = options.get("kt_lora_rank")
    if given is not None and on_experts and int(given) < cfg.lora_rank:
        raise ConfigError(
            f"kt_lora_rank={given} is smaller than lora_rank={cfg.lora_rank}; "
            "set only lora_rank (kt-sft passes it to the engine)"
        )
    options.setdefault("kt_lora_rank", cfg.lora_rank if on_experts else 0)
    options.setdefault("kt_lora_alpha", cfg.scaling_alpha)
    if (
        main
        and cfg.profile
        and cfg.use_kt
        and not any(k in options for k in ("kt_profile", "kt_profile_path"))
    ):
        options["kt_profile"] = str(output_dir / "engine_trace.json")
    return options


def build_model(
    cfg: TrainConfig,
    model_path: str,
    *,
    output_dir: Path,
    ranks: Ranks,
    device: str,
    dtype: Any,
) -> Any:
    """The base model (experts in the kt engine unless `use_kt: false`) with PEFT LoRA applied,
    gradient checkpointing as configured, in training mode."""
    import torch

    from kt_sft.train import modeling

    model = modeling.load_base_model(
        model_path,
        use_kt=cfg.use_kt,
        kt_options=kt_options(cfg, output_dir, main=ranks.is_main),
        dtype=dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
    )
    torch.manual_seed(cfg.seed)  # the LoRA initialisation does not depend on the model load
    lora = modeling.build_lora_config(
        model,
        targets=cfg.lora_targets,
        rank=cfg.lora_rank,
        alpha=cfg.scaling_alpha,
        dropout=cfg.lora_dropout,
        use_kt=cfg.use_kt,
    )
    model = modeling.apply_lora(model, lora, cfg.lora_targets, use_kt=cfg.use_kt)
    for peft_config in getattr(model, "peft_config", {}).values():
        # the adapter names its base as the user did (a Hub id, their path, or `embedded`),
        # not as the absolute path it was resolved to on this machine
        peft_config.base_model_name_or_path = cfg.model_name_or_path
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
    model.train()
    return model


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """The learning-rate factor of optimizer step `step`: linear warmup, then `kind`."""

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / (warmup + 1)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_optimizer(cfg: TrainConfig, params: list[Any], total_steps: int) -> tuple[Any, Any]:
    """AdamW over `params` (no weight decay on 1-D ones) and its LambdaLR schedule."""
    import torch

    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
    )
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.lr_scheduler_type, warmup, total_steps)
    )
    return optimizer, scheduler

"""Every `kt-sft train` configuration key in one table: its type, default, documentation, group
and checks (see docs/configuration.md, which is generated from it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kt_sft.train.config_build import build

__all__ = ["EMBEDDED", "GROUPS", "MAX_ACCUMULATION_STEPS", "TrainConfig", "describe_keys", "opt"]

#: The value of `model_name_or_path` / `dataset` that selects the embedded demo model / data.
EMBEDDED = "embedded"

# Micro-batches per optimizer step: the loop plans a window's batches up front, so the count is
# bounded (a typo such as 1e20 must be an error, not unbounded memory).
MAX_ACCUMULATION_STEPS = 65536

GROUPS = {
    "model": "Model",
    "data": "Data",
    "lora": "LoRA",
    "train": "Training",
    "output": "Output and checkpoints",
    "kt": "Engine",
}


def opt(
    default: Any,
    help: str,
    group: str,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_min: bool = False,
    kind: str | None = None,
) -> Any:
    """A dataclass field carrying the documentation and checks of one config key."""
    meta = {
        "help": help,
        "group": group,
        "choices": tuple(choices) if choices else None,
        "minimum": minimum,
        "maximum": maximum,
        "exclusive_min": exclusive_min,
        "kind": kind,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every key of a `kt-sft train` YAML file (see docs/configuration.md)."""

    # ---- model
    model_name_or_path: str | None = opt(
        None,
        "Hugging Face checkpoint directory of the base model (config.json + safetensors). "
        f"`{EMBEDDED}` selects the built-in tiny Qwen3-MoE demo model. Required.",
        "model",
    )
    tokenizer_name_or_path: str | None = opt(
        None, "Tokenizer directory; defaults to the model directory.", "model"
    )
    trust_remote_code: bool = opt(
        False, "Allow model code shipped with the checkpoint (custom architectures).", "model"
    )
    bf16: bool = opt(
        False,
        "Run the PyTorch side (attention, router, embeddings) in bfloat16 instead of "
        "float32. The CPU experts always use the engine's own weight format (kt_weight_dtype).",
        "model",
    )
    device: str = opt(
        "auto",
        "Where the non-expert part of the model runs: `auto` (CUDA when available), "
        "`cpu` or `cuda`.",
        "model",
        choices=("auto", "cpu", "cuda"),
    )
    torch_num_threads: int | None = opt(
        None,
        "Intra-op threads of PyTorch (attention, router, LM head); unset = PyTorch's "
        "default (one per core). The engine has its own (kt_num_threads). On a CPU-only machine "
        "they take turns; small models run faster with 1.",
        "model",
        minimum=1,
    )
    use_kt: bool = opt(
        True,
        "Run the routed experts in the kt engine. `false` trains the stock Hugging Face + "
        "PEFT model instead (for comparisons; needs memory for every expert in PyTorch).",
        "model",
    )

    # ---- data
    dataset: str | list[str] | None = opt(  # noqa: RUF009 - immutable default
        None,
        "Training data: a file or list of files (.jsonl, .json, .parquet, .csv). "
        f"`{EMBEDDED}` selects the bundled demo dataset. Required.",
        "data",
        kind="paths",
    )
    dataset_format: str = opt(
        "auto",
        "How records are read: `text` (one `text` column, loss on every token), "
        "`prompt_completion` (loss on the completion only), `messages` (chat turns through the "
        "chat template, loss on assistant turns only), `alpaca` (instruction/input/output) or "
        "`sharegpt` (conversations of from/value); `auto` picks by the columns present.",
        "data",
        choices=("auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt"),
    )
    text_column: str = opt("text", "Column holding the text of the `text` format.", "data")
    prompt_column: str = opt("prompt", "Column holding the prompt of `prompt_completion`.", "data")
    completion_column: str = opt(
        "completion", "Column holding the completion of `prompt_completion`.", "data"
    )
    messages_column: str = opt(
        "messages", "Column holding the list of {role, content} turns of `messages`.", "data"
    )
    template: str = opt(
        "auto",
        "Chat template for `messages`, `alpaca` and `sharegpt`: `auto` uses the "
        "tokenizer's own template, `chatml` the built-in ChatML template (<|im_start|>role ... "
        "<|im_end|>).",
        "data",
        choices=("auto", "chatml"),
    )
    cutoff_len: int = opt(
        1024, "Maximum tokens per example; longer examples are truncated.", "data", minimum=1
    )
    max_samples: int | None = opt(
        None, "Use at most this many examples (after reading, before shuffling).", "data", minimum=1
    )
    train_on_prompt: bool = opt(
        False,
        "Also compute the loss on prompts / user turns (by default only completions and "
        "assistant turns are trained).",
        "data",
    )

    # ---- LoRA
    finetuning_type: str = opt(
        "lora", "Fine-tuning method; only `lora` is supported.", "lora", choices=("lora",)
    )
    lora_rank: int = opt(8, "LoRA rank r.", "lora", minimum=1)
    lora_alpha: float | None = opt(
        None,
        "LoRA alpha (scaling = alpha / r); defaults to 2 × lora_rank.",
        "lora",
        minimum=0,
        exclusive_min=True,
    )
    lora_dropout: float = opt(
        0.0,
        "Dropout on the LoRA input. Only without expert LoRA: PEFT's adapters on fused "
        "expert tensors (target_parameters) have no dropout.",
        "lora",
        minimum=0,
        maximum=1,
    )
    lora_target: str | list[str] = opt(  # noqa: RUF009 - immutable default
        "all",
        "What gets LoRA adapters: `all` (routed experts + every linear layer except the "
        "LM head and router), `experts` (routed experts only), or a list / comma-separated "
        "string of module names (e.g. `q_proj,v_proj`), where `experts` may be one item.",
        "lora",
        kind="names",
    )

    # ---- training
    learning_rate: float = opt(
        1e-4, "Peak learning rate of AdamW.", "train", minimum=0, exclusive_min=True
    )
    num_train_epochs: float = opt(
        3.0,
        "Passes over the data (ignored when max_steps > 0).",
        "train",
        minimum=0,
        exclusive_min=True,
    )
    max_steps: int = opt(
        -1, "Optimizer steps to run; -1 = use num_train_epochs.", "train", minimum=-1
    )
    per_device_train_batch_size: int = opt(1, "Examples per micro-batch.", "train", minimum=1)
    gradient_accumulation_steps: int = opt(
        1,
        "Micro-batches per optimizer step (at most 65536).",
        "train",
        minimum=1,
        maximum=MAX_ACCUMULATION_STEPS,
    )
    gradient_checkpointing: bool = opt(
        False, "Recompute activations in backward to save memory.", "train"
    )
    lr_scheduler_type: str = opt(
        "cosine",
        "Learning-rate schedule after warmup.",
        "train",
        choices=("cosine", "linear", "constant", "constant_with_warmup"),
    )
    warmup_ratio: float = opt(
        0.0, "Fraction of the steps used for linear warmup.", "train", minimum=0, maximum=1
    )
    warmup_steps: int = opt(
        0, "Warmup steps (overrides warmup_ratio when > 0).", "train", minimum=0
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.", "train", minimum=0)
    max_grad_norm: float = opt(
        1.0, "Gradient clipping norm; 0 disables clipping.", "train", minimum=0
    )
    adam_beta1: float = opt(0.9, "AdamW beta1.", "train", minimum=0, maximum=1)
    adam_beta2: float = opt(0.999, "AdamW beta2.", "train", minimum=0, maximum=1)
    adam_epsilon: float = opt(1e-8, "AdamW epsilon.", "train", minimum=0, exclusive_min=True)
    optim: str = opt("adamw_torch", "Optimizer.", "train", choices=("adamw_torch",))
    seed: int = opt(
        42,
        "Seed for LoRA initialisation and data order (0 to 2**63 - 1).",
        "train",
        minimum=0,
        maximum=2**63 - 1,
    )
    on_nonfinite_loss: str = opt(
        "error",
        "What a step whose loss or gradient norm is NaN / Inf does: `error` stops the "
        "run with an error before the optimizer step (nothing non-finite reaches the adapter or a "
        "checkpoint), `skip` drops that step's gradients and goes on (the step still consumes "
        "its data and counts).",
        "train",
        choices=("error", "skip"),
    )

    # ---- output
    output_dir: str = opt(
        "kt-sft-output", "Where the adapter, checkpoints, loss curve and trace go.", "output"
    )
    overwrite_output_dir: bool = opt(
        False, "Allow reusing an output_dir that already holds results.", "output"
    )
    logging_steps: int = opt(10, "Print a log line every this many steps.", "output", minimum=1)
    save_steps: int = opt(
        0,
        "Write a resumable checkpoint every this many steps and after the last one "
        "(0 = only the final adapter).",
        "output",
        minimum=0,
    )
    save_total_limit: int | None = opt(
        None, "Keep only the newest this many checkpoints.", "output", minimum=1
    )
    resume_from_checkpoint: str | None = opt(
        None,
        "Checkpoint directory to resume from, or `auto` for the newest one in output_dir.",
        "output",
    )
    plot_loss: bool = opt(True, "Write loss_curve.png.", "output")
    profile: bool = opt(
        True, "Time the CPU experts and the rest, and write a Chrome trace (trace.json).", "output"
    )
    disable_tqdm: bool = opt(
        False, "Hide the progress bar (log lines are still printed).", "output"
    )

    # ---- engine options: every `kt_*` key, passed to kt_sft.KTConfig
    kt: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Engine options (`kt_*` keys), validated by kt_sft.KTConfig.",
            "group": "kt",
        },
    )

    # ---- derived
    @property
    def scaling_alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank)

    @property
    def datasets(self) -> list[str]:
        if self.dataset is None:
            return []
        return [self.dataset] if isinstance(self.dataset, str) else list(self.dataset)

    @property
    def lora_targets(self) -> list[str]:
        value = self.lora_target
        items = value.split(",") if isinstance(value, str) else list(value)
        return [s.strip() for s in items if s.strip()]

    def to_dict(self) -> dict[str, Any]:
        """The config as a flat dict of YAML keys (`kt_*` options inline)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "kt"}
        out.update(self.kt)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], source: str = "config") -> TrainConfig:
        """Build and validate a config from YAML-style keys; raises ConfigError."""
        return build(cls, values, source)


def describe_keys() -> Iterable[tuple[str, dataclasses.Field]]:
    """Yield (group, field) for every documented key, in declaration order."""
    for f in dataclasses.fields(TrainConfig):
        if f.name != "kt":
            yield f.metadata["group"], f

"""kt in the Hugging Face ``Trainer`` (and TRL's ``SFTTrainer``): :class:`KTTrainer`.

```python
args = TrainingArguments(output_dir="out", save_steps=50, ...)   # starts torch.distributed
plugin = KTransformersPlugin(kt_config={"lora_rank": 8})
model = kt_accelerate.load_model(path, plugin)                   # after TrainingArguments
model = kt_sft.get_peft_model(model, LoraConfig(**kt_sft.default_expert_lora_targets(model)))
trainer = KTTrainer(model=model, args=args, train_dataset=ds, kt_plugin=plugin)
trainer.train()                        # or trainer.train(resume_from_checkpoint=True)
```

Everything else is the stock Trainer: logging, evaluation, ``save_steps`` checkpoints (the model
part is the standard PEFT adapter, as ``save_pretrained`` writes it), ``resume_from_checkpoint``.
:class:`KTTrainerMixin` holds the additions, so other Trainer subclasses get them by mixing it in
first (``class MyTrainer(KTTrainerMixin, SFTTrainer)``; ``kt_accelerate.KTSFTTrainer`` is that
class for TRL). The additions:

* construction: checks ``TrainingArguments`` against the plugin, wraps an unwrapped supported
  model (a model name for ``SFTTrainer`` is loaded with :func:`kt_accelerate.load_model`), keeps
  the expert LoRA parameters out of DDP and equal on every rank;
* ``create_optimizer``: the engines re-read the LoRA weights after every optimizer step (the
  default ``adamw_torch_fused`` writes them without bumping torch's version counters);
* ``training_step``: after the backward that completes an optimizer step, reduces the expert
  LoRA gradients across ranks (before the Trainer clips and steps);
* ``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2, ...})``: FSDP2 shards the
  non-expert parameters (on the CPU too, over gloo) while kt keeps its own out of sharding
  (:mod:`kt_accelerate.fsdp`); the optimizer keeps kt's parameters in param groups of their
  own, and checkpoints hold the gathered, standard PEFT adapter. FSDP1, CPU offload,
  ``cpu_ram_efficient_loading`` and ``fsdp_config["activation_checkpointing"]`` are refused;
* checkpoints record the process layout (``kt_layout.json``, by :class:`KTCallback`) and
  ``train(resume_from_checkpoint=...)`` checks it (see :mod:`kt_accelerate.resume_layout`).
"""

from __future__ import annotations

import os
from typing import Any

from accelerate.utils import DistributedType
from transformers import Trainer, TrainerCallback

from kt_accelerate import fsdp, integration, resume_layout
from kt_accelerate.plugin import KTransformersPlugin

__all__ = ["KTCallback", "KTTrainer", "KTTrainerMixin"]


class KTCallback(TrainerCallback):
    """Writes ``kt_layout.json`` into every checkpoint folder the Trainer saves."""

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            resume_layout.write_layout(folder)


def _resolve_checkpoint(resume: Any, output_dir: str) -> str | None:
    if resume is None or resume is False:
        return None
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    return os.fspath(resume)


class KTTrainerMixin:
    """kt's additions to a ``transformers.Trainer`` subclass (mix in first)."""

    def __init__(
        self, *args: Any, kt_plugin: KTransformersPlugin | None = None, **kwargs: Any
    ) -> None:
        plugin = kt_plugin if kt_plugin is not None else KTransformersPlugin()
        if not isinstance(plugin, KTransformersPlugin):
            raise TypeError(f"kt_plugin must be a KTransformersPlugin, got {type(plugin).__name__}")
        self.kt_plugin = plugin
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None:
            plugin.check_training_args(training_args)
            _ = training_args.device  # sets up torch.distributed (launchers' env) now
        integration.init_distributed(plugin)
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, str):
            init_kwargs = dict(getattr(training_args, "model_init_kwargs", None) or {})
            model = integration.load_model(model, plugin, **init_kwargs)
        if model is not None:
            model = integration.ensure_wrapped(model, plugin)
            if "model" in kwargs or not args:
                kwargs["model"] = model
            else:
                args = (model, *args[1:])
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        # PEFT may only now be applied (SFTTrainer's peft_config): place its parameters.
        if self.model is not None:  # type: ignore[has-type]
            self.model = integration.prepare_model(self.model, plugin, wrap=False)
            if self._kt_fsdp2 and integration.is_kt_model(self.model):
                fsdp.prepare_for_fsdp2(
                    self.model, self.accelerator.state.fsdp_plugin, self.accelerator.device
                )
        self.add_callback(KTCallback())  # type: ignore[attr-defined]

    @property
    def _kt_fsdp2(self) -> bool:
        return (
            bool(getattr(self, "is_fsdp_enabled", False))
            and getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", None) == 2
        )  # type: ignore

    def create_accelerator_and_postprocess(self) -> None:
        """The stock accelerator, checked against kt; under ``TrainingArguments(fsdp=...)`` on
        the CPU it takes accelerate's FSDP2 path over gloo (accelerate keeps ``MULTI_CPU``
        there, see :func:`kt_accelerate.fsdp.use_fsdp_on_cpu`)."""
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        accelerator = self.accelerator  # type: ignore[attr-defined]
        requested = getattr(self.args, "fsdp_plugin_args", None)  # type: ignore[attr-defined]
        if requested is not None and accelerator.distributed_type == DistributedType.MULTI_CPU:
            from accelerate.utils import FullyShardedDataParallelPlugin

            fsdp.use_fsdp_on_cpu(accelerator, FullyShardedDataParallelPlugin(**requested))
            self.is_fsdp_enabled = True
        if accelerator.distributed_type == DistributedType.FSDP:
            self.kt_plugin.check_fsdp_plugin(accelerator.state.fsdp_plugin)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        optimizer = super().create_optimizer(*args, **kwargs)  # type: ignore[misc]
        if self._kt_fsdp2:
            fsdp.separate_kt_parameters(optimizer, self.model)  # type: ignore[attr-defined]
        return optimizer

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Under FSDP2 a PEFT model's adapter is gathered (collective) and written whole by the
        main process, whatever ``fsdp_config["state_dict_type"]`` is: checkpoints and
        ``save_model`` hold the standard PEFT adapter, as without FSDP."""
        from peft import PeftModel

        unwrapped = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        if not (self._kt_fsdp2 and isinstance(unwrapped, PeftModel)):
            return super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        from kt_sft.adapter import gather_adapter_state_dict

        state = gather_adapter_state_dict(unwrapped)
        self._save(output_dir, state_dict=state)  # type: ignore[attr-defined]
        if self.args.push_to_hub and not _internal_call:  # type: ignore[attr-defined]
            self.push_to_hub(
                commit_message="Model save",  # type: ignore[attr-defined]
                revision=self.args.hub_revision,
            )  # type: ignore[attr-defined]

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        loss = super().training_step(*args, **kwargs)  # type: ignore[misc]
        if self.accelerator.sync_gradients:  # type: ignore[attr-defined]
            integration.sync_expert_grads(self.model)  # type: ignore[attr-defined]
        return loss

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        path = _resolve_checkpoint(resume_from_checkpoint, self.args.output_dir)  # type: ignore[attr-defined]
        if path is not None:
            resume_layout.check_layout(
                path, allow_world_size_change=bool(self.kt_plugin.allow_world_size_change)
            )
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]


class KTTrainer(KTTrainerMixin, Trainer):
    """``transformers.Trainer`` with kt (see :class:`KTTrainerMixin`); takes ``kt_plugin=``."""

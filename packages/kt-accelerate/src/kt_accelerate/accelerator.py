"""`KTAccelerator`: stock ``accelerate.Accelerator`` plus kt, through its public methods only.

```python
from kt_accelerate import KTAccelerator, KTransformersPlugin
import kt_accelerate, kt_sft

accelerator = KTAccelerator(kt_plugin=KTransformersPlugin(kt_config={"lora_rank": 8}))
model = kt_accelerate.load_model(path, accelerator.kt_plugin)   # experts -> engine (rank 0/node)
model = kt_sft.get_peft_model(model, LoraConfig(**kt_sft.default_expert_lora_targets(model)))
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
for batch in loader:
    loss = model(**batch).loss
    accelerator.backward(loss)        # + expert LoRA gradients reduced across ranks
    optimizer.step(); optimizer.zero_grad()
```

What the subclass adds to ``Accelerator``:

* ``__init__``: refuses distributed types kt cannot run under (DeepSpeed, FSDP1, FSDP2 with CPU
  offload) and starts kt's distributed mode (one engine per node) right after accelerate set up
  ``torch.distributed``. accelerate turns FSDP on only for accelerator devices; with
  ``cpu=True`` and an FSDP2 plugin (``fsdp_plugin=`` or ``accelerate launch`` with an FSDP2
  config) the run uses accelerate's FSDP2 path on the CPU (gloo) all the same.
* ``prepare_model``: wraps a supported MoE model that is not wrapped yet (experts go to the
  engine, everything else to the accelerator's device as usual), checks the plugin against a
  model wrapped elsewhere, and keeps the expert LoRA parameters out of DDP (kt reduces them).
* ``prepare`` under FSDP2: the same, then keeps kt's parameters out of sharding and makes the
  trainable parameters equal on all ranks before accelerate shards the rest (see
  :mod:`kt_accelerate.fsdp`).
* ``prepare_optimizer``: makes sure the optimizer updates the expert LoRA parameters and that
  the engines re-read them after each step (fused optimizers bypass torch's version counters).
* ``backward``: after the backward that completes a step (``sync_gradients``), reduces the
  expert LoRA gradients across ranks, so clipping and the optimizer see the global values.
* ``save_state`` / ``load_state``: record the process layout and check it on resume (through
  accelerate's state pre-hooks).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from kt_accelerate import fsdp, integration, resume_layout
from kt_accelerate.plugin import KTransformersPlugin, _flag

__all__ = ["KTAccelerator"]


class KTAccelerator(Accelerator):
    """``Accelerator`` that runs kt models (see the module docstring).

    Args:
        kt_plugin: kt's settings; ``None`` builds a :class:`KTransformersPlugin` from the
            environment (``ACCELERATE_KT_*``, ``KT_*``).
        *args, **kwargs: passed to ``Accelerator``.
    """

    def __init__(
        self, *args: Any, kt_plugin: KTransformersPlugin | None = None, **kwargs: Any
    ) -> None:
        plugin = kt_plugin if kt_plugin is not None else KTransformersPlugin()
        if not isinstance(plugin, KTransformersPlugin):
            raise TypeError(f"kt_plugin must be a KTransformersPlugin, got {type(plugin).__name__}")
        deepspeed = kwargs.get("deepspeed_plugin") or kwargs.get("deepspeed_plugins")
        if deepspeed is not None:
            first = next(iter(deepspeed.values())) if isinstance(deepspeed, dict) else deepspeed
            plugin.check_distributed_type(
                "DEEPSPEED", zero_stage=getattr(first, "zero_stage", None)
            )
        if kwargs.get("fsdp_plugin") is not None:
            plugin.check_fsdp_plugin(kwargs["fsdp_plugin"])
        super().__init__(*args, **kwargs)
        if self.state.distributed_type == DistributedType.MULTI_CPU and (
            kwargs.get("fsdp_plugin") is not None or _flag("ACCELERATE_USE_FSDP")
        ):
            fsdp.use_fsdp_on_cpu(self, kwargs.get("fsdp_plugin"))
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched > 1 and self.num_processes == 1:
            raise ValueError(
                f"KTAccelerator: the launcher started {launched} processes (WORLD_SIZE) but "
                "accelerate set up a single-process run, so every rank would train alone. On a "
                "machine without GPUs pass KTAccelerator(cpu=True) (or use_cpu: true with "
                "TrainingArguments) to train with gloo on the CPU"
            )
        zero_stage = None
        ds = getattr(self.state, "deepspeed_plugin", None)
        if ds is not None:
            zero_stage = getattr(ds, "zero_stage", None)
        fsdp_plugin = getattr(self.state, "fsdp_plugin", None)
        if self.distributed_type == DistributedType.FSDP:
            plugin.check_fsdp_plugin(fsdp_plugin)
        plugin.check_distributed_type(
            self.distributed_type,
            zero_stage=zero_stage,
            fsdp_version=getattr(fsdp_plugin, "fsdp_version", None),
        )
        self.kt_plugin = plugin
        self._kt_models: list[torch.nn.Module] = []
        integration.init_distributed(plugin)
        self.register_save_state_pre_hook(self._kt_save_state_hook)
        self.register_load_state_pre_hook(self._kt_load_state_hook)

    # -- prepare --------------------------------------------------------------------------
    def _prepare_kt_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = integration.prepare_model(model, self.kt_plugin)
        if integration.is_kt_model(model):
            if all(m is not model for m in self._kt_models):
                self._kt_models.append(model)
            if self.is_fsdp2:
                fsdp.prepare_for_fsdp2(model, self.state.fsdp_plugin, self.device)
        return model

    def prepare(self, *args: Any, device_placement: list[bool] | None = None) -> Any:
        if self.is_fsdp2:
            # accelerate's FSDP2 path shards models itself (prepare_model is not called), after
            # the optimizers are prepared: kt's steps come first.
            args = tuple(
                self._prepare_kt_model(obj)
                if isinstance(obj, torch.nn.Module)
                and not getattr(obj, "_is_accelerate_prepared", False)
                else obj
                for obj in args
            )
        return super().prepare(*args, device_placement=device_placement)

    def prepare_model(
        self,
        model: torch.nn.Module,
        device_placement: bool | None = None,
        evaluation_mode: bool = False,
    ) -> torch.nn.Module:
        if not getattr(model, "_is_accelerate_prepared", False):
            model = self._prepare_kt_model(model)
        return super().prepare_model(
            model, device_placement=device_placement, evaluation_mode=evaluation_mode
        )

    def prepare_optimizer(
        self, optimizer: torch.optim.Optimizer, device_placement: bool | None = None
    ) -> Any:
        if isinstance(optimizer, torch.optim.Optimizer):
            if self._kt_models:
                integration.include_expert_lora(optimizer, self._kt_models)
        return super().prepare_optimizer(optimizer, device_placement=device_placement)

    # -- training step --------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        super().backward(loss, **kwargs)
        if self.sync_gradients:
            self.sync_expert_grads()

    def sync_expert_grads(self) -> None:
        """Reduce the expert LoRA gradients of every prepared kt model across ranks (done by
        :meth:`backward` when it completes a step; call it yourself after a bare
        ``loss.backward()``)."""
        for model in self._kt_models:
            integration.sync_expert_grads(model)

    # -- state ----------------------------------------------------------------------------
    # The expert weights of a kt model live in the engine; in torch they are empty placeholder
    # parameters. They are left out of save_state (safetensors would see them all as one
    # shared tensor) and load_state does not ask for them; every other key is still required.

    def load_state(
        self,
        input_dir: str | None = None,
        load_kwargs: dict | None = None,
        **load_model_func_kwargs: Any,
    ) -> None:
        if self._kt_models:
            # Checked key by key in _kt_load_state_hook, except the placeholders.
            load_model_func_kwargs.setdefault("strict", False)
        return super().load_state(input_dir, load_kwargs, **load_model_func_kwargs)

    def _kt_save_state_hook(self, models: list[Any], weights: list[Any], output_dir: str) -> None:
        for model, state in zip(models, weights):
            for name in _placeholders(model):
                state.pop(name, None)
        if self.is_main_process:
            resume_layout.write_layout(output_dir)

    def _kt_load_state_hook(self, models: list[Any], input_dir: str) -> None:
        resume_layout.check_layout(
            input_dir, allow_world_size_change=bool(self.kt_plugin.allow_world_size_change)
        )
        if not self._kt_models:
            return
        for i, model in enumerate(models):
            saved = resume_layout.saved_model_keys(input_dir, i)
            if saved is None:
                continue
            expected = set(self.get_state_dict(model, unwrap=False)) - set(_placeholders(model))
            missing = sorted(expected - saved)
            if missing:
                raise resume_layout.KTResumeError(
                    f"{input_dir}: the saved state of model {i} lacks {len(missing)} key(s) the "
                    f"model has, e.g. {missing[:3]}; it was saved from a different model"
                )


def _placeholders(model: torch.nn.Module) -> list[str]:
    """Names of the empty parameters standing in for expert weights held by a kt engine."""
    return [
        n
        for n, p in model.named_parameters(remove_duplicate=False)
        if getattr(p, "kt_released", False)
    ]

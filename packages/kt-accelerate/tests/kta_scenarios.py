"""The worker side of kt-accelerate's multi-process tests.

Each multi-process test starts one ``python kta_scenarios.py <scenario> <outdir>`` per rank
(with torchrun's environment variables, or through ``accelerate launch``); the rank writes what
it saw to ``<outdir>/rank<r>.pt`` and the test compares it with a single-process reference that
it computes itself with the helpers of ``kta_common.py``.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from kta_common import (
    KT_SETTINGS,
    LR,
    MODEL_TYPE,
    STEPS,
    VOCAB,
    LossRecorder,
    build_model,
    collate,
    dropped_graph_dx,
    expert_grads,
    experts_call,
    first_experts,
    layer_inputs,
    num_targets,
    rank_batches,
    sequences,
    token_sum_loss,
    trainable_state,
    trainer_args,
)

# `accelerate` through this interpreter, not whatever PATH holds (the test venv's bin may not be
# on PATH at all).
ACCELERATE_CLI = [sys.executable, "-m", "accelerate.commands.accelerate_cli"]


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _save(outdir: str, payload: dict[str, Any]) -> None:
    path = Path(outdir) / f"rank{_rank()}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _accelerator(timeout: float = 60.0) -> Any:
    """A KTAccelerator on CPU; its plugin comes from the environment (ACCELERATE_KT_*, the
    kt config file) under ``accelerate launch``, else from ``KT_SETTINGS``."""
    from accelerate.utils import InitProcessGroupKwargs

    import kt_accelerate

    if os.environ.get("ACCELERATE_KT_CONFIG_FILE"):
        plugin = kt_accelerate.KTransformersPlugin()
    else:
        plugin = kt_accelerate.KTransformersPlugin(kt_config=dict(KT_SETTINGS))
    init = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout))
    return kt_accelerate.KTAccelerator(cpu=True, kt_plugin=plugin, kwargs_handlers=[init])


def scenario_parity(outdir: str) -> None:
    """KTAccelerator loop on this rank's micro-batch; also the routed experts alone with uneven
    (and zero) token counts, and a call where no rank has tokens."""
    import torch.distributed as dist

    import kt_accelerate
    from kt_sft.distributed import current_context

    accelerator = _accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    # A different LoRA init per rank: prepare() must make them all rank 0's.
    model = build_model(accelerator.kt_plugin, lora_seed=rank)
    params = [
        p for n, p in model.named_parameters() if p.requires_grad and "experts" not in n
    ]  # expert LoRA: prepare adds it
    opt = torch.optim.AdamW(params, lr=LR)
    ddp, opt = accelerator.prepare(model, opt)
    payload: dict[str, Any] = {
        "context": repr(current_context()),
        "initial": trainable_state(model),
        "plugin": accelerator.kt_plugin.to_dict(),
        "distributed_type": str(accelerator.distributed_type),
    }

    x, ids, w, grad = layer_inputs(world)[rank]
    payload["layer"] = experts_call(model, x, ids, w, grad)
    kt_accelerate.sync_expert_grads(model)
    payload["layer_grads"] = {i: g * world for i, g in expert_grads(model).items()}
    empty = experts_call(model, x[:0], ids[:0], w[:0], grad[:0])  # nobody has tokens
    payload["empty_shapes"] = {k: tuple(v.shape) for k, v in empty.items()}
    payload["dropped_graph_dx"] = dropped_graph_dx(model, x, ids, w, grad)
    opt.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.grad = None

    tokens = rank_batches(world)[rank]
    n = num_targets(rank_batches(world))
    losses = []
    for _ in range(STEPS):
        loss = token_sum_loss(ddp, tokens) / n * world  # DDP averages over ranks
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        gathered = [None] * world
        dist.all_gather_object(gathered, loss.item() / world)
        losses.append(gathered)
    payload["losses"] = losses
    payload["state"] = trainable_state(model)
    payload["engine_ranks"] = _engine_ranks(model)
    payload["out_of_step"] = _out_of_step(model, rank, x, ids, w)
    _save(outdir, payload)


def _out_of_step(model: Any, rank: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> str:
    """Rank 0 calls the experts for training (cached), every other rank for inference: the
    ranks of node 0 must refuse with a clear error instead of exchanging tensors."""
    from kt_sft.distributed import KTDistributedError

    try:
        if rank == 0:
            first_experts(model)(x.clone().requires_grad_(True), ids, w)
        else:
            with torch.no_grad():
                first_experts(model)(x, ids, w)
    except KTDistributedError as exc:
        return str(exc)
    return "ok"


def _engine_ranks(model: Any) -> list[str]:
    from kt_sft.inject import experts_layers

    return sorted({type(layer.experts_backend).__name__ for _, _, layer in experts_layers(model)})


def _full(value: torch.Tensor) -> torch.Tensor:
    """A parameter's whole value (gathered when FSDP2 sharded it: collective)."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    return value.detach().clone()


def scenario_fsdp2(outdir: str) -> None:
    """KTAccelerator under FSDP2 on this rank's micro-batch: the non-expert parameters are
    sharded, the expert LoRA is not; losses, gradient norms and weights are compared with one
    process; the adapter is saved by every rank (rank 0 writes the gathered tensors).

    Under ``accelerate launch`` the FSDP2 settings come from its config file (FSDP_* variables);
    otherwise from an explicit FullyShardedDataParallelPlugin, with the model's gradient
    checkpointing on, and save_state / load_state are checked too."""
    import torch.distributed as dist
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs
    from torch.distributed.tensor import DTensor

    import kt_accelerate
    from kt_sft.distributed import expert_lora_parameters

    init = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=60))
    launched = bool(os.environ.get("ACCELERATE_USE_FSDP"))  # (a plugin argument sets it too)
    if launched:
        plugin = kt_accelerate.KTransformersPlugin()
        accelerator = kt_accelerate.KTAccelerator(
            cpu=True, kt_plugin=plugin, kwargs_handlers=[init]
        )
    else:
        plugin = kt_accelerate.KTransformersPlugin(kt_config=dict(KT_SETTINGS))
        fsdp = FullyShardedDataParallelPlugin(
            fsdp_version=2, auto_wrap_policy="transformer_based_wrap", reshard_after_forward=True
        )
        accelerator = kt_accelerate.KTAccelerator(
            cpu=True, kt_plugin=plugin, fsdp_plugin=fsdp, kwargs_handlers=[init]
        )
    rank, world = accelerator.process_index, accelerator.num_processes
    model = build_model(accelerator.kt_plugin, lora_seed=rank)  # prepare makes them rank 0's
    if not launched:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    model, opt = accelerator.prepare(model, opt)
    experts = expert_lora_parameters(model)
    payload: dict[str, Any] = {
        "distributed_type": str(accelerator.distributed_type),
        "fsdp_version": accelerator.state.fsdp_plugin.fsdp_version,
        "gradient_checkpointing": any(
            getattr(m, "gradient_checkpointing", False) is True for m in model.modules()
        ),
        "model_class": type(model).__name__,
        "expert_lora_sharded": [isinstance(p, DTensor) for p in experts],
        "trainable_sharded": sorted(
            {
                isinstance(p, DTensor)
                for p in model.parameters()
                if p.requires_grad and all(p is not e for e in experts)
            }
        ),
        "local_numel": {
            n: (p.to_local().numel() if isinstance(p, DTensor) else p.numel())
            for n, p in model.named_parameters()
            if "q_proj.lora_A" in n
        },
        "engine_ranks": _engine_ranks(model),
    }
    tokens = rank_batches(world)[rank]
    n = num_targets(rank_batches(world))
    losses, norms = [], []
    for _ in range(STEPS):
        loss = token_sum_loss(model, tokens) / n * world  # FSDP averages over ranks, as DDP
        accelerator.backward(loss)
        norm = accelerator.clip_grad_norm_(model.parameters(), float("inf"))
        norms.append(float(norm))
        opt.step()
        opt.zero_grad()
        gathered = [None] * world
        dist.all_gather_object(gathered, loss.item() / world)
        losses.append(gathered)
    payload["losses"] = losses
    payload["grad_norms"] = norms
    payload["state"] = {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}
    accelerator.unwrap_model(model).save_pretrained(str(Path(outdir) / "adapter"))
    if not launched:
        # accelerate's sharded checkpoint, kt's parameters included: one more step after
        # restoring it (from scrambled weights) repeats the step taken right after saving.
        folder = Path(outdir) / "state"
        accelerator.save_state(str(folder))
        payload["layout_written"] = (
            accelerator.is_main_process and (folder / "kt_layout.json").is_file()
        )
        first = token_sum_loss(model, tokens) / n * world
        accelerator.backward(first)
        opt.step()
        opt.zero_grad()
        after = {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(-0.5)
        accelerator.load_state(str(folder))
        restored = {name: _full(p) for name, p in model.named_parameters() if p.requires_grad}
        payload["restored_diff"] = max(
            float((restored[k] - v).abs().max()) for k, v in payload["state"].items()
        )
        again = token_sum_loss(model, tokens) / n * world
        accelerator.backward(again)
        opt.step()
        opt.zero_grad()
        payload["resumed_losses"] = (first.item(), again.item())
        payload["resumed_diff"] = max(
            float((_full(p) - after[name]).abs().max())
            for name, p in model.named_parameters()
            if p.requires_grad
        )
    _save(outdir, payload)


def scenario_crash(outdir: str) -> None:
    """Rank 1 dies inside the second step's forward (in a MoE layer); the others must fail
    quickly with kt's error instead of waiting."""
    import kt_accelerate
    from kt_sft.inject import experts_layers

    accelerator = _accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    model = build_model(accelerator.kt_plugin, lora_seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    ddp, opt = accelerator.prepare(model, opt)
    ids = rank_batches(world)[rank]
    mode = os.environ.get("KTA_FAILURE", "crash")
    for step in range(3):
        if step == 1 and rank == 1:
            layer = next(iter(experts_layers(model)))[2]

            def dying(*args: Any, **kwargs: Any) -> Any:
                if mode == "hang":
                    time.sleep(600)
                os._exit(17)

            layer.engine_forward = dying
        start = time.monotonic()
        try:
            loss = token_sum_loss(ddp, ids)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        except kt_accelerate.KTDistributedError as exc:
            _save(outdir, {"error": str(exc), "step": step, "seconds": time.monotonic() - start})
            os._exit(3)


def scenario_trainer(outdir: str) -> None:
    """KTTrainer on this rank's share of a sequential dataset (same global batches as one
    process with world × the per-device batch); engine placement from the environment."""
    from transformers import TrainingArguments

    import kt_accelerate

    out = os.environ["KTA_TRAIN_DIR"]
    args = trainer_args(out, per_device=2)
    plugin = kt_accelerate.KTransformersPlugin(kt_config=dict(KT_SETTINGS))
    model = build_model(plugin, lora_seed=_rank())
    recorder = LossRecorder()
    trainer = kt_accelerate.KTTrainer(
        model=model,
        args=args,
        train_dataset=sequences(),
        data_collator=collate,
        kt_plugin=plugin,
        callbacks=[recorder],
    )
    assert isinstance(args, TrainingArguments)
    trainer.train()
    _save(
        outdir,
        {
            "losses": recorder.losses,
            "state": trainable_state(model),
            "engine_ranks": _engine_ranks(model),
            "placement": plugin.engine_placement,
        },
    )


#: ``TrainingArguments`` turning on FSDP2 in the Trainer (docs/distributed.md).
TRAINER_FSDP2: dict[str, Any] = {
    "fsdp": True,
    "fsdp_config": {
        "fsdp_version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": True,
    },
}


def scenario_trainer_fsdp2(outdir: str) -> None:
    """KTTrainer with ``TrainingArguments(fsdp=..., fsdp_config={"fsdp_version": 2})`` on this
    rank's share of the dataset: 4 steps with a checkpoint every 2, then (unless
    ``KTA_RESUME=0``) a second trainer resuming from ``checkpoint-2`` in another folder."""
    from torch.distributed.tensor import DTensor

    import kt_accelerate

    out = Path(os.environ["KTA_TRAIN_DIR"])
    payload: dict[str, Any] = {}
    for run, resume in (("full", None), ("resumed", str(out / "full" / "checkpoint-2"))):
        if run == "resumed" and os.environ.get("KTA_RESUME", "1") == "0":
            break
        args = trainer_args(str(out / run), per_device=2, **TRAINER_FSDP2)
        plugin = kt_accelerate.KTransformersPlugin(kt_config=dict(KT_SETTINGS))
        model = build_model(plugin, lora_seed=_rank() + 1)  # the trainer makes them rank 0's
        recorder = LossRecorder()
        trainer = kt_accelerate.KTTrainer(
            model=model,
            args=args,
            train_dataset=sequences(),
            data_collator=collate,
            kt_plugin=plugin,
            callbacks=[recorder],
        )
        trainer.train(resume_from_checkpoint=resume)
        wrapped = trainer.model
        payload[run] = {
            "losses": recorder.losses,
            "state": {n: _full(p) for n, p in wrapped.named_parameters() if p.requires_grad},
            "sharded": sorted(
                {
                    isinstance(p, DTensor)
                    for n, p in wrapped.named_parameters()
                    if p.requires_grad and "experts" not in n
                }
            ),
            "experts_sharded": sorted(
                {isinstance(p, DTensor) for n, p in wrapped.named_parameters() if "experts" in n}
            ),
            "distributed_type": str(trainer.accelerator.distributed_type),
            "model_class": type(wrapped).__name__,
            "engine_ranks": _engine_ranks(wrapped),
        }
    _save(outdir, payload)


def word_tokenizer() -> Any:
    """A word-level tokenizer over the tiny model's vocabulary (``w0`` … ``w127``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(VOCAB)}, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3"
    )


def scenario_trl_fsdp2(outdir: str) -> None:
    """TRL's SFTTrainer with kt (KTSFTTrainer) under FSDP2 from an unwrapped model, a text
    dataset and a ``peft_config``: one step, one checkpoint."""
    from datasets import Dataset
    from peft import LoraConfig
    from torch.distributed.tensor import DTensor
    from trl import SFTConfig

    import kt_accelerate
    from kt_models import tiny
    from kt_sft.distributed import expert_lora_parameters

    g = torch.Generator().manual_seed(0)
    rows = [
        {"text": " ".join(f"w{int(i)}" for i in torch.randint(4, VOCAB, (8,), generator=g))}
        for _ in range(4)
    ]
    args = SFTConfig(
        output_dir=os.environ["KTA_TRAIN_DIR"],
        max_steps=1,
        per_device_train_batch_size=2,
        use_cpu=True,
        report_to=[],
        save_steps=1,
        logging_steps=1,
        max_length=16,
        disable_tqdm=True,
        ddp_timeout=120,
        **TRAINER_FSDP2,
    )
    trainer = kt_accelerate.KTSFTTrainer(
        model=tiny.build(MODEL_TYPE),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=word_tokenizer(),
        kt_plugin=kt_accelerate.KTransformersPlugin(kt_config=dict(KT_SETTINGS)),
        peft_config=LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        ),
    )
    before = [p.detach().clone() for p in expert_lora_parameters(trainer.model)]
    recorder = LossRecorder()
    trainer.add_callback(recorder)
    trainer.train()
    after = expert_lora_parameters(trainer.model)
    _save(
        outdir,
        {
            "losses": recorder.losses,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "sharded": sorted(
                {
                    isinstance(p, DTensor)
                    for n, p in trainer.model.named_parameters()
                    if p.requires_grad and "experts" not in n
                }
            ),
            # PEFT's default init has B = 0, so the first step moves the B factors only.
            "experts_trained": len(after) == len(before) > 0
            and any(not torch.equal(a, b) for a, b in zip(after, before)),
        },
    )


SCENARIOS = {
    "parity": scenario_parity,
    "crash": scenario_crash,
    "trainer": scenario_trainer,
    "fsdp2": scenario_fsdp2,
    "trainer_fsdp2": scenario_trainer_fsdp2,
    "trl_fsdp2": scenario_trl_fsdp2,
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    SCENARIOS[sys.argv[1]](sys.argv[2])
    # Leave the process groups cleanly so that no rank waits for another at exit.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

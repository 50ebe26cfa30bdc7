"""What kt-accelerate's tests and their worker processes both build.

The tiny MoE model with kt and PEFT LoRA, each rank's uneven micro-batch, the routed-experts
calls, the single-process reference a multi-process run is compared with, and the Trainer's
data, arguments and loss recorder. ``kta_scenarios.py`` runs the ranks with the same pieces.
"""

from __future__ import annotations

import os
from typing import Any

import torch

#: kt-sft's fp32 torch reference of the engine: exact, so parity is down to summation order.
#: (KTA_BACKEND=engine runs the workers on the compiled engine instead, for measurements.)
KT_SETTINGS: dict[str, Any] = (
    {"backend": "torch", "weight_dtype": "fp32", "lora_rank": 4}
    if os.environ.get("KTA_BACKEND", "torch") == "torch"
    else {"lora_rank": 4, "num_threads": 1}
)
#: The compiled engine (bf16 expert weights), as users run it.
ENGINE_SETTINGS: dict[str, Any] = {"lora_rank": 4, "num_threads": 1}
MODEL_TYPE = "qwen3_moe"
VOCAB = 128
LR = 1e-2
STEPS = 2

#: (batch, sequence length) of each rank's micro-batch: uneven across ranks.
RANK_SHAPES = [(2, 7), (1, 12), (3, 4), (1, 9)]
#: Tokens each rank sends to the routed experts in the zero-token check (rank 1 sends none).
LAYER_TOKENS = [5, 0, 3, 0]


def lora_config() -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        init_lora_weights=False,
    )


def build_model(plugin: Any = None, *, lora_seed: int = 0, wrap: bool = True) -> Any:
    """The tiny MoE model, kt-wrapped, with PEFT LoRA on experts and attention (random A and B,
    so every factor gets a gradient from the first step)."""
    from peft import get_peft_model

    import kt_accelerate
    from kt_models import tiny

    model = tiny.build(MODEL_TYPE)
    if wrap:
        plugin = plugin or kt_accelerate.KTransformersPlugin(kt_config=dict(KT_SETTINGS))
        model = kt_accelerate.wrap_model(model, plugin)
    torch.manual_seed(lora_seed)
    model = get_peft_model(model, lora_config())
    model.train()
    return model


def rank_batches(world: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randint(3, VOCAB, shape, generator=g) for shape in RANK_SHAPES[:world]]


def num_targets(batches: list[torch.Tensor]) -> int:
    return sum(b.shape[0] * (b.shape[1] - 1) for b in batches)


def token_sum_loss(model: Any, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        ids[:, 1:].reshape(-1),
        reduction="sum",
    )


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def layer_inputs(world: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per rank: hidden states, expert ids, routing weights and an output gradient for one call
    of the routed experts (``LAYER_TOKENS`` rows; a rank may have none)."""
    g = torch.Generator().manual_seed(99)
    out = []
    for r in range(world):
        T = LAYER_TOKENS[r]
        x = torch.randn(T, 64, generator=g)
        ids = (
            torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(T)])
            if T
            else torch.empty(0, 2, dtype=torch.int64)
        )
        w = torch.rand(T, 2, generator=g)
        grad = torch.randn(T, 64, generator=g)
        out.append((x, ids, w, grad))
    return out


def first_experts(model: Any) -> Any:
    """The outermost PEFT wrapper of the first kt experts module (calling it runs the engine)."""
    from peft.tuners.lora.layer import ParamWrapper

    for _, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            return module
    raise AssertionError("no PEFT-wrapped experts")


def experts_call(
    model: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, grad: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One forward + backward of the routed experts alone; returns out, dx and dw."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    out = first_experts(model)(x, ids, w)
    (out * grad).sum().backward()
    return {"out": out.detach(), "dx": x.grad.detach().clone(), "dw": w.grad.detach().clone()}


def dropped_graph_dx(
    model: Any, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """Two cached forwards, the second one's graph dropped, then the first one's backward: the
    engine pops the dropped entry first (a zero backward, exchanged like any other)."""
    xa = x.clone().requires_grad_(True)
    kept = first_experts(model)(xa, ids, w)
    dropped = first_experts(model)(x.clone().requires_grad_(True), ids, w)
    del dropped
    (kept * grad).sum().backward()
    assert xa.grad is not None
    return xa.grad.detach().clone()


def expert_grads(model: Any) -> dict[int, torch.Tensor]:
    from kt_sft.distributed import expert_lora_parameters

    return {
        i: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for i, p in enumerate(expert_lora_parameters(model))
    }


def reference(
    world: int, steps: int = STEPS, settings: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Single process: the same global batch (every rank's micro-batch, accumulated)."""
    import kt_accelerate
    from kt_sft.distributed import expert_lora_parameters

    plugin = kt_accelerate.KTransformersPlugin(kt_config=dict(settings or KT_SETTINGS))
    model = build_model(plugin, lora_seed=0)
    result: dict[str, Any] = {}
    # Routed experts alone, all ranks' tokens in one call.
    parts = layer_inputs(world)
    cat = [torch.cat([p[i] for p in parts]) for i in range(4)]
    result["layer"] = experts_call(model, *cat)
    result["layer_grads"] = expert_grads(model)
    model.zero_grad(set_to_none=True)
    for p in expert_lora_parameters(model):
        p.grad = None
    batches = rank_batches(world)
    n = num_targets(batches)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)
    losses, norms = [], []
    for _ in range(steps):
        step = []
        for ids in batches:
            loss = token_sum_loss(model, ids) / n
            loss.backward()
            step.append(loss.item())
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in trainable])))
        opt.step()
        opt.zero_grad()
        losses.append(step)
    result["losses"] = losses
    result["grad_norms"] = norms
    result["state"] = trainable_state(model)
    with torch.no_grad():
        result["probe_logits"] = model(input_ids=PROBE).logits.detach().clone()
    return result


#: Tokens whose logits compare a trained adapter across loaders.
PROBE = torch.tensor([[5, 17, 42, 99, 3, 64, 7, 120]])


# ---------------------------------------------------------------------------------------------
# Trainer helpers


def sequences(n: int = 16) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        ids = torch.randint(3, VOCAB, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def collate(rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[i, :k] = torch.tensor(r["input_ids"])
        labels[i, :k] = torch.tensor(r["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trainer_args(output_dir: str, *, per_device: int, max_steps: int = 4, **overrides: Any) -> Any:
    from transformers import TrainingArguments

    settings: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": per_device,
        "max_steps": max_steps,
        "save_steps": 2,
        "logging_steps": 1,
        "learning_rate": LR,
        "report_to": [],
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,
        "ddp_timeout": 120,
        "gradient_checkpointing": True,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


class LossRecorder:
    """A TrainerCallback recording the logged training loss per step."""

    def __new__(cls) -> Any:
        from transformers import TrainerCallback

        class _Recorder(TrainerCallback):
            def __init__(self) -> None:
                self.losses: dict[int, float] = {}

            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
            ) -> None:
                if logs and "loss" in logs:
                    self.losses[state.global_step] = float(logs["loss"])

        return _Recorder()

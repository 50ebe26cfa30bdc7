"""Resumable checkpoints of a training run: the final adapter, `checkpoint-<step>/` folders
(adapter + optimizer + scheduler + RNG states + :class:`TrainState`), and resuming from one.

Every folder is written through :func:`artifacts.atomic_dir`, so an interrupted save leaves the
previous complete version. Nothing holding NaN / Inf is ever written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kt_sft.train import artifacts
from kt_sft.train.ranks import Ranks
from kt_sft.train.schema import ConfigError, TrainConfig
from kt_sft.train.state import NonFiniteLossError, TrainState

__all__ = [
    "check_world_size",
    "load_checkpoint",
    "resolve_resume",
    "save_adapter",
    "save_checkpoint",
]


def _check_finite_parameters(model: Any, what: str) -> None:
    """Refuse to write `what` when a trainable parameter holds NaN / Inf."""
    import torch

    for name, p in model.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            raise NonFiniteLossError(
                f"not writing {what}: trainable parameter {name} holds NaN / Inf values (an "
                "earlier optimizer step diverged); lower learning_rate or lora_alpha, check the "
                "data and the model's weights, and train again from the last good checkpoint"
            )


def save_adapter(model: Any, directory: Path) -> None:
    """Write the PEFT adapter of `model` into `directory` (a standard PEFT adapter folder)."""
    _check_finite_parameters(model, f"the adapter {directory.name}")
    # LoRA on lm_head / embeddings must not copy the (frozen, possibly huge) base matrices
    model.save_pretrained(str(directory), save_embedding_layers=False)
    if not (directory / "adapter_config.json").is_file():
        raise RuntimeError(f"save_pretrained wrote no adapter_config.json into {directory}")


def save_checkpoint(
    output_dir: Path,
    state: TrainState,
    *,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    cfg: TrainConfig,
    ranks: Ranks,
    previous: artifacts.PreviousRun,
) -> Path:
    """Rank 0 writes the checkpoint (collective: it gathers every rank's RNG state). The adapter
    and optimizer state are the same on every rank. The first write replaces a previous run."""
    import torch

    rng = ranks.gather(torch.get_rng_state(), "gathering of the RNG states for a checkpoint")
    path = output_dir / f"checkpoint-{state.global_step}"
    if not ranks.is_main:
        return path

    def write(tmp: Path) -> None:
        save_adapter(model, tmp)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save({"torch": rng[0], "torch_per_rank": rng}, tmp / "rng_state.pt")
        payload = state.to_json() | {"config": cfg.to_dict(), "world_size": ranks.world_size}
        from kt_sft import __version__

        payload["kt_sft_version"] = __version__
        (tmp / artifacts.STATE_FILE).write_text(json.dumps(payload, indent=2, default=str))

    artifacts.atomic_dir(path, write)
    previous.discard(keep=path)  # only now: a failed first save leaves the previous run whole
    artifacts.prune_checkpoints(output_dir, cfg.save_total_limit)
    return path


def check_world_size(path: Path, ranks: Ranks) -> None:
    """A checkpoint continues only under the number of processes that wrote it: the global batch
    and the data position depend on it."""
    saved = int(json.loads((path / artifacts.STATE_FILE).read_text()).get("world_size", 1))
    if saved != ranks.world_size:
        raise ConfigError(
            f"checkpoint {path} was saved by {saved} process(es) but this run has "
            f"{ranks.world_size}: the global batch (per_device_train_batch_size x "
            "gradient_accumulation_steps x processes) and the data order would change, so the "
            f"resumed run would not continue the saved one; resume with {saved} process(es)"
            + (
                f" (torchrun --nproc-per-node {saved} -m kt_sft.cli train ...)"
                if saved > 1
                else " (without torchrun)"
            )
        )


def resolve_resume(cfg: TrainConfig, output_dir: Path) -> Path | None:
    """The checkpoint folder `resume_from_checkpoint` names (`auto`: the newest), or None."""
    value = cfg.resume_from_checkpoint
    if value is None or value.lower() in ("false", "no"):
        return None
    if value.lower() in ("auto", "true", "yes", "latest"):
        latest = artifacts.latest_checkpoint(output_dir)
        if latest is None:
            raise ConfigError(
                f"'resume_from_checkpoint' is {value} but {output_dir} holds no "
                "checkpoint-<step>/ folder (set save_steps to write checkpoints)"
            )
        return latest
    path = Path(value).expanduser()
    if not (path / artifacts.STATE_FILE).is_file():
        raise ConfigError(
            f"'resume_from_checkpoint' {path} is not a kt-sft checkpoint (no "
            f"{artifacts.STATE_FILE})"
        )
    return path


def load_checkpoint(
    path: Path, *, model: Any, optimizer: Any, scheduler: Any, ranks: Ranks
) -> TrainState:
    """Restore the adapter, optimizer, scheduler and this rank's RNG state from `path`."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise ConfigError(
            f"checkpoint {path} does not fit this model/LoRA config: unexpected "
            f"keys {unexpected[:3]}"
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng_state.pt", weights_only=True)
    per_rank = rng.get("torch_per_rank")
    torch.set_rng_state(
        per_rank[ranks.rank]
        if per_rank is not None and len(per_rank) == ranks.world_size
        else rng["torch"]
    )
    return TrainState.from_json(json.loads((path / artifacts.STATE_FILE).read_text()))

"""The `kt-sft train` loop: a plain PyTorch loop around a kt-wrapped model with PEFT LoRA.

AdamW over the trainable (LoRA) parameters, gradient accumulation with the loss normalised by the
trained tokens of the whole accumulation window, optional gradient checkpointing, warmup + cosine /
linear / constant schedule, resumable checkpoints every `save_steps`, and Ctrl-C handling: the
first Ctrl-C stops at the next micro-batch boundary and writes a resumable checkpoint of the last
completed optimizer step (atomically), a second one aborts at once (nothing half-written is ever
published). Progress goes to a tqdm bar (steps, loss, tokens/s) and log lines.

Launched by torchrun or `accelerate launch`, the same loop trains on a global batch split over
the ranks (see :mod:`kt_sft.train.ranks`): rank 0 writes every file and prints the global loss.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kt_sft.train import artifacts
from kt_sft.train.profiling import ExpertTimer, Timeline
from kt_sft.train.ranks import Ranks
from kt_sft.train.schema import EMBEDDED, ConfigError, TrainConfig

__all__ = ["NonFiniteLossError", "TrainResult", "TrainState", "train"]


class NonFiniteLossError(RuntimeError):
    """A training step produced a NaN / Inf loss or gradient norm (``on_nonfinite_loss: error``).

    Raised before that step's optimizer update, so the parameters, the last checkpoint and any
    adapter written so far stay finite.
    """


@dataclass
class TrainState:
    """What a checkpoint needs to continue a run exactly where it stopped."""

    global_step: int = 0
    micro_index: int = 0  # micro-batches consumed (data position)
    tokens_seen: int = 0
    train_seconds: float = 0.0
    log: list[dict[str, float]] = field(default_factory=list)  # per optimizer step
    skipped_steps: int = 0  # steps dropped by on_nonfinite_loss: skip

    def to_json(self) -> dict[str, Any]:
        return {
            "global_step": self.global_step,
            "micro_index": self.micro_index,
            "tokens_seen": self.tokens_seen,
            "train_seconds": self.train_seconds,
            "log": self.log,
            "skipped_steps": self.skipped_steps,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        return cls(
            int(data["global_step"]),
            int(data["micro_index"]),
            int(data.get("tokens_seen", 0)),
            float(data.get("train_seconds", 0.0)),
            list(data.get("log", [])),
            int(data.get("skipped_steps", 0)),
        )


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path | None
    checkpoint_dir: Path | None
    interrupted: bool
    state: TrainState
    total_steps: int
    summary: dict[str, Any]


class _StopFlag:
    """SIGINT -> request a graceful stop; a second SIGINT raises KeyboardInterrupt at once."""

    def __init__(self, *, announce: bool = True) -> None:
        self.requested = False
        self.announce = announce
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print(
                "\nCtrl-C: stopping after the current micro-batch and saving a resumable "
                "checkpoint (press Ctrl-C again to abort without saving)",
                file=sys.stderr,
                flush=True,
            )

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)


# ----------------------------------------------------------------------------------------------


def _lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
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


def _micro_batches(n: int, batch_size: int, seed: int, start: int) -> Iterator[list[int]]:
    """Endless stream of index batches: a fresh seeded permutation per epoch, resumable at any
    micro-batch position `start`. Several ranks draw global batches (`batch_size` = per-device
    size x ranks) and split them."""
    import torch

    per_epoch = math.ceil(n / batch_size)
    index = start
    while True:
        epoch, pos = divmod(index, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for b in range(pos, per_epoch):
            yield perm[b * batch_size : (b + 1) * batch_size]
        index = (epoch + 1) * per_epoch


def _device(cfg: TrainConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def _targets(example: Any) -> int:
    """Trained tokens of one example (labels after the first position that are not ignored)."""
    return sum(1 for label in example.labels[1:] if label != -100)


def _log(msg: str, bar: Any = None) -> None:
    if bar is not None:
        bar.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)


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


def _save_adapter(model: Any, directory: Path) -> None:
    _check_finite_parameters(model, f"the adapter {directory.name}")
    # LoRA on lm_head / embeddings must not copy the (frozen, possibly huge) base matrices
    model.save_pretrained(str(directory), save_embedding_layers=False)
    if not (directory / "adapter_config.json").is_file():
        raise RuntimeError(f"save_pretrained wrote no adapter_config.json into {directory}")


def _save_checkpoint(
    output_dir: Path,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    state: TrainState,
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
        _save_adapter(model, tmp)
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


def _check_world_size(path: Path, ranks: Ranks) -> None:
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


def _resolve_resume(cfg: TrainConfig, output_dir: Path) -> Path | None:
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


def _load_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, ranks: Ranks
) -> TrainState:
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


def _kt_options(cfg: TrainConfig, output_dir: Path, *, main: bool = True) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    *,
    on_step_end: Callable[[TrainState], None] | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Run one training job described by `cfg`; see the module docstring. Under a launcher
    that started several processes (torchrun, `accelerate launch`) every rank calls this."""
    ranks = Ranks.start(_device(cfg))
    try:
        result = _train(cfg, ranks, on_step_end=on_step_end, quiet=quiet or not ranks.is_main)
    except BaseException:
        ranks.close(wait=False)  # the peers fail at their next exchange with this rank
        raise
    ranks.close()
    return result


def _train(
    cfg: TrainConfig, ranks: Ranks, *, on_step_end: Callable[[TrainState], None] | None, quiet: bool
) -> TrainResult:
    import torch

    from kt_sft.data import Columns, collate, prepare_dataset, resolve_dataset_paths
    from kt_sft.train import modeling

    t_start = time.perf_counter()
    resuming = cfg.resume_from_checkpoint is not None
    output_dir = Path(cfg.output_dir).expanduser()
    error: BaseException | None = None
    resume_path: Path | None = None
    previous = artifacts.PreviousRun(output_dir, [])
    try:  # rank 0 prepares output_dir; every rank finds the checkpoint to resume from
        if ranks.is_main:
            output_dir, previous = artifacts.prepare_output_dir(
                cfg.output_dir, overwrite=cfg.overwrite_output_dir, resuming=resuming
            )
        resume_path = _resolve_resume(cfg, output_dir)
        if resume_path is not None:
            _check_world_size(resume_path, ranks)
    except (ConfigError, artifacts.OutputDirError) as exc:
        error = exc
    ranks.agree(error)
    device = ranks.device(_device(cfg))
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if cfg.torch_num_threads:
        torch.set_num_threads(cfg.torch_num_threads)
    torch.manual_seed(cfg.seed)

    # ---- tokenizer and data first: bad data fails before the (slow) model load
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
        _log(
            f"data: {len(data.examples)} examples ({fmts}){dropped}, {data.num_tokens} tokens; "
            f"{total_steps} steps of {cfg.per_device_train_batch_size} x "
            f"{cfg.gradient_accumulation_steps} examples{procs}"
        )

    # ---- model + LoRA
    kt_options = _kt_options(cfg, output_dir, main=ranks.is_main)
    model = modeling.load_base_model(
        model_path,
        use_kt=cfg.use_kt,
        kt_options=kt_options,
        dtype=dtype,
        device=device,
        trust_remote_code=cfg.trust_remote_code,
    )
    torch.manual_seed(cfg.seed)
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
    # the loss from the LM head a few hundred tokens at a time: never the whole logits tensor
    from kt_sft.host_memory import maybe_tune_malloc
    from kt_sft.loss import ChunkedCausalLMLoss

    maybe_tune_malloc()  # a model that fills RAM: freed activations go back to the system

    token_loss = ChunkedCausalLMLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ranks.broadcast_parameters(params)
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    if not quiet:
        _log(
            f"model: {model_path} ({'experts in the kt engine' if cfg.use_kt else 'stock'}, "
            f"{device}, {str(dtype).replace('torch.', '')}); LoRA r={cfg.lora_rank} "
            f"alpha={cfg.scaling_alpha:g} on {','.join(cfg.lora_targets)}: "
            f"{n_trainable:,} trainable parameters"
        )
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
        optimizer, _lr_lambda(cfg.lr_scheduler_type, warmup, total_steps)
    )
    state = TrainState()
    resumed_from = 0
    if resume_path is not None:
        state = _load_checkpoint(resume_path, model, optimizer, scheduler, ranks)
        resumed_from = state.global_step
        if not quiet:
            _log(f"resumed from {resume_path} at step {state.global_step}")

    timeline = Timeline(enabled=cfg.profile)
    expert_timer = ExpertTimer(timeline)
    if cfg.profile:
        expert_timer.attach(model)

    pad_id = tokenizer.pad_token_id
    batches = _micro_batches(len(data.examples), global_batch, cfg.seed, state.micro_index)
    bar = None
    if not cfg.disable_tqdm and not quiet:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=total_steps,
            initial=state.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    interrupted = False
    checkpoint_dir: Path | None = None
    run_tokens, run_seconds = 0, 0.0
    try:
        with _StopFlag(announce=ranks.is_main) as stop:
            stopping = False
            while state.global_step < total_steps and not stopping:
                step_start = time.perf_counter()
                # The RNG state the window starts from (LoRA dropout draws from it): a Ctrl-C
                # inside the window drops the partial window and checkpoints this state, so the
                # resumed run replays the window exactly.
                window_rng = torch.get_rng_state()
                window = [next(batches) for _ in range(cfg.gradient_accumulation_steps)]
                # the loss is normalised by the trained tokens of the whole global window
                n_items = sum(_targets(data.examples[i]) for idx in window for i in idx)
                loss_sum, step_tokens, completed = 0.0, 0, 0
                for idx in window:
                    mine = ranks.share(idx)
                    # A rank with no example of a short last batch still takes part in every
                    # exchange: it runs one example with zero weight.
                    b = collate([data.examples[i] for i in (mine or idx[:1])], pad_id)
                    b = {k: v.to(device) for k, v in b.items()}
                    with timeline.span("forward", step=state.global_step):
                        loss = (
                            token_loss(b["input_ids"], b["attention_mask"], b["labels"]) / n_items
                        )
                        if not mine:
                            loss = loss * 0.0
                    with timeline.span("backward", step=state.global_step):
                        loss.backward()
                    loss_sum += float(loss.detach())
                    step_tokens += int(b["attention_mask"].sum()) if mine else 0
                    completed += 1
                    stopping = ranks.any(stop.requested)  # every rank stops at the same point
                    if stopping:
                        break
                if stopping and completed < len(window):
                    optimizer.zero_grad(set_to_none=True)  # partial window: drop it
                    torch.set_rng_state(window_rng)
                    break
                skipped = False
                with timeline.span("optimizer", step=state.global_step):
                    ranks.reduce_gradients(model, params)
                    grad_norm = float(
                        torch.nn.utils.clip_grad_norm_(
                            params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
                        )
                    )
                    # every rank takes the same decision (the local losses differ)
                    bad = ranks.any(
                        not (math.isfinite(loss_sum) and math.isfinite(grad_norm)),
                        "non-finite loss check",
                    )
                    if bad and cfg.on_nonfinite_loss == "error":
                        optimizer.zero_grad(set_to_none=True)
                        raise NonFiniteLossError(
                            f"step {state.global_step + 1}: the loss is {loss_sum} and the "
                            f"gradient norm {grad_norm}; stopped before the optimizer step, so "
                            "the parameters stay finite and nothing non-finite was written"
                            + (f" (last checkpoint: {checkpoint_dir})" if checkpoint_dir else "")
                            + ". Typical causes: a too large learning_rate or lora_alpha, "
                            "NaN / Inf in the model's weights or inputs. Set on_nonfinite_loss: "
                            "skip to skip such steps instead"
                        )
                    if bad:
                        skipped = True
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                loss_sum, tokens = ranks.sum([loss_sum, step_tokens])
                step_tokens = int(tokens)
                step_end = time.perf_counter()
                timeline.add(
                    f"step {state.global_step + 1}",
                    "step",
                    step_start,
                    step_end,
                    loss=loss_sum,
                    tokens=step_tokens,
                )
                dt = step_end - step_start
                run_tokens += step_tokens
                run_seconds += dt
                state.global_step += 1
                state.micro_index += len(window)
                state.tokens_seen += step_tokens
                state.train_seconds += dt
                lr = scheduler.get_last_lr()[0]
                entry = {
                    "step": state.global_step,
                    "loss": loss_sum,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "tokens": step_tokens,
                    "seconds": dt,
                }
                if skipped:
                    entry["skipped"] = 1.0
                    state.skipped_steps += 1
                    if not quiet:
                        _log(
                            f"step {state.global_step}: non-finite loss {loss_sum} / gradient "
                            f"norm {grad_norm}: step skipped (on_nonfinite_loss: skip)",
                            bar,
                        )
                state.log.append(entry)
                tok_s = run_tokens / run_seconds if run_seconds else 0.0
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss_sum:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.1e}", refresh=False
                    )
                if not quiet and (
                    state.global_step % cfg.logging_steps == 0 or state.global_step == total_steps
                ):
                    _log(
                        f"step {state.global_step}/{total_steps}  loss {loss_sum:.4f}  "
                        f"lr {lr:.2e}  grad_norm {grad_norm:.3f}  tokens/s {tok_s:.0f}",
                        bar,
                    )
                if cfg.save_steps and (
                    state.global_step % cfg.save_steps == 0 or state.global_step == total_steps
                ):
                    checkpoint_dir = _save_checkpoint(
                        output_dir, model, optimizer, scheduler, state, cfg, ranks, previous
                    )
                if on_step_end is not None:
                    on_step_end(state)
                # a stop requested during the step's optimizer part ends the run here
                stopping = stopping or ranks.any(stop.requested)
            if stopping:
                interrupted = True
                checkpoint_dir = _save_checkpoint(
                    output_dir, model, optimizer, scheduler, state, cfg, ranks, previous
                )
    finally:
        if bar is not None:
            bar.close()
        expert_timer.detach()

    adapter_dir = None
    summary: dict[str, Any] = {}
    if not interrupted and ranks.is_main:
        adapter_dir = artifacts.atomic_dir(
            output_dir / artifacts.ADAPTER_DIR, lambda d: _save_adapter(model, d)
        )
        previous.discard(keep=adapter_dir)
    if ranks.is_main:
        summary = _finish(
            cfg,
            output_dir,
            state,
            timeline,
            expert_timer,
            run_tokens,
            run_seconds,
            total_steps,
            adapter_dir,
            checkpoint_dir,
            interrupted,
            n_trainable,
            n_total,
            model_path,
            time.perf_counter() - t_start,
            ranks.world_size,
            resumed_from=resumed_from,
        )
    with contextlib.suppress(Exception):
        if cfg.use_kt:
            import kt_sft

            kt_sft.close(model)
    engine_trace = output_dir / "engine_trace.json"
    if ranks.is_main and engine_trace.is_file():
        summary["engine_trace"] = str(engine_trace)
        artifacts.write_json_atomic(output_dir / "train_summary.json", summary)
    if not quiet:
        _print_summary(summary)
    return TrainResult(
        output_dir, adapter_dir, checkpoint_dir, interrupted, state, total_steps, summary
    )


def _finish(
    cfg: TrainConfig,
    output_dir: Path,
    state: TrainState,
    timeline: Timeline,
    timer: ExpertTimer,
    run_tokens: int,
    run_seconds: float,
    total_steps: int,
    adapter_dir: Path | None,
    checkpoint_dir: Path | None,
    interrupted: bool,
    n_trainable: int,
    n_total: int,
    model_path: str,
    wall: float,
    world_size: int = 1,
    *,
    resumed_from: int = 0,
) -> dict[str, Any]:
    good = [e for e in state.log if not e.get("skipped")]
    losses = [e["loss"] for e in good]
    summary: dict[str, Any] = {
        "steps": state.global_step,
        "total_steps": total_steps,
        "interrupted": interrupted,
        "world_size": world_size,
        "model": model_path,
        "use_kt": cfg.use_kt,
        "trainable_parameters": n_trainable,
        "parameters": n_total,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "loss_first5_mean": sum(losses[:5]) / len(losses[:5]) if losses else None,
        "loss_last5_mean": sum(losses[-5:]) / len(losses[-5:]) if losses else None,
        "tokens": run_tokens,
        "train_seconds": run_seconds,
        "resumed_from_step": resumed_from,
        "train_seconds_total": state.train_seconds,
        "tokens_per_second": run_tokens / run_seconds if run_seconds else 0.0,
        "wall_seconds": wall,
        "skipped_steps": state.skipped_steps,
        "adapter": str(adapter_dir) if adapter_dir else None,
        "checkpoint": str(checkpoint_dir) if checkpoint_dir else None,
    }
    if cfg.profile and run_seconds:
        experts = timer.total_seconds
        summary["time_split"] = {
            "moe_layers_timed": timer.num_layers,
            "experts_seconds": experts,
            "experts_forward_seconds": timer.forward_seconds,
            "experts_backward_seconds": timer.backward_seconds,
            "rest_seconds": max(run_seconds - experts, 0.0),
            "experts_fraction": experts / run_seconds,
            "forward_seconds": timeline.total("phase", "forward"),
            "backward_seconds": timeline.total("phase", "backward"),
            "optimizer_seconds": timeline.total("phase", "optimizer"),
        }
        trace = output_dir / "trace.json"
        summary["trace_engine_phases"] = timer.engine_phases
        source = "kt-sft train: step phases and experts calls timed in PyTorch" + (
            "; engine phases from MoEEngine.last_timings()" if timer.engine_phases else ""
        )
        timeline.write_chrome_trace(
            trace,
            {
                "source": source,
                "summary": {k: v for k, v in summary.items() if not isinstance(v, dict)},
            },
        )
        summary["trace"] = str(trace)
    if cfg.plot_loss and losses:
        png = output_dir / "loss_curve.png"
        title = f"kt-sft: {Path(model_path).name}, LoRA r={cfg.lora_rank}"
        if artifacts.plot_loss(png, [e["step"] for e in good], losses, title=title):
            summary["loss_curve"] = str(png)
        else:
            summary["loss_curve"] = None
            summary["loss_curve_note"] = "matplotlib is not installed: pip install matplotlib"
    artifacts.write_json_atomic(output_dir / "train_summary.json", summary)
    return summary


def _print_summary(s: dict[str, Any]) -> None:
    lines = []
    if s["interrupted"]:
        lines.append(
            f"interrupted at step {s['steps']}/{s['total_steps']}: resumable checkpoint "
            f"{s['checkpoint']}"
        )
        lines.append(
            f"  resume with the same command plus --resume_from_checkpoint {s['checkpoint']}"
        )
    elif s.get("resumed_from_step"):
        lines.append(
            f"done: {s['steps']} steps in {s['train_seconds_total']:.1f} s (resumed at "
            f"step {s['resumed_from_step']}: {s['steps'] - s['resumed_from_step']} "
            f"steps in {s['train_seconds']:.1f} s this run)"
        )
    else:
        lines.append(f"done: {s['steps']} steps in {s['train_seconds']:.1f} s")
    if s["loss_first"] is not None:
        lines.append(
            f"loss            {s['loss_first5_mean']:.4f} (first 5 steps) -> "
            f"{s['loss_last5_mean']:.4f} (last 5 steps)"
        )
    lines.append(f"throughput      {s['tokens_per_second']:.0f} tokens/s ({s['tokens']} tokens)")
    split = s.get("time_split")
    if split:
        rest = split["rest_seconds"]
        total = split["experts_seconds"] + rest
        # two lines: one would wrap on a 100-column terminal
        lines.append(
            f"time split      CPU experts {split['experts_seconds']:.1f} s "
            f"({100 * split['experts_seconds'] / total:.0f}%: forward "
            f"{split['experts_forward_seconds']:.1f} s, backward "
            f"{split['experts_backward_seconds']:.1f} s)"
        )
        lines.append(
            f"                rest {rest:.1f} s ({100 * rest / total:.0f}%: attention, "
            "router, embeddings, LM head, optimizer)"
        )
    if s.get("adapter"):
        lines.append(f"adapter         {s['adapter']}")
    if s.get("loss_curve"):
        lines.append(f"loss curve      {s['loss_curve']}")
    if s.get("trace"):
        lines.append(
            f"trace           {s['trace']} (open in https://ui.perfetto.dev or chrome://tracing)"
        )
    if s.get("engine_trace"):
        lines.append(f"engine trace    {s['engine_trace']}")
    print("\n".join(lines), flush=True)

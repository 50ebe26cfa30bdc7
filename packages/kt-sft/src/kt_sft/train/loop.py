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
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kt_sft.train import artifacts, setup
from kt_sft.train.profiling import ExpertTimer, Timeline
from kt_sft.train.ranks import Ranks
from kt_sft.train.report import log, print_summary, write_summary
from kt_sft.train.schema import TrainConfig
from kt_sft.train.signals import StopFlag
from kt_sft.train.state import NonFiniteLossError, TrainResult, TrainState
from kt_sft.train.step_checkpoints import load_checkpoint, save_adapter, save_checkpoint

__all__ = ["NonFiniteLossError", "TrainResult", "TrainState", "train"]


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


def _targets(example: Any) -> int:
    """Trained tokens of one example (labels after the first position that are not ignored)."""
    return sum(1 for label in example.labels[1:] if label != -100)


@dataclass
class _Run:
    """Everything one training run works with, built by :func:`_start`."""

    cfg: TrainConfig
    ranks: Ranks
    quiet: bool
    on_step_end: Callable[[TrainState], None] | None
    t_start: float
    output_dir: Path
    previous: artifacts.PreviousRun
    model_path: str
    examples: list[Any]
    pad_id: int | None
    global_batch: int
    total_steps: int
    device: str
    model: Any
    token_loss: Any
    params: list[Any]
    n_trainable: int
    n_total: int
    optimizer: Any
    scheduler: Any
    state: TrainState
    resumed_from: int
    timeline: Timeline
    expert_timer: ExpertTimer
    bar: Any = None
    # what the run has done so far (this process's run, not counting resumed steps)
    interrupted: bool = False
    checkpoint_dir: Path | None = None
    run_tokens: int = 0
    run_seconds: float = 0.0

    def save_checkpoint(self) -> Path:
        return save_checkpoint(
            self.output_dir,
            self.state,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            cfg=self.cfg,
            ranks=self.ranks,
            previous=self.previous,
        )


@dataclass
class _Window:
    """One optimizer step's micro-batches and what running them gave on this rank."""

    start: float  # perf_counter() when the step began
    # The RNG state the window starts from (LoRA dropout draws from it): a Ctrl-C inside the
    # window drops the partial window and checkpoints this state, so the resumed run replays the
    # window exactly.
    rng: Any
    batches: list[list[int]]
    loss: float = 0.0
    tokens: int = 0
    completed: int = 0  # micro-batches run

    @property
    def partial(self) -> bool:
        return self.completed < len(self.batches)


def train(
    cfg: TrainConfig,
    *,
    on_step_end: Callable[[TrainState], None] | None = None,
    quiet: bool = False,
) -> TrainResult:
    """Run one training job described by `cfg`; see the module docstring. Under a launcher
    that started several processes (torchrun, `accelerate launch`) every rank calls this."""
    ranks = Ranks.start(setup.device_of(cfg))
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
    run = _start(cfg, ranks, on_step_end=on_step_end, quiet=quiet)
    try:
        with StopFlag(announce=ranks.is_main) as stop:
            _run_steps(run, stop)
    finally:
        if run.bar is not None:
            run.bar.close()
        run.expert_timer.detach()
    return _finish(run)


def _start(
    cfg: TrainConfig, ranks: Ranks, *, on_step_end: Callable[[TrainState], None] | None, quiet: bool
) -> _Run:
    """Output folder, data, model, optimizer, the resumed state and the progress bar."""
    import torch

    t_start = time.perf_counter()
    output_dir, previous, resume_path = setup.prepare_output(cfg, ranks)
    device = ranks.device(setup.device_of(cfg))
    if device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    if cfg.torch_num_threads:
        torch.set_num_threads(cfg.torch_num_threads)
    torch.manual_seed(cfg.seed)

    # tokenizer and data first: bad data fails before the (slow) model load
    data = setup.load_data(cfg, ranks, quiet=quiet)
    model = setup.build_model(
        cfg, data.model_path, output_dir=output_dir, ranks=ranks, device=device, dtype=dtype
    )
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
        log(
            f"model: {data.model_path} ({'experts in the kt engine' if cfg.use_kt else 'stock'}, "
            f"{device}, {str(dtype).replace('torch.', '')}); LoRA r={cfg.lora_rank} "
            f"alpha={cfg.scaling_alpha:g} on {','.join(cfg.lora_targets)}: "
            f"{n_trainable:,} trainable parameters"
        )
    optimizer, scheduler = setup.build_optimizer(cfg, params, data.total_steps)
    state = TrainState()
    if resume_path is not None:
        state = load_checkpoint(
            resume_path, model=model, optimizer=optimizer, scheduler=scheduler, ranks=ranks
        )
        if not quiet:
            log(f"resumed from {resume_path} at step {state.global_step}")

    timeline = Timeline(enabled=cfg.profile)
    expert_timer = ExpertTimer(timeline)
    if cfg.profile:
        expert_timer.attach(model)
    run = _Run(
        cfg=cfg,
        ranks=ranks,
        quiet=quiet,
        on_step_end=on_step_end,
        t_start=t_start,
        output_dir=output_dir,
        previous=previous,
        model_path=data.model_path,
        examples=data.data.examples,
        pad_id=data.tokenizer.pad_token_id,
        global_batch=data.global_batch,
        total_steps=data.total_steps,
        device=device,
        model=model,
        token_loss=token_loss,
        params=params,
        n_trainable=n_trainable,
        n_total=n_total,
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        resumed_from=state.global_step,
        timeline=timeline,
        expert_timer=expert_timer,
    )
    if not cfg.disable_tqdm and not quiet:
        from tqdm.auto import tqdm

        run.bar = tqdm(
            total=run.total_steps,
            initial=state.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
    return run


def _run_steps(run: _Run, stop: StopFlag) -> None:
    """Optimizer steps until `total_steps` or a requested stop; a stop ends with a resumable
    checkpoint of the last completed step."""
    import torch

    cfg, state = run.cfg, run.state
    batches = _micro_batches(len(run.examples), run.global_batch, cfg.seed, state.micro_index)
    stopping = False
    while state.global_step < run.total_steps and not stopping:
        start = time.perf_counter()
        window = _Window(
            start,
            torch.get_rng_state(),
            [next(batches) for _ in range(cfg.gradient_accumulation_steps)],
        )
        stopping = _forward_backward(run, window, stop)
        if stopping and window.partial:
            run.optimizer.zero_grad(set_to_none=True)  # partial window: drop it
            torch.set_rng_state(window.rng)
            break
        grad_norm, skipped = _optimizer_step(run, window)
        _record_step(run, window, grad_norm, skipped=skipped)
        # a stop requested during the step's optimizer part ends the run here
        stopping = stopping or run.ranks.any(stop.requested)
    if stopping:
        run.interrupted = True
        run.checkpoint_dir = run.save_checkpoint()


def _forward_backward(run: _Run, window: _Window, stop: StopFlag) -> bool:
    """Forward and backward of the window's micro-batches, gradients accumulated; stops early
    (the window then stays partial) when a stop was requested on any rank. Returns whether one
    was."""
    ranks, step = run.ranks, run.state.global_step
    # the loss is normalised by the trained tokens of the whole global window
    n_items = sum(_targets(run.examples[i]) for idx in window.batches for i in idx)
    from kt_sft.data import collate

    for idx in window.batches:
        mine = ranks.share(idx)
        # A rank with no example of a short last batch still takes part in every
        # exchange: it runs one example with zero weight.
        b = collate([run.examples[i] for i in (mine or idx[:1])], run.pad_id)
        b = {k: v.to(run.device) for k, v in b.items()}
        with run.timeline.span("forward", step=step):
            loss = run.token_loss(b["input_ids"], b["attention_mask"], b["labels"]) / n_items
            if not mine:
                loss = loss * 0.0
        with run.timeline.span("backward", step=step):
            loss.backward()
        window.loss += float(loss.detach())
        window.tokens += int(b["attention_mask"].sum()) if mine else 0
        window.completed += 1
        if ranks.any(stop.requested):  # every rank stops at the same point
            return True
    return False


def _optimizer_step(run: _Run, window: _Window) -> tuple[float, bool]:
    """Reduce and clip the gradients and take the optimizer step, unless the loss or the
    gradient norm is not finite (then raise or skip, per on_nonfinite_loss). Returns the
    gradient norm and whether the step was skipped."""
    import torch

    cfg, ranks, optimizer = run.cfg, run.ranks, run.optimizer
    with run.timeline.span("optimizer", step=run.state.global_step):
        ranks.reduce_gradients(run.model, run.params)
        grad_norm = float(
            torch.nn.utils.clip_grad_norm_(
                run.params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
            )
        )
        # every rank takes the same decision (the local losses differ)
        bad = ranks.any(
            not (math.isfinite(window.loss) and math.isfinite(grad_norm)),
            "non-finite loss check",
        )
        if bad and cfg.on_nonfinite_loss == "error":
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"step {run.state.global_step + 1}: the loss is {window.loss} and the "
                f"gradient norm {grad_norm}; stopped before the optimizer step, so "
                "the parameters stay finite and nothing non-finite was written"
                + (f" (last checkpoint: {run.checkpoint_dir})" if run.checkpoint_dir else "")
                + ". Typical causes: a too large learning_rate or lora_alpha, "
                "NaN / Inf in the model's weights or inputs. Set on_nonfinite_loss: "
                "skip to skip such steps instead"
            )
        if not bad:
            optimizer.step()
            run.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return grad_norm, bad


def _record_step(run: _Run, window: _Window, grad_norm: float, *, skipped: bool) -> None:
    """Count the finished step (global loss and tokens over the ranks), log it, checkpoint it
    when due, and call on_step_end."""
    cfg, state = run.cfg, run.state
    loss_sum, tokens = run.ranks.sum([window.loss, window.tokens])
    step_tokens = int(tokens)
    step_end = time.perf_counter()
    run.timeline.add(
        f"step {state.global_step + 1}",
        "step",
        window.start,
        step_end,
        loss=loss_sum,
        tokens=step_tokens,
    )
    dt = step_end - window.start
    run.run_tokens += step_tokens
    run.run_seconds += dt
    state.global_step += 1
    state.micro_index += len(window.batches)
    state.tokens_seen += step_tokens
    state.train_seconds += dt
    lr = run.scheduler.get_last_lr()[0]
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
        if not run.quiet:
            log(
                f"step {state.global_step}: non-finite loss {loss_sum} / gradient "
                f"norm {grad_norm}: step skipped (on_nonfinite_loss: skip)",
                run.bar,
            )
    state.log.append(entry)
    _show_progress(run, loss_sum, lr, grad_norm)
    if cfg.save_steps and (
        state.global_step % cfg.save_steps == 0 or state.global_step == run.total_steps
    ):
        run.checkpoint_dir = run.save_checkpoint()
    if run.on_step_end is not None:
        run.on_step_end(state)


def _show_progress(run: _Run, loss: float, lr: float, grad_norm: float) -> None:
    """Advance the progress bar; a log line every logging_steps and at the last step."""
    step, total = run.state.global_step, run.total_steps
    tok_s = run.run_tokens / run.run_seconds if run.run_seconds else 0.0
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.1e}", refresh=False)
    if not run.quiet and (step % run.cfg.logging_steps == 0 or step == total):
        log(
            f"step {step}/{total}  loss {loss:.4f}  "
            f"lr {lr:.2e}  grad_norm {grad_norm:.3f}  tokens/s {tok_s:.0f}",
            run.bar,
        )


def _finish(run: _Run) -> TrainResult:
    """Write the final adapter (unless interrupted) and the summary, and close the engine."""
    ranks, output_dir = run.ranks, run.output_dir
    adapter_dir = None
    summary: dict[str, Any] = {}
    if not run.interrupted and ranks.is_main:
        adapter_dir = artifacts.atomic_dir(
            output_dir / artifacts.ADAPTER_DIR, lambda d: save_adapter(run.model, d)
        )
        run.previous.discard(keep=adapter_dir)
    if ranks.is_main:
        summary = write_summary(
            run.cfg,
            run.state,
            output_dir=output_dir,
            timeline=run.timeline,
            timer=run.expert_timer,
            run_tokens=run.run_tokens,
            run_seconds=run.run_seconds,
            total_steps=run.total_steps,
            adapter_dir=adapter_dir,
            checkpoint_dir=run.checkpoint_dir,
            interrupted=run.interrupted,
            n_trainable=run.n_trainable,
            n_total=run.n_total,
            model_path=run.model_path,
            wall=time.perf_counter() - run.t_start,
            world_size=ranks.world_size,
            resumed_from=run.resumed_from,
        )
    with contextlib.suppress(Exception):
        if run.cfg.use_kt:
            import kt_sft

            kt_sft.close(run.model)
    engine_trace = output_dir / "engine_trace.json"
    if ranks.is_main and engine_trace.is_file():
        summary["engine_trace"] = str(engine_trace)
        artifacts.write_json_atomic(output_dir / "train_summary.json", summary)
    if not run.quiet:
        print_summary(summary)
    return TrainResult(
        output_dir,
        adapter_dir,
        run.checkpoint_dir,
        run.interrupted,
        run.state,
        run.total_steps,
        summary,
    )

"""What a training run reports: progress lines, `train_summary.json` (with the Chrome trace and the
loss curve it points to) and the closing printout."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from kt_sft.train import artifacts
from kt_sft.train.profiling import ExpertTimer, Timeline
from kt_sft.train.schema import TrainConfig
from kt_sft.train.state import TrainState

__all__ = ["log", "print_summary", "write_summary"]


def log(msg: str, bar: Any = None) -> None:
    """Print one progress line; through the tqdm bar when there is one (it stays intact)."""
    if bar is not None:
        bar.write(msg, file=sys.stdout)
    else:
        print(msg, flush=True)


def write_summary(
    cfg: TrainConfig,
    state: TrainState,
    *,
    output_dir: Path,
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
    resumed_from: int = 0,
) -> dict[str, Any]:
    """Write `train_summary.json` (plus trace.json with `profile` and loss_curve.png with
    `plot_loss`) into `output_dir`; returns the summary. `run_*` count this process's run only,
    `state` the whole training including resumed steps."""
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
        _add_time_split(summary, output_dir, timeline, timer, run_seconds)
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


def _add_time_split(
    summary: dict[str, Any],
    output_dir: Path,
    timeline: Timeline,
    timer: ExpertTimer,
    run_seconds: float,
) -> None:
    """The CPU experts vs the rest, and the Chrome trace (trace.json) they were measured in."""
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


def print_summary(s: dict[str, Any]) -> None:
    """The closing lines of a run: steps, loss, throughput, time split, where the files are."""
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

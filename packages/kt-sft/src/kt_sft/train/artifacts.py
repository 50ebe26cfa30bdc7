"""What a training run writes: adapters, resumable checkpoints, the loss curve, a summary.

Every directory is written under a temporary name in the same parent and renamed into place, so a
crash or Ctrl-C at any moment leaves either the previous complete version or the new complete one,
never a half-written adapter. Layout of `output_dir`:

    adapter/                  the final standard PEFT adapter (adapter_config.json + safetensors)
    checkpoint-<step>/        adapter files + optimizer.pt + scheduler.pt + trainer_state.json
    loss_curve.png            training loss per step
    trace.json                Chrome trace of the run's timings (chrome://tracing, Perfetto)
    train_summary.json        loss start/end, tokens/s, time split, paths
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kt_sft._swap import clean_leftovers, fsync_tree, recover, swap_into_place

__all__ = [
    "ADAPTER_DIR",
    "CHECKPOINT_RE",
    "OutputDirError",
    "PreviousRun",
    "atomic_dir",
    "find_adapter_dir",
    "latest_checkpoint",
    "list_checkpoints",
    "plot_loss",
    "prepare_output_dir",
    "prune_checkpoints",
    "write_json_atomic",
]

ADAPTER_DIR = "adapter"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
# A write that failed with this little space left counts as "disk full".
_DISK_FULL_BYTES = 16 << 20
_RUN_FILES = ("loss_curve.png", "trace.json", "train_summary.json", "engine_trace.json")


class OutputDirError(ValueError):
    """output_dir cannot be used (not writable, or holds a run that would be overwritten)."""


def _writable_probe(path: Path) -> None:
    fd, probe = tempfile.mkstemp(prefix=".kt-write-test-", dir=path)
    os.close(fd)
    os.unlink(probe)


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint directories (with a trainer state), oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for child in output_dir.iterdir():
        m = CHECKPOINT_RE.match(child.name)
        if m and (child / STATE_FILE).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


class PreviousRun:
    """A previous run's adapter, checkpoints and run files in output_dir, kept until the new run
    has something of its own to write: a run that fails before that (bad dataset, bad model, a
    crash in the first step) leaves the previous results untouched."""

    def __init__(self, output_dir: Path, names: Sequence[str]) -> None:
        self.output_dir = output_dir
        self.names = sorted(names)

    def discard(self, keep: Path | None = None) -> None:
        """Remove the previous run's files except `keep` (what the new run just wrote in their
        place); once: later calls do nothing."""
        for name in self.names:
            path = self.output_dir / name
            if keep is not None and path == keep:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        self.names = []


def prepare_output_dir(
    path: str | Path, *, overwrite: bool, resuming: bool
) -> tuple[Path, PreviousRun]:
    """Create/check output_dir before any expensive work; raise OutputDirError when unusable.

    An output_dir that holds a previous run's adapter or checkpoints is refused unless
    `overwrite` or `resuming`. Nothing is deleted here: with `overwrite`, the returned
    PreviousRun names the files to replace, and the caller discards them when it first writes.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"output_dir {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        _writable_probe(out)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputDirError(
            f"output_dir {out} is not writable: {reason}; choose another "
            "output_dir (e.g. --output_dir /tmp/kt-sft-output)"
        ) from exc
    recover(out)  # a checkpoint or adapter a kill left parked mid-swap counts as present
    previous = [
        p.name for p in out.iterdir() if p.name == ADAPTER_DIR or CHECKPOINT_RE.match(p.name)
    ]
    replaced: list[str] = []
    if previous and not resuming:
        if not overwrite:
            raise OutputDirError(
                f"output_dir {out} already holds a training run ({', '.join(sorted(previous))}); "
                "set overwrite_output_dir: true to replace it, or resume_from_checkpoint: auto "
                "to continue it"
            )
        replaced = previous + [name for name in _RUN_FILES if (out / name).exists()]
    clean_leftovers(out)  # of interrupted writes (a checkpoint parked mid-swap is restored)
    return out, PreviousRun(out, replaced)


def atomic_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmpdir)`, then swap tmpdir into place as `target`, replacing any previous
    version (kt_sft._swap: one atomic exchange where the file system supports it).

    At every instant `target` is the old complete directory or the new complete one (or, on a
    file system without an atomic exchange, the old one is parked under `.<name>.old-<pid>` for
    the instant between two renames, and the next run's `prepare_output_dir` puts it back). If
    `write` fails, its temporary folder is removed; if the process dies, the `.tmp-*` folder left
    behind is removed by the next run.
    """
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        write(tmp)
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes 0700 folders
        for f in tmp.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)
        fsync_tree(tmp)  # the contents are durable before the swap publishes them
        swap_into_place(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(exc, target)
        raise
    return target


def _raise_if_disk_full(exc: BaseException, target: Path) -> None:
    """Re-raise a failed write as ``OSError(ENOSPC)`` naming "No space left on device" when the
    file system is full (torch.save reports it as an iostream error without the cause)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        raise OSError(errno.ENOSPC, f"No space left on device while writing {target}") from exc
    if not isinstance(exc, (OSError, RuntimeError)):
        return
    try:
        st = os.statvfs(target.parent)
    except OSError:
        return
    free = st.f_bavail * st.f_frsize
    if free < _DISK_FULL_BYTES:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device while writing {target} "
            f"({free} bytes free on its file system; the write failed with: {exc})",
        ) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def prune_checkpoints(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints; return the deleted ones."""
    if not keep:
        return []
    ckpts = list_checkpoints(output_dir)
    doomed = ckpts[:-keep] if len(ckpts) > keep else []
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def find_adapter_dir(path: str | Path) -> Path:
    """Accept an adapter directory, a checkpoint directory, or an output_dir (-> its adapter/,
    else its newest checkpoint); raise FileNotFoundError saying what was looked for."""
    p = Path(path).expanduser()
    if (p / "adapter_config.json").is_file():
        return p
    if (p / ADAPTER_DIR / "adapter_config.json").is_file():
        return p / ADAPTER_DIR
    latest = latest_checkpoint(p)
    if latest is not None and (latest / "adapter_config.json").is_file():
        return latest
    if not p.exists():
        raise FileNotFoundError(f"adapter path not found: {p}")
    raise FileNotFoundError(
        f"no PEFT adapter in {p}: expected adapter_config.json there, in "
        f"{p / ADAPTER_DIR}, or in a checkpoint-<step>/ folder"
    )


def plot_loss(path: Path, steps: Sequence[int], losses: Sequence[float], *, title: str) -> bool:
    """Write the loss curve PNG (raw + smoothed); False when matplotlib is unavailable."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    try:
        ax.plot(steps, losses, color="#9ab8d8", linewidth=1, label="loss")
        if len(losses) >= 5:
            alpha, smooth, acc = 0.2, [], losses[0]
            for v in losses:
                acc = alpha * v + (1 - alpha) * acc
                smooth.append(acc)
            ax.plot(steps, smooth, color="#1f5fa8", linewidth=2, label="smoothed")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = path.with_name(f".tmp-{path.name}")
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return True

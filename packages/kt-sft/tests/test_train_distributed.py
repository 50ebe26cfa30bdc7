"""`kt-sft train` on 2 CPU processes (torchrun, gloo) against the same run in one process.

The embedded demo config, shortened on the command line: 1 process with
``per_device_train_batch_size 8`` and 2 processes with 4 each see the same examples per step
(the 2-process run splits each global batch of 8 over the ranks), so the loss curve and the
adapter must agree. The fp32 run uses 9 examples: every second global batch then holds one
example, and rank 1 runs a zero-weight one to keep the exchanges in step.

Tolerances (4 steps):
* Losses and gradient norms are sums of the same terms in another order (one engine call on the
  leader for both ranks' tokens, gradients summed over ranks): they agree to rounding, ~1e-7
  relative in fp32 (measured 8e-8; engine ~6e-7); checked with rel 1e-5 (grad norms 1e-4).
* Adapter weights after AdamW: a weight's update is lr * m/(sqrt(v) + eps), a ratio that does not
  shrink with the gradient, so a weight whose gradient nearly cancels (its summands' rounding
  is a large share of it) can move differently in the two runs by up to what AdamW can move it
  at all. In the first steps |m_hat / sqrt(v_hat)| <= 1.01 (Cauchy-Schwarz over the moment sums
  for beta1 = 0.9, beta2 = 0.999, t <= 4), so no weight can differ by more than
  2 * 1.01 * sum(lr_t) (the bound checked for every weight), while the bulk moves identically:
  fp32 reference (``--kt_backend torch --kt_weight_dtype fp32``): >= 99.9 % of weights within
  1e-5 (measured: all but a handful; the largest difference seen 5.1e-5). Compiled engine (bf16
  activations and expert weights, rounding that depends on how tokens group into tiles):
  >= 99.5 % within 1e-5 (measured: 234 of 202,752 weights beyond it, largest 2.5e-4).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kt_sft.backend import engine_available
from kt_sft.train import ConfigError, load_train_config
from kt_sft.train.loop import train
from kt_sft.train.setup import lr_lambda

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

STEPS = 4
COMMON = [
    "--max_steps",
    str(STEPS),
    "--logging_steps",
    "1",
    "--save_steps",
    "2",
    "--disable_tqdm",
    "true",
]
BACKENDS = {
    "engine": [],
    # 9 examples: each epoch is a global batch of 8 and one of 1, which leaves rank 1 without an
    # example (it runs a zero-weight one to keep the exchanges in step)
    "torch-fp32": ["--kt_backend", "torch", "--kt_weight_dtype", "fp32", "--max_samples", "9"],
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kt-cache")


@pytest.fixture(autouse=True)
def _cache(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KT_CACHE_DIR", str(cache_dir))
    for key in (
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "GROUP_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "KT_ENGINE_PLACEMENT",
        "KT_DIST_TIMEOUT",
    ):
        monkeypatch.delenv(key, raising=False)


def test_rank_placement_and_shares_without_a_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """What each rank takes: its own GPU on a node, a contiguous share of a global batch (a
    short last batch leaves a rank empty handed: it then runs a zero-weight example)."""
    from kt_sft.train.ranks import Ranks, launched_world_size

    assert Ranks.start("cpu") == Ranks()  # no launcher: one process, nothing started
    two = [Ranks(rank=r, world_size=2, local_rank=r) for r in range(2)]
    assert [r.device("cuda") for r in two] == ["cuda:0", "cuda:1"]
    assert two[1].device("cpu") == "cpu" and Ranks().device("cuda") == "cuda"
    assert [r.share(list(range(8))) for r in two] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [r.share([7, 8, 9]) for r in two] == [[7, 8], [9]]
    assert [r.share([5]) for r in two] == [[5], []]
    assert [r.is_main for r in two] == [True, False]
    monkeypatch.setenv("WORLD_SIZE", "four")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer, got 'four'"):
        launched_world_size()


def _env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "GROUP_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
        )
    }
    env.update(
        KT_CACHE_DIR=str(cache_dir),
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        KT_DIST_TIMEOUT="60",
        **extra,
    )
    return env


def _torchrun(
    args: list[str], cache_dir: Path, *, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node 2 -m kt_sft.cli train ARGS` (docs/distributed.md)."""
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kt_sft.cli",
        "train",
        *args,
    ]
    return subprocess.run(
        argv, env=_env(cache_dir), capture_output=True, text=True, timeout=timeout
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> dict:
    """Per backend: the one-process run (in this process) and the 2-process run (torchrun)."""
    os.environ["KT_CACHE_DIR"] = str(cache_dir)
    out: dict = {}
    for name, extra in BACKENDS.items():
        if name == "engine" and not engine_available():
            continue
        base = tmp_path_factory.mktemp(f"runs-{name}")
        one = train(
            load_train_config(
                None,
                [
                    *COMMON,
                    *extra,
                    "--output_dir",
                    str(base / "one"),
                    "--per_device_train_batch_size",
                    "8",
                ],
            ),
            quiet=True,
        )
        start = time.monotonic()
        proc = _torchrun(
            [
                *COMMON,
                *extra,
                "--output_dir",
                str(base / "two"),
                "--per_device_train_batch_size",
                "4",
            ],
            cache_dir,
        )
        out[name] = {
            "one": one,
            "two": base / "two",
            "proc": proc,
            "base": base,
            "extra": extra,
            "seconds": time.monotonic() - start,
        }
    return out


def _run(runs: dict, name: str) -> dict:
    if name not in runs:
        pytest.skip("kt-kernels engine not built")
    run = runs[name]
    proc = run["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return run


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_two_processes_give_the_one_process_loss_curve_and_adapter(
    runs: dict, backend: str
) -> None:
    run = _run(runs, backend)
    two: Path = run["two"]
    log_two = json.loads((two / "checkpoint-4" / "trainer_state.json").read_text())["log"]
    log_one = run["one"].state.log
    assert [e["step"] for e in log_two] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in log_two] == pytest.approx([e["loss"] for e in log_one], rel=1e-5)
    assert [e["grad_norm"] for e in log_two] == pytest.approx(
        [e["grad_norm"] for e in log_one], rel=1e-4
    )
    assert [e["tokens"] for e in log_two] == [e["tokens"] for e in log_one]
    one, other = _weights(run["one"].adapter_dir), _weights(two / "adapter")
    assert one.keys() == other.keys()
    cfg = load_train_config(None)
    schedule = lr_lambda(cfg.lr_scheduler_type, cfg.warmup_steps, STEPS)
    adam_bound = 2 * 1.01 * sum(cfg.learning_rate * schedule(t) for t in range(STEPS))
    close = total = 0
    for key, value in one.items():
        diff = (other[key] - value).abs()
        assert float(diff.max()) <= adam_bound, (key, float(diff.max()), adam_bound)
        close += int((diff <= 1e-5).sum())
        total += diff.numel()
    assert close / total >= (0.999 if backend == "torch-fp32" else 0.995), close / total


def test_rank_0_alone_writes_and_logs_the_global_loss(runs: dict) -> None:
    run = _run(runs, "engine" if "engine" in runs else "torch-fp32")
    two: Path = run["two"]
    stdout = run["proc"].stdout
    # one log line per step (rank 0 prints, the member stays quiet) with the global loss
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{s}/{STEPS}" for s in range(1, STEPS + 1)]
    loss_one = run["one"].state.log[0]["loss"]
    assert float(lines[0].split()[3]) == pytest.approx(loss_one, abs=1e-4)
    assert "4 x 1 examples x 2 processes" in stdout
    assert stdout.count("done: 4 steps") == 1 and stdout.count("\nadapter ") == 1
    names = sorted(p.name for p in two.iterdir())
    expected = {"adapter", "checkpoint-2", "checkpoint-4", "train_summary.json"}
    assert expected <= set(names), names
    assert not [n for n in names if n.startswith(".tmp")]
    summary = json.loads((two / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == STEPS
    assert summary["loss_first"] == pytest.approx(loss_one, rel=1e-5)
    rng = torch.load(two / "checkpoint-4" / "rng_state.pt", weights_only=True)
    assert len(rng["torch_per_rank"]) == 2  # every rank's RNG, written by rank 0


def test_ctrl_c_stops_every_rank_and_the_run_resumes(
    runs: dict, cache_dir: Path, tmp_path: Path
) -> None:
    """SIGINT to torchrun (what Ctrl-C in its terminal sends): torchrun passes it to both
    ranks, which stop at the same micro-batch; rank 0 writes a resumable checkpoint. Resuming
    with 2 processes finishes with the uninterrupted run's adapter; with 1 process it is
    refused."""
    run = _run(runs, "engine" if "engine" in runs else "torch-fp32")
    out = tmp_path / "interrupted"
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "kt_sft.cli",
        "train",
        *COMMON,
        *run["extra"],
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "4",
    ]
    proc = subprocess.Popen(
        argv,
        env=_env(cache_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("step 1/"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(lines) + rest
    assert "interrupted at step" in text and "--resume_from_checkpoint" in text, text[-3000:]
    assert text.count("Ctrl-C: stopping") == 1  # rank 0 announces it
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and not (out / "adapter").exists(), text[-3000:]
    stopped = int(ckpts[0].name.split("-")[1])
    assert 1 <= stopped < STEPS

    resumed = _torchrun(
        [
            *COMMON,
            *run["extra"],
            "--output_dir",
            str(out),
            "--per_device_train_batch_size",
            "4",
            "--resume_from_checkpoint",
            "auto",
        ],
        cache_dir,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {ckpts[0]} at step {stopped}" in resumed.stdout
    straight, again = _weights(run["two"] / "adapter"), _weights(out / "adapter")
    for key, value in straight.items():
        torch.testing.assert_close(again[key], value, rtol=0, atol=1e-6, msg=key)
    log = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log"]
    log_straight = json.loads((run["two"] / "checkpoint-4" / "trainer_state.json").read_text())[
        "log"
    ]
    assert [e["loss"] for e in log] == pytest.approx([e["loss"] for e in log_straight], rel=1e-6)

    with pytest.raises(
        ConfigError,
        match=r"saved by 2 process\(es\) but this run has 1: the "
        r"global batch .* resume with 2 process\(es\) "
        r"\(torchrun --nproc-per-node 2",
    ):
        train(
            load_train_config(
                None,
                [
                    *COMMON,
                    *run["extra"],
                    "--output_dir",
                    str(out),
                    "--resume_from_checkpoint",
                    str(ckpts[0]),
                ],
            ),
            quiet=True,
        )


CRASHING_RANK = """\
import os, sys
import kt_sft.cli
import kt_sft.loss
calls = [0]
original = kt_sft.loss.ChunkedCausalLMLoss.__call__
def dying(self, *args, **kwargs):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 3:
        os._exit(17)  # dies in the forward of step 3, like an OOM kill
    return original(self, *args, **kwargs)
kt_sft.loss.ChunkedCausalLMLoss.__call__ = dying
sys.exit(kt_sft.cli.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_crashing_rank_makes_the_other_fail_fast_with_a_clear_error(
    cache_dir: Path, tmp_path: Path
) -> None:
    """No launcher to clean up: rank 1 dies mid-run and rank 0, waiting for its tokens in a MoE
    layer, stops on its own with kt's error instead of hanging; nothing is published."""
    out = tmp_path / "crash"
    port = str(_free_port())
    procs = []
    start = time.monotonic()
    for rank in range(2):
        env = _env(
            cache_dir,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            GROUP_RANK="0",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    CRASHING_RANK,
                    "train",
                    *COMMON,
                    "--output_dir",
                    str(out),
                    "--per_device_train_batch_size",
                    "4",
                    "--kt_backend",
                    "torch",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    seconds = time.monotonic() - start
    assert procs[1].returncode == 17
    assert procs[0].returncode == 1, results[0][1][-3000:]
    error = results[0][1]
    assert "[rank 0] kt-sft train: error: kt distributed: rank 0" in error, error[-3000:]
    assert "rank(s) [1]" in error and "crashed or is stuck" in error
    assert "step 2/4" in results[0][0] and "step 3/4" not in results[0][0]
    assert seconds < 60
    assert not (out / "adapter").exists()


RECORDING_RANK = """\
import json, os, sys
import kt_sft, kt_sft.cli
from kt_sft.inject import experts_layers
close = kt_sft.close
def recording_close(model, *args, **kwargs):
    # which engine backend each rank's MoE layers ended the run with
    kinds = sorted({type(layer.experts_backend).__name__ for _, _, layer in experts_layers(model)})
    path = os.path.join(os.environ["KT_TEST_REPORT"], "rank%s.json" % os.environ["RANK"])
    with open(path, "w") as fh:
        json.dump(kinds, fh)
    return close(model, *args, **kwargs)
kt_sft.close = recording_close
sys.exit(kt_sft.cli.main(sys.argv[1:]))
"""


def test_two_nodes_of_two_processes_give_the_one_process_run(
    cache_dir: Path, tmp_path: Path
) -> None:
    """`kt-sft train` as 2 nodes x 2 processes on localhost (torchrun's variables for
    ``--nnodes 2 --nproc-per-node 2``), per_device_train_batch_size 2, against one process
    with 8: the same losses, gradient norms and adapter (fp32 reference engine, tolerances as
    above). Each node's local rank 0 holds an engine replica and serves its node's other rank;
    only global rank 0 writes files: node 1's ranks get their own --output_dir, which stays
    empty. Measured: losses 2e-8 relative, gradient norms equal, adapter 5.5e-6; ~25 s."""
    extra = BACKENDS["torch-fp32"]
    one = train(
        load_train_config(
            None,
            [
                *COMMON,
                *extra,
                "--output_dir",
                str(tmp_path / "one"),
                "--per_device_train_batch_size",
                "8",
            ],
        ),
        quiet=True,
    )
    report = tmp_path / "report"
    report.mkdir()
    outputs = [tmp_path / "node0", tmp_path / "node1"]
    port = str(_free_port())
    procs = []
    start = time.monotonic()
    for rank in range(4):
        node = rank // 2
        env = _env(
            cache_dir,
            RANK=str(rank),
            WORLD_SIZE="4",
            LOCAL_RANK=str(rank % 2),
            LOCAL_WORLD_SIZE="2",
            GROUP_RANK=str(node),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            KT_TEST_REPORT=str(report),
        )
        argv = [
            sys.executable,
            "-c",
            RECORDING_RANK,
            "train",
            *COMMON,
            *extra,
            "--output_dir",
            str(outputs[node]),
            "--per_device_train_batch_size",
            "2",
        ]
        procs.append(
            subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    try:
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    seconds = time.monotonic() - start
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stdout[-3000:] + stderr[-3000:]
    backends = [json.loads((report / f"rank{r}.json").read_text()) for r in range(4)]
    assert backends == [["LeaderBackend"], ["MemberBackend"]] * 2
    assert "2 x 1 examples x 4 processes" in results[0][0]
    steps = [line for line in results[0][0].splitlines() if line.startswith("step ")]
    assert len(steps) == STEPS  # rank 0 prints the global loss; the others stay quiet
    assert not [line for s, _ in results[1:] for line in s.splitlines() if line.startswith("step ")]
    # rank 0 alone wrote: node 1's output_dir was never created
    assert not outputs[1].exists()
    out = outputs[0]
    log_four = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())["log"]
    log_one = one.state.log
    assert [e["step"] for e in log_four] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in log_four] == pytest.approx([e["loss"] for e in log_one], rel=1e-5)
    assert [e["grad_norm"] for e in log_four] == pytest.approx(
        [e["grad_norm"] for e in log_one], rel=1e-4
    )
    assert [e["tokens"] for e in log_four] == [e["tokens"] for e in log_one]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 4
    reference, other = _weights(one.adapter_dir), _weights(out / "adapter")
    assert reference.keys() == other.keys()
    for key, value in reference.items():
        torch.testing.assert_close(other[key], value, rtol=0, atol=5e-5, msg=key)
    assert seconds < 60

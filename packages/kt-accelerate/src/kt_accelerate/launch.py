"""``kt-accelerate launch``: ``accelerate launch`` with the kt settings in the same config file.

accelerate's config files refuse keys they do not know, so kt's settings cannot go into them
directly. This command reads an accelerate config file that may carry one extra top-level
section, ``kt:`` (KTConfig keys, ``kt_``-prefixed names accepted, plus the plugin's
``engine_placement``, ``dist_timeout``, ``allow_world_size_change``), writes that section to its
own file, exports ``ACCELERATE_KT_CONFIG_FILE`` pointing at it (read by
:class:`~kt_accelerate.KTransformersPlugin`), and runs stock ``accelerate launch`` with the rest::

    kt-accelerate launch --config_file kt_accelerate.yaml train.py --my-arg 1

Every other option is passed to ``accelerate launch`` unchanged. The same thing by hand::

    ACCELERATE_KT_CONFIG_FILE=kt.yaml accelerate launch --config_file accelerate.yaml train.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["KT_SECTION", "build_command", "main", "split_config"]

KT_SECTION = "kt"


def split_config(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(accelerate settings, kt section or None)`` of a config file (YAML or JSON)."""
    import json

    import yaml

    p = Path(path)
    text = p.read_text(encoding="utf-8")
    data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    if not isinstance(data, Mapping):
        raise ValueError(f"{str(p)!r}: expected a mapping of accelerate settings")
    data = dict(data)
    kt = data.pop(KT_SECTION, None)
    if kt is not None and not isinstance(kt, Mapping):
        raise ValueError(
            f"{str(p)!r}: the '{KT_SECTION}' section must be a mapping of kt "
            f"settings, got {type(kt).__name__}"
        )
    return data, (dict(kt) if kt is not None else None)


def _accelerate() -> list[str]:
    exe = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which(
        "accelerate"
    )
    if exe is None:
        return [sys.executable, "-m", "accelerate.commands.launch"]
    return [exe, "launch"]


def build_command(
    config_file: str | None, rest: Sequence[str], workdir: Path
) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command line and the environment variables to add."""
    import yaml

    command = _accelerate()
    env: dict[str, str] = {}
    if config_file is not None:
        accel, kt = split_config(config_file)
        if kt is None:
            command += ["--config_file", str(config_file)]
        else:
            accel_file = workdir / "accelerate_config.yaml"
            kt_file = workdir / "kt_config.yaml"
            accel_file.write_text(yaml.safe_dump(accel, sort_keys=True), encoding="utf-8")
            kt_file.write_text(yaml.safe_dump(kt, sort_keys=True), encoding="utf-8")
            command += ["--config_file", str(accel_file)]
            env["ACCELERATE_KT_CONFIG_FILE"] = str(kt_file)
    return command + list(rest), env


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kt-accelerate",
        description="Launch a training script with accelerate and kt (see docs/distributed.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    launch = sub.add_parser(
        "launch",
        help="accelerate launch, with a 'kt:' section allowed in the config file",
        description="Any option other than the ones below goes to `accelerate launch`.",
    )
    launch.add_argument(
        "--config_file",
        "--config-file",
        default=None,
        help="accelerate config file with an optional 'kt:' section",
    )
    launch.add_argument(
        "--dry_run",
        "--dry-run",
        action="store_true",
        help="print the command and environment instead of running them",
    )
    args, rest = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="kt-accelerate-") as tmp:
        command, env = build_command(args.config_file, rest, Path(tmp))
        if args.dry_run:
            for key, value in env.items():
                print(f"{key}={value}")
            print(" ".join(command))
            return 0
        return subprocess.call(command, env={**os.environ, **env})


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

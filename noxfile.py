"""Build and test the kt monorepo: `nox -l` lists the sessions.

Sessions run on every Python the packages declare (their `Programming Language :: Python :: 3.x`
classifiers) that is installed on this machine; missing interpreters are skipped.

PyTorch: on a machine without an NVIDIA driver the `tests` and `bench` sessions install PyTorch's
CPU build first (requirements/torch-cpu.txt, the same file the README's CPU-only install uses),
so no multi-GB CUDA build is pulled; with a driver, pip's default build. KT_NOX_TORCH=cpu or
KT_NOX_TORCH=default forces one or the other. KT_NOX_CONSTRAINTS names an extra pip constraints
file for every install (to pin packages on a given machine without narrowing the packages' own
metadata).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import nox
from nox.command import CommandFailed

ROOT = Path(__file__).parent
PACKAGES = ("kt-kernels", "kt-models", "kt-sft", "kt-accelerate")
KERNELS = ROOT / "packages" / "kt-kernels"
TORCH_CPU = ROOT / "requirements" / "torch-cpu.txt"


def _declared_pythons() -> list[str]:
    """The Python versions every package declares in its classifiers (sorted)."""
    found: set[str] | None = None
    for name in PACKAGES:
        text = (ROOT / "packages" / name / "pyproject.toml").read_text(encoding="utf-8")
        versions = set(re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text))
        found = versions if found is None else found & versions
    if not found:
        raise RuntimeError("the packages declare no common Python 3.x classifier")
    return sorted(found, key=lambda v: tuple(map(int, v.split("."))))


def _default_python(pythons: list[str]) -> str:
    """The interpreter nox runs on when the packages declare it, else the newest declared one
    that is installed: the Python of the single-interpreter sessions and of the C++ tests."""
    import sys

    own = f"{sys.version_info.major}.{sys.version_info.minor}"
    if own in pythons:
        return own
    installed = [v for v in pythons if shutil.which(f"python{v}")]
    return installed[-1] if installed else pythons[-1]


PYTHONS = _declared_pythons()
DEFAULT_PYTHON = _default_python(PYTHONS)

nox.options.sessions = ["tests", "kernels"]
nox.options.error_on_missing_interpreters = False  # declared but not installed: skipped
nox.options.default_venv_backend = "venv"


def _constraints() -> list[str]:
    path = os.environ.get("KT_NOX_CONSTRAINTS")
    if not path:
        return []
    full = (ROOT / path).resolve()
    if not full.is_file():
        raise FileNotFoundError(f"KT_NOX_CONSTRAINTS names a missing file: {full}")
    return ["-c", str(full)]


def _has_nvidia_driver() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


def _install_torch(session: nox.Session) -> None:
    """PyTorch's CPU build where there is no NVIDIA driver (or KT_NOX_TORCH=cpu), else leave
    torch to the packages' own requirement. Skips the session, saying why, when no CPU build of
    the pinned torch exists for this Python where pip can reach it."""
    choice = os.environ.get("KT_NOX_TORCH", "auto")
    if choice not in ("auto", "cpu", "default"):
        session.error(f"KT_NOX_TORCH must be auto, cpu or default, got {choice!r}")
    if choice == "default" or (choice == "auto" and _has_nvidia_driver()):
        return
    try:
        # --retries 0: an unreachable index answers at once instead of after minutes of retries
        session.install("--retries", "0", *_constraints(), "-r", str(TORCH_CPU), silent=False)
    except CommandFailed:
        session.skip(
            f"no CPU build of torch from {TORCH_CPU.relative_to(ROOT)} could be "
            f"installed for Python {session.python} (PyTorch's CPU index unreachable "
            "and no local wheel); set KT_NOX_TORCH=default to use pip's default build"
        )


def _pkg(name: str, extras: str = "") -> str:
    return str(ROOT / "packages" / name) + (f"[{extras}]" if extras else "")


def _pytest(session: nox.Session, *paths: str | Path) -> None:
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-ra",
        "--import-mode=importlib",
        "-p",
        "no:cacheprovider",
        *map(str, paths),
        *session.posargs,
    )


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Build and install all four packages, run every package's tests and the top-level tests.
    Every test tree runs even when an earlier one fails; the session fails at the end, naming
    each failed tree."""
    _install_torch(session)
    session.install(
        *_constraints(),
        _pkg("kt-kernels", "test"),
        _pkg("kt-models", "test"),
        _pkg("kt-sft", "test"),
        _pkg("kt-accelerate", "test"),
        silent=False,
    )
    # One pytest run per test tree: each package's tests import their own conftest/helpers by
    # module name, which must not collide across packages.
    failed = []
    for tree in [ROOT / "packages" / name / "tests" for name in PACKAGES] + [ROOT / "tests"]:
        try:
            _pytest(session, tree)
        except CommandFailed:
            failed.append(str(tree.relative_to(ROOT)))
    if failed:
        session.error(f"tests failed in: {', '.join(failed)}")


@nox.session(python=PYTHONS)
def kernels(session: nox.Session) -> None:
    """Install kt-kernels alone (no torch, no training code); run its Python and C++ tests."""
    session.install(*_constraints(), _pkg("kt-kernels", "test"), silent=False)
    forbidden = ("torch", "kt_sft", "kt_models", "kt_accelerate", "transformers", "peft")
    session.run(
        "python",
        "-c",
        "import importlib.util, sys\n"
        f"bad = [m for m in {forbidden!r} if importlib.util.find_spec(m)]\n"
        "sys.exit(f'kernels venv must not contain {bad}' if bad else 0)",
    )
    _pytest(session, KERNELS / "tests")
    if session.python != DEFAULT_PYTHON:
        return  # the C++ tests do not depend on the Python version: built and run once
    # The C++ tests (kernels per ISA against scalar, dispatch, AMX on a tile model) need no Python.
    session.install("cmake>=3.18", "ninja")
    build = KERNELS / "build" / "ctest"
    session.run(
        "cmake",
        "-S",
        str(KERNELS),
        "-B",
        str(build),
        "-G",
        "Ninja",
        "-DKT_KERNELS_BUILD_TESTS=ON",
        "-DCMAKE_BUILD_TYPE=Release",
    )
    session.run("cmake", "--build", str(build))
    session.run("ctest", "--test-dir", str(build), "--output-on-failure")


@nox.session(python=DEFAULT_PYTHON)
def sanitize(session: nox.Session) -> None:
    """Build kt-kernels with AddressSanitizer + UBSan and run its tests under them."""
    session.install(
        *_constraints(),
        "numpy",
        "ml_dtypes",
        "pytest",
        "hypothesis",
        "safetensors",
        "scikit-build-core>=0.10",
        "pybind11>=2.12",
    )
    session.install(
        "--no-build-isolation",
        "-Ccmake.define.KT_KERNELS_SANITIZE=ON",
        "-Ccmake.build-type=RelWithDebInfo",
        "-Cbuild-dir=build/sanitize",
        str(KERNELS),
    )
    libasan = subprocess.run(
        ["g++", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    libubsan = subprocess.run(
        ["g++", "-print-file-name=libubsan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    env = {
        "LD_PRELOAD": f"{libasan} {libubsan}",
        # CPython itself leaks by design at exit; leaks inside the engine show up as errors
        # through ASan's other checks (use-after-free, overflows) and in the C++ tests.
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:strict_string_checks=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "KT_KERNELS_TEST_FAST": "1",
    }
    session.run(
        "python",
        "-m",
        "pytest",
        "-q",
        "-x",
        "--import-mode=importlib",
        "-p",
        "no:cacheprovider",
        str(KERNELS / "tests"),
        *session.posargs,
        env=env,
    )


@nox.session(python=DEFAULT_PYTHON)
def build(session: nox.Session) -> None:
    """Build wheel + sdist of each package into dist/, install the wheels fresh, import each."""
    session.install("build")
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    for name in PACKAGES:
        session.run("python", "-m", "build", "--outdir", str(dist), str(ROOT / "packages" / name))
    wheels = sorted(str(p) for p in dist.glob("*.whl"))
    if len(wheels) != len(PACKAGES) or len(list(dist.glob("*.tar.gz"))) != len(PACKAGES):
        session.error(f"expected a wheel and an sdist per package, got {sorted(os.listdir(dist))}")
    session.install(*_constraints(), "--find-links", str(dist), *wheels)
    session.run(
        "python",
        "-c",
        "import kt_kernels, kt_models, kt_sft, kt_accelerate; "
        "print('imported', kt_kernels.__version__, kt_models.__version__, "
        "kt_sft.__version__, kt_accelerate.__version__)",
    )


@nox.session(python=DEFAULT_PYTHON)
def lint(session: nox.Session) -> None:
    """ruff (lint and format) on Python, clang-format --dry-run on C++. The tools are pinned:
    their output changes between releases, and CI must not turn red on a release."""
    session.install("ruff==0.17.6", "clang-format==23.1.5")
    session.run("ruff", "check", str(ROOT))
    session.run("ruff", "format", "--check", str(ROOT))
    sources = sorted(str(p) for p in (KERNELS / "csrc").rglob("*") if p.suffix in {".h", ".cpp"})
    sources += sorted(
        str(p) for p in (KERNELS / "tests" / "cpp").rglob("*") if p.suffix in {".h", ".cpp"}
    )
    session.run("clang-format", "--dry-run", "--Werror", *sources)


@nox.session(python=DEFAULT_PYTHON)
def bench(session: nox.Session) -> None:
    """Run the benchmarks in bench/ (each prints ours vs baseline from one run)."""
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    if not scripts:
        session.log("bench/ has no benchmarks yet; nothing to run.")
        return
    _install_torch(session)
    session.install(
        *_constraints(), _pkg("kt-kernels", "test"), _pkg("kt-models"), _pkg("kt-sft"), "psutil"
    )
    for script in scripts:
        session.run("python", str(script), *session.posargs)

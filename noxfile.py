"""Build and test the kt monorepo: `nox -l` lists the sessions.

Set KT_NOX_CONSTRAINTS to a pip constraints file (CI uses testing/constraints-cpu.txt) to pin
packages such as torch on a given machine without narrowing the packages' own metadata.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ("kt-kernels", "kt-models", "kt-sft", "kt-accelerate")
PYTHONS = ["3.11"]
KERNELS = ROOT / "packages" / "kt-kernels"

nox.options.sessions = ["tests", "kernels"]
nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "venv"


def _constraints() -> list[str]:
    path = os.environ.get("KT_NOX_CONSTRAINTS")
    if not path:
        return []
    full = (ROOT / path).resolve()
    if not full.is_file():
        raise FileNotFoundError(f"KT_NOX_CONSTRAINTS names a missing file: {full}")
    return ["-c", str(full)]


def _pkg(name: str, extras: str = "") -> str:
    return str(ROOT / "packages" / name) + (f"[{extras}]" if extras else "")


def _pytest(session: nox.Session, *paths: str | Path) -> None:
    session.run("python", "-m", "pytest", "-q", "-ra", "--import-mode=importlib",
                "-p", "no:cacheprovider", *map(str, paths), *session.posargs)


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Build and install all four packages, run every package's tests and the top-level tests."""
    session.install(*_constraints(), _pkg("kt-kernels", "test"), _pkg("kt-models", "test"),
                    _pkg("kt-sft", "test"), _pkg("kt-accelerate", "test"))
    # One pytest run per test tree: each package's tests import their own conftest/helpers by
    # module name, which must not collide across packages.
    for name in PACKAGES:
        _pytest(session, ROOT / "packages" / name / "tests")
    _pytest(session, ROOT / "tests")


@nox.session(python=PYTHONS)
def kernels(session: nox.Session) -> None:
    """Install kt-kernels alone (no torch, no training code); run its Python and C++ tests."""
    session.install(*_constraints(), _pkg("kt-kernels", "test"))
    forbidden = ("torch", "kt_sft", "kt_models", "kt_accelerate", "transformers", "peft")
    session.run("python", "-c",
                "import importlib.util, sys\n"
                f"bad = [m for m in {forbidden!r} if importlib.util.find_spec(m)]\n"
                "sys.exit(f'kernels venv must not contain {bad}' if bad else 0)")
    _pytest(session, KERNELS / "tests")
    # The C++ tests (kernels per ISA against scalar, dispatch, AMX on a tile model) need no Python.
    session.install("cmake>=3.18", "ninja")
    build = KERNELS / "build" / "ctest"
    session.run("cmake", "-S", str(KERNELS), "-B", str(build), "-G", "Ninja",
                "-DKT_KERNELS_BUILD_TESTS=ON", "-DCMAKE_BUILD_TYPE=Release")
    session.run("cmake", "--build", str(build))
    session.run("ctest", "--test-dir", str(build), "--output-on-failure")


@nox.session(python=PYTHONS)
def sanitize(session: nox.Session) -> None:
    """Build kt-kernels with AddressSanitizer + UBSan and run its tests under them."""
    session.install(*_constraints(), "numpy", "ml_dtypes", "pytest", "hypothesis", "safetensors",
                    "scikit-build-core>=0.10", "pybind11>=2.12")
    session.install("--no-build-isolation", "-Ccmake.define.KT_KERNELS_SANITIZE=ON",
                    "-Ccmake.build-type=RelWithDebInfo", "-Cbuild-dir=build/sanitize", str(KERNELS))
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                             text=True, check=True).stdout.strip()
    libubsan = subprocess.run(["g++", "-print-file-name=libubsan.so"], capture_output=True,
                              text=True, check=True).stdout.strip()
    env = {
        "LD_PRELOAD": f"{libasan} {libubsan}",
        # CPython itself leaks by design at exit; leaks inside the engine show up as errors
        # through ASan's other checks (use-after-free, overflows) and in the C++ tests.
        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:strict_string_checks=1",
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "KT_KERNELS_TEST_FAST": "1",
    }
    session.run("python", "-m", "pytest", "-q", "-x", "--import-mode=importlib", "-p",
                "no:cacheprovider", str(KERNELS / "tests"), *session.posargs, env=env)


@nox.session(python=PYTHONS)
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
    session.run("python", "-c",
                "import kt_kernels, kt_models, kt_sft, kt_accelerate; "
                "print('imported', kt_kernels.__version__, kt_models.__version__, "
                "kt_sft.__version__, kt_accelerate.__version__)")


@nox.session(python=PYTHONS)
def lint(session: nox.Session) -> None:
    """ruff on Python, clang-format --dry-run on C++."""
    session.install("ruff>=0.6", "clang-format>=18")
    session.run("ruff", "check", ".")
    sources = sorted(str(p) for p in (KERNELS / "csrc").rglob("*") if p.suffix in {".h", ".cpp"})
    sources += sorted(str(p) for p in (KERNELS / "tests" / "cpp").rglob("*.cpp"))
    session.run("clang-format", "--dry-run", "--Werror", *sources)


@nox.session(python=PYTHONS)
def bench(session: nox.Session) -> None:
    """Run the benchmarks in bench/ (each prints ours vs baseline from one run)."""
    scripts = sorted((ROOT / "bench").glob("bench_*.py"))
    if not scripts:
        session.log("bench/ has no benchmarks yet; nothing to run.")
        return
    session.install(*_constraints(), _pkg("kt-kernels", "test"), _pkg("kt-models"), _pkg("kt-sft"),
                    "psutil")
    for script in scripts:
        session.run("python", str(script), *session.posargs)

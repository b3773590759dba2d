"""Shared pytest setup: fast compilation, a compilation cache shared by the run's workers, an
isolated array cache, and the real-data rule.

Real-data tests (``@pytest.mark.slow``) read CIFAR-10 from ``$TFDS_DATA_DIR`` through the
``cifar10_data_dir`` fixture. Where the data is missing they *fail* in CI (``CI=true``), so a
broken data setup cannot turn CI green by skipping, and skip elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile

import pytest

_CREATED_CACHE: list[str] = []

# Compiles that took longer than this are written to the run's compilation cache.
_PERSISTENT_CACHE_MIN_COMPILE_SECONDS = 0.2

# Faster compiles of small CPU programs (see pytest_configure).
_CPU_COMPILE_FLAGS = "--xla_cpu_use_fusion_emitters=false"


def pytest_configure(config):
    # Decoded datasets go to a temporary directory for the whole run (xdist workers inherit it)
    # unless the developer chose one, so tests never write into ~/.cache.
    if not os.environ.get("FIPPURE_CACHE_DIR"):
        _CREATED_CACHE.append(tempfile.mkdtemp(prefix="fippure-test-cache-"))
        os.environ["FIPPURE_CACHE_DIR"] = _CREATED_CACHE[-1]
    # Many tests build fresh closures that compile the same programs, and both xdist workers
    # compile the models' steps: JAX's persistent cache, keyed by the program and the compile
    # options, lets a later compile load the executable. It lives for this run only, unless the
    # developer set JAX_COMPILATION_CACHE_DIR.
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _CREATED_CACHE.append(tempfile.mkdtemp(prefix="fippure-test-jax-cache-"))
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _CREATED_CACHE[-1]
    # also read by subprocesses, such as the notebook's kernel
    os.environ.setdefault(
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(_PERSISTENT_CACHE_MIN_COMPILE_SECONDS)
    )
    # XLA's CPU backend compiles the suite's many small programs about 40% faster with its
    # classic loop emitters than with its MLIR fusion emitters (the compiled-steps tests: 25 s
    # -> 15 s of backend compile; the whole suite under -n 2: 931 s -> 665 s). XLA reads the
    # flag when the backend starts, after this hook; xdist workers, the notebook's kernel and
    # CLI subprocesses inherit it. A developer's own choice is kept, and a jaxlib that no
    # longer knows the flag (XLA aborts on an unknown one) runs without it.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_use_fusion_emitters" not in flags:
        candidate = f"{flags} {_CPU_COMPILE_FLAGS}".strip()
        if _xla_accepts(candidate):
            os.environ["XLA_FLAGS"] = candidate


def _xla_accepts(flags: str) -> bool:
    """Whether XLA starts with ``flags`` (tried in a subprocess, about a second)."""
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(()).block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": flags},
        capture_output=True,
        timeout=300,
    )
    return probe.returncode == 0


def pytest_unconfigure(config):
    for path in _CREATED_CACHE:
        shutil.rmtree(path, ignore_errors=True)


def _prepared(data_dir: str | None, name: str) -> bool:
    if not data_dir:
        return False
    return any(pathlib.Path(data_dir, name).glob("*/dataset_info.json"))


@pytest.fixture(scope="session")
def cifar10_data_dir() -> str:
    """The TFDS directory holding a prepared CIFAR-10 (``$TFDS_DATA_DIR``).

    Fails the test in CI when the data is missing; skips it elsewhere.
    """
    data_dir = os.environ.get("TFDS_DATA_DIR")
    if _prepared(data_dir, "cifar10"):
        return data_dir
    message = (
        f"CIFAR-10 is not prepared in TFDS_DATA_DIR={data_dir!r}; point TFDS_DATA_DIR at a "
        "directory holding cifar10/<version>/"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def _full_optimization():
    import jax

    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture
def optimized_compilation():
    """Full XLA optimisation for a compute-bound test (conftest turns most of it off)."""
    with _full_optimization():
        yield


@pytest.fixture(scope="session")
def full_optimization():
    """A context manager with full XLA optimisation inside, for the compute-bound part of a
    module-scoped fixture (training a backdoored model, say): optimised code there runs about
    twice as fast, and the module's small tests keep compiling quickly."""
    return _full_optimization


# A program is compiled (a backend compile) or, when an equal one was compiled before in this
# run, loaded from the persistent cache. A test that counts compiles counts both.
_PROGRAM_EVENTS = (
    "/jax/core/compile/backend_compile_duration",
    "/jax/compilation_cache/cache_retrieval_time_sec",
)


@contextlib.contextmanager
def _programs_compiled():
    import jax

    events: list[str] = []

    def listener(event, duration, **kwargs):
        if event in _PROGRAM_EVENTS:
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="session")
def programs_compiled():
    """``with programs_compiled() as events:`` collects the compile events inside: at least one
    per program, whether XLA built it or the run's persistent compilation cache supplied it."""
    return _programs_compiled


def pytest_collection_modifyitems(config, items):
    # Real-data tests run first (a stable sort keeps the rest in file order): each takes minutes,
    # and under ``-n 2`` one that started last would leave the other worker idle at the end.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def _run_directory(tmp_path_factory) -> pathlib.Path:
    """The temporary directory of this pytest run, shared by its xdist workers."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _exclusive(lock: pathlib.Path):
    import fcntl

    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def directory_built_once_per_run(tmp_path_factory):
    """``directory_built_once_per_run(name, build)``: a directory that ``build(path)`` fills,
    built by the first xdist worker that asks (a checkpoint, say).

    A session fixture is built once per worker; one that takes tens of seconds (a trigger scan,
    a trained model) is worth building once per run. A worker that asks while another builds
    waits for it.
    """
    root = _run_directory(tmp_path_factory)

    def get(name: str, build) -> pathlib.Path:
        path, done = root / name, root / f"{name}.done"
        with _exclusive(root / f"{name}.lock"):
            if not done.exists():
                shutil.rmtree(path, ignore_errors=True)
                path.mkdir()
                build(path)
                done.touch()
        return path

    return get


@pytest.fixture(scope="session")
def built_once_per_run(directory_built_once_per_run):
    """``built_once_per_run(name, build)``: ``build()``, run by the first xdist worker that asks
    and pickled for the others (:func:`directory_built_once_per_run`)."""

    def get(name: str, build):
        def save(path: pathlib.Path) -> None:
            (path / "value.pickle").write_bytes(pickle.dumps(build()))

        return pickle.loads(
            (directory_built_once_per_run(name, save) / "value.pickle").read_bytes()
        )

    return get


def pytest_sessionstart(session):
    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs",
        float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]),
    )
    jax.monitoring.register_event_duration_secs_listener(_count_programs)


# Linux caps the memory mappings of a process (vm.max_map_count, 65,530 by default), and XLA's
# CPU backend maps regions for each compiled program (about six for a small one, 526 for NFT's
# step on the digits CNN), which JAX's caches keep alive. A worker
# builds thousands of programs over the suite (the eager Python-loop Lanczos tests alone add
# about 29,000 mappings): in two CI runs (2026-12-07 and 2026-12-08) a worker passed the cap
# late in the run and XLA segfaulted while it serialised a program for the compilation
# cache. A worker past half the cap clears JAX's caches between tests; later tests load their
# programs from the persistent cache or compile them again. The mappings (a read of /proc,
# about 25 ms at 30,000) are counted after a test that built at least 10 programs since the
# last count.
_PROGRAMS_BETWEEN_MAPPING_CHECKS = 10
_programs_since_check = [0]


def _count_programs(event, duration, **kwargs):
    if event in _PROGRAM_EVENTS:
        _programs_since_check[0] += 1


def _memory_mappings() -> int | None:
    """This process's memory mappings, or None where /proc does not say (not Linux)."""
    try:
        with open(f"/proc/{os.getpid()}/maps", "rb") as handle:
            return handle.read().count(b"\n")
    except OSError:
        return None


def _mapping_cap() -> int | None:
    try:
        return int(pathlib.Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):
        return None


def release_compiled_programs_near_the_mapping_cap(cap: int | None = None) -> bool:
    """Clears JAX's caches when this process holds more than half the kernel's cap on memory
    mappings; says whether it did."""
    _programs_since_check[0] = 0
    cap = _mapping_cap() if cap is None else cap
    mappings = _memory_mappings()
    if cap is None or mappings is None or mappings <= cap // 2:
        return False
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
    return True


@pytest.fixture(scope="session")
def release_compiled_programs():
    """:func:`release_compiled_programs_near_the_mapping_cap`, for the test of this setup."""
    return release_compiled_programs_near_the_mapping_cap


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    if _programs_since_check[0] >= _PROGRAMS_BETWEEN_MAPPING_CHECKS:
        release_compiled_programs_near_the_mapping_cap()

"""llama.cpp as a peer in ``qwen3 bench``: build its benches, convert the checkpoint, run, report tokens/s.

The comparison is only fair on the same weights and the same machine, so this module builds
``llama-bench`` and ``llama-batched-bench`` from source on the machine that runs the benchmark (with
``GGML_NATIVE``, as a user who cares about speed would) and writes a GGUF from the very Hugging Face
checkpoint folder the other engines load. The source is the llama.cpp tree vendored in the
``llama-cpp-python`` sdist: it is on PyPI, which is reachable where GitHub may not be, and pinning one
sdist version pins one llama.cpp commit, so numbers taken weeks apart come from the same code.

Everything is optional: :func:`find_or_build` returns None (and logs why) when llama.cpp cannot be had,
and :func:`bench`, the entry point ``qwen3 bench`` loads, raises with the reason so the caller can skip
the peer. See docs/benchmarks.md for the commands this runs and the numbers measured with it.

    python benchmarks/llama_cpp.py --model /tmp/rand06b            # build if needed, convert, run
    python benchmarks/llama_cpp.py --model /tmp/rand06b --no-build # only use a llama-bench already there
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

try:  # POSIX only; elsewhere concurrent builds are simply not guarded against
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger("llama_cpp_bench")

#: The sdist whose vendored llama.cpp is built. Pinned so that every run measures the same llama.cpp
#: commit; 0.3.36 vendors llama.cpp 0c1e570 (ggml 0.25.3), which knows the qwen3 architecture.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "qwen3" / "llama.cpp"
BENCH = "llama-bench"
BATCHED_BENCH = "llama-batched-bench"
QUANTIZE = "llama-quantize"  # makes K-quant GGUF files from a bf16 one (random-weight benchmark models)
BINARIES = (BENCH, BATCHED_BENCH, QUANTIZE)

#: Release + native CPU code, and nothing that needs the network or a library we do not ship: curl and
#: OpenSSL are only for downloading models, and static linking lets the two binaries be copied out of
#: the build tree into ``bin/`` and still run.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
)

#: ggml's x86 options for a non-native build, with the /proc/cpuinfo flag each needs.
_GGML_X86_OPTIONS = {
    "GGML_SSE42": "sse4_2", "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
    "GGML_BMI2": "bmi2", "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
}  # fmt: skip


def cmake_options(cpu_flags: set[str] | None = None) -> tuple[str, ...]:
    """CMAKE_OPTIONS for this CPU: native code, except that on a CPU with AMX the build is every other
    extension of this CPU's, without AMX.

    Why: llama.cpp's AMX matrix path (chosen at run time for Q4_0/Q8_0... weights when built natively on
    a Sapphire Rapids-class Xeon) crashed llama-bench with SIGSEGV in ``ggml_backend_amx_mul_mat`` on
    Qwen3-0.6B Q8_0 here (llama-cpp-python 0.3.36, a 2-vCPU KVM guest, 2026-12-02). Without AMX it runs
    its AVX-512 (VNNI, BF16) kernels and weight repacking, as on the other machines.
    """
    from qwen3.kernels import cpu_flags as machine_flags

    flags = machine_flags() if cpu_flags is None else cpu_flags
    if "amx_tile" not in flags:
        return CMAKE_OPTIONS
    chosen = [f"-D{option}={'ON' if flag in flags else 'OFF'}" for option, flag in _GGML_X86_OPTIONS.items()]
    return tuple(o if o != "-DGGML_NATIVE=ON" else "-DGGML_NATIVE=OFF" for o in CMAKE_OPTIONS) + (
        *chosen, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    )  # fmt: skip


#: Python modules ``convert_hf_to_gguf.py`` imports unconditionally on the way to writing a Qwen3 GGUF.
#: sentencepiece is among them even for a BPE vocabulary: the converter tries the SentencePiece path
#: first and only falls back to BPE when ``tokenizer.model`` is missing, after the import.
CONVERTER_MODULES = {
    "numpy": "numpy",
    "torch": "torch",
    "transformers": "transformers",
    "yaml": "pyyaml",
    "sentencepiece": "sentencepiece",
}

#: The real Qwen3 vocabulary (../shared/spec/tokenizer beside the repo), for checkpoints saved without one.
SPEC_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "spec" / "tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
OUTTYPES = ("f32", "f16", "bf16", "q8_0")
TORCH_TO_OUTTYPE = {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp could not be found or built here; the message says why."""


# --- finding and building the binaries ---------------------------------------------------------------


def find_or_build(
    cache_dir: Path = DEFAULT_CACHE_DIR,
    *,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    jobs: int = 2,
    build: bool = True,
) -> Path | None:
    """Path of a runnable ``llama-bench``, building it into ``cache_dir`` on first use; None if impossible.

    Looks on PATH, then in ``cache_dir/bin`` (a previous build of the same sdist ``version``), and
    otherwise downloads the sdist and builds ``llama-bench`` and ``llama-batched-bench`` with ``jobs``
    compile jobs (minutes; see docs/benchmarks.md). ``llama-batched-bench`` sits beside the returned
    path, or use :func:`find_batched_bench`. Never raises: the benchmark must run without llama.cpp, so
    failures are logged as a warning with the reason and give None.
    """
    try:
        return require_llama_bench(cache_dir, version=version, jobs=jobs, build=build)
    except Exception as exc:  # any failure means "no peer", never a crashed benchmark
        logger.warning("llama.cpp unavailable: %s", exc)
        return None


def require_llama_bench(
    cache_dir: Path = DEFAULT_CACHE_DIR,
    *,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    jobs: int = 2,
    build: bool = True,
) -> Path:
    """:func:`find_or_build`, but raising :class:`LlamaCppUnavailable` (or the underlying error) instead."""
    on_path = shutil.which(BENCH)
    if on_path:
        logger.info("using %s from PATH: %s", BENCH, on_path)
        return Path(on_path)
    cache_dir = Path(cache_dir).expanduser()
    with _cache_lock(cache_dir):  # two benchmarks starting at once must not build into one tree
        cached = _cached_bench(cache_dir, version)
        if cached is not None:
            logger.info("using cached %s", cached)
            return cached
        if not build:
            raise LlamaCppUnavailable(
                f"{BENCH} is not on PATH nor in {cache_dir / 'bin'}, and building is off"
            )
        source = fetch_source(cache_dir, version)
        return build_benches(source, cache_dir, version=version, jobs=jobs)


def find_batched_bench(bench_binary: Path) -> Path | None:
    """``llama-batched-bench`` beside ``bench_binary`` (they are built and installed together), or on PATH."""
    sibling = Path(bench_binary).with_name(BATCHED_BENCH)
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return sibling
    on_path = shutil.which(BATCHED_BENCH)
    return Path(on_path) if on_path else None


def _cached_bench(cache_dir: Path, version: str) -> Path | None:
    """``cache_dir/bin/llama-bench`` if both binaries are there and were built from sdist ``version``."""
    bin_dir = cache_dir / "bin"
    try:
        info = json.loads((bin_dir / "build-info.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("llama_cpp_python") != version:
        logger.info(
            "cached llama.cpp is from llama-cpp-python %s, want %s", info.get("llama_cpp_python"), version
        )
        return None
    if info.get("cmake_options") != list(cmake_options()):
        logger.info("cached llama.cpp was built with other options than this CPU needs; rebuilding")
        return None
    binaries = [bin_dir / name for name in BINARIES]
    if all(b.is_file() and os.access(b, os.X_OK) for b in binaries):
        return binaries[0]
    return None


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Exclusive lock on ``cache_dir`` for the duration of a download, build or conversion."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as handle:
        if fcntl is None:  # pragma: no cover
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fetch_source(cache_dir: Path = DEFAULT_CACHE_DIR, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The llama.cpp source tree (``vendor/llama.cpp``) of the ``llama-cpp-python`` sdist ``version``.

    Downloaded with pip (``--no-binary :all:`` so pip fetches the sdist, not a wheel without the C++
    sources) and extracted once into ``cache_dir/src``; later calls reuse it. The converter lives in the
    same tree, so this is needed even when ``llama-bench`` comes from PATH.
    """
    cache_dir = Path(cache_dir).expanduser()
    top = cache_dir / "src" / f"llama_cpp_python-{version}"
    source = top / "vendor" / "llama.cpp"
    if (source / "CMakeLists.txt").is_file() and (source / "convert_hf_to_gguf.py").is_file():
        return source
    top.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=top.parent, prefix=".download-") as tmp:
        logger.info("downloading the llama-cpp-python %s sdist with pip", version)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--retries",
            "2",
            "--dest",
            tmp,
            f"llama-cpp-python=={version}",
        ]
        _run(cmd, what="pip download of the llama-cpp-python sdist", log_path=Path(tmp) / "pip.log")
        archives = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not archives:
            raise LlamaCppUnavailable(f"pip download left no llama_cpp_python-*.tar.gz in {tmp}")
        logger.info("extracting %s", archives[0].name)
        with tarfile.open(archives[0]) as tar:
            # The "data" filter (Python >= 3.10.12 / 3.11.4) refuses absolute paths, links out of the tree
            # and device files; this sdist has none, so it only ever protects.
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, filter="data")
            else:  # pragma: no cover
                tar.extractall(tmp)
        extracted = Path(tmp) / f"llama_cpp_python-{version}"
        if not (extracted / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
            raise LlamaCppUnavailable(
                f"the sdist has no vendor/llama.cpp/convert_hf_to_gguf.py ({archives[0].name})"
            )
        if top.exists():  # a half-extracted tree from an interrupted run
            shutil.rmtree(top)
        extracted.rename(top)  # atomic: a tree under src/ is always complete
    return source


def build_benches(
    source: Path,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    *,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    jobs: int = 2,
) -> Path:
    """Configure and build only ``llama-bench``, ``llama-batched-bench`` and ``llama-quantize``; return ``cache_dir/bin/llama-bench``.

    Only those targets are built (the full tree is several times larger). The build tree stays in
    ``cache_dir/build/<version>`` so an interrupted build resumes; the binaries are copied to
    ``cache_dir/bin`` with a ``build-info.json`` only once all exist, so a half build is never "found".
    """
    if shutil.which("cmake") is None:
        raise LlamaCppUnavailable("cmake is not installed (apt-get install cmake g++)")
    cache_dir = Path(cache_dir).expanduser()
    build_dir = cache_dir / "build" / version
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / "build.log"
    start = time.perf_counter()
    options = cmake_options()
    logger.info("configuring llama.cpp (%s); log in %s", " ".join(options), log_path)
    _run(
        ["cmake", "-S", str(source), "-B", str(build_dir), *options],
        what="cmake configure",
        log_path=log_path,
    )
    logger.info("building %s and %s with -j%d (several minutes)", BENCH, BATCHED_BENCH, jobs)
    _run(
        [
            "cmake",
            "--build",
            str(build_dir),
            "--config",
            "Release",
            f"-j{jobs}",
            "--target",
            *BINARIES,
        ],
        what="cmake build",
        log_path=log_path,
        append=True,
    )
    seconds = time.perf_counter() - start
    bin_dir = cache_dir / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "build-info.json").unlink(missing_ok=True)
    for name in BINARIES:
        built = build_dir / "bin" / name
        if not built.is_file():
            raise LlamaCppUnavailable(f"the build finished without {built}; see {log_path}")
        shutil.copy2(built, bin_dir / name)
    info = {
        "llama_cpp_python": version,
        "llama_cpp_commit": _git_commit(source),
        "cmake_options": list(options),
        "jobs": jobs,
        "build_seconds": round(seconds, 1),
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": str(source),
    }
    (bin_dir / "build-info.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("built llama.cpp %s in %.0f s into %s", info["llama_cpp_commit"] or "", seconds, bin_dir)
    return bin_dir / BENCH


def _git_commit(source: Path) -> str | None:
    """The llama.cpp commit of the vendored tree (the sdist ships its git metadata), or None."""
    try:
        out = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _run(
    cmd: Sequence[str],
    *,
    what: str,
    log_path: Path,
    append: bool = False,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
) -> None:
    """Run ``cmd`` with its output in ``log_path``; on failure raise with the log's tail, which says why."""
    with open(log_path, "a" if append else "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise LlamaCppUnavailable(f"{what} took over {timeout} s; see {log_path}") from exc
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise LlamaCppUnavailable(
            f"{what} failed (exit {proc.returncode}); end of {log_path}:\n" + "\n".join(tail)
        )


# --- GGUF conversion -----------------------------------------------------------------------------------


def convert_to_gguf(
    hf_folder: Path,
    out_path: Path,
    outtype: str = "bf16",
    *,
    source: Path | None = None,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write ``out_path``, a GGUF of the Hugging Face checkpoint in ``hf_folder``, with llama.cpp's converter.

    Uses ``convert_hf_to_gguf.py`` of the llama.cpp tree being benchmarked (``source``, else that of the
    pinned sdist, downloaded if need be) with its own ``gguf-py``: a GGUF writer from another version can
    write metadata that this llama.cpp reads differently. ``hf_folder`` is never modified: the converter
    runs on a scratch folder of symlinks to its files, to which the Qwen3 tokenizer files from
    ``tokenizer_dir`` (default ../shared/spec/tokenizer) are added when the checkpoint has none. The
    converter needs the real vocabulary, as it recognises the pre-tokenizer by a hash of its output.
    """
    hf_folder, out_path = Path(hf_folder), Path(out_path)
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype must be one of {OUTTYPES}, not {outtype!r}")
    if not (hf_folder / "config.json").is_file():
        raise FileNotFoundError(f"{hf_folder} has no config.json: not a Hugging Face checkpoint folder")
    missing = [pkg for mod, pkg in CONVERTER_MODULES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise LlamaCppUnavailable(f"the GGUF converter needs: pip install {' '.join(missing)}")
    source = Path(source) if source is not None else fetch_source(cache_dir)
    script = source / "convert_hf_to_gguf.py"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    partial = out_path.with_name(out_path.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="qwen3-gguf-") as scratch:
        staged = Path(scratch) / hf_folder.name  # the converter names the model after its folder
        staged.mkdir()
        for item in hf_folder.iterdir():
            (staged / item.name).symlink_to(item.resolve())
        if not (staged / "tokenizer.json").exists() and not (staged / "vocab.json").exists():
            tok = Path(tokenizer_dir) if tokenizer_dir is not None else SPEC_TOKENIZER
            if not all((tok / name).is_file() for name in TOKENIZER_FILES):
                raise FileNotFoundError(f"{hf_folder} has no tokenizer and {tok} has no {TOKENIZER_FILES}")
            for name in TOKENIZER_FILES:
                (staged / name).unlink(missing_ok=True)
                shutil.copyfile(tok / name, staged / name)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(source / "gguf-py"), env.get("PYTHONPATH")) if p)
        env.pop("NO_LOCAL_GGUF", None)  # the converter then also puts its own gguf-py first
        env["HF_HUB_OFFLINE"] = "1"  # the tokenizer is local; never wait on the network
        cmd = [sys.executable, str(script), str(staged), "--outfile", str(partial), "--outtype", outtype]
        logger.info("converting %s to %s GGUF", hf_folder, outtype)
        start = time.perf_counter()
        _run(cmd, what="convert_hf_to_gguf.py", log_path=Path(scratch) / "convert.log", env=env)
        partial.replace(out_path)  # only a complete file ever has the final name
    logger.info(
        "wrote %s (%.2f GB) in %.0f s", out_path, out_path.stat().st_size / 1e9, time.perf_counter() - start
    )
    return out_path


def cached_gguf(
    hf_folder: Path,
    outtype: str = "bf16",
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    source: Path | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """The GGUF of ``hf_folder`` in ``cache_dir/gguf``, converted only when the checkpoint changed.

    Conversion takes about a minute and ``qwen3 bench`` reuses one checkpoint across runs, so the file
    is keyed by the folder's path plus the size and mtime of its files; a changed checkpoint gets a new
    GGUF and the stale one of the same folder is deleted (each is as large as the weights).
    """
    hf_folder = Path(hf_folder).resolve()
    cache_dir = Path(cache_dir).expanduser()
    stamp = hashlib.sha256()
    for item in sorted(hf_folder.iterdir()):
        if item.is_file():
            st = item.stat()
            stamp.update(f"{item.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    folder_key = hashlib.sha256(str(hf_folder).encode()).hexdigest()[:12]
    out = cache_dir / "gguf" / f"{hf_folder.name}-{folder_key}-{stamp.hexdigest()[:12]}-{outtype}.gguf"
    with _cache_lock(cache_dir):
        if out.is_file():
            logger.info("using cached %s", out)
            return out
        for stale in out.parent.glob(f"{hf_folder.name}-{folder_key}-*-{outtype}.gguf"):
            stale.unlink()
        return convert_to_gguf(
            hf_folder, out, outtype, source=source, cache_dir=cache_dir, tokenizer_dir=tokenizer_dir
        )


def quantized_gguf(
    hf_folder: Path,
    qtype: str,
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    threads: int | None = None,
) -> Path:
    """``hf_folder`` as a GGUF of llama-quantize type ``qtype`` (``Q8_0``, ``Q4_K_M``, ...), cached.

    Made as users' files are: llama.cpp's converter writes bf16 (:func:`cached_gguf`), then
    ``llama-quantize`` (built with the benches) applies the type and its per-tensor mix (``_M``: more bits
    for some attn_v / ffn_down and the output).
    """
    bf16 = cached_gguf(hf_folder, "bf16", cache_dir=cache_dir)
    out = bf16.with_name(bf16.name.removesuffix("-bf16.gguf") + f"-{qtype}.gguf")
    quantize = require_llama_bench(cache_dir).with_name(QUANTIZE)
    with _cache_lock(Path(cache_dir).expanduser()):
        if out.is_file():
            return out
        partial = out.with_name(out.name + ".partial")
        cmd = [str(quantize), str(bf16), str(partial), qtype, str(threads or _default_threads())]
        logger.info("quantizing %s to %s", bf16.name, qtype)
        _run(cmd, what="llama-quantize", log_path=out.with_suffix(".log"))
        partial.replace(out)
    return out


# --- running the benches -------------------------------------------------------------------------------


def run_llama_bench(
    binary: Path,
    gguf: Path,
    threads: int = 2,
    *,
    n_prompt: int = 512,
    n_gen: int = 128,
    repetitions: int = 3,
    timeout: float = 1800,
) -> dict[str, Any]:
    """Prefill (``pp<n_prompt>``) and batch-1 decode (``tg<n_gen>``) tokens/s from ``llama-bench``.

    Runs ``llama-bench -m GGUF -t THREADS -p N_PROMPT -n N_GEN -r REPETITIONS -o json``: one prompt of
    ``n_prompt`` tokens in a single batch, then ``n_gen`` tokens decoded one at a time from an empty
    context, each repeated after a warm-up run. ``prefill_tok_s``/``decode_tok_s`` are the *median* of the
    repetitions (``qwen3 bench`` takes medians too); llama-bench's own mean and stddev come alongside.
    """
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-p",
        str(n_prompt),
        "-n",
        str(n_gen),
        "-r",
        str(repetitions),
        "-o",
        "json",
    ]
    logger.info("running %s", " ".join(cmd))
    proc, peak = run_measured(cmd, timeout)
    if proc.returncode != 0:
        raise LlamaCppUnavailable(f"{BENCH} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    tests = json.loads(proc.stdout)
    pp = next(t for t in tests if t["n_prompt"] == n_prompt and t["n_gen"] == 0)
    tg = next(t for t in tests if t["n_gen"] == n_gen and t["n_prompt"] == 0)
    return {
        "prefill_tok_s": statistics.median(pp["samples_ts"]),
        "decode_tok_s": statistics.median(tg["samples_ts"]),
        "prefill_tok_s_mean": pp["avg_ts"],
        "prefill_tok_s_stddev": pp["stddev_ts"],
        "decode_tok_s_mean": tg["avg_ts"],
        "decode_tok_s_stddev": tg["stddev_ts"],
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "repetitions": repetitions,
        "threads": tg["n_threads"],
        "flash_attn": tg.get("flash_attn"),
        "model_type": tg.get("model_type"),
        "build_commit": tg.get("build_commit"),
        "build_number": tg.get("build_number"),
        "cpu_info": tg.get("cpu_info"),
        "command": " ".join(cmd),
        "peak_rss_GB": peak / 1e9,
    }


def run_measured(cmd: Sequence[str], timeout: float) -> tuple[subprocess.CompletedProcess, int]:
    """``subprocess.run(cmd)`` with output captured, and the child's peak resident memory in bytes.

    The peak is the child's own ``VmHWM`` (/proc/PID/status), read every 0.1 s while it runs: getrusage's
    figure for children also counts the parent's pages the child had before it exec'd.
    """
    import threading

    peak = 0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.wait(0.1):
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                return

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        done.set()
        watcher.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), peak


def run_batched_bench(
    binary: Path,
    gguf: Path,
    threads: int = 2,
    *,
    parallel: int = 32,
    n_prompt: int = 128,
    n_gen: int = 128,
    repetitions: int = 3,
    timeout: float = 3600,
) -> dict[str, Any]:
    """Tokens/s with ``parallel`` sequences decoded together, from ``llama-batched-bench``.

    ``parallel`` sequences each get their own random ``n_prompt``-token prompt (prefilled together), then
    all ``n_gen`` tokens of every sequence are decoded in ``n_gen`` batched steps. The run is repeated by
    listing ``parallel`` ``repetitions`` times in ``-npl`` (one model load) and medians are taken of:

    - ``tok_s``: generated tokens / (prefill + decode time), ``parallel * n_gen / T``: what
      ``qwen3 bench`` calls ``batch<N>_tok_s`` (all requests submitted at once, the clock runs until the
      last token), so this is the figure compared;
    - ``tg_tok_s``: generated tokens / decode time only (llama-batched-bench's ``S_TG``), higher since it
      leaves the prefill out;
    - ``pp_tok_s``: prompt tokens / prefill time (``S_PP``).
    """
    ctx = parallel * (n_prompt + n_gen)  # every sequence's prompt and output must fit in the KV cache
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "-t",
        str(threads),
        "-tb",
        str(threads),
        "-c",
        str(ctx),
        "-npp",
        str(n_prompt),
        "-ntg",
        str(n_gen),
        "-npl",
        ",".join([str(parallel)] * repetitions),
        "--output-format",
        "jsonl",
    ]
    logger.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise LlamaCppUnavailable(
            f"{BATCHED_BENCH} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    runs = []
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        line = line.strip()
        if line.startswith("{") and '"speed_tg"' in line:
            runs.append(json.loads(line))
    runs = [r for r in runs if r["pl"] == parallel and r["pp"] == n_prompt and r["tg"] == n_gen]
    if not runs:  # e.g. a context too small makes the tool skip the configuration silently
        raise LlamaCppUnavailable(
            f"{BATCHED_BENCH} printed no result for pl={parallel}: {proc.stderr[-2000:]}"
        )
    return {
        "tok_s": statistics.median(parallel * n_gen / r["t"] for r in runs),
        "tg_tok_s": statistics.median(r["speed_tg"] for r in runs),
        "pp_tok_s": statistics.median(r["speed_pp"] for r in runs),
        "parallel": parallel,
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "repetitions": len(runs),
        "threads": runs[0]["n_threads"],
        "flash_attn": runs[0]["flash_attn"],
        "n_kv_max": runs[0]["n_kv_max"],
        "runs": runs,
        "command": " ".join(cmd),
    }


# --- entry points ------------------------------------------------------------------------------------


def bench(folder: Path, args: argparse.Namespace | None = None) -> dict[str, float]:
    """The llama.cpp column of ``qwen3 bench``: the same keys as its qwen3 and transformers columns.

    Reads the shape of each figure from ``qwen3 bench``'s ``args`` (``dtype``, ``prefill_tokens``,
    ``decode_tokens``, ``concurrency``, ``batch_prompt``, ``batch_output``, ``repeats``) so the engines
    run the same work, and uses torch's thread count, which the report prints. Raises with the reason when
    llama.cpp is unavailable; the caller skips the peer.
    """

    def get(name: str, default: Any) -> Any:
        return getattr(args, name, None) or default

    threads = _default_threads()
    outtype = TORCH_TO_OUTTYPE[get("dtype", "bfloat16")]
    concurrency = getattr(args, "concurrency", 32) if args is not None else 32  # 0: no batch figure
    binary = require_llama_bench()
    batched = find_batched_bench(binary)
    if batched is None:
        raise LlamaCppUnavailable(f"{BATCHED_BENCH} is not beside {binary} nor on PATH")
    gguf = folder if str(folder).endswith(".gguf") else cached_gguf(folder, outtype)  # a GGUF: that very file
    single = run_llama_bench(
        binary,
        gguf,
        threads,
        n_prompt=get("prefill_tokens", 512),
        n_gen=get("decode_tokens", 128),
        repetitions=get("repeats", 3),
    )
    results = {
        "decode_tok_s": single["decode_tok_s"],
        "prefill_tok_s": single["prefill_tok_s"],
        "peak_rss_GB": single["peak_rss_GB"],
    }
    if concurrency:
        multi = run_batched_bench(
            batched,
            gguf,
            threads,
            parallel=concurrency,
            n_prompt=get("batch_prompt", 128),
            n_gen=get("batch_output", 128),
            repetitions=get("repeats", 3),
        )
        results[f"batch{concurrency}_tok_s"] = multi["tok_s"]
        results[f"batch{concurrency}_tg_tok_s"] = multi["tg_tok_s"]
    return results


def _default_threads() -> int:
    """torch's intra-op thread count when torch is importable (what qwen3 and transformers use), else the CPUs."""
    try:
        import torch

        return torch.get_num_threads()
    except ImportError:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/llama_cpp.py",
        description="Build llama.cpp's benches (from the llama-cpp-python sdist), convert a Hugging Face "
        "Qwen3 checkpoint to GGUF and print llama.cpp's prefill, decode and batched tokens/s as one JSON line.",
    )
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint folder")
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="GGUF to use/write (default: a cached conversion in CACHE_DIR/gguf)",
    )
    parser.add_argument("--outtype", default="bf16", choices=OUTTYPES, help="GGUF weight type")
    parser.add_argument("--threads", type=int, default=None, help="threads (default: torch's thread count)")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length (llama-bench -p)")
    parser.add_argument("--gen", type=int, default=128, help="batch-1 decode length (llama-bench -n)")
    parser.add_argument("--parallel", type=int, default=32, help="sequences at once for the batched figure")
    parser.add_argument("--batch-prompt", type=int, default=128, help="prompt length per batched sequence")
    parser.add_argument("--batch-gen", type=int, default=128, help="generated tokens per batched sequence")
    parser.add_argument("--repetitions", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--no-batched", action="store_true", help="skip llama-batched-bench")
    parser.add_argument("--no-build", action="store_true", help="never download or build llama.cpp")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs when building")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="build and GGUF cache")
    parser.add_argument(
        "--llama-cpp-python-version",
        default=LLAMA_CPP_PYTHON_VERSION,
        help="sdist whose vendored llama.cpp is built",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="tokenizer files for a checkpoint without any (default: ../shared/spec/tokenizer)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: find or build, convert, run both benches; print one JSON line (``available: false``, exit 1, if not)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        result = _measure(args)
    except (LlamaCppUnavailable, OSError, subprocess.SubprocessError) as exc:
        logger.error("%s", exc)
        print(json.dumps({"available": False, "reason": str(exc).splitlines()[0]}))
        return 1
    print(json.dumps(result))
    return 0


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """The work of :func:`main`, raising on the first failure."""
    version = args.llama_cpp_python_version
    start = time.perf_counter()
    binary = require_llama_bench(args.cache_dir, version=version, jobs=args.jobs, build=not args.no_build)
    acquire_s = time.perf_counter() - start
    source = fetch_source(args.cache_dir, version)
    if args.gguf is None:
        gguf = cached_gguf(
            args.model, args.outtype, cache_dir=args.cache_dir, source=source, tokenizer_dir=args.tokenizer
        )
    elif args.gguf.is_file():
        logger.info("using existing %s", args.gguf)
        gguf = args.gguf
    else:
        gguf = convert_to_gguf(
            args.model, args.gguf, args.outtype, source=source, tokenizer_dir=args.tokenizer
        )
    threads = args.threads or _default_threads()
    info = build_info(binary)
    result: dict[str, Any] = {
        "available": True,
        "llama_cpp_python": info.get("llama_cpp_python"),
        "llama_cpp_commit": info.get("llama_cpp_commit"),
        "llama_bench": str(binary),
        "gguf": str(gguf),
        "outtype": args.outtype,
        "threads": threads,
        "find_or_build_s": round(acquire_s, 1),
        "build_s": info.get("build_seconds"),
    }
    single = run_llama_bench(
        binary, gguf, threads, n_prompt=args.prompt, n_gen=args.gen, repetitions=args.repetitions
    )
    result["prefill_tok_s"] = single["prefill_tok_s"]
    result["decode_tok_s"] = single["decode_tok_s"]
    if not args.no_batched:
        batched = find_batched_bench(binary)
        if batched is None:
            raise LlamaCppUnavailable(
                f"{BATCHED_BENCH} is not beside {binary} nor on PATH (--no-batched skips it)"
            )
        multi = run_batched_bench(
            batched,
            gguf,
            threads,
            parallel=args.parallel,
            n_prompt=args.batch_prompt,
            n_gen=args.batch_gen,
            repetitions=args.repetitions,
        )
        result[f"batch{args.parallel}_tok_s"] = multi["tok_s"]
        result[f"batch{args.parallel}_tg_tok_s"] = multi["tg_tok_s"]
        result["batched_bench"] = multi
    result["llama_bench_detail"] = single
    return result


def build_info(binary: Path) -> dict[str, Any]:
    """``build-info.json`` written beside a binary built by :func:`build_benches`; empty for others (PATH)."""
    try:
        return json.loads((Path(binary).parent / "build-info.json").read_text())
    except (OSError, ValueError):
        return {}


if __name__ == "__main__":
    sys.exit(main())

"""Build llama.cpp's `llama-diffusion-cli` once, from the llama.cpp vendored in the llama-cpp-python sdist.

python bench/llama_cpp.py                 # prints the path of the binary (builds it the first time)
python bench/llama_cpp.py --version 0.3.36 --sdist /tmp/lcp/llama_cpp_python-0.3.36.tar.gz

The build lives in adapt's cache dir ($ADAPT_CACHE or ~/.cache/adapt)/llama.cpp/<version>/, keyed by the
llama-cpp-python version: Release, CPU only, no CURL, only the `llama-diffusion-cli` target (a few
minutes on 2 cores). The sdist comes from --sdist, or the cache, or `pip download` (needs the network).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from adapt.sources import cache_dir  # noqa: E402

VERSION = "0.3.36"
TARGET = "llama-diffusion-cli"


def build_dir(version: str = VERSION) -> Path:
    return cache_dir() / "llama.cpp" / version


def binary(version: str = VERSION) -> Path:
    return build_dir(version) / "build" / "bin" / TARGET


def find_sdist(version: str, sdist: Path | None) -> Path:
    """The sdist given, or one already downloaded (cache, /tmp/lcp), or `pip download` it into the cache."""
    name = f"llama_cpp_python-{version}.tar.gz"
    candidates = [sdist] if sdist else [build_dir(version) / name, Path("/tmp/lcp") / name]
    for path in candidates:
        if path and path.is_file():
            return path
    dest = build_dir(version)
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={version}", "--no-deps"]
    subprocess.run([*pip, "--no-binary", ":all:", "-d", str(dest)], check=True)
    return dest / name


def ensure_built(version: str = VERSION, sdist: Path | None = None, jobs: int = 2) -> Path:
    """The path of `llama-diffusion-cli`, building it the first time (the source is unpacked beside it)."""
    exe = binary(version)
    if exe.is_file():
        return exe
    base = build_dir(version)
    src = base / "llama.cpp"
    if not (src / "CMakeLists.txt").is_file():
        archive = find_sdist(version, sdist)
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        base.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and (m.isfile() or m.isdir()):
                    m.name = "llama.cpp/" + m.name[len(prefix) :]
                    members.append(m)
            tar.extractall(base, members=members, filter="data")
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF"]
    flags += ["-DLLAMA_BUILD_SERVER=OFF", "-DGGML_CUDA=OFF", "-DGGML_METAL=OFF", "-DBUILD_SHARED_LIBS=OFF"]
    subprocess.run(["cmake", "-S", str(src), "-B", str(base / "build"), *flags], check=True)
    subprocess.run(["cmake", "--build", str(base / "build"), "--target", TARGET, f"-j{jobs}"], check=True)
    if not exe.is_file():
        raise SystemExit(f"the build finished but {exe} is missing")
    return exe


def run_diffusion(
    exe: Path,
    gguf: Path,
    prompt: str,
    n_input: int,
    gen: int,
    block: int,
    steps_per_block: int,
    threads: int = 2,
    top_k: int = 0,
) -> tuple[str, float]:
    """(generated text, seconds of generation) of llama-diffusion-cli, greedy confidence-based decoding.

    The canvas is -ub = n_input + gen tokens; llama.cpp cuts all of it (prompt included) in blocks, so
    n_input + gen must be a multiple of `block`, and its steps count every block. `--temp 0 --top-k 0
    --top-p 1` leaves only its `dist` sampler, which draws from the softmax: greedy where the margins are
    clear (its confidence is that softmax probability, as adapt's). `top_k=1` takes the argmax, but then
    every confidence is 1 and a block is decoded left to right: exact greedy decoding with blocks of 1.
    The prompt goes through the GGUF's chat template (llama-diffusion-cli always applies it): compare
    with `adapt sample --chat`.
    """
    import re
    import time

    total = n_input + gen
    if total % block:
        raise ValueError(f"prompt ({n_input}) + gen ({gen}) must be a multiple of the block length {block}")
    cmd = [str(exe), "-m", str(gguf), "-p", prompt, "-ub", str(total), "-b", str(total), "-c", str(total)]
    cmd += [
        "--diffusion-block-length",
        str(block),
        "--diffusion-steps",
        str(steps_per_block * total // block),
    ]
    cmd += [
        "--diffusion-algorithm",
        "4",
        "--temp",
        "0",
        "--top-k",
        str(top_k),
        "--top-p",
        "1.0",
        "--seed",
        "0",
    ]
    cmd += ["-t", str(threads), "-tb", str(threads)]
    for _ in range(20):  # its logger is a thread that may lose the last lines at exit (llama.cpp #22142)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, timeout=600)
        wall = time.perf_counter() - start
        log = (proc.stdout + proc.stderr).decode("utf-8", errors="replace")
        if proc.returncode != 0 or re.search(r"sampling time per step: [0-9.]+ms\n[0-9.]+ I \n", log):
            break
    if proc.returncode != 0 or "sampling time per step:" not in log:
        raise RuntimeError(f"llama-diffusion-cli failed ({proc.returncode}): {log[-2000:]}")
    m = re.search(r"total time: ([0-9.]+)ms", log)
    seconds = float(m.group(1)) / 1000 if m else wall
    # after the timing line: "<timestamp> I " then "\n<text>\n" (the generated text, special tokens left out)
    rest = log.split("sampling time per step:", 1)[1].split("\n", 1)[1]
    rest = re.sub(r"^[0-9.]+ I ", "", rest).removeprefix("\n")
    return rest.removesuffix("\n"), seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", default=VERSION)
    parser.add_argument("--sdist", type=Path, default=None)
    parser.add_argument("--jobs", type=int, default=int(os.environ.get("JOBS", "2")))
    args = parser.parse_args()
    print(ensure_built(args.version, args.sdist, args.jobs))


if __name__ == "__main__":
    main()

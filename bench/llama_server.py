"""llama.cpp's own C++ server (llama-server) for the benchmark: build it, find it, and describe how to start it.

``python -m bench.llama_server build`` downloads the llama-cpp-python source distribution from
PyPI (it carries the whole llama.cpp tree under vendor/llama.cpp), compiles only the
llama-server target for this CPU and copies the binary to .cache/llama-server/bin/ in the
repository (git-ignored). ``python -m bench.llama_server path`` prints the binary it would use.
About 8 minutes on 2 cores; cmake and a C++ compiler are needed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "llama-server"
BINARY = CACHE / "bin" / "llama-server"
VERSION = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp the bench was checked against
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
               "-DBUILD_SHARED_LIBS=OFF")  # one self-contained binary that can be copied out of the build tree
BUILD_HINT = ".venv/bin/python -m bench.llama_server build"
# FIM prefix tokens llama.cpp recognises by their text (src/llama-vocab.cpp); a vocabulary with none of them
# makes llama-server refuse /infill.
FIM_PREFIX_NAMES = ("<fim_prefix>", "<|fim_prefix|>", "<fim-prefix>", "<PRE>", "\u2581<PRE>", "<|code_prefix|>",
                    "<|prefix|>", "<\uff5cfim\u2581begin\uff5c>")
# Special tokens of the SmolLM tokenizer that code completion never uses, lent to llama-server as FIM markers.
FIM_STAND_INS = ("<issue_start>", "<issue_comment>", "<issue_closed>")
FIM_KEYS = ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id")

log = logging.getLogger("bench.llama_server")


def find_binary() -> Path | None:
    """The llama-server to run: $LLAMA_SERVER_BIN, else the one `build` made, else one on PATH; None if none."""
    named = os.environ.get("LLAMA_SERVER_BIN")
    if named:
        return Path(named) if Path(named).is_file() else None
    if BINARY.is_file():
        return BINARY
    found = shutil.which("llama-server")
    return Path(found) if found else None


def _vocabulary(model_folder: Path) -> dict[str, int]:
    """Token text -> id from the model folder's tokenizer.json (vocabulary and added tokens)."""
    data = json.loads((model_folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = dict((data.get("model") or {}).get("vocab") or {})
    vocab.update({token["content"]: token["id"] for token in data.get("added_tokens") or []})
    return vocab


def fim_overrides(model_folder: Path) -> list[str]:
    """``--override-kv`` arguments that give a model without FIM tokens stand-ins, so /infill is served.

    Empty when the model has FIM tokens of its own, or when the stand-ins are missing too
    (llama-server then answers /infill 501, which the llama.vscode session reports).
    """
    try:
        vocab = _vocabulary(model_folder)
    except (OSError, ValueError):
        return []
    if any(name in vocab for name in FIM_PREFIX_NAMES) or not all(name in vocab for name in FIM_STAND_INS):
        return []
    pairs = [f"{key}=int:{vocab[name]}" for key, name in zip(FIM_KEYS, FIM_STAND_INS)]
    return ["--override-kv", ",".join(pairs)]


def _run(argv: list[str], cwd: Path | None = None) -> None:
    """Run a build step, its output passed through; raise CalledProcessError when it fails."""
    log.info("$ %s", " ".join(argv))
    subprocess.run(argv, cwd=cwd, check=True)


def download(version: str, cache: Path) -> Path:
    """The llama-cpp-python sdist in ``cache`` (pip downloads it once)."""
    sdist = cache / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={version}", "-d", str(cache)])
    return sdist


def extract(sdist: Path, cache: Path) -> Path:
    """The llama.cpp tree inside the unpacked sdist (unpacked once)."""
    root = cache / sdist.name.removesuffix(".tar.gz")
    if not (root / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        log.info("unpacking %s", sdist)
        with tarfile.open(sdist) as archive:
            archive.extractall(cache, filter="data")
    return root / "vendor" / "llama.cpp"


def build(version: str = VERSION, jobs: int | None = None, cache: Path = CACHE) -> Path:
    """Download, configure and compile llama-server; copy it to ``cache``/bin and return its path."""
    cache.mkdir(parents=True, exist_ok=True)
    tree = extract(download(version, cache), cache)
    build_dir = tree / "build-bench"
    _run(["cmake", "-S", str(tree), "-B", str(build_dir), *CMAKE_FLAGS])
    _run(["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs or os.cpu_count() or 2)])
    target = cache / "bin" / "llama-server"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(build_dir / "bin" / "llama-server", target)
    _run([str(target), "--version"])
    return target


def main(argv: list[str] | None = None) -> int:
    """``build`` or ``path``; exit status 1 when there is no binary or the build fails."""
    parser = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build", "path"))
    parser.add_argument("--version", default=VERSION, help="llama-cpp-python release to build (default %(default)s)")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="download and build folder (default %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "path":
        binary = find_binary()
        print(binary if binary else f"no llama-server found; build one with: {BUILD_HINT}")
        return 0 if binary else 1
    try:
        print(build(args.version, args.jobs, args.cache))
    except (OSError, subprocess.CalledProcessError, tarfile.TarError) as exc:
        log.error("build failed: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

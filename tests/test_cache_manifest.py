"""The converted copy of a GGUF model carries a manifest; damaged copies are found and converted again.

A tiny Llama is written as a GGUF file here (float32, ~6 MB) so each conversion takes
well under a second; its safetensors copy is larger than the 4 MiB the fast check
hashes whole, so the sampled path is the one exercised.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from app.engine import loader
from app.engine.loader import MANIFEST, ModelLoadError, ResolvedSource, check_copy, prepare_copy
from config import ModelConfig

from .tiny_models import EOS, build_tokenizer

PROMPT = "def fibonacci(n):"
WEIGHTS = "model.safetensors"


def add_tokenizer(writer) -> int:
    """Store the tests' byte-level BPE tokenizer (tests/tiny_models.py) as GGUF metadata; returns its size."""
    state = json.loads(build_tokenizer().backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["id"] for added in state["added_tokens"]}
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control token
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    writer.add_bos_token_id(vocab[EOS])
    writer.add_eos_token_id(vocab[EOS])
    writer.add_add_bos_token(False)
    return len(tokens)


def add_weights(writer, vocab: int, hidden: int, ffn: int, layers: int, kv: int) -> None:
    """Random float32 Llama weights under their GGUF tensor names."""
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                       f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    for name, shape in shapes.items():
        # Large embedding and output weights make greedy text decisive, as in tests/tiny_models.py.
        scale = {"token_embd.weight": 1.0, "output.weight": 0.5}.get(name, 0.05)
        writer.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))
    for name in [f"blk.{i}.{norm}.weight" for i in range(layers) for norm in ("attn_norm", "ffn_norm")]:
        writer.add_tensor(name, np.ones(hidden, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))


def write_tiny_gguf(path: Path, hidden: int = 256, ffn: int = 512, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2) -> Path:
    """A float32 GGUF Llama (~6 MB) with random weights and the tests' tokenizer."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    vocab = add_tokenizer(writer)
    add_weights(writer, vocab, hidden, ffn, layers, kv_heads * (hidden // heads))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def model_config(gguf_path: Path) -> ModelConfig:
    """A config entry serving the GGUF file at ``gguf_path``."""
    return ModelConfig(name="tiny-gguf", source=str(gguf_path), dtype="float32", context_length=256)


def load(gguf_path: Path, cache: Path):
    """(model, tokenizer) through the real loader, on the CPU in float32."""
    return loader.load_pretrained(model_config(gguf_path), cache, torch.device("cpu"), "float32")


def fingerprint(model, tokenizer) -> tuple[dict, list[int]]:
    """The model's weights and its greedy continuation of PROMPT."""
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    return {k: v.clone() for k, v in model.state_dict().items()}, out[0].tolist()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One conversion of the tiny GGUF, the files present when its manifest was written, and its fingerprint."""
    root = tmp_path_factory.mktemp("manifest")
    gguf_path = write_tiny_gguf(root / "tiny.gguf")
    present = []
    original = loader.write_manifest

    def spy(folder: Path) -> None:
        present.append(sorted(os.listdir(folder)))
        original(folder)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loader, "write_manifest", spy)
        folder, status = prepare_copy(ResolvedSource(str(root), "tiny.gguf"), root / "cache")
    assert status == "converted"
    reference = fingerprint(*load(gguf_path, root / "cache"))
    return {"gguf": gguf_path, "folder": folder, "present": present, "print": reference}


@pytest.fixture()
def copy(pristine, tmp_path):
    """A private cache holding a copy of the pristine conversion (mtimes kept); returns the copy's folder."""
    folder = tmp_path / "cache" / pristine["folder"].name
    shutil.copytree(pristine["folder"], folder)  # copy2: the manifest's mtimes still match
    return folder


@pytest.fixture()
def loader_log():
    """The loader's log records, captured whatever the "app" logger's propagation is."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("app.engine.loader")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def overwrite(path: Path, offset: int, data: bytes, keep_mtime: bool = True) -> None:
    """Write ``data`` at ``offset`` without changing the size; with ``keep_mtime`` as silent disk damage would."""
    stat = path.stat()
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def assert_same_model(gguf_path: Path, cache: Path, pristine) -> None:
    """The model loaded from ``cache`` has the pristine weights and writes the same text."""
    weights, ids = fingerprint(*load(gguf_path, cache))
    ref_weights, ref_ids = pristine["print"]
    assert ids == ref_ids
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def warnings_of(records) -> str:
    """The text of the captured warnings, one per line."""
    return "\n".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)


# -- the manifest -----------------------------------------------------------------


def test_manifest_written_last_and_lists_every_file(pristine):
    """Every other file exists when the manifest is written; it lists each with size, mtime and sha256."""
    folder = pristine["folder"]
    manifest = json.loads((folder / MANIFEST).read_text())
    others = sorted(set(os.listdir(folder)) - {MANIFEST})
    assert pristine["present"] == [others]  # all files were there, and nothing came after the manifest
    assert {"config.json", "generation_config.json", WEIGHTS, "tokenizer.json"} <= set(others)
    assert sorted(manifest["files"]) == others
    for name, entry in manifest["files"].items():
        stat = (folder / name).stat()
        assert (entry["size"], entry["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
        assert entry["sha256"] == loader._full_digest(folder / name)
    assert loader.sample_offsets(manifest["files"][WEIGHTS]["size"])  # the weights are sampled, not hashed whole


def test_failed_conversion_leaves_no_folder(pristine, tmp_path, monkeypatch):
    """A conversion that stops before its manifest leaves neither the copy nor its staging folder behind."""
    def broken(folder: Path) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(loader, "write_manifest", broken)
    cache = tmp_path / "cache"
    with pytest.raises(ModelLoadError, match="disk full"):
        prepare_copy(ResolvedSource(str(pristine["gguf"].parent), "tiny.gguf"), cache)
    assert [p for p in cache.iterdir() if p.is_dir()] == []


def test_sample_offsets_catch_any_megabyte_in_500_mb():
    """1024 blocks of 4 KiB over 500 MB leave gaps under 1 MB; small files are hashed whole."""
    size = 500_000_000
    offsets = loader.sample_offsets(size)
    assert len(offsets) == 1024 and offsets[0] == 0 and offsets[-1] == size - loader.SAMPLE_BLOCK
    gaps = [b - (a + loader.SAMPLE_BLOCK) for a, b in zip(offsets, offsets[1:])]
    assert 0 < max(gaps) < 1_000_000  # an overwrite of >= 1 MB always covers part of a sampled block
    assert loader.sample_offsets(4 * 1024 * 1024) == []


# -- the fast check at start --------------------------------------------------------


def test_fast_check_passes_good_copy(pristine, copy, monkeypatch):
    """A good copy passes without hashing the weights whole, and prepare_copy reports it ok."""
    hashed = []
    full_digest = loader._full_digest
    monkeypatch.setattr(loader, "_full_digest", lambda path: hashed.append(path.name) or full_digest(path))
    assert check_copy(copy) is None
    assert WEIGHTS not in hashed
    source = ResolvedSource(str(pristine["gguf"].parent), "tiny.gguf")
    assert prepare_copy(source, copy.parent) == (copy, "ok")


@pytest.mark.parametrize("keep_mtime", [True, False], ids=["silent", "written"])
def test_zeros_in_the_middle_are_reconverted(pristine, copy, loader_log, keep_mtime):
    """Same-size zeros in the middle of the weights fail the fast check; the start converts again, same model."""
    size = (copy / WEIGHTS).stat().st_size
    overwrite(copy / WEIGHTS, size // 2, bytes(1 << 20), keep_mtime)
    problem = check_copy(copy)
    assert problem and WEIGHTS in problem
    assert ("sampled blocks" if keep_mtime else "every byte") in problem
    assert_same_model(pristine["gguf"], copy.parent, pristine)
    assert WEIGHTS in warnings_of(loader_log) and "again" in warnings_of(loader_log)
    assert check_copy(copy) is None


def test_truncated_weights_are_reconverted(pristine, copy, loader_log):
    """A truncated safetensors file is caught by its size and converted again (no SafetensorError)."""
    with open(copy / WEIGHTS, "r+b") as handle:
        handle.truncate(handle.seek(0, os.SEEK_END) // 2)
    assert "bytes instead of" in check_copy(copy)
    assert_same_model(pristine["gguf"], copy.parent, pristine)
    assert "truncated" in warnings_of(loader_log)


def test_folder_without_manifest_is_reconverted(pristine, copy, loader_log):
    """A copy made by an older version (no manifest) is unverified: it is converted again, saying why."""
    (copy / MANIFEST).unlink()
    source = ResolvedSource(str(pristine["gguf"].parent), "tiny.gguf")
    assert prepare_copy(source, copy.parent) == (copy, "re-converted")
    assert "older version" in warnings_of(loader_log)
    assert check_copy(copy) is None


def test_unexpected_file_and_bad_manifest_fail_the_check(copy):
    """A file the conversion did not write, or a garbled manifest, fails the check."""
    (copy / "pytorch_model.bin").write_bytes(b"x")
    assert "pytorch_model.bin" in check_copy(copy)
    (copy / "pytorch_model.bin").unlink()
    (copy / MANIFEST).write_text("{not json")
    assert "unreadable" in check_copy(copy)


def test_touched_but_unchanged_file_is_hashed_once(copy, loader_log):
    """A new mtime with the same bytes (a copied cache) passes; the manifest records it so later starts sample."""
    os.utime(copy / WEIGHTS, ns=(0, 10**18))
    assert check_copy(copy) is None
    assert json.loads((copy / MANIFEST).read_text())["files"][WEIGHTS]["mtime_ns"] == 10**18
    assert "manifest updated" in "\n".join(r.getMessage() for r in loader_log)
    assert [p.name for p in copy.parent.iterdir() if p.name.startswith(".manifest")] == []


def test_copy_that_passes_the_check_but_fails_to_load_is_reconverted(pristine, copy, loader_log):
    """Load errors (here a garbled config.json the manifest vouches for) take the same path: convert again."""
    (copy / "config.json").write_text("{garbled")
    loader.write_manifest(copy)
    assert check_copy(copy) is None
    assert_same_model(pristine["gguf"], copy.parent, pristine)
    assert "config.json" in warnings_of(loader_log)


def test_concurrent_starts_convert_once(pristine, copy, monkeypatch):
    """Two workers finding the same damaged copy convert it once, under the file lock."""
    calls = []
    write = loader._write_conversion
    monkeypatch.setattr(loader, "_write_conversion", lambda *a: calls.append(1) or write(*a))
    (copy / MANIFEST).unlink()
    source = ResolvedSource(str(pristine["gguf"].parent), "tiny.gguf")
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_copy(source, copy.parent)[1]))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and sorted(results) == ["ok", "re-converted"]


# -- when the copy cannot be converted again -----------------------------------------


@pytest.fixture()
def private_gguf(pristine, tmp_path):
    """A private copy of the GGUF with a good converted copy in a private cache: (gguf, folder)."""
    gguf_path = tmp_path / "src" / "tiny.gguf"
    gguf_path.parent.mkdir()
    shutil.copy2(pristine["gguf"], gguf_path)
    folder = tmp_path / "cache" / f"tiny-{loader._source_digest(gguf_path)}"
    shutil.copytree(pristine["folder"], folder)
    return gguf_path, folder


def garble(gguf_path: Path) -> None:
    """Overwrite a GGUF file with junk of the same size and mtime (its copy keeps its name)."""
    overwrite(gguf_path, 0, b"\xff" * gguf_path.stat().st_size)


def test_reconversion_impossible_names_the_folder(private_gguf):
    """Damaged copy + unconvertible GGUF: a ModelLoadError naming the folder to delete; nothing deleted."""
    gguf_path, folder = private_gguf
    (folder / WEIGHTS).write_bytes(b"")
    garble(gguf_path)
    with pytest.raises(ModelLoadError) as info:
        load(gguf_path, folder.parent)
    assert f"delete {folder}" in str(info.value) and WEIGHTS in str(info.value)
    assert folder.is_dir()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".convert")] == []


def test_missing_gguf_is_a_model_load_error(private_gguf):
    """A GGUF file that is gone is a ModelLoadError, not a traceback."""
    gguf_path, _ = private_gguf
    gguf_path.unlink()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(gguf_path, gguf_path.parent)
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        prepare_copy(ResolvedSource(str(gguf_path.parent), gguf_path.name), gguf_path.parent)


def test_copy_that_never_loads_names_the_folder(private_gguf, monkeypatch):
    """A copy that fails to load even after converting it again: a ModelLoadError naming the folder."""
    gguf_path, folder = private_gguf

    def failing(config, location, device, dtype):
        raise ModelLoadError(f"model 'tiny-gguf': cannot load {location!r}: broken")

    monkeypatch.setattr(loader, "_load_folder", failing)
    with pytest.raises(ModelLoadError, match=f"delete {folder}"):
        load(gguf_path, folder.parent)


# -- python -m app prepare --verify --------------------------------------------------


@pytest.fixture()
def run_cli(monkeypatch, tmp_path, capsys):
    """Run ``python -m app`` in-process against a config serving ``gguf``; restores the app logger after."""
    from app.__main__ import main

    app_logger = logging.getLogger("app")
    saved = (app_logger.handlers[:], app_logger.level, app_logger.propagate)

    def run(gguf_path: Path, cache: Path, *argv: str) -> tuple[int, str]:
        """Exit code and standard output of ``python -m app *argv``."""
        config = tmp_path / "fauxpilot.toml"
        config.write_text(f'[server]\ndevice = "cpu"\ncache_dir = "{cache}"\n\n[[models]]\nname = "tiny-gguf"\n'
                          f'source = "{gguf_path}"\ndtype = "float32"\n')
        monkeypatch.setenv("FAUXPILOT_CONFIG", str(config))
        for var in ("FAUXPILOT_CACHE_DIR", "FAUXPILOT_DEVICE", "FAUXPILOT_MODEL"):
            monkeypatch.delenv(var, raising=False)
        code = main(list(argv))
        return code, capsys.readouterr().out

    yield run
    app_logger.handlers[:], app_logger.level, app_logger.propagate = saved


def test_prepare_verify_catches_what_sampling_cannot(private_gguf, run_cli):
    """One flipped byte between sampled blocks passes the fast check; --verify finds it, re-converts, exits 3."""
    gguf_path, folder = private_gguf
    offsets = loader.sample_offsets((folder / WEIGHTS).stat().st_size)
    middle = len(offsets) // 2
    between = (offsets[middle] + loader.SAMPLE_BLOCK + offsets[middle + 1]) // 2
    assert offsets[middle] + loader.SAMPLE_BLOCK < between < offsets[middle + 1]
    with open(folder / WEIGHTS, "rb") as handle:
        handle.seek(between)
        flipped = bytes([handle.read(1)[0] ^ 0x01])
    overwrite(folder / WEIGHTS, between, flipped)
    assert check_copy(folder) is None  # the fast check cannot see it
    assert "every byte" in check_copy(folder, full=True)
    code, out = run_cli(gguf_path, folder.parent, "prepare", "--verify")
    assert code == 3 and out.splitlines() == [f"tiny-gguf\tre-converted\t{folder}"]
    code, out = run_cli(gguf_path, folder.parent, "prepare", "--verify")
    assert code == 0 and out.splitlines() == [f"tiny-gguf\tok\t{folder}"]


def test_prepare_verify_reports_failure(private_gguf, run_cli):
    """A damaged copy whose GGUF cannot be converted again: a 'failed' line naming the folder, exit 1."""
    gguf_path, folder = private_gguf
    overwrite(folder / WEIGHTS, 100_000, b"\x00" * 10)
    garble(gguf_path)
    code, out = run_cli(gguf_path, folder.parent, "prepare", "--verify")
    assert code == 1
    assert out.startswith("tiny-gguf\tfailed\t") and f"delete {folder}" in out

"""tools/gguf_tensor_types.py on GGUF headers written here: the storage-type shares that decide whether a packaged
checkpoint was stored in float (docs/llm.md, "A model trained in float")."""

import importlib.util
import json
import struct
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gguf_tensor_types", ROOT / "tools" / "gguf_tensor_types.py")
gtt = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("gguf_tensor_types", gtt)
_spec.loader.exec_module(gtt)


def _string(text):
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def _header(metadata, tensors, version=3):
    """GGUF bytes: metadata as (key, type id, packed value), tensors as (name, shape, type id); no tensor data."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(metadata))
    for key, kind, packed in metadata:
        out += _string(key) + struct.pack("<I", kind) + packed
    for offset, (name, shape, kind) in enumerate(tensors):
        out += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
        out += struct.pack("<IQ", kind, 4096 * offset)
    return out


def _array_of_strings(items):
    return struct.pack("<IQ", 8, len(items)) + b"".join(_string(s) for s in items)


METADATA = [("general.architecture", 8, _string("llama")), ("general.name", 8, _string("Tiny")),
            ("general.file_type", 4, struct.pack("<I", 15)), ("general.size_label", 8, _string("1K")),
            ("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
            ("tokenizer.ggml.tokens", 9, _array_of_strings([f"t{i}" for i in range(40)])),
            ("llama.shape", 9, struct.pack("<IQ", 4, 2) + struct.pack("<2I", 3, 4))]
TENSORS = [("token_embd.weight", [16, 40], 8), ("blk.0.attn_q.weight", [16, 16], 6),
           ("blk.0.ffn_down.weight", [32, 16], 12), ("blk.0.attn_norm.weight", [16], 0)]


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "tiny.gguf"
    path.write_bytes(_header(METADATA, TENSORS) + b"\0" * 64)
    return path


def test_header_metadata_and_tensors(checkpoint):
    metadata, tensors = gtt.read_header(checkpoint)
    assert metadata["general.architecture"] == "llama" and metadata["general.file_type"] == 15
    assert metadata["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert metadata["tokenizer.ggml.tokens"] == "[40 items]"  # long arrays kept as their length
    assert metadata["llama.shape"] == [3, 4]
    assert tensors == [("token_embd.weight", [16, 40], "Q8_0"), ("blk.0.attn_q.weight", [16, 16], "Q5_0"),
                       ("blk.0.ffn_down.weight", [32, 16], "Q4_K"), ("blk.0.attn_norm.weight", [16], "F32")]


def test_shares_count_parameters_not_tensors(checkpoint):
    info = gtt.summary(checkpoint)
    assert info["parameters"] == 640 + 256 + 512 + 16
    assert list(info["shares"]) == ["Q8_0", "Q4_K", "Q5_0", "F32"]  # largest first
    assert info["shares"]["Q4_K"] == pytest.approx(512 / 1424)
    assert info["float_share"] == pytest.approx(16 / 1424)
    assert (info["embedding"], info["head"]) == ("Q8_0", "tied")


def test_a_float_checkpoint_reads_as_float(tmp_path):
    path = tmp_path / "f16.gguf"
    path.write_bytes(_header(METADATA[:1], [("token_embd.weight", [8, 8], 1), ("output.weight", [8, 8], 30),
                                            ("blk.0.attn_q.weight", [8, 8], 0)]))
    info = gtt.summary(path)
    assert info["float_share"] == pytest.approx(1.0) and info["head"] == "BF16"


def test_the_first_part_of_a_split_file_is_enough(tmp_path):
    path = tmp_path / "model.gguf.part00"
    path.write_bytes(_header(METADATA, TENSORS) + b"\1" * 10_000)  # tensor data cut anywhere after the header
    assert gtt.summary(path)["tensors"] == 4


@pytest.mark.parametrize("content, words", [(b"PK\3\4 a wheel", "not a GGUF file"),
                                            (_header(METADATA, TENSORS)[:-30], "ends inside its GGUF header"),
                                            (_header(METADATA, TENSORS, version=1), "version 1")])
def test_bad_files_are_refused_in_one_sentence(tmp_path, capsys, content, words):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    out = tmp_path / "out.json"
    assert gtt.main([str(path), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gguf_tensor_types: error: ") and words in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_cli_prints_and_writes_json(checkpoint, tmp_path, capsys):
    out = tmp_path / "types.json"
    assert gtt.main([str(checkpoint), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "llama 'Tiny' (1K), file type 15, 4 tensors, 1,424 parameters" in text
    assert "Q8_0 44.9 %" in text
    assert json.loads(out.read_text())[0]["shares"]["F32"] == pytest.approx(16 / 1424)

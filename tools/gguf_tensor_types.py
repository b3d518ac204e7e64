"""How a GGUF checkpoint stores its weights: each storage type's share of the parameters, from the header alone.

    python tools/gguf_tensor_types.py model.gguf [more.gguf ...] [--json out.json]

Why: a checkpoint judged as "the original" in docs/llm.md must be trained in float, and a GGUF file says what it
is only in its tensors' types (its name and `general.file_type` say the main type, not the mix: a Q4_K_M file
keeps some tensors in 5, 6 or 8 bits). Only the header is read (metadata, then every tensor's name, shape and
type), so the first part of a checkpoint split over several packages is enough. No dependency beyond Python.

Prints, per file: architecture, name, size label, file type, the number of tensors and parameters, each type's
share of the parameters, and the types of the embedding table and output head.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

MAGIC = b"GGUF"
# ggml's tensor type ids (ggml.h, enum ggml_type) for the types small checkpoints use
TENSOR_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 9: "Q8_1", 10: "Q2_K",
                11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K", 16: "IQ2_XXS", 17: "IQ2_XS",
                18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S", 23: "IQ4_XS", 24: "I8",
                25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 30: "BF16"}
FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
# metadata value types: struct format of the scalars; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
KEPT_ARRAY_LENGTH = 16  # longer arrays (a tokenizer's vocabulary) are kept as their length only


class GGUFError(ValueError):
    """The file is not a GGUF header this reader understands (one sentence for the user)."""


class _Reader:
    """Little-endian values read one at a time from a binary file, so a 262k-token vocabulary is never held."""

    def __init__(self, file, path):
        self.file, self.path = file, path

    def take(self, size):
        data = self.file.read(size)
        if len(data) != size:
            raise GGUFError(f"{self.path} ends inside its GGUF header (a truncated file?)")
        return data

    def scalar(self, fmt):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self):
        return self.take(self.scalar("Q")).decode("utf-8", errors="replace")

    def value(self, kind):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, length = self.scalar("I"), self.scalar("Q")
            items = [self.value(item_kind) for _ in range(length)]
            return items if length <= KEPT_ARRAY_LENGTH else f"[{length} items]"
        raise GGUFError(f"{self.path} has a metadata value of unknown type {kind}")


def read_header(path):
    """(metadata, tensors) of a GGUF file: metadata a dict, tensors a list of (name, shape, type name)."""
    path = Path(path)
    with open(path, "rb") as file:
        reader = _Reader(file, path)
        if file.read(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        version = reader.scalar("I")
        if version < 2:
            raise GGUFError(f"{path} is GGUF version {version}; this reader reads versions 2 and later")
        count, entries = reader.scalar("Q"), reader.scalar("Q")
        metadata = {"gguf.version": version}
        for _ in range(entries):
            key = reader.string()
            metadata[key] = reader.value(reader.scalar("I"))
        tensors = []
        for _ in range(count):
            name = reader.string()
            shape = [reader.scalar("Q") for _ in range(reader.scalar("I"))]
            kind = reader.scalar("I")
            reader.scalar("Q")  # the offset of its data, not needed here
            tensors.append((name, shape, TENSOR_TYPES.get(kind, f"type {kind}")))
    return metadata, tensors


def type_shares(tensors):
    """Each storage type's share of the parameters, largest first, and the parameter count."""
    counts = {}
    for _, shape, kind in tensors:
        size = 1
        for dim in shape:
            size *= dim
        counts[kind] = counts.get(kind, 0) + size
    total = sum(counts.values())
    shares = {kind: n / total for kind, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))}
    return shares, total


def summary(path):
    """What one file holds, as a JSON-ready dict."""
    metadata, tensors = read_header(path)
    shares, total = type_shares(tensors)
    by_name = {name: kind for name, _, kind in tensors}
    return {"file": str(path), "architecture": metadata.get("general.architecture"),
            "name": metadata.get("general.name"), "size_label": metadata.get("general.size_label"),
            "file_type": metadata.get("general.file_type"), "tensors": len(tensors), "parameters": total,
            "shares": shares, "float_share": sum(v for k, v in shares.items() if k in FLOAT_TYPES),
            "embedding": by_name.get("token_embd.weight"), "head": by_name.get("output.weight", "tied")}


def format_summary(info):
    shares = ", ".join(f"{kind} {100 * share:.1f} %" for kind, share in info["shares"].items())
    return (f"{info['file']}: {info['architecture']} '{info['name']}' ({info['size_label']}), file type "
            f"{info['file_type']}, {info['tensors']} tensors, {info['parameters']:,} parameters\n"
            f"  by type: {shares}\n  in float: {100 * info['float_share']:.1f} %; embedding {info['embedding']}, "
            f"head {info['head']}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="gguf_tensor_types", description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="GGUF files (the first part of a split file is enough)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the summaries as JSON")
    args = parser.parse_args(argv)
    try:
        infos = [summary(path) for path in args.files]
    except (OSError, GGUFError) as error:
        print(f"gguf_tensor_types: error: {error}", file=sys.stderr)
        return 2
    for info in infos:
        print(format_summary(info))
    if args.json:
        try:
            args.json.write_text(json.dumps(infos, indent=1) + "\n")
        except OSError as error:
            print(f"gguf_tensor_types: error: cannot write {args.json}: {error.strerror}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

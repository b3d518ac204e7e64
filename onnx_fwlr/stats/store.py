"""Calibration statistics: running float64 sums, additive, so shards computed apart merge by adding.

activations[key]: statistics of one site input X (key = tensor name, or "name|T" when a Gemm reads it
transposed): 'gram' Σ w x xᵀ [K,K], 'sum' Σ w x [K], 'abs_sum' Σ w |x| [K], 'count' Σ w (w = mask weight, 1
without a mask), over every position of every sample.
gradients[weight]: 'fisher_row' [K], 'fisher_col' [N], 'grad_gram' [N,N], 'grad_count' (samples × seeds); a
site too wide for an [N,N] Gram (an LM head) holds 'grad_sketch' [r,N], 'grad_diag' [N] and 'sketch_rank' instead.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnx_fwlr.errors import FwlrError
from onnx_fwlr.io.model import iter_tensor_bytes
from onnx_fwlr.io.onnx_utils import walk_graphs
from onnx_fwlr.sites.find import Site

FORMAT_VERSION = 1


def activation_key(use) -> str:
    return f"{use.input}|T" if use.trans_a else use.input


def model_fingerprint(model: onnx.ModelProto) -> str:
    """sha256 over the graph's structure and every constant's bytes: stats belong to exactly one model."""
    digest = hashlib.sha256()
    for graph in walk_graphs(model):
        for node in graph.node:
            digest.update(f"{node.op_type}:{','.join(node.input)}>{','.join(node.output)};".encode())
        for tensor in sorted(graph.initializer, key=lambda t: t.name):
            digest.update(tensor.name.encode())
            for block in iter_tensor_bytes(model, tensor):  # same bytes; lazily loaded tensors in chunks
                digest.update(block)
    return digest.hexdigest()


@dataclass
class Statistics:
    fingerprint: str
    activations: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    gradients: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    # --- accumulation ---------------------------------------------------------------------------
    @staticmethod
    def fold(target: dict, update: dict) -> None:
        """Add one batch's sums into the running sums (a low-rank Gram factor merges by re-truncating the stack
        of both factors, autodiff.losses.fold_sketch)."""
        for name, value in update.items():
            if name == "sketch_rank" and name in target:
                continue
            if name == "grad_sketch" and name in target:
                from onnx_fwlr.autodiff.losses import fold_sketch

                rank = int(target.get("sketch_rank", update.get("sketch_rank", len(value))))
                target[name] = fold_sketch(target[name], value, rank)
            elif name in target:
                target[name] += value  # in place: a float32 Gram is cast in small chunks, never copied whole
            else:
                target[name] = np.array(value, dtype=np.float64)

    def merge(self, other: "Statistics") -> "Statistics":
        if other.fingerprint != self.fingerprint:
            raise FwlrError(
                "these statistics come from different models (fingerprints differ); merge shards of one model only."
            )
        for mine, theirs in ((self.activations, other.activations), (self.gradients, other.gradients)):
            for key, sums in theirs.items():
                self.fold(mine.setdefault(key, {}), sums)
        for key in ("samples", "batches"):
            self.meta[key] = self.meta.get(key, 0) + other.meta.get(key, 0)
        self.meta["smoke_test"] = bool(self.meta.get("smoke_test") or other.meta.get("smoke_test"))
        return self

    # --- what the methods read ------------------------------------------------------------------
    def _activation_sums(self, site: Site) -> tuple[dict, float]:
        """The site's sums over its uses (read only: a single use's own arrays, not a copy of its Gram)."""
        if len(site.uses) == 1:
            sums = self.activations[activation_key(site.uses[0])]
            return sums, float(sums["count"])
        total: dict = {}
        for use in site.uses:
            self.fold(total, self.activations[activation_key(use)])
        return total, float(total["count"])

    def input_gram(self, site: Site) -> np.ndarray:
        """E[x xᵀ] over calibration positions, summed over the site's uses."""
        sums, count = self._activation_sums(site)
        return sums["gram"] / max(count, 1.0)

    def mean_input(self, site: Site) -> np.ndarray:
        sums, count = self._activation_sums(site)
        return sums["sum"] / max(count, 1.0)

    def mean_abs_input(self, site: Site) -> np.ndarray:
        sums, count = self._activation_sums(site)
        return sums["abs_sum"] / max(count, 1.0)

    def fisher_row(self, site: Site) -> np.ndarray:
        grads = self.gradients[site.weight]
        return grads["fisher_row"] / max(float(grads["grad_count"]), 1.0)

    def output_grad_gram(self, site: Site) -> np.ndarray:
        grads = self.gradients[site.weight]
        return grads["grad_gram"] / max(float(grads["grad_count"]), 1.0)

    def output_grad_sketch(self, site: Site) -> tuple[np.ndarray, np.ndarray] | None:
        """(S [r, N], d [N]) with Sᵀ S + diag(d − diag(Sᵀ S)) the mean output-gradient Gram, for a site whose
        Gram was too wide to form (autodiff.losses.sketched); None when the exact Gram was kept."""
        grads = self.gradients[site.weight]
        if "grad_sketch" not in grads:
            return None
        count = max(float(grads["grad_count"]), 1.0)
        return grads["grad_sketch"] / np.sqrt(count), grads["grad_diag"] / count

    def has_activations(self, site: Site) -> bool:
        return all(activation_key(u) in self.activations for u in site.uses)

    def has_gradients(self, site: Site) -> bool:
        return site.weight in self.gradients

    def require(self, sites: list[Site], needs: tuple[str, ...], method: str) -> None:
        """Stats must cover what the method reads for at least one site; the rest fall back (caller's job).
        Every array they hold for these sites must have the site's shape (an edited or damaged file is refused
        here, not met as a broadcasting error mid-way)."""
        self.check_shapes(sites)
        if "activations" in needs and not any(self.has_activations(s) for s in sites):
            raise FwlrError(
                f"`method` {method} needs activation statistics, but the statistics hold none for these sites."
            )
        if "gradients" in needs and not any(self.has_gradients(s) for s in sites):
            raise FwlrError(
                f"`method` {method} needs gradient (Fisher) statistics; calibrate with gradients "
                "(`onnx-fwlr calibrate `fisher``) or pick an activation-based method (asvd, whiten)."
            )

    def check_shapes(self, sites: list[Site]) -> None:
        """Activation sums of a site's input are [K] / [K, K], gradient sums [K] (rows) / [N] / [N, N], counts
        scalars."""
        for site in sites:
            K, N = site.K, site.N
            expected = [(self.activations.get(activation_key(use), {}), {"sum": (K,), "abs_sum": (K,),
                                                                        "gram": (K, K), "count": ()})
                        for use in site.uses]
            expected.append((self.gradients.get(site.weight, {}), {"fisher_row": (K,), "fisher_col": (N,),
                                                                    "grad_gram": (N, N), "grad_count": ()}))
            for arrays, shapes in expected:
                for name, shape in shapes.items():
                    if name in arrays and np.shape(arrays[name]) != shape:
                        raise FwlrError(f"the statistics' '{name}' array for site '{site.name}' has shape "
                                        f"{list(np.shape(arrays[name]))}, not {list(shape)} for its [{K}, {N}] "
                                        "weight; the file is damaged or edited: recalibrate with `onnx-fwlr "
                                        "calibrate`.")

    # --- files ------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """One .npz, deterministic bytes (fixed member order and timestamps)."""
        arrays, index = {}, []
        for kind, table in (("activations", self.activations), ("gradients", self.gradients)):
            for key in sorted(table):
                for name in sorted(table[key]):
                    arrays[f"a{len(index)}"] = np.asarray(table[key][name], dtype=np.float64)
                    index.append([kind, key, name])
        meta = {k: v for k, v in self.meta.items() if k != "seconds"}  # timings would break reproducible bytes
        header = {"format": FORMAT_VERSION, "fingerprint": self.fingerprint, "meta": meta, "index": index}
        arrays["header"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        write_npz(path, arrays)

    @classmethod
    def load(cls, path: str | Path, expect_fingerprint: str | None = None) -> "Statistics":
        path = Path(path)
        if not path.is_file():
            raise FwlrError(f"{path}: statistics file not found; create it with `onnx-fwlr calibrate`.")
        try:
            with np.load(path, allow_pickle=False) as archive:
                header = json.loads(bytes(archive["header"]).decode())
                arrays = {k: archive[k] for k in archive.files if k != "header"}
        except (KeyError, ValueError, OSError, zipfile.BadZipFile):
            raise FwlrError(
                f"{path}: is not an onnx-fwlr statistics file; create it with `onnx-fwlr calibrate`."
            ) from None
        if expect_fingerprint is not None and header["fingerprint"] != expect_fingerprint:
            raise FwlrError(f"{path}: these statistics were computed for a different model; recalibrate this one.")
        stats = cls(header["fingerprint"], meta=header.get("meta", {}))
        for i, (kind, key, name) in enumerate(header["index"]):
            getattr(stats, kind).setdefault(key, {})[name] = arrays[f"a{i}"]
        return stats


def holds_gradients(stats) -> bool:
    """Whether statistics (a Statistics object, or a file from `onnx-fwlr calibrate`) hold gradient sums;
    a file is read for its header only. An unreadable file counts as none: loading it later names the problem."""
    if isinstance(stats, Statistics):
        return bool(stats.gradients)
    try:
        with np.load(Path(stats), allow_pickle=False) as archive:
            header = json.loads(bytes(archive["header"]).decode())
        return any(kind == "gradients" for kind, _key, _name in header["index"])
    except (KeyError, ValueError, OSError, TypeError, zipfile.BadZipFile):
        return False


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez with byte-reproducible output: members in the given order, fixed timestamps."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            archive.writestr(info, buffer.getvalue())
    tmp.replace(path)

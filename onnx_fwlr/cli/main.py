"""`onnx-fwlr`: a thin command line over the API.

Exit codes: 0 success, 1 validation failed, 2 bad input (one plain sentence on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onnx_fwlr import __version__
from onnx_fwlr.errors import FwlrError


def _write_json(data: dict, target: str) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=_json_default)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n")


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _out(args) -> "callable":
    """Where tables go: stdout, or stderr when stdout carries JSON."""
    stream = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
    return lambda text="": print(text, file=stream)


class Inspect:
    name = "inspect"
    help = "list every factorisable MatMul/Gemm weight and every skipped one with its reason"

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("--include", help="regex: only sites whose node or weight name matches")
        p.add_argument("--exclude", help="regex: skip sites whose node or weight name matches")
        p.add_argument("--json", metavar="FILE", help="also write the listing as JSON ('-' for stdout)")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.sites.listing import inspect_model

        listing = inspect_model(args.model, args.include, args.exclude)
        _out(args)(listing.format())
        if args.json:
            _write_json(listing.to_dict(), args.json)
        return 0


class Compress:
    name = "compress"
    help = "factorise the model's constant MatMul/Gemm weights and write the compressed model"

    @staticmethod
    def add_arguments(p):
        from onnx_fwlr.pipeline.compress import ALLOCATIONS, METHODS

        p.add_argument("model", help="ONNX model file")
        p.add_argument("-o", "--output", required=True, help="path of the compressed model")
        p.add_argument("--ratio", type=float, help="parameters kept in the factorised weights (0 < R <= 1)")
        p.add_argument("--rank", action="append", default=[], metavar="N|NAME=N",
                       help="one fixed rank for every site (N), or for one site (NAME=N, repeatable)")
        p.add_argument("--target-size", metavar="BYTES", help="size of the output model, e.g. 20MB or 150000")
        p.add_argument("--max-error", type=float,
                       help="largest relative L2 output error on --val data; the smallest ratio meeting it is found")
        p.add_argument("--keep-attention", action="store_true",
                       help="keep Q/K/V/output projections dense (factorising them breaks ORT's Attention fusion)")
        p.add_argument("--method", default="svd", choices=list(METHODS), help="weighting (default: svd)")
        p.add_argument("--methods", metavar="M,kron",
                       help="per site, the structure with the lowest weighted error at the same budget (e.g. whiten,kron)")
        p.add_argument("--dope", type=float, default=0.0, metavar="FRACTION",
                       help="keep this fraction of each weight's entries as a sparse correction: W ~ structure + D")
        p.add_argument("--kron-shape", metavar="m1xm2,n1xn2", help="force Kronecker factor shapes (K=m1*m2, N=n1*n2)")
        p.add_argument("--allocation", default="uniform", choices=list(ALLOCATIONS), help="rank allocation")
        p.add_argument("--include", help="regex: only sites whose node or weight name matches")
        p.add_argument("--exclude", help="regex: skip sites whose node or weight name matches")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data beside the model")
        p.add_argument("--write-unchanged", action="store_true",
                       help="write the output even when no site can be factorised")
        _calibration_arguments(p)
        p.add_argument("--stats", metavar="FILE", help="statistics from `onnx-fwlr calibrate` instead of --calib")
        p.add_argument("--stats-memory", metavar="SIZE",
                       help="most memory the activation Grams may hold at once (e.g. 4GB; default a third of RAM); "
                            "beyond it asvd/whiten calibrate in several passes, one group of sites each")
        p.add_argument("--sequential", action="store_true",
                       help="refit each site, depth by depth, to its input in the compressed model (reads --calib once per depth)")
        p.add_argument("--no-bias-correction", action="store_true",
                       help="do not fold the mean output shift into a bias (on by default for asvd/whiten/kfac)")
        p.add_argument("--val", metavar="DATA", help="validate against the original on this data afterwards")
        p.add_argument("--refine", type=int, metavar="STEPS",
                       help="then distil the factors against the original for up to STEPS Adam steps on --calib "
                            "(early stopping on 10%% of --calib held back; --val stays unseen)")
        p.add_argument("--refine-lr", type=float, default=3e-5, help="peak learning rate of --refine (default 3e-5)")
        _tolerance_arguments(p)
        p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        _decomposition_arguments(p)

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.pipeline.compress import compress, validate
        from onnx_fwlr.io.model import check_output_path, file_size, save_model

        output = check_output_path(args.output, [args.model], args.force)
        rank, ranks = _parse_ranks(args.rank)
        if args.refine is not None and (args.calib is None or args.calib == "random"):
            raise FwlrError("--refine trains on the calibration data; pass --calib DATA (.npz or a folder of .npz).")
        model, report = compress(
            args.model, ratio=args.ratio, rank=rank, ranks=ranks, target_size=_parse_size(args.target_size),
            max_error=args.max_error, validation=args.val, method=args.method, allocation=args.allocation,
            include=args.include, exclude=args.exclude, keep_attention=args.keep_attention,
            calibration=args.calib, stats=args.stats,
            batch_size=args.batch_size, mask_input=args.mask_input, shapes=_shapes(args),
            bias_correction=False if args.no_bias_correction else None, fisher_options=_fisher_options(args),
            methods=[m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None,
            dope=args.dope, kron_shape=_parse_kron_shape(args.kron_shape), sequential=args.sequential,
            svd=args.svd, workers=args.workers, stats_memory=_parse_size(args.stats_memory, "--stats-memory"),
            progress=not args.quiet,
        )
        out = _out(args)
        refined = None
        if args.refine is not None and report.factorised:
            from onnx_fwlr.refine.loop import refine

            # early stopping on held-back calibration data, so that --val stays unseen for the final check
            model, refined = refine(args.model, model, args.calib, steps=args.refine,
                                    lr=args.refine_lr, batch_size=args.batch_size, seed=args.seed,
                                    output=args.fisher_output, progress=not args.quiet)
        report.file_size_before = file_size(args.model)
        written = bool(report.sites) or args.write_unchanged
        if written:
            save_model(model, output, external_data=True if args.external_data else None)
            report.file_size_after = file_size(output)
        out(report.format())
        if refined is not None:
            out(refined.format())
        if written:
            out(f"wrote {output}")
        code = 0
        if args.val and written:
            validation = validate(args.model, output, args.val, batch_size=args.batch_size, progress=not args.quiet)
            code = _report_validation(validation, args, out)
            report.validation = validation.to_dict()
        if args.json:
            data = report.to_dict()
            if refined is not None:
                data["refine"] = refined.to_dict()
            _write_json(data, args.json)
        return code


def _parse_kron_shape(text: str | None):
    """`--kron-shape 8x8,16x16` -> (m1, m2, n1, n2)."""
    if text is None:
        return None
    import re

    match = re.fullmatch(r"\s*(\d+)x(\d+)\s*,\s*(\d+)x(\d+)\s*", text)
    if not match or 0 in (shape := tuple(int(v) for v in match.groups())):
        raise FwlrError(f"--kron-shape '{text}' is not m1xm2,n1xn2 with positive integers (e.g. 8x8,16x16).")
    return shape


def _parse_ranks(items: list[str]) -> tuple[int | None, dict]:
    """`--rank 8` (every site) and `--rank fc1=8` (one site), in any mix."""
    rank, ranks = None, {}
    for item in items:
        name, _, value = item.rpartition("=")
        try:
            number = int(value)
        except ValueError:
            raise FwlrError(f"--rank '{item}' is not N or NAME=N with N an integer.") from None
        if name:
            ranks[name] = number
        else:
            rank = number
    return rank, ranks


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _parse_size(text: str | None, flag: str = "--target-size") -> int | None:
    if text is None:
        return None
    import re

    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise FwlrError(f"{flag} '{text}' is not a size; write e.g. 150000, 500KB, 20MB or 1.5GiB.")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _calibration_arguments(p):
    p.add_argument("--calib", metavar="DATA",
                   help="calibration data: .npz (keys = input names), a folder of .npz, or 'random' (smoke test)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per ONNX Runtime run (default 32)")
    p.add_argument("--mask-input", metavar="NAME", help="input whose zeros mark padding (default: attention_mask)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1",
                   help="sizes of symbolic input dimensions (for random data and profiling); repeatable")
    p.add_argument("--loss", choices=["ce", "mc", "gaussian"],
                   help="Fisher loss: ce (needs a 'labels' key), mc (sampled from the model), gaussian (embeddings); "
                        "default: ce with labels, else by the output's kind")
    p.add_argument("--fisher-output", metavar="NAME", help="output the loss is defined on (default: first float one)")
    p.add_argument("--fisher-samples", type=int, default=1, help="loss seeds per batch for mc/gaussian (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Fisher sampling (default 0)")


def _decomposition_arguments(p):
    p.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"],
                   help="auto (default): randomised SVD where the rank is known and at most min(K,N)/4 with "
                        "min(K,N) >= 1024, exact otherwise; see docs/large_models.md")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="decompose sites in N processes (same output bytes as 1; default 1)")


def _fisher_options(args) -> dict:
    return {"loss": args.loss, "output": args.fisher_output, "samples": args.fisher_samples, "seed": args.seed}


def _tolerance_arguments(p):
    p.add_argument("--min-cosine", type=float, help="fail when an output's mean cosine falls below this")
    p.add_argument("--max-rel-error", type=float, help="fail when an output's relative L2 error exceeds this")
    p.add_argument("--max-accuracy-drop", type=float, help="fail when accuracy drops by more than this fraction")


def _shapes(args):
    from onnx_fwlr.evaluate.profiling import parse_shape_args

    return parse_shape_args(args.shape) if args.shape else None


def _report_validation(validation, args, out) -> int:
    from onnx_fwlr.evaluate.validation import format_validation

    failures = validation.check(min_cosine=args.min_cosine, max_rel_error=args.max_rel_error,
                                max_accuracy_drop=args.max_accuracy_drop)
    out(format_validation(validation, failures))
    return 1 if failures else 0


class Calibrate:
    name = "calibrate"
    help = "measure activation (and with --fisher, gradient) statistics once, to reuse with compress --stats"

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("-o", "--output", required=True, help="statistics file (.npz)")
        _calibration_arguments(p)
        p.add_argument("--fisher", action="store_true", help="also gradient statistics (for fwsvd, kfac, global)")
        p.add_argument("--shard", metavar="I/N", help="use only the I-th of N interleaved parts of the batches")
        p.add_argument("--include", help="regex: only sites whose node or weight name matches")
        p.add_argument("--exclude", help="regex: skip sites whose node or weight name matches")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.pipeline.compress import calibrate
        from onnx_fwlr.io.model import check_output_path

        output = check_output_path(args.output, [args.model], args.force)
        if args.calib is None:
            raise FwlrError("calibrate needs data; pass --calib DATA (.npz, a folder of .npz, or 'random').")
        stats = calibrate(args.model, args.calib, fisher=args.fisher, include=args.include, exclude=args.exclude,
                          batch_size=args.batch_size, mask_input=args.mask_input, shapes=_shapes(args),
                          shard=_parse_shard(args.shard), progress=not args.quiet,
                          **(_fisher_options(args) if args.fisher else {}))
        stats.save(output)
        meta = stats.meta
        print(f"calibrated {len(stats.activations)} site input(s), {len(stats.gradients)} with gradients, on "
              f"{meta.get('samples', 0)} samples in {meta.get('batches', 0)} batches "
              f"({meta.get('seconds', 0):.1f} s); wrote {output}")
        return 0


def _parse_shard(text):
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise FwlrError(f"--shard '{text}' is not of the form I/N (e.g. 0/4).") from None
    return index, count


class MergeStats:
    name = "merge-stats"
    help = "add statistics computed on different data (shards) into one file"

    @staticmethod
    def add_arguments(p):
        p.add_argument("inputs", nargs="+", help="statistics files from `onnx-fwlr calibrate`")
        p.add_argument("-o", "--output", required=True, help="merged statistics file")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.io.model import check_output_path
        from onnx_fwlr.stats.store import Statistics

        output = check_output_path(args.output, args.inputs, args.force)
        merged = Statistics.load(args.inputs[0])
        for path in args.inputs[1:]:
            merged.merge(Statistics.load(path))
        merged.save(output)
        print(f"merged {len(args.inputs)} file(s), {merged.meta.get('samples', 0)} samples; wrote {output}")
        return 0


class Validate:
    name = "validate"
    help = "compare a compressed model with its original on the same data; exit 1 when a tolerance fails"

    @staticmethod
    def add_arguments(p):
        p.add_argument("original", help="the original ONNX model")
        p.add_argument("compressed", help="the compressed ONNX model")
        p.add_argument("--data", required=True, help=".npz (keys = input names, optional 'labels') or a folder")
        p.add_argument("--batch-size", type=int, default=32, help="samples per run (default 32)")
        _tolerance_arguments(p)
        p.add_argument("--json", metavar="FILE", help="write the metrics as JSON ('-' for stdout)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.pipeline.compress import validate

        validation = validate(args.original, args.compressed, args.data, batch_size=args.batch_size,
                              progress=not args.quiet)
        code = _report_validation(validation, args, _out(args))
        if args.json:
            _write_json(validation.to_dict(), args.json)
        return code


class Profile:
    name = "profile"
    help = "ONNX Runtime latency, memory, size, FLOPs and per-op time; --compare for a side-by-side table"

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("--compare", metavar="OTHER", help="a second model (e.g. the compressed one) to compare")
        p.add_argument("--data", help=".npz whose first batch is the input (else --shape and synthetic inputs)")
        p.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1",
                       help="input sizes for synthetic inputs; repeatable")
        p.add_argument("--batch-size", type=int, default=32, help="batch taken from --data (default 32)")
        p.add_argument("--runs", type=int, default=100, help="timed runs (default 100)")
        p.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
        p.add_argument("--threads", type=int, help="intra-op threads (default: ONNX Runtime's choice)")
        p.add_argument("--providers", default="CPUExecutionProvider",
                       help="comma-separated execution providers (e.g. CUDAExecutionProvider,CPUExecutionProvider)")
        p.add_argument("--save-test-data", metavar="DIR",
                       help="write ONNX Runtime's test_data_set_0 layout (inputs and the original's outputs)")
        p.add_argument("--json", metavar="FILE", help="write the numbers as JSON ('-' for stdout)")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.io.data import open_data
        from onnx_fwlr.io.model import load_model
        from onnx_fwlr.evaluate.profiling import compare_profiles, format_comparison, format_profile, profile_model, save_test_data
        from onnx_fwlr.evaluate.profiling import synthetic_feed

        structure = load_model(args.model)
        if args.data:
            feed, _ = next(iter(open_data(args.data, structure, batch_size=args.batch_size)))
        else:
            feed = synthetic_feed(structure, _shapes(args))
        providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
        options = dict(runs=args.runs, warmup=args.warmup, threads=args.threads, providers=providers)
        out = _out(args)
        first = profile_model(args.model, feed, **options)
        data = {"model": first}
        if args.compare:
            second = profile_model(args.compare, feed, **options)
            data.update(compare=second, ratios=compare_profiles(first, second))
            out(format_comparison(first, second))
        else:
            out(format_profile(first))
        if args.save_test_data:
            folder = save_test_data(args.model, feed, args.save_test_data)
            out(f"wrote ONNX Runtime test data to {folder}")
        if args.json:
            _write_json(data, args.json)
        return 0


class Sweep:
    name = "sweep"
    help = "evaluate many budgets and methods from one calibration: table, JSON and PNG plots"

    @staticmethod
    def add_arguments(p):
        p.add_argument("model", help="ONNX model file")
        p.add_argument("--calib", metavar="DATA", help="calibration data (needed by every method but svd)")
        p.add_argument("--val", metavar="DATA", required=True, help="validation data the budgets are judged on")
        p.add_argument("--ratios", default="0.9,0.7,0.5,0.3", help="comma-separated parameter ratios")
        p.add_argument("--methods", default="svd,whiten", help="comma-separated methods")
        p.add_argument("--allocations", default="uniform", help="comma-separated: uniform, global")
        p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for sweep.json and the plots")
        p.add_argument("--batch-size", type=int, default=32, help="samples per run (default 32)")
        p.add_argument("--mask-input", metavar="NAME", help="input whose zeros mark padding")
        p.add_argument("--latency", action="store_true", help="also measure ONNX Runtime latency of each model")
        p.add_argument("--save-models", action="store_true", help="keep every compressed model in DIR")
        p.add_argument("--workers", type=int, default=1, help="processes for the per-site decompositions (default 1)")
        p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
        p.add_argument("--json", metavar="FILE", help="also write the results as JSON here ('-' for stdout)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.evaluate.sweep import sweep, write_outputs

        try:
            ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
        except ValueError:
            raise FwlrError(f"--ratios '{args.ratios}' is not a comma-separated list of numbers.") from None
        split = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
        result = sweep(args.model, args.calib, args.val, ratios=ratios, methods=split(args.methods),
                       allocations=split(args.allocations), out_dir=args.output, batch_size=args.batch_size,
                       mask_input=args.mask_input, latency=args.latency, save_models=args.save_models,
                       workers=args.workers, progress=not args.quiet)
        out = _out(args)
        out(result.format())
        try:
            written = write_outputs(result, args.output, plots=not args.no_plots)
        except FwlrError as exc:  # no matplotlib: the table and JSON still count
            written = write_outputs(result, args.output, plots=False)
            out(f"note: {exc}")
        out("wrote " + ", ".join(written))
        if args.json:
            _write_json(result.to_dict(), args.json)
        return 0


class Refine:
    name = "refine"
    help = "fine-tune the factors of a compressed model by distillation against the original (no training framework)"

    @staticmethod
    def add_arguments(p):
        from onnx_fwlr.refine.loop import LOSSES, SCHEDULES

        p.add_argument("original", help="the original ONNX model (the teacher)")
        p.add_argument("compressed", help="the compressed ONNX model whose factors are trained")
        p.add_argument("-o", "--output", required=True, help="path of the refined model")
        p.add_argument("--calib", metavar="DATA", required=True,
                       help="training data: .npz (keys = input names, optional 'labels') or a folder of .npz")
        p.add_argument("--val", metavar="DATA", help="validation data (default: 10%% of --calib held back)")
        p.add_argument("--steps", type=int, default=200, help="Adam steps at most (default 200)")
        p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate (default 3e-5)")
        p.add_argument("--batch-size", type=int, default=32, help="samples per step (default 32)")
        p.add_argument("--loss", choices=list(LOSSES),
                       help="distillation loss: mse (hidden states, embeddings) or kl (logits); default by output kind")
        p.add_argument("--output-name", dest="output_name", metavar="NAME",
                       help="model output the loss is on (default: first float output)")
        p.add_argument("--label-weight", type=float, default=0.0,
                       help="weight of the cross-entropy with the data's labels (default 0)")
        p.add_argument("--eval-every", type=int, default=10, help="steps between validations (default 10)")
        p.add_argument("--patience", type=int, default=5,
                       help="validations without improvement before stopping (default 5)")
        p.add_argument("--schedule", choices=list(SCHEDULES), default="cosine", help="learning-rate decay")
        p.add_argument("--seed", type=int, default=0, help="seed of the batch order and held-back split")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
        p.add_argument("--plot", metavar="PNG", help="write the loss curve as a PNG (needs matplotlib)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.io.model import check_output_path, save_model
        from onnx_fwlr.refine.loop import refine

        output = check_output_path(args.output, [args.original, args.compressed], args.force)
        model, report = refine(args.original, args.compressed, args.calib, validation=args.val, steps=args.steps,
                               lr=args.lr, batch_size=args.batch_size, loss=args.loss, output=args.output_name,
                               label_weight=args.label_weight, eval_every=args.eval_every, patience=args.patience,
                               schedule=args.schedule, seed=args.seed, progress=not args.quiet)
        save_model(model, output)
        out = _out(args)
        out(report.format())
        out(f"wrote {output}")
        _refine_plot(report, args.plot, out)
        if args.json:
            _write_json(report.to_dict(), args.json)
        return 0


def _refine_plot(report, path, out) -> None:
    if not path:
        return
    try:
        report.plot(path)
        out(f"wrote {path}")
    except FwlrError as exc:  # no matplotlib: the model and the table still count
        out(f"note: {exc}")


COMMANDS = [Inspect, Calibrate, MergeStats, Compress, Validate, Profile, Sweep, Refine]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-fwlr", description="Importance-weighted low-rank compression of ONNX models."
    )
    parser.add_argument("--version", action="version", version=f"onnx-fwlr {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(handler=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except FwlrError as exc:
        print(f"onnx-fwlr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("onnx-fwlr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and closed early: not an error of ours
        sys.stderr.close()
        return 0

"""What the commands share: option groups, value parsers, JSON and table output."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from onnx_fwlr.errors import FwlrError

# Library parameter names (as FwlrError messages write them, in backticks) and the flags that set them. A command
# whose flag differs for the same parameter says so in its own `flags` (e.g. refine's --output-name).
FLAGS = {
    "accuracy_level": "--accuracy-level", "allocation": "--allocation", "baselines": "--baselines",
    "batch_axes": "--batch-axis", "batch_size": "--batch-size",
    "block_size": "--block-size", "calibration": "--calib", "common_prefix": "--common-prefix", "dope": "--dope",
    "dope_dropout": "--dope-dropout", "dope_share": "--dope-share", "embeddings": "--embeddings",
    "exclude": "--exclude", "executor": "--executor", "factor_dtype": "--factor-dtype",
    "latency_cache": "--latency-cache", "latency_threads": "--latency-threads",
    "fisher": "--fisher", "force": "--force", "forms": "--forms", "include": "--include",
    "int8": "--int8", "keep_attention": "--keep-attention", "kron_shape": "--kron-shape",
    "label_weight": "--label-weight", "loss": "--loss", "lr": "--lr", "mask_input": "--mask-input",
    "max_accuracy_drop": "--max-accuracy-drop", "max_error": "--max-error", "max_kl": "--max-kl",
    "max_perplexity_ratio": "--max-perplexity-ratio", "max_rel_error": "--max-rel-error", "method": "--method",
    "merge_corrections": "--merge-corrections", "methods": "--methods", "min_cosine": "--min-cosine",
    "min_top1_agreement": "--min-top1-agreement",
    "output": "--fisher-output", "outputs": "--outputs", "quantize": "--quantize", "rank": "--rank",
    "rank_multiple": "--rank-multiple", "ranks": "--rank NAME=N", "ratio": "--ratio", "ratios": "--ratios",
    "ray_address": "--ray-address", "ray_shared_dir": "--ray-shared-dir", "shards": "--calib-shards",
    "refine_lr": "--refine-lr", "refine_steps": "--refine", "reselect": "--reselect", "samples": "--fisher-samples",
    "seed": "--seed", "sequential": "--sequential", "shapes": "--shape", "shard": "--shard", "sizes": "--sizes",
    "stats": "--stats", "stats_memory": "--stats-memory", "steps": "--steps", "svd": "--svd",
    "target_latency": "--target-latency", "target_size": "--target-size", "validation": "--val",
    "workers": "--workers",
}


def in_flag_terms(message: str, overrides: dict | None = None, verbatim=()) -> str:
    """A library message with each `parameter` written as the flag that sets it. Text the user supplied is
    left as it is: the `verbatim` strings (command-line values) and names the message quotes ('...')."""
    flags = FLAGS | (overrides or {})
    kept = [re.escape(text) for text in sorted(verbatim, key=len, reverse=True) if "`" in text]
    parts = re.split("(" + "|".join(kept + [r"(?<!\w)'[^'\n]*'(?!\w)"]) + ")", message)
    return "".join(part if i % 2 else re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flags.get(m.group(1), m.group(0)), part)
                   for i, part in enumerate(parts))


def user_texts(argv: list[str]) -> list[str]:
    """The values the user typed (whole arguments, and the part after '=' of --flag=value)."""
    return [text for arg in argv for text in (arg, arg.partition("=")[2] if arg.startswith("--") else "") if text]


def write_json(data: dict, target: str) -> None:
    text = json.dumps(data, indent=2, sort_keys=True, default=json_default)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        Path(target).write_text(text + "\n")


def read_json(path: str, flag: str) -> dict:
    """A JSON object from a file, or one sentence saying why not."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FwlrError(f"{flag} {path}: file not found; check the path.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FwlrError(f"{flag} {path}: is not a readable JSON file ({exc}).") from None
    if not isinstance(values, dict):
        raise FwlrError(f"{flag} {path}: holds no JSON object; write it with --save-config.")
    return values


def json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def printer(args) -> "callable":
    """Where tables go: stdout, or stderr when stdout carries JSON; report notes and warnings name parameters
    in library terms, so they are shown as this command's flags."""
    stream = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout
    flags, verbatim = getattr(args, "flags", {}), getattr(args, "verbatim", ())
    return lambda text="": print(in_flag_terms(str(text), flags, verbatim), file=stream)


BALANCED = "balanced"  # --kron-shape: the most balanced shapes by error alone, no timing


def parse_kron_shape(text: str | None):
    """`--kron-shape 8x8,16x16` -> (m1, m2, n1, n2); `--kron-shape balanced` -> "balanced" (by error alone)."""
    if text is None:
        return None
    if text.strip() == BALANCED:
        return BALANCED
    match = re.fullmatch(r"\s*(\d+)x(\d+)\s*,\s*(\d+)x(\d+)\s*", text)
    if not match or 0 in (shape := tuple(int(v) for v in match.groups())):
        raise FwlrError(f"--kron-shape '{text}' is not m1xm2,n1xn2 with positive integers (e.g. 8x8,16x16) or "
                        "'balanced'.")
    return shape


def parse_ranks(items: list[str]) -> tuple[int | None, dict]:
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


SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | None, flag: str = "--target-size") -> int | None:
    if text is None:
        return None
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise FwlrError(f"{flag} '{text}' is not a size; write e.g. 150000, 500KB, 20MB or 1.5GiB.")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def calibration_arguments(p):
    p.add_argument("--calib", metavar="DATA",
                   help="calibration data: .npz (keys = input names), a folder of .npz, or 'random' (smoke test)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per ONNX Runtime run (default 32)")
    p.add_argument("--mask-input", metavar="NAME", help="input whose zeros mark padding (default: attention_mask)")
    p.add_argument("--shape", action="append", default=[], metavar="NAME:D0,D1",
                   help="sizes of symbolic input dimensions (for random data, profiling, and the input size "
                        "--target-latency / --rank-multiple auto time the model at); repeatable")
    p.add_argument("--loss", choices=["ce", "mc", "gaussian", "lm"],
                   help="Fisher loss: ce (needs a 'labels' key), mc (sampled from the model), gaussian (embeddings), "
                        "lm (next-token cross-entropy of a language model: input_ids shifted by one, padding masked); "
                        "default: ce with labels, lm for 'logits' [batch, seq, vocab] over input_ids, else by the "
                        "output's kind")
    p.add_argument("--fisher-output", metavar="NAME", help="output the loss is defined on (default: first float one)")
    p.add_argument("--fisher-samples", type=int, default=1, help="loss seeds per batch for mc/gaussian (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the Fisher sampling (default 0)")


def decomposition_arguments(p):
    p.add_argument("--svd", default="auto", choices=["auto", "exact", "randomized"],
                   help="auto (default): randomised SVD where the rank is known and at most min(K,N)/4 with "
                        "min(K,N) >= 1024, exact otherwise; see docs/large_models.md")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="decompose sites in N processes (same output bytes as 1; default 1)")


def distributed_arguments(p):
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where calibration shards and decompositions run: local (default; --workers processes) or "
                        "ray (a Ray cluster; pip install \"onnx_fwlr[ray]\"); see docs/distributed.md")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster's HOST:PORT, or auto (the one `ray start` began on this machine); default: "
                        "$RAY_ADDRESS, else a fresh cluster on this machine for this run")
    p.add_argument("--calib-shards", type=int, metavar="N",
                   help="measure calibration in N interleaved shards, N Ray tasks with --executor ray, added up in "
                        "shard order (the same bytes on either executor for the same N; default 1)")
    p.add_argument("--ray-shared-dir", metavar="DIR",
                   help="a folder every Ray node mounts at the same path: the one recorded Fisher pass that the group "
                        "tasks fold is written there (default: this machine's temporary folder, and the group tasks "
                        "run on this machine's node)")


def executor(args):
    """The Executor the distributed options ask for (None: today's one local pass)."""
    if args.executor == "local" and args.ray_address is None and args.calib_shards is None \
            and args.ray_shared_dir is None:
        return None
    from onnx_fwlr.pipeline.distributed import Executor

    return Executor(args.executor, args.ray_address, 1 if args.calib_shards is None else args.calib_shards,
                    args.ray_shared_dir)


def fisher_options(args) -> dict:
    return {"loss": args.loss, "output": args.fisher_output, "samples": args.fisher_samples, "seed": args.seed}


def tolerance_arguments(p):
    p.add_argument("--min-cosine", type=float, help="fail when an output's mean cosine falls below this")
    p.add_argument("--max-rel-error", type=float, help="fail when an output's relative L2 error exceeds this")
    p.add_argument("--max-accuracy-drop", type=float, metavar="POINTS",
                   help="fail when label accuracy drops by more than this many percentage points (0-100; default "
                        "with labels and no other tolerance: 1)")


def comparison_arguments(p):
    p.add_argument("--outputs", metavar="NAME[,NAME]",
                   help="outputs to compare (default: every floating-point output both models share)")
    p.add_argument("--common-prefix", action="store_true",
                   help="compare outputs whose length differs between the models (e.g. audio) over the part both have")
    p.add_argument("--batch-axis", action="append", default=[], metavar="OUTPUT:AXIS",
                   help="the sample axis of an output when it is not 0 (e.g. states:1 for [layers, batch, H]; "
                        "found from the model's symbolic dimensions when they say it); repeatable")


def parse_batch_axes(items: list[str]) -> dict[str, int]:
    axes = {}
    for item in items:
        name, _, axis = item.rpartition(":")
        try:
            axes[name] = int(axis)
        except ValueError:
            name = ""
        if not name:
            raise FwlrError(f"--batch-axis '{item}' is not OUTPUT:AXIS; give an output name and an axis, e.g. "
                            "states:1.")
    return axes


def parse_outputs(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise FwlrError(f"--outputs '{text}' names no output; give comma-separated output names.")
    return names


def language_arguments(p):
    p.add_argument("--metric", choices=["auto", "outputs", "perplexity"], default="auto",
                   help="perplexity: a language model's next-token perplexity of both models, their ratio, top-1 "
                        "agreement and KL(original || compressed) on token data (input_ids, attention_mask); outputs: "
                        "per-output errors; auto (default): perplexity for a model reading input_ids with a 'logits' "
                        "[batch, seq, vocab] output (--logits names another) unless an output tolerance (--min-cosine, "
                        "--max-rel-error, --max-accuracy-drop, --outputs) is given, else outputs")
    p.add_argument("--logits", default="logits", metavar="NAME", help="logits output for --metric perplexity")
    p.add_argument("--max-perplexity-ratio", type=float, help="fail when compressed/original perplexity exceeds this")
    p.add_argument("--max-kl", type=float, help="fail when the mean next-token KL divergence (nats) exceeds this")
    p.add_argument("--min-top1-agreement", type=float, help="fail when next-token top-1 agreement falls below this")


def resolve_metric(args, model) -> str:
    """--metric auto made concrete for ``model`` (the original), written back to ``args.metric``."""
    if args.metric == "auto":
        from onnx_fwlr.evaluate.language import is_language_model

        output_tolerance = any(getattr(args, name, None) is not None for name in
                               ("min_cosine", "max_rel_error", "max_accuracy_drop", "outputs"))
        args.metric = "perplexity" if not output_tolerance and is_language_model(model, args.logits) else "outputs"
    return args.metric


def report_language(metrics, args, out) -> int:
    from onnx_fwlr.evaluate.language import format_language

    failures = metrics.check(max_perplexity_ratio=args.max_perplexity_ratio, max_kl=args.max_kl,
                             min_top1_agreement=args.min_top1_agreement)
    judged = any(v is not None for v in (args.max_perplexity_ratio, args.max_kl, args.min_top1_agreement))
    out(format_language(metrics, failures, judged))
    return 1 if failures else 0


def shapes(args):
    from onnx_fwlr.cost.profiling import parse_shape_args

    return parse_shape_args(args.shape) if args.shape else None


def report_validation(validation, args, out) -> int:
    """The comparison table and its verdict (evaluate.tolerance.judge: the default tolerance, or "no tolerance
    given" rather than a PASS that judged nothing); 1 when a tolerance fails."""
    from onnx_fwlr.evaluate.tolerance import judge
    from onnx_fwlr.evaluate.validation import format_validation

    verdict = judge(validation, min_cosine=args.min_cosine, max_rel_error=args.max_rel_error,
                    max_accuracy_drop=args.max_accuracy_drop)
    out(format_validation(validation, verdict.failures, verdict.line()))
    return 0 if verdict.passed else 1


def check_before_work(args) -> None:
    """Every path and tolerance of the command checked before any work, so a typo costs nothing and leaves
    nothing behind: the command's `outputs` and `inputs` (arg name -> (label, kind), io.model.check_paths_apart)
    never alias each other, existing outputs need --force, output folders must take a file."""
    outputs, inputs = getattr(args, "path_outputs", {}), getattr(args, "path_inputs", {})
    if outputs:
        from onnx_fwlr.io.model import check_paths_apart

        check_paths_apart([(label, getattr(args, name, None), kind) for name, (label, kind) in outputs.items()],
                          [(label, getattr(args, name, None), kind) for name, (label, kind) in inputs.items()],
                          force=bool(getattr(args, "force", False)))
    if hasattr(args, "max_accuracy_drop"):
        from onnx_fwlr.evaluate.tolerance import check_tolerances

        check_tolerances(args.min_cosine, args.max_rel_error, args.max_accuracy_drop)
    if getattr(args, "metric", None) == "perplexity":  # refused now, not after the model is written
        from onnx_fwlr.evaluate.language import check_language_model

        model = getattr(args, "model", None) or getattr(args, "original", None)
        if model is not None:  # compress --config without a model: checked once the config names it
            check_language_model(model, args.logits)


# What commands read and write, for check_before_work: arg name -> (label in messages, kind).
MODEL_IN = {"model": ("the input model", "model")}
JSON_OUT = {"json": ("--json", "file")}
CALIB_IN = {"calib": ("the --calib data", "data")}
VAL_IN = {"val": ("the --val data", "data")}


def parse_shard(text):
    if text is None:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise FwlrError(f"--shard '{text}' is not of the form I/N (e.g. 0/4).") from None
    return index, count


def refine_plot(report, path, out) -> None:
    if not path:
        return
    try:
        report.plot(path)
        out(f"wrote {path}")
    except FwlrError as exc:  # no matplotlib: the model and the table still count
        out(f"note: {exc}")


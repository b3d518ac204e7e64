"""`onnx-fwlr compress`."""

from __future__ import annotations

import argparse

from onnx_fwlr.cli.options import (
    CALIB_IN,
    JSON_OUT,
    MODEL_IN,
    VAL_IN,
    calibration_arguments,
    comparison_arguments,
    decomposition_arguments,
    distributed_arguments,
    executor,
    fisher_options,
    language_arguments,
    parse_batch_axes,
    parse_kron_shape,
    parse_outputs,
    parse_ranks,
    parse_size,
    printer,
    read_json,
    report_language,
    report_validation,
    resolve_metric,
    shapes,
    tolerance_arguments,
    write_json,
)


def _rank_multiple(text: str):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is neither a whole number nor 'auto'") from None


class Compress:
    name = "compress"
    help = "factorise the model's constant MatMul/Gemm weights and write the compressed model"
    inputs = MODEL_IN | CALIB_IN | VAL_IN | {"stats": ("the --stats file", "file"), "config": ("--config", "file")}
    outputs = {"output": ("-o", "model"), "save_config": ("--save-config", "file")} | JSON_OUT

    @staticmethod
    # Long: one line per flag of the command, grouped as --help shows them.
    def add_arguments(p):
        from onnx_fwlr.cli.choices import ALLOCATIONS, METHODS

        p.add_argument("model", nargs="?", help="ONNX model file (with --config: the config's model when omitted)")
        p.add_argument("-o", "--output", required=True, help="path of the compressed model")
        p.add_argument("--ratio", type=float,
                       help="parameters kept in the factorised weights (0 < R <= 1); for an already-quantized input "
                            "(int8 MatMulInteger, QDQ, Cast+Mul, MatMulNBits), the share of the input file's bytes")
        p.add_argument("--rank", action="append", default=[], metavar="N|NAME=N",
                       help="one fixed rank for every site (N), or for one site (NAME=N, repeatable)")
        p.add_argument("--target-size", metavar="BYTES",
                       help="size of the output model, e.g. 20MB or 150000 (bytes as written: a quantized input's "
                            "factors are quantized again)")
        p.add_argument("--max-error", type=float,
                       help="largest relative L2 output error on --val data; the smallest ratio meeting it is found")
        p.add_argument("--target-latency", type=float, metavar="F",
                       help="latency to reach, as a fraction of the original's measured on this machine (e.g. 0.6); "
                            "ranks go where the loss per millisecond saved is smallest (needs --method fwsvd/kfac); "
                            "with --quantize, each site's scheme and correction rank, timed as written (int4 "
                            "MatMulNBits, dynamic int8, ...); an int8 input is timed as int8, and when no site's "
                            "factored form is faster nothing is written (exit 2)")
        p.add_argument("--rank-multiple", nargs="?", const="auto", type=_rank_multiple, metavar="N|auto",
                       help="allocate ranks in steps of N on sites wide enough for it, within the budget (default "
                            "16, which CPU kernels run at their FLOP share; 1: any rank); 'auto' (or no value) times "
                            "the kernels here, rounds each rank to the fastest nearby one and keeps dense any site "
                            "whose factored form is slower (int8 pairs against int8 ops for an int8 input); none "
                            "faster: nothing written (exit 2)")
        p.add_argument("--no-latency-check", action="store_true",
                       help="an already-quantized input's output is timed against the input at the data's row "
                            "count (one --calib batch or --shape; 20 alternating pairs) and the report says when it "
                            "is slower: skip that measurement")
        p.add_argument("--latency-threads", type=int, metavar="N",
                       help="intra-op threads the latency model times with (default: ONNX Runtime's choice)")
        p.add_argument("--latency-cache", metavar="DIR",
                       help="folder of the measured latency tables (default ~/.cache/onnx_fwlr/latency)")
        p.add_argument("--keep-attention", action="store_true",
                       help="keep Q/K/V/output projections dense (factorising them breaks ORT's Attention fusion)")
        p.add_argument("--method", choices=list(METHODS),
                       help="weighting (default: the best the data allows: kfac with --calib or gradient --stats, "
                            "whiten with activation --stats, svd without data; docs/defaults.md)")
        p.add_argument("--methods", metavar="M,kron",
                       help="per site, the structure with the lowest weighted error at the same budget "
                            "(e.g. whiten,kron)")
        p.add_argument("--dope", type=float, default=0.0, metavar="FRACTION",
                       help="keep this fraction of each weight's entries as a sparse correction: W ~ structure + D")
        p.add_argument("--dope-share", type=float, metavar="S",
                       help="instead of --dope: spend this share of each site's stored numbers on doping entries "
                            "(3 numbers each), e.g. 0.3")
        p.add_argument("--kron-shape", metavar="m1xm2,n1xn2",
                       help="force Kronecker factor shapes (K=m1*m2, N=n1*n2), or 'balanced': the most balanced shapes "
                            "by error alone, no timing (default: the lowest-error shape measured faster than the dense "
                            "weight at the model's rows; docs/doped.md)")
        p.add_argument("--forms", choices=["default", "measured"], default="default",
                       help="ONNX form of structured sites: by multiply-adds (default, deterministic), or the fastest "
                            "timed here at the model's row count, keeping dense a site whose structure is slower than "
                            "its dense weight (needs --calib DATA or --shape; --latency-threads applies)")
        p.add_argument("--allocation", choices=list(ALLOCATIONS),
                       help="rank allocation (default: global with gradient statistics (fwsvd, kfac), else uniform)")
        p.add_argument("--include", help="regex: only sites whose node or weight name matches")
        p.add_argument("--exclude", help="regex: skip sites whose node or weight name matches")
        p.add_argument("--force", action="store_true", help="overwrite an existing output")
        p.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data beside the model")
        p.add_argument("--also", action="append", default=[], metavar="MODEL=OUT",
                       help="apply the same factors to another export of the same checkpoint (a decoder's with-past "
                            "or merged model, e.g. Optimum's decoder_with_past_model.onnx / decoder_model_merged.onnx; "
                            "weights matched by name and value) and write it to OUT, checking greedy decoding through "
                            "its KV cache against the compressed model on --val/--calib token ids (repeatable; with "
                            "--quantize: the same quantized weights and corrections, with-past exports only)")
        p.add_argument("--write-unchanged", action="store_true",
                       help="write the output even when no site can be factorised")
        calibration_arguments(p)
        p.add_argument("--stats", metavar="FILE", help="statistics from `onnx-fwlr calibrate` instead of --calib")
        p.add_argument("--stats-memory", metavar="SIZE",
                       help="most memory the Grams may hold at once (e.g. 4GB; default a third of RAM, or half the "
                            "weights' bytes for gradient statistics of a model above 256 MiB); beyond it asvd/whiten "
                            "calibrate in several passes, one group of sites each, and kfac/fwsvd set one pass "
                            "aside on disk and fold it one group at a time")
        p.add_argument("--sequential", action="store_true",
                       help="refit each site, depth by depth, to its input in the compressed model "
                            "(reads --calib once per depth)")
        p.add_argument("--no-bias-correction", action="store_true",
                       help="do not fold the mean output shift into a bias (on by default for asvd/whiten/kfac)")
        p.add_argument("--val", metavar="DATA", help="validate against the original on this data afterwards")
        p.add_argument("--no-ort-comparison", action="store_true",
                       help="with --val: skip measuring ONNX Runtime's int8 per-channel and int4 block-32 "
                            "quantizations of the original (the report's closing sentence when one is better)")
        p.add_argument("--refine", type=int, metavar="STEPS",
                       help="then distil the factors against the original for up to STEPS Adam steps on --calib "
                            "(early stopping on 10%% of --calib held back; --val stays unseen)")
        p.add_argument("--refine-lr", type=float, default=3e-5, help="peak learning rate of --refine (default 3e-5)")
        p.add_argument("--dope-dropout", type=float, metavar="P",
                       help="--refine of doped structured sites: drop each site's doping term per step with this "
                            "probability (co-matrix dropout; default 0: off, docs/doped.md)")
        tolerance_arguments(p)
        comparison_arguments(p)
        language_arguments(p)
        p.add_argument("--json", metavar="FILE", help="write the report as JSON ('-' for stdout)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--save-config", metavar="FILE",
                       help="write the run's options (every group, defaults included) as JSON, to replay with --config")
        p.add_argument("--config", metavar="FILE",
                       help="run the options a --save-config file holds (the model too, unless given); option flags "
                            "other than output, report and tolerance flags are not read then")
        decomposition_arguments(p)
        distributed_arguments(p)
        q = p.add_argument_group("quantization with a low-rank correction (docs/quantization.md)")
        q.add_argument("--quantize", choices=["int4", "int8", "auto"],
                       help="store each weight with ONNX Runtime's quantizer plus a low-rank correction of its error: "
                            "int4 (MatMulNBits), int8 (quantize_dynamic per channel) or auto (per site, under "
                            "--target-size or --ratio, which then counts bytes of the input model, or under "
                            "--target-latency, which times every scheme here and picks the fast ones)")
        q.add_argument("--block-size", type=int, default=32, help="block of K per int4 scale (default 32)")
        q.add_argument("--embeddings", default="auto", choices=["auto", "keep", "int8", "int4"],
                       help="embedding tables: chosen by the budget (auto, with --calib), kept, or forced")
        q.add_argument("--int8", default="dynamic", choices=["dynamic", "block"],
                       help="int8 as quantize_dynamic per channel (fast on CPUs) or weight-only MatMulNBits blocks")
        q.add_argument("--factor-dtype", default="float16", choices=["float16", "float32"],
                       help="storage of the correction factors (float16: half the bytes, cast once at load)")
        q.add_argument("--accuracy-level", choices=["0", "4", "auto"],
                       help="MatMulNBits compute: 0 float, 4 int8 activations (where a check on the calibration "
                            "activations passes), auto per site by what measures faster here at the timing rows "
                            "(default: auto with --target-latency, else 0)")
        q.add_argument("--merge-corrections", action="store_true",
                       help="corrections of sites reading the same tensor (q/k/v) share one first-factor MatMul")

    @staticmethod
    def run(args) -> int:
        from onnx_fwlr.io.model import check_output_path, file_size, save_model
        from onnx_fwlr.pipeline.run import run

        config = run_config(args)
        output = check_output_path(args.output, [config.model], args.force)
        also = parse_also(args.also, config, args, output)
        if args.save_config:
            write_json(config.to_dict(), args.save_config)
        model, report = run(config)
        out = printer(args)
        report.file_size_before = file_size(config.model)
        changed = bool(report.sites) if config.quantize.mode else report.factorised > 0
        written = changed or args.write_unchanged
        if written:
            save_model(model, output, external_data=True if args.external_data else None)
            report.file_size_after = file_size(output)
        out(report.format())
        if report.refined is not None:
            out(report.refined.format())
        if written:
            out(f"wrote {output.resolve()}")
        else:
            out(f"nothing to do: no weight was factorised, so {output} was not written (--write-unchanged writes "
                "the model unchanged).")
        code = 0
        if also and written:
            summary_also = write_also(also, config, args, model, report, output, out)
            code = 1 if any(not item["greedy_matches"] for item in summary_also if "greedy_matches" in item) else 0
        if report.checked is not None and written:
            code = max(code, report_validation(report.checked, args, out))
        summary = report.to_dict()
        points = None
        if _latency_table_wanted(config, report, args) and written:
            points = _latency_points(config, report, model, out)
            summary["ort_points"] = points
        if report.checked is not None and written and not args.no_ort_comparison and not report.checked.unjudged:
            summary["ort_baselines"] = _ort_comparison(config, report, output, out, points)
        if args.val and args.metric == "perplexity" and written:
            from onnx_fwlr.evaluate.language import validate_language

            del model  # written and used: the ONNX Runtime sessions of the check get its memory
            release_run_memory(report)
            metrics = validate_language(config.model, output, args.val, batch_size=config.data.batch_size,
                                        logits=args.logits, progress=not args.quiet)  # the file written: ORT
            # reads it as any user's session would, with no serialised copy of the model in memory
            code = max(code, report_language(metrics, args, out))
            summary["language"] = metrics.to_dict()
        if also and written:
            summary["also"] = summary_also
        if args.json:
            write_json(summary, args.json)
        return code


def release_run_memory(report) -> None:
    """Before the check of a language model, what the run no longer holds for anything goes: the plans' store
    behind `report.rewritten` (--also has used it; a temporary folder of plans on a large model), garbage, and the
    heap pages glibc keeps after them, so the check's ONNX Runtime sessions start from the smallest footprint."""
    import gc

    from onnx_fwlr.io import runtime

    report.rewritten = None
    gc.collect()
    runtime.release_free_memory()


def parse_also(items, config, args, output):
    """--also MODEL=OUT pairs, checked before any work: MODEL exists, OUT is a new path apart from every input and
    output."""
    from pathlib import Path

    from onnx_fwlr.errors import FwlrError
    from onnx_fwlr.io.model import check_output_path

    if items and config.quantize.mode:
        _check_also_with_quantize(config.model)
    pairs, outputs = [], [output.resolve()]
    for item in items:
        source, sep, target = item.partition("=")
        if not sep or not source or not target:
            raise FwlrError(f"--also '{item}' is not MODEL=OUT (e.g. decoder_with_past_model.onnx=small_past.onnx).")
        if not Path(source).is_file():
            raise FwlrError(f"--also: {source} is not a model file; check the path.")
        target = check_output_path(target, [config.model, source, *(s for s, _ in pairs)], args.force)
        if target.resolve() in outputs:
            raise FwlrError(f"--also writes {target} twice; give every output its own path.")
        if config.quantize.mode:
            _check_also_target_for_quantize(source)
        outputs.append(target.resolve())
        pairs.append((Path(source), target))
    return pairs


def _check_also_target_for_quantize(source):
    """The quantized rewrite handles weights read in the main graph (a with-past export); a merged export reads
    them inside If branches, which it does not rewrite yet."""
    import onnx

    from onnx_fwlr.errors import FwlrError
    from onnx_fwlr.io.onnx_utils import walk_graphs

    if len(walk_graphs(onnx.load(str(source), load_external_data=False))) > 1:
        raise FwlrError(f"--also {source}: with --quantize, exports whose weights are read inside subgraphs (a merged "
                        "decoder's If branches) are not rewritten yet; give the with-past export instead.")


def _check_also_with_quantize(model):
    """--quantize writes the other exports by the same rewrite of the same float weights; an input that is already
    quantized is requantized its own way, which --also does not repeat."""
    import onnx

    from onnx_fwlr.errors import FwlrError
    from onnx_fwlr.quant.dequantize import detect_quantized

    if detect_quantized(onnx.load(str(model), load_external_data=False)):
        raise FwlrError("--also with --quantize takes a float model; this one already holds quantized weights "
                        "(compress each export with the same flags instead).")


def write_also(pairs, config, args, model, report, output, out) -> list[dict]:
    """The other exports with the compressed model's factors (or, under --quantize, the same quantized weights and
    corrections), each checked by greedy decoding through its cache."""
    from onnx_fwlr.io.model import save_model
    from onnx_fwlr.pipeline.transplant import apply_same_factors, apply_same_quantization

    results = []
    prompt = _prompt_ids(args.val or config.data.calibration)
    rewritten = report.rewritten if config.quantize.mode else None
    what = "quantized weights" if rewritten is not None else "factors"
    for source, target in pairs:
        if rewritten is not None:
            other, replaced = apply_same_quantization(str(source), config.model, rewritten)
        else:
            other, replaced = apply_same_factors(str(source), config.model, model)
        save_model(other, target, external_data=True if args.external_data else None)
        line = f"wrote {target.resolve()} ({len(replaced)} weight(s) with the {what} of {output.name})"
        item = {"model": str(source), "output": str(target), "weights": replaced}
        if prompt is not None:
            check = _greedy(other, model, prompt)
            item |= {"greedy_matches": check.matches, "greedy_tokens": int(check.cached.shape[1] - prompt.shape[1]),
                     "max_logit_diff": check.max_logit_diff}
            verdict = "matches" if check.matches else "FAIL: differs from"
            line += (f"; greedy decoding through its KV cache {verdict} {output.name} "
                     f"({item['greedy_tokens']} tokens x {prompt.shape[0]} prompts)")
            if not check.matches and any(n.op_type == "MatMulInteger" for n in other.graph.node):
                line += (" (dynamic int8 rounds each run's activations with one scale over all its positions, so a "
                         "cached step, one position, rounds differently from the whole sequence)")
        out(line)
        results.append(item)
    return results


GREEDY_STEPS = 8


def _greedy(other, compressed, prompt):
    """Greedy tokens of ``other`` (cached) against ``compressed`` (no cache) on the same prompts."""
    from onnx_fwlr.evaluate.language import CACHE_FLAG, greedy_check

    merged = CACHE_FLAG in {i.name for i in other.graph.input}
    return greedy_check(other, prompt, GREEDY_STEPS, no_cache=None if merged else compressed)


def _prompt_ids(data):
    """Up to 2 prompts of 8 real tokens from a token .npz (None: no such data, no greedy check)."""
    import numpy as np

    if not data or not str(data).endswith(".npz"):
        return None
    with np.load(data) as arrays:
        if "input_ids" not in arrays.files:
            return None
        ids = arrays["input_ids"]
        mask = arrays["attention_mask"] if "attention_mask" in arrays.files else np.ones_like(ids)
    if ids.ndim != 2 or ids.shape[1] < 2:
        return None
    length = min(8, ids.shape[1])
    rows = [i for i in range(ids.shape[0]) if mask[i, :length].all()][:2]
    return ids[rows, :length].astype(np.int64) if rows else None


def _ort_comparison(config, report, output, out, points=None) -> list[dict]:
    """One closing sentence when a plain ONNX Runtime quantization of the original does better on --val data at
    no more bytes (workflows.frontier.ort_comparison); the measured baselines for the JSON report. `points`: the
    latency table's rows, whose baselines were judged on the same data already."""
    from onnx_fwlr.io.model import file_size
    from onnx_fwlr.workflows.frontier import ort_comparison

    outputs = list(config.compare.outputs) if config.compare.outputs is not None else None
    sentence, rows = ort_comparison(config.model, file_size(output), report.checked, config.data.validation,
                                    batch_size=config.data.batch_size, outputs=outputs,
                                    common_prefix=config.compare.common_prefix, quantized=bool(config.quantize.mode),
                                    judge=config.fisher.output, measured=points)
    if sentence:
        out(sentence)
    return rows


def _latency_table_wanted(config, report, args) -> bool:
    """`--quantize ... --target-latency` ends with ONNX Runtime's points beside ours (issue 26), unless
    --no-ort-comparison; a quantized input is not quantized again (as in the closing sentence)."""
    speed = report.budget.get("speed") or {}
    return (bool(config.quantize.mode) and config.budget.target_latency is not None and not args.no_ort_comparison
            and speed.get("measured_ratio") is not None and not report.input_quantization)


def _latency_points(config, report, model, out) -> list[dict]:
    """ONNX Runtime's points beside ours (workflows.frontier.compress_latency_points), printed as sweep --latency
    prints its table."""
    from onnx_fwlr.workflows.frontier import compress_latency_points

    table = compress_latency_points(config, report, model)
    out(table.format())
    return table.rows


def _accuracy_level(args):
    """--accuracy-level as the config holds it (None: compress_quantized's default)."""
    level = args.accuracy_level
    return None if level is None else level if level == "auto" else int(level)


def run_config(args):
    """The RunConfig the flags (or a --config file) ask for; the config checks itself."""
    from onnx_fwlr.errors import FwlrError
    from onnx_fwlr.pipeline import config

    if args.config:
        values = read_json(args.config, "--config")
        if args.model:
            values["model"] = args.model
        values["progress"] = not args.quiet  # an output flag, like -o and --json
        made = config.RunConfig.from_dict(values)
        if args.val:
            resolve_metric(args, made.model)
        if args.metric == "perplexity" and not args.model:  # cli.options.check_before_work had no model to check
            from onnx_fwlr.evaluate.language import check_language_model

            check_language_model(made.model, args.logits)
        return made
    if args.model is None:
        raise FwlrError("give the model to compress (or a --config file that names it).")
    if args.val:
        resolve_metric(args, args.model)  # --metric auto: perplexity for a language model, else outputs
    rank, ranks = parse_ranks(args.rank)
    validation = args.val if args.metric == "outputs" or args.max_error is not None else None
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) if args.methods else None
    outputs = parse_outputs(args.outputs)
    return config.RunConfig(
        model=args.model,
        data=config.DataOptions(calibration=args.calib, stats=args.stats, validation=validation,
                             batch_size=args.batch_size, mask_input=args.mask_input, shapes=shapes(args),
                             stats_memory=parse_size(args.stats_memory, "--stats-memory")),
        fisher=config.FisherOptions(**fisher_options(args)),
        sites=config.SiteOptions(include=args.include, exclude=args.exclude, keep_attention=args.keep_attention),
        budget=config.BudgetOptions(ratio=args.ratio, rank=rank, ranks=ranks, target_size=parse_size(args.target_size),
                                 max_error=args.max_error, target_latency=args.target_latency),
        method=config.MethodOptions(method=args.method, allocation=args.allocation,
                                 bias_correction=False if args.no_bias_correction else None,
                                 sequential=args.sequential, svd=args.svd, workers=args.workers,
                                 executor=executor(args)),
        structured=config.StructuredOptions(methods=methods, dope=args.dope, dope_share=args.dope_share,
                                         kron_shape=parse_kron_shape(args.kron_shape), forms=args.forms),
        quantize=config.QuantizeOptions(mode=args.quantize, block_size=args.block_size, embeddings=args.embeddings,
                                     int8=args.int8, factor_dtype=args.factor_dtype,
                                     accuracy_level=_accuracy_level(args), merge_corrections=args.merge_corrections),
        refine=config.RefineOptions(steps=args.refine, lr=args.refine_lr, dope_dropout=args.dope_dropout),
        speed=config.SpeedOptions(rank_multiple=args.rank_multiple, latency_threads=args.latency_threads,
                               latency_cache=args.latency_cache, latency_check=not args.no_latency_check),
        compare=config.CompareOptions(outputs=tuple(outputs) if outputs is not None else None,
                                   common_prefix=args.common_prefix,
                                   batch_axes=parse_batch_axes(args.batch_axis) or None),
        progress=not args.quiet)

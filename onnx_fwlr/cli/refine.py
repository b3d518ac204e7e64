"""`onnx-fwlr refine`."""

from __future__ import annotations

from onnx_fwlr.cli.options import CALIB_IN, JSON_OUT, VAL_IN, printer, refine_plot, write_json


class Refine:
    name = "refine"
    help = "fine-tune the factors of a compressed model by distillation against the original (no training framework)"
    # refine() calls the distilled output `output`, as compress calls the Fisher one
    flags = {"output": "--output-name"}
    inputs = {"original": ("the original model", "model"), "compressed": ("the compressed model", "model")} | \
        CALIB_IN | VAL_IN
    outputs = {"output": ("-o", "model"), "plot": ("--plot", "file")} | JSON_OUT

    @staticmethod
    def add_arguments(p):
        from onnx_fwlr.cli.choices import REFINE_LOSSES as LOSSES
        from onnx_fwlr.cli.choices import SCHEDULES

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
        p.add_argument("--dope-dropout", type=float, metavar="P",
                       help="doped structured sites: drop each site's doping term per step with this probability "
                            "(co-matrix dropout; default 0: off, docs/doped.md)")
        p.add_argument("--reselect", type=int, default=0, metavar="R",
                       help="doped structured sites: train in R+1 phases, re-selecting the doping support "
                            "(top-k of what the trained structure misses) between them (default 0)")
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
                               schedule=args.schedule, seed=args.seed, dope_dropout=args.dope_dropout,
                               reselect=args.reselect, progress=not args.quiet)
        save_model(model, output)
        out = printer(args)
        out(report.format())
        out(f"wrote {output}")
        refine_plot(report, args.plot, out)
        if args.json:
            write_json(report.to_dict(), args.json)
        return 0

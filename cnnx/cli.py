"""The `cnnx` command: ingest, synth, train, evaluate, predict, visualize, grid, bench.

Every subcommand takes --help; `--config FILE.toml` supplies defaults (a table per
subcommand, e.g. `[train]` with `epochs = 5`) and flags on the command line override them.
Errors people will hit print one line and exit with status 2; --traceback shows the rest.
Numbers are checked before anything starts (no cluster, no run folder).
"""
import argparse
import importlib.metadata
import json
import math
import sys
import tomllib

from cnnx.runs import UserError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DATA_HELP = "a Zarr store made by `cnnx ingest`/`cnnx synth`, or 'faces' or 'fashion-mnist'"


MODES_HELP = """\
modes (--mode):
  sync      each step splits the global batch into --shards equal parts, one
            task each; their gradients are summed in a fixed tree and applied
            once. Same --seed and --shards: the same weights bit for bit on
            any number of workers.
  downpour  asynchronous: each shard's gradient is applied as it arrives.
  dynsgd    downpour, each gradient scaled by 1/(staleness+1).
  adag      each task takes several local SGD steps; their change is applied
            scaled by 1/(staleness+1).
  easgd     each shard keeps its own weights, pulled towards the driver's
            every few local steps (elastic averaging).
"""

# Help for arguments declared without any (the formatter then also shows their default).
MISSING_HELP = {
    "size": "height and width in pixels every image is resized to",
}


# ----------------------------------------------------------------------------- parser

class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, when it has one worth showing."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if ("default" in text or not action.option_strings or default is None
                or default is False or default is argparse.SUPPRESS or default == ()):
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        shown = f"(default: {default})".replace("%", "%%")   # help strings are %-formatted
        return f"{text} {shown}" if text else shown


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (exit 2), like every other cnnx error."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (`{self.prog} --help` shows "
                              f"the options)\n")


def version():
    try:
        return importlib.metadata.version("cnnx")
    except importlib.metadata.PackageNotFoundError:     # run from a source tree, not installed
        import cnnx

        return cnnx.__version__


def build_parser():
    parser = Parser(
        prog="cnnx", description="Train convolutional networks fast on CPUs, locally or on "
                                 "a Dask cluster.")
    parser.add_argument("--version", action="version", version=f"cnnx {version()}")
    parser.add_argument("--config", metavar="FILE", help="TOML file of defaults, one table "
                        "per subcommand ([train], [ingest], ...); flags override it")
    parser.add_argument("--traceback", action="store_true",
                        help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    ingest = commands.add_parser("ingest", help="image folders (one per class) -> Zarr store")
    ingest.add_argument("source", help="folder with one sub-folder of images per class (a "
                        "path or fsspec URL)")
    ingest.add_argument("store", help="Zarr store to write (a path or fsspec URL)")
    ingest.add_argument("--size", nargs=2, type=int, default=(80, 80), metavar=("H", "W"),
                        help="height and width in pixels every image is resized to "
                             "(default: 80 80)")
    ingest.add_argument("--grayscale", action="store_true", help="store one grey channel")
    ingest.add_argument("--chunk-size", type=int, default=None, help="images per chunk")
    where = ingest.add_mutually_exclusive_group()
    where.add_argument("--processes", type=int, default=None,
                       help="decoding processes on this machine (default: one per core for "
                            "512+ files)")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="decode on a running Dask cluster, e.g. tcp://10.0.0.5:8786 (its "
                            "workers must reach SOURCE and STORE)")
    where.add_argument("--workers", type=int, default=None,
                       help="decode on a local Dask cluster of this many workers")
    ingest.add_argument("--overwrite", action="store_true",
                        help="replace a store made from other files or settings")
    ingest.set_defaults(run=run_ingest)

    synth = commands.add_parser("synth", help="synthetic faces with/without glasses -> store")
    synth.add_argument("store", help="Zarr store to write (a path or fsspec URL)")
    synth.add_argument("--n", type=int, required=True, help="number of images")
    synth.add_argument("--size", nargs=2, type=int, default=(80, 80), metavar=("H", "W"),
                       help="image height and width in pixels")
    synth.add_argument("--seed", type=int, default=0, help="seed of the drawing: same seed, "
                       "same images")
    synth.add_argument("--chunk-size", type=int, default=None, help="images per chunk")
    synth.add_argument("--processes", type=int, default=None,
                       help="drawing processes (default: one per core for large n)")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a store made with other settings")
    synth.set_defaults(run=run_synth)

    train = commands.add_parser("train", help="train a network (default: the bundled faces "
                                "set on a local Dask cluster)", epilog=MODES_HELP)
    add_training_arguments(train)
    train.add_argument("--epochs", type=int, default=12, help="passes over the training split "
                       "(with --resume: the total, counting the epochs already done)")
    train.add_argument("--batch-size", type=int, default=32,
                       help="global batch per step, split evenly over the --shards")
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue the run in --out from its last checkpoint")
    existing.add_argument("--overwrite", action="store_true",
                          help="replace the run already in --out (its model, history, "
                               "report and checkpoints)")
    train.set_defaults(run=run_train)

    evaluate = commands.add_parser("evaluate", help="accuracy, loss, per-class report and "
                                   "confusion matrix of a saved model")
    evaluate.add_argument("model", help="model.npz written by `cnnx train`")
    evaluate.add_argument("--data", required=True, help=DATA_HELP)
    evaluate.add_argument("--split", choices=("test", "all"), default="test",
                          help="the run's held-out test split (default) or every image")
    evaluate.set_defaults(run=run_evaluate)

    predict = commands.add_parser("predict", help="class and probability of image files")
    predict.add_argument("model", help="model.npz written by `cnnx train`")
    predict.add_argument("images", nargs="+", help="image files (PNG, JPEG, BMP, TIFF)")
    predict.add_argument("--json", action="store_true", help="print JSON lines")
    predict.set_defaults(run=run_predict)

    visualize = commands.add_parser("visualize", help="PNG grid of each convolution and "
                                    "pooling layer's feature maps for one image")
    visualize.add_argument("model", help="model.npz (normalised as its run did when run.json "
                           "is beside it, else with the image's own mean and std)")
    visualize.add_argument("image", help="image file (PNG, JPEG, BMP, TIFF), resized to the "
                           "model's input")
    visualize.add_argument("--out", metavar="FILE.png", default=None,
                           help="PNG to write (default: IMAGE-feature-maps.png here)")
    visualize.add_argument("--max-maps", type=int, default=16, metavar="N",
                           help="channels shown per layer (default: 16)")
    visualize.set_defaults(run=run_visualize)

    grid = commands.add_parser("grid", help="learning rate x batch size grid on one cluster",
                               epilog=MODES_HELP)
    add_training_arguments(grid)
    grid.add_argument("--epochs", type=int, default=5, help="epochs of every cell")
    grid.add_argument("--lrs", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4],
                      metavar="LR", help="learning rates, one grid row each")
    grid.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64],
                      metavar="N", help="global batch sizes, one grid column each")
    grid.set_defaults(run=run_grid)

    bench = commands.add_parser("bench", help="kernel, training and scaling benchmarks")
    bench.add_argument("--quick", action="store_true", help="fewer rounds, smaller shapes")
    bench.add_argument("--threads", type=int, nargs="+", default=None,
                       help="thread counts to measure (default: 1 and all cores)")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.set_defaults(run=run_bench)
    _fill_missing_help(commands)
    return parser


def _fill_missing_help(commands):
    for sub in commands.choices.values():
        for action in sub._actions:
            if action.help is None and action.dest in MISSING_HELP:
                action.help = MISSING_HELP[action.dest]


def add_training_arguments(p):
    p.add_argument("--data", default="faces", help=DATA_HELP + " (default: faces)")
    p.add_argument("--arch", default=None, help="glasses, comics, fashion, small, or a "
                   "model .npz/architecture .json file (default: chosen by image size)")
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="ADDRESS",
                         help="a running Dask scheduler, e.g. tcp://10.0.0.5:8786")
    cluster.add_argument("--workers", type=int, default=None,
                         help="workers of a local cluster on 127.0.0.1 (default: one per core)")
    p.add_argument("--mode", choices=("sync", "downpour", "dynsgd", "adag", "easgd"),
                   default="sync", help="how workers' gradients reach the weights; see "
                   "'modes' below")
    p.add_argument("--shards", type=int, default=None,
                   help="virtual shards per step (fixed: results do not depend on workers; "
                        "default: the number of workers, fewer if the data is too small)")
    p.add_argument("--optimizer", default="adam",
                   help="sgd, momentum, nesterov, adagrad, adadelta, rmsprop, adam, adamax, "
                        "nadam, lars")
    p.add_argument("--augment", nargs="*", default=(), metavar="KIND",
                   help="hflip vflip rotate zoom translate contrast invert")
    p.add_argument("--normalize", choices=("standardize", "scale", "none"),
                   default="standardize", help="standardize: per-channel mean and std of "
                   "the training split; scale: pixels / 255; none: raw pixels")
    p.add_argument("--wire", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of weights and gradients on the network")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the "
                   "train/validation/test split, shuffling, dropout and augmentation")
    p.add_argument("--out", default=None, help="output folder (default: "
                   "./cnnx-runs/<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def apply_config(parser, argv):
    """Load --config (if given) into the subcommands' defaults; command-line flags still win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    try:
        with open(known.config, "rb") as f:
            config = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {known.config!r} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"config file {known.config!r} is not valid TOML: {error}") from None
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for section, values in config.items():
        if section not in subparsers.choices or not isinstance(values, dict):
            raise UserError(f"config file {known.config!r}: unknown table [{section}]; "
                            f"use one of {sorted(subparsers.choices)}")
        sub = subparsers.choices[section]
        known_keys = {a.dest for a in sub._actions}
        settings = {key.replace("-", "_"): value for key, value in values.items()}
        unknown = sorted(set(settings) - known_keys)
        if unknown:
            raise UserError(f"config file {known.config!r}: [{section}] has unknown "
                            f"keys {unknown}")
        sub.set_defaults(**settings)


# ------------------------------------------------------------------------- numbers

# argument dest -> what it must be; lists (nargs) are checked item by item. Values from
# --config bypass argparse's type=, so every number is checked here, after parsing.
POSITIVE_INTEGERS = ("epochs", "batch_size", "batch_sizes", "workers", "shards", "n",
                     "chunk_size", "processes", "max_maps", "threads", "size")
NON_NEGATIVE_INTEGERS = ("seed",)
POSITIVE_NUMBERS = ("lr", "lrs")


def check_numbers(args):
    """One UserError naming the flag for the first number out of range, before any work."""
    for dest, value in vars(args).items():
        if value is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            problem = _number_problem(dest, item)
            if problem:
                raise UserError(f"{_flag(dest)} must be {problem}, got {item!r}")
    batch_sizes = getattr(args, "batch_sizes", None) or [getattr(args, "batch_size", None)]
    shards = getattr(args, "shards", None)
    for batch_size in batch_sizes:
        if shards and batch_size and batch_size % shards:
            raise UserError(f"--batch-size {batch_size} is not divisible by --shards {shards}: "
                            f"each shard takes an equal part of a step; choose a batch size "
                            f"that is a multiple of {shards}, or other --shards")


def _number_problem(dest, value):
    integer = isinstance(value, int) and not isinstance(value, bool)
    if dest in POSITIVE_INTEGERS and not (integer and value >= 1):
        return "a positive integer"
    if dest in NON_NEGATIVE_INTEGERS and not (integer and value >= 0):
        return "an integer of 0 or more"
    if dest in POSITIVE_NUMBERS and not (isinstance(value, (int, float)) and not
                                         isinstance(value, bool) and math.isfinite(value)
                                         and value > 0):
        return "a positive number"
    return None


def _flag(dest):
    return "--" + dest.replace("_", "-")


# ---------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    show_traceback = "--traceback" in argv
    try:
        apply_config(parser, argv)
        args = parser.parse_args(argv)
        if args.command is None:         # bare `cnnx`: what it can do, not an error
            parser.print_help()
            return 0
        check_numbers(args)
        return args.run(args) or 0
    except KeyboardInterrupt as interrupt:
        # the run says what is left to resume; worker processes were kept out of it
        detail = f"; {interrupt}" if str(interrupt) else ""
        print(f"cnnx: interrupted{detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:          # one clear line for the user, not a traceback
        if show_traceback or not _is_user_facing(error):
            raise
        message = " ".join(str(error).split())        # one line, whatever the message holds
        where = "" if isinstance(error, UserError) else " (--traceback shows where)"
        print(f"cnnx: error: {message}{where}", file=sys.stderr)
        return EXIT_USAGE


def _is_user_facing(error):
    # Errors whose message already says what is wrong and what to do; anything else is a
    # bug in cnnx and keeps its traceback. ConnectionError and TimeoutError (a scheduler
    # that cannot be reached or does not answer) are OSErrors.
    return isinstance(error, (UserError, ValueError, OSError, FloatingPointError))


# --------------------------------------------------------------------------- commands

def run_ingest(args):
    from cnnx import data
    from cnnx.parallel.cluster import connect

    client = owned = None
    if args.scheduler or args.workers:
        client, owned = connect(args.scheduler, n_workers=args.workers)
    try:
        summary = data.ingest(args.source, args.store, image_size=tuple(args.size),
                              grayscale=args.grayscale, workers=args.processes, client=client,
                              overwrite=args.overwrite, progress=True, **_chunking(args))
    finally:
        if client is not None:
            client.close()
        if owned is not None:
            owned.close()
    print(summary)


def run_synth(args):
    from cnnx import data

    summary = data.make_synthetic(args.store, args.n, image_size=tuple(args.size),
                                  seed=args.seed, workers=args.processes,
                                  overwrite=args.overwrite, progress=True, **_chunking(args))
    print(summary)


def _chunking(args):
    # only when given: the data layer's default chunk size stays in one place
    return {"chunk_size": args.chunk_size} if args.chunk_size else {}


def run_train(args):
    from cnnx import runs

    if args.resume and not args.out:
        raise UserError("--resume continues the run in --out DIR; name that folder")
    if args.out:
        runs.claim_run_folder(args.out, resume=args.resume, overwrite=args.overwrite)
    run = runs.TrainingRun.from_args(args, batch_sizes=[args.batch_size])
    with run:
        try:
            run.train(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      resume=args.resume)
        except KeyboardInterrupt:
            raise runs.Interrupted(run.resume_hint(out_given=args.out is not None)) from None
        run.finish()


def run_evaluate(args):
    from cnnx import runs

    result = runs.evaluate_model(args.model, args.data, split=args.split)
    print(result.text())


def run_predict(args):
    from cnnx import runs

    rows = runs.predict_files(args.model, args.images)
    for row in rows:
        if args.json:
            print(json.dumps(row))
        elif "error" in row:
            print(f"{row['path']}: error: {row['error']}")
        else:
            print(f"{row['path']}: {row['class']} ({row['probability']:.3f})")
    failed = [row["path"] for row in rows if "error" in row]
    if failed:
        # every image was reported above; the status says not all of them could be read
        print(f"cnnx: error: {len(failed)} of {len(rows)} images could not be read: "
              f"{', '.join(failed)}", file=sys.stderr)
        return EXIT_USAGE


def run_visualize(args):
    from cnnx import visualize

    path = visualize.visualize(args.model, args.image, out=args.out, max_maps=args.max_maps)
    print(f"cnnx: feature maps of {args.image} written to {path}")


def run_grid(args):
    from cnnx import runs

    run = runs.TrainingRun.from_args(args, batch_sizes=args.batch_sizes)
    with run:
        table = run.grid(args.lrs, args.batch_sizes, epochs=args.epochs)
    print(table)


def run_bench(args):
    from cnnx import bench

    results = bench.run(quick=args.quick, threads=args.threads)
    print(bench.format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())

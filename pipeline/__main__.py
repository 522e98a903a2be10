"""`python -m pipeline <command>`: the project's command line (each stage also has its own CLI)."""
from __future__ import annotations

import sys

import yaml

from . import config as C
from .cli import add_config_args, positive_int, seed_int


def _cmd_config(args) -> None:
    raw = {"preset": args.preset} if args.preset else None
    cfg = C.resolve(raw, args.set) if raw is not None else C.load_config(args.params, args.set)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def _cmd_info(args) -> None:
    from .cli import config_from
    from .networks import build_network, count_parameters
    from .data.readers import class_count
    from .fid import check_reference_choice
    from .metrics import check_reference_protocol
    cfg = config_from(args)
    check_reference_choice(cfg)                 # own data: the reference is checked here, not at its stage
    check_reference_protocol(cfg)
    label_dim, where = _label_dim(cfg, class_count(cfg.data))
    net = build_network(cfg, cfg.data.resolution, cfg.data.channels, label_dim or 0)
    print(f"config ok: {args.params} (hash {cfg.hash()})")
    print(f"data: {cfg.data.source}{f' {cfg.data.path}' if cfg.data.path else ''}; reference: {cfg.metrics.reference}"
          + (f" (data.reference_split={cfg.data.reference_split} held out of training)"
             if cfg.data.reference_split is not None else ""))
    print(f"network: {count_parameters(net) / 1e6:.3f}M parameters, {cfg.data.resolution}x{cfg.data.resolution}"
          f"x{cfg.data.channels}, label_dim={label_dim if label_dim is not None else '?'} ({where})")
    print(f"sampler: {cfg.sampler.solver}, {cfg.sampler.steps} steps, NFE {cfg.sampler.nfe}")
    import torch

    from .devices import cpu_limits
    n = torch.get_num_threads()
    print(f"cpu: {n} thread{'s' if n != 1 else ''} ({', '.join(f'{k} {v}' for k, v in cpu_limits().items())})")


def _label_dim(cfg, classes: int | None) -> tuple[int | None, str]:
    """(label_dim, where it comes from): network.label_dim when set (checked against the data's classes),
    else the data's class count, as training takes it; 0 without labels."""
    if not cfg.data.use_labels:
        return cfg.network.label_dim or 0, "data.use_labels=false: unconditional"
    if cfg.network.label_dim is not None:
        if classes is not None and classes > cfg.network.label_dim:
            raise C.ConfigError(f"network.label_dim={cfg.network.label_dim}, but the data has {classes} classes: set "
                                f"network.label_dim={classes} or leave it null (taken from the data)")
        return cfg.network.label_dim, "network.label_dim"
    if classes is None:
        return None, f"from the data's labels; {cfg.data.path} cannot be listed yet"
    return classes, "the data's classes" if classes else "the data has no labels: unconditional"


def _cmd_sweep(args) -> None:
    from .sweep.driver import run_sweep
    run_sweep(args.file, address=args.address, resume=args.resume, reports_dir=args.reports, num_cpus=args.num_cpus,
              dry_run=args.dry_run)


def _cmd_convert(args) -> int:
    from .snapshots import convert_legacy
    if not args.trust:
        print("convert: loading a pickled .pt file can run code; this command reads it only with "
              "torch.load(weights_only=True), but give --trust to say you know where the files come from",
              file=sys.stderr)
        return 2
    for src, dst in convert_legacy(args.paths):
        print(f"{src} -> {dst} (the original is kept as {src.name}.orig)")
    return 0


def _cmd_dataset(args) -> None:
    from .cli import config_from
    from .data.encode import write_edm2_dataset
    cfg = config_from(args)
    r = write_edm2_dataset(cfg, args.out, args.split)
    print(f"{r['count']} images ({cfg.data.resolution}x{cfg.data.resolution}, {cfg.data.channels} channel(s), "
          f"{r['labels']} classes) from {r['source']} -> {r['out']} (EDM2's layout: shards of PNGs + dataset.json)")


def _cmd_import_nvidia(args) -> None:
    from .nvidia import import_files
    written = import_files(args.files, args.out, kind=args.kind, kimg=args.kimg, sigma_rel=args.sigma_rel)
    kinds = {p.name.split("-")[0] for p in written}
    if "ema" in kinds:
        print(f"models: `python -m stages.evaluate --models {args.out}` or `python -m pipeline sample --model "
              f"{args.out}/<file>`")
    if "phema" in kinds:
        print(f"snapshots: `python -m stages.reconstruct --snapshots {args.out} --targets 0.1 --out <folder>` "
              f"reconstructs any EMA length from them")


def _cmd_submit(args) -> int:
    from .launch import JobFailedError, describe, submit, wait
    lo = {k[len("launcher_"):]: v for k, v in vars(args).items() if k.startswith("launcher_") and v is not None}
    s = submit(args.kind, args.target, args.params, args.set, args.executor, args.folder, lo)   # bad input: exit 2
    print(describe(s), flush=True)
    if args.wait:
        try:
            result = wait(s)
        except JobFailedError as err:                  # the job ran and failed: its own exit status
            print(f"submit: {err}", file=sys.stderr)
            return 1
        print(f"job {s.job_id} finished: {result}")
    return 0


def _cmd_runs(args) -> int:
    from pathlib import Path

    from .tracking.runs import load_runs
    from .tracking.store import tracking_uri
    cfg = C.load_config(args.params) if Path(args.params).is_file() else None
    if args.out:
        from .io import check_writable
        check_writable(args.out, "--out", folder=False)
    experiment = args.experiment or ("edm2-sweeps" if args.sweep else
                                     (cfg.tracking.experiment if cfg is not None else "edm2"))
    df = load_runs(experiment, args.uri or tracking_uri(cfg), args.sweep)
    if args.out:
        from .io import atomic_write
        if args.out.endswith(".parquet"):
            atomic_write(args.out, lambda f: df.to_parquet(f, index=False))
        else:
            atomic_write(args.out, lambda f: df.to_csv(f, index=False), mode="w")
        print(f"{len(df)} rows -> {args.out}")
    elif not len(df):
        print("no runs")
    elif args.all or args.columns:
        import pandas as pd
        cols = [c.strip() for c in (args.columns or "").split(",") if c.strip()] or list(df.columns)
        unknown = [c for c in cols if c not in df.columns]
        if unknown:
            raise C.ConfigError(f"--columns: no column {', '.join(unknown)} (the columns: {', '.join(df.columns)})")
        with pd.option_context("display.max_columns", None, "display.width", None):
            print(df[cols].to_string(index=False, na_rep="-"))
    else:
        from .tracking.runs import COMPACT_WIDTH, compact
        table, left = compact(df.round({"final_loss": 4, "sigma_rel": 3}))
        import textwrap
        table["run"] = table["run"].str.ljust(int(table["run"].str.len().max()))     # names read left-aligned
        print(table.to_string(index=False, na_rep="-"))
        note = (f"{len(table)} run(s), one row per training (best FID, 95% interval); --all: every EMA point and "
                f"column; --columns a,b: chosen ones"
                + (f"; params not shown (over {COMPACT_WIDTH} columns): {', '.join(left)}" if left else ""))
        print("\n".join(textwrap.wrap(note, COMPACT_WIDTH)))
    return 0


def _cmd_sample(args) -> int:
    from .devices import pick_device
    from .generation import export_samples
    # --guidance goes through the schema like any value (NaN, negative weights refused there)
    cfg = C.load_config(args.params, args.set + ([f"sampler.guidance={args.guidance!r}"]
                                                 if args.guidance is not None else []))
    from .cli import params_diff_line
    line = params_diff_line(args.params, cfg)
    if line:
        print(line, file=sys.stderr)
    sampler, note = _model_sampler(args, cfg)
    if args.guide is None and sampler.guidance != 1:
        raise C.ConfigError(f"guidance {sampler.guidance} needs --guide (a model file or unconditional)")
    device = pick_device(args.device or cfg.metrics.device, "--device" if args.device else "metrics.device")
    out = export_samples(args.model, args.num, args.out, sampler, args.seed, args.batch or sampler.batch_size,
                         device, args.guide, progress=True, cfg=cfg)
    if note:                                       # after the work: an error stays the one line it is
        print(note, file=sys.stderr)
    print(f"{args.num} samples (seeds {args.seed}-{args.seed + args.num - 1}, NFE {sampler.nfe}"
          f"{f', guidance {sampler.guidance} with {args.guide}' if args.guide else ''}) -> {out}")
    return 0


def _model_sampler(args, cfg):
    """(sampler settings, what to say): the model's recorded ones (its header's config) when they differ
    from the params in anything but the guidance weight and no sampler value was given on the command
    line; the params' otherwise."""
    from .snapshots import check_reconstruction
    from .records import sampler_record
    recorded_cfg = check_reconstruction(args.model).get("config")
    recorded = recorded_cfg.get("sampler") if isinstance(recorded_cfg, dict) else None   # a foreign header: params
    explicit = any(s.split("=", 1)[0].strip().startswith("sampler.") for s in args.set)
    if not recorded:
        return cfg.sampler, None
    try:
        theirs = C.SamplerConfig.model_validate({**recorded, "batch_size": cfg.sampler.batch_size,
                                                 "guidance": cfg.sampler.guidance})   # w: this command's choice
    except Exception:                              # a header of another version: the params decide
        return cfg.sampler, None
    if sampler_record(theirs) == sampler_record(cfg.sampler):
        return cfg.sampler, None
    if explicit:
        return cfg.sampler, (f"sampler: the command line's settings (NFE {cfg.sampler.nfe}); the model was made "
                             f"with NFE {theirs.nfe}")
    return theirs, (f"sampler: the model's recorded settings (NFE {theirs.nfe}, {theirs.steps} steps, "
                    f"{theirs.solver}); the params say NFE {cfg.sampler.nfe} -- give -S sampler.steps=N (or any "
                    f"sampler.*) to use other settings")


def _cmd_compare(args) -> int:
    from pathlib import Path

    from .compare import CompareError, compare, find_evaluation, lines
    from .tracking.store import tracking_uri
    if len(args.experiments) < 2:
        raise CompareError("compare needs two evaluations or more, e.g. compare HEAD exp-1a2b3")
    uri = args.uri or tracking_uri(C.load_config(args.params) if Path(args.params).is_file() else None)
    evals = [find_evaluation(s, Path.cwd(), uri, Path(args.sweeps)) for s in args.experiments]
    results = [compare(evals[0], other) for other in evals[1:]]
    for i, res in enumerate(results):
        print("\n".join(([""] if i else []) + lines(res)))
    if args.json:
        from .io import atomic_write_text
        import json
        atomic_write_text(json.dumps(results, indent=2), args.json)
    return 0


def _cmd_results(args) -> int:
    from .results import results_lines
    from .cli import config_from
    for line in results_lines(config_from(args), args.metrics, args.report):
        print(line)
    return 0


def _add_config(sub) -> None:
    sp = sub.add_parser("config", help="validate a params file (or a preset) and print the resolved config")
    add_config_args(sp)
    sp.add_argument("--preset", help=f"print a preset instead: {', '.join(sorted(C.presets()))}")
    sp.set_defaults(func=_cmd_config)


def _add_info(sub) -> None:
    sp = sub.add_parser("info", help="validate the config and describe the network it builds")
    add_config_args(sp)
    sp.set_defaults(func=_cmd_info)


def _add_sample(sub) -> None:
    sp = sub.add_parser("sample", help="write N samples of a reconstructed model (PNG folder or .npz), "
                        "optionally guided", description="Example: python -m pipeline sample --model "
                        "models/ema/ema-0000030720-0.040.safetensors --num 1000 --out samples.npz")
    add_config_args(sp)
    sp.add_argument("--model", required=True, help="a reconstructed EMA model (ema-*.safetensors)")
    sp.add_argument("--num", type=positive_int, required=True, help="number of images")
    sp.add_argument("--out", required=True, help="a folder (one PNG per image, named by seed) or a .npz file")
    sp.add_argument("--seed", type=seed_int, default=0, help="image i uses seed SEED + i (default: 0)")
    sp.add_argument("--guide", help="guiding model: a model file (autoguidance) or `unconditional`")
    sp.add_argument("--guidance", type=float, help="guidance weight w (default: sampler.guidance; 1 = unguided)")
    sp.add_argument("--batch", type=positive_int, help="images per batch (default: sampler.batch_size)")
    sp.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: metrics.device)")
    sp.set_defaults(func=_cmd_sample)


def _add_results(sub) -> None:
    sp = sub.add_parser("results", help="the main job's results: FID per EMA length with its interval, the best "
                        "and what is not distinguishable from it, and where to look next")
    add_config_args(sp)
    sp.add_argument("--metrics", default="metrics", help="metrics folder (default: metrics)")
    sp.add_argument("--report", default="reports/report.html", help="the run report (default: reports/report.html)")
    sp.set_defaults(func=_cmd_results)


def _add_compare(sub) -> None:
    sp = sub.add_parser("compare", help="B - A per metric with its 95%% interval and whether it is resolved (paired "
                        "when both used the same seeds), between DVC experiments, revisions, MLflow runs, sweep "
                        "trials or records files", description="Each argument is a records file or folder, a sweep "
                        "trial (SWEEP/TRIAL), an MLflow run id, or a DVC experiment name or git revision. The first "
                        "is the baseline A. Example: python -m pipeline compare HEAD exp-1a2b3")
    sp.add_argument("experiments", nargs="+", metavar="A B", help="two or more evaluations (the first is A)")
    sp.add_argument("--params", default="params.yaml", help="params file for the MLflow URI (default: params.yaml)")
    sp.add_argument("--uri", help="MLflow tracking URI for run ids (default: the params' tracking.uri)")
    sp.add_argument("--sweeps", default="runs/sweeps", help="where the sweeps' trials are (default: runs/sweeps)")
    sp.add_argument("--json", help="also write the comparison as JSON to this file")
    sp.set_defaults(func=_cmd_compare)


def _add_sweep(sub) -> None:
    sp = sub.add_parser("sweep", help="run a Ray Tune sweep from sweeps/<name>.yaml",
                        description="Run a Ray Tune sweep. `python -m pipeline sweep promote SWEEP` turns a finished "
                        "sweep's winner into params.yaml or a queued DVC experiment (see sweep promote --help).")
    sp.add_argument("file", help="sweep definition (YAML), e.g. sweeps/lr.yaml")
    sp.add_argument("--address", help="join a running Ray cluster (host:port); one not on loopback needs token "
                    "authentication (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN). Default: a local Ray on 127.0.0.1 only")
    sp.add_argument("--resume", action="store_true", help="resume an interrupted sweep (finished trials are kept)")
    sp.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray instance (default: all)")
    sp.add_argument("--reports", default="reports/sweeps", help="where the table and figures go")
    sp.add_argument("--dry-run", action="store_true", help="print the plan (trials and their values, axes, EMA "
                    "lengths, images to train and generate) and exit")
    sp.set_defaults(func=_cmd_sweep)


def _cmd_promote(args) -> int:
    from .sweep.promote import promote
    for line in promote(args.sweep, args.params, args.trial, args.sigma_rel, args.duration_nimg, args.queue,
                        args.storage, args.name):
        print(line)
    return 0


def _add_promote(sub) -> None:
    sp = sub.add_parser("sweep-promote", prog="python -m pipeline sweep promote",
                        help="`sweep promote SWEEP`: write a sweep trial's values and best EMA length into "
                        "params.yaml, or queue them as a DVC experiment (--queue)",
                        description="The sweep's best trial (or --trial) gives its searched values; its best EMA "
                        "length (or --sigma-rel) becomes ema.targets. Prints exactly what changed.")
    sp.add_argument("sweep", help="the sweep: its name (under --storage), its folder, or its sweep file")
    sp.add_argument("--trial", help="this trial instead of the sweep's best")
    sp.add_argument("--sigma-rel", type=float, help="this EMA length instead of the trial's best")
    sp.add_argument("--duration-nimg", type=positive_int, help="train.duration_nimg of the long run")
    sp.add_argument("--queue", action="store_true", help="queue a DVC experiment (dvc exp run --queue -S ...) "
                    "instead of writing params.yaml")
    sp.add_argument("--name", help="the queued DVC experiment's name (with --queue)")
    sp.add_argument("--params", default="params.yaml", help="params file to write (default: params.yaml)")
    sp.add_argument("--storage", default="runs/sweeps", help="where sweeps are stored (default: runs/sweeps)")
    sp.set_defaults(func=_cmd_promote)


def _cmd_share(args) -> int:
    from pathlib import Path

    from .share import set_sharing
    for line in set_sharing(Path(args.dvc_yaml), args.state == "on", commit=not args.no_commit):
        print(line)
    return 0


def _add_share(sub) -> None:
    sp = sub.add_parser("share", help="on: keep the training's snapshots and summary in DVC's cache, so `dvc push` "
                        "shares a finished run (a teammate's `dvc pull` + `dvc repro` trains nothing); off: back to "
                        "the default (snapshots outside the cache)")
    sp.add_argument("state", choices=["on", "off"])
    sp.add_argument("--dvc-yaml", default="dvc.yaml", help="the pipeline file (default: dvc.yaml)")
    sp.add_argument("--no-commit", action="store_true", help="only edit dvc.yaml (no `dvc commit` of the outputs)")
    sp.set_defaults(func=_cmd_share)


def _add_submit(sub) -> None:
    sp = sub.add_parser("submit", help="run training, an evaluation, a sweep or a command on SLURM (submitit) or locally",
                        description="Examples: submit train -S train.ref_lr=0.005 | submit sweep sweeps/lr.yaml | "
                                    "submit cmd --wait -- dvc repro")
    add_config_args(sp)
    sp.add_argument("kind", choices=["train", "evaluate", "sweep", "cmd"])
    sp.add_argument("target", nargs="*", help="sweep: the sweep file; cmd: the command (after --); evaluate: the "
                    "stage's flags (after --, e.g. -- --models models/nvidia)")
    sp.add_argument("--executor", choices=["slurm", "local"], help="default: launcher.executor")
    for flag, key, typ in (("--partition", "slurm.partition", str), ("--gpus", "slurm.gpus_per_node", int),
                           ("--cpus", "slurm.cpus_per_task", int), ("--mem-gb", "slurm.mem_gb", float),
                           ("--time-min", "timeout_min", int), ("--account", "slurm.account", str),
                           ("--qos", "slurm.qos", str), ("--nodes", "nnodes", int),
                           ("--tasks-per-node", "nproc_per_node", int),
                           ("--array-parallelism", "slurm.array_parallelism", int)):
        sp.add_argument(flag, dest=f"launcher_{key}", type=typ, help=f"launcher.{key}")
    sp.add_argument("--folder", help="submitit folder (default: a fresh runs/jobs/<kind>-<time>)")
    sp.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status "
                    "(what a DVC stage that runs on SLURM needs)")
    sp.set_defaults(func=_cmd_submit)


def _add_convert(sub) -> None:
    sp = sub.add_parser("convert", help="convert pickled .pt snapshots / EMA models of earlier versions to "
                        "safetensors (needs --trust)")
    sp.add_argument("paths", nargs="+", help="snapshot or model folders, or single .pt files")
    sp.add_argument("--trust", action="store_true", help="you trust where these files come from")
    sp.set_defaults(func=_cmd_convert)


def _add_dataset(sub) -> None:
    sp = sub.add_parser("dataset", help="write the params' data source in EDM2's dataset layout (PNG shards + "
                        "dataset.json; a folder, or a .zip), at data.resolution / data.resize / data.channels")
    sp.add_argument("--out", required=True, help="a new folder, or a file ending in .zip")
    sp.add_argument("--split", default="train", help="train, or test for fashion-mnist (default: train)")
    add_config_args(sp)
    sp.set_defaults(func=_cmd_dataset)


def _add_import_nvidia(sub) -> None:
    sp = sub.add_parser("import-nvidia", help="NVIDIA EDM2's released models and raw post-hoc EMA snapshots (.pkl) -> "
                        "this project's safetensors, read without running any code in them")
    sp.add_argument("files", nargs="+", help="network pickles (edm2-img512-xs-2147483-0.135.pkl, "
                    "network-snapshot-<kimg>-<std>.pkl) or folders of them")
    sp.add_argument("--out", required=True, help="folder for the safetensors files (models: ema-*.safetensors, "
                    "snapshots: phema-*.safetensors)")
    sp.add_argument("--kind", choices=["auto", "model", "snapshot"], default="auto",
                    help="auto: network-snapshot-* files are raw snapshots, others models (default: auto)")
    sp.add_argument("--kimg", type=int, help="training time in thousands of images, for a file whose name does not "
                    "carry it (EDM2 names its files <name>-<kimg>-<sigma_rel>.pkl)")
    sp.add_argument("--sigma-rel", type=float, help="EMA length of a file whose name does not carry it")
    sp.set_defaults(func=_cmd_import_nvidia)


def _add_runs(sub) -> None:
    sp = sub.add_parser("runs", help="load the runs of an MLflow experiment (or one sweep) into a table")
    sp.add_argument("--experiment", help="MLflow experiment (default: the main job's, tracking.experiment of "
                    "--params; with --sweep: edm2-sweeps)")
    sp.add_argument("--sweep", help="only this sweep (its name or parent run id)")
    sp.add_argument("--params", default="params.yaml", help="params file for the default experiment and URI")
    sp.add_argument("--uri", help="tracking URI (default: tracking.uri, $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    sp.add_argument("--out", help="write the table as CSV (.csv) or Parquet (.parquet)")
    sp.add_argument("--all", action="store_true", help="every EMA point and every column (default: one row per "
                    "training that fits 120 columns)")
    sp.add_argument("--columns", help="only these columns of the full table, comma-separated (e.g. "
                    "run_name,sigma_rel,fid,fid_lo,fid_hi)")
    sp.set_defaults(func=_cmd_runs)


COMMANDS = [_add_config, _add_info, _add_sample, _add_results, _add_compare, _add_sweep, _add_promote, _add_share, _add_submit, _add_convert, _add_dataset, _add_import_nvidia, _add_runs]   # in the order --help lists them


def build_parser():
    """`python -m pipeline`'s parser: one sub-command per entry of COMMANDS."""
    from .cli import ArgumentParser
    p = ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:                      # `submit cmd ... -- <command>`: everything after -- is the command
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1:]
    if argv[:2] == ["sweep", "promote"]:  # `sweep promote SWEEP`: its own sub-command
        argv = ["sweep-promote", *argv[2:]]
    args = p.parse_args(argv)
    if rest:
        if args.command != "submit":
            p.error("`--` is only used by `submit cmd -- <command>` and `submit evaluate -- <stage flags>`")
        args.target = list(args.target) + rest
    from .cli import run
    return run(args.command, lambda: args.func(args))



if __name__ == "__main__":
    sys.exit(main())

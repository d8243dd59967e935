"""The ``guidedseg`` command line: phantoms, the case store, segmentation, bundles, evaluation."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import GuidedSegError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        code = int(args.run(args) or 0)
        sys.stdout.flush()  # here, so that a reader gone away (| head) is caught below, not at exit
        return code
    except GuidedSegError as error:
        print(f"guidedseg: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        root = Path(__file__).resolve().parents[1]
        print(f"guidedseg: error: this command needs the Python package '{error.name}', which is not installed "
              f"for {sys.executable}; run 'make setup' in {root} and use {root / '.venv' / 'bin' / 'guidedseg'} "
              f"(or install it here: {sys.executable} -m pip install -e '{root}[train]')", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. piped into head: the reader has gone, say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("guidedseg: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guidedseg", description="GuidedSeg: semi-supervised 3D organ segmentation.")
    parser.add_argument("--version", action="version", version=f"guidedseg {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    phantoms = commands.add_parser("phantoms", help="write a case store of synthetic abdominal CT phantoms",
                                   description="Write a case store of synthetic abdominal CT phantoms with the 13 "
                                               "FLARE22 organs: some labeled, most unlabeled, plus a test split.")
    phantoms.add_argument("out", type=Path, help="folder of the new store (must not hold a store yet)")
    phantoms.add_argument("--cases", type=int, default=20, help="training cases, labeled + unlabeled (default 20)")
    phantoms.add_argument("--labeled", type=int, default=4, help="how many training cases are labeled (default 4)")
    phantoms.add_argument("--test", type=int, default=4, help="test cases with labels (default 4)")
    phantoms.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same store")
    phantoms.add_argument("--size", type=int, nargs=3, default=(96, 96, 64), metavar=("X", "Y", "Z"),
                          help="voxels per case (default 96 96 64)")
    phantoms.add_argument("--spacing", type=float, nargs=3, metavar=("X", "Y", "Z"),
                          help="voxel size in mm (default: drawn per case, about 3.8 x 3.8 x 5)")
    phantoms.set_defaults(run=_run_phantoms)

    segment = commands.add_parser("segment", help="segment scans with a model bundle",
                                  description="Segment a scan, or every scan in a folder, with a model bundle loaded "
                                              "once. Label maps are written on each scan's own grid, atomically; "
                                              "existing outputs are refused before anything runs (or replaced "
                                              "with --overwrite).")
    segment.add_argument("--model", type=Path, required=True, help="model bundle folder")
    segment.add_argument("--input", type=Path, required=True,
                         help="image file, DICOM series folder, or a folder of image files")
    segment.add_argument("--output", required=True,
                         help="label map file (.nii.gz, .nrrd, .seg.nrrd, ...), or a folder (one that exists, or a name "
                              "ending in / or without a suffix): each scan's label map goes there under the scan's "
                              "name. A folder of scans needs an output folder")
    segment.add_argument("--overwrite", action="store_true",
                         help="replace outputs that exist (each by a rename once its new version is complete); "
                              "without it, existing outputs are refused before anything runs")
    segment.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    segment.add_argument("--ensemble", action="store_true", help="average networks A and B of a two-network bundle")
    segment.add_argument("--lcc", action="store_true", help="keep only the largest connected piece of each organ")
    segment.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                         help="a progress bar on stderr, or one JSON object per line on stdout (for the Slicer panel)")
    segment.set_defaults(run=_run_segment)

    bundle = commands.add_parser("bundle", help="inspect model bundles")
    bundle_commands = bundle.add_subparsers(title="bundle commands", metavar="BUNDLE_COMMAND")
    bundle_info = bundle_commands.add_parser("info", help="print what a model bundle holds")
    bundle_info.add_argument("bundle", type=Path)
    bundle_info.add_argument("--json", action="store_true", help="print model.json and the weights summary as JSON")
    bundle_info.set_defaults(run=_run_bundle_info)
    bundle_import = bundle_commands.add_parser(
        "import", help="import a bundle (.zip or folder) into a models folder, checked first",
        description="Copy a model bundle into a models folder, offline. It is checked before it is listed: a zip "
                    "holding anything but a bundle's files (a pickle, code), a path outside its folder, a link, a "
                    "newer bundle format or weights that are not safetensors are refused, with nothing written. "
                    "A bundle already there is never replaced: the new one gets a -2 (or later) suffix.")
    bundle_import.add_argument("source", type=Path, help="a bundle's .zip, or its folder")
    bundle_import.add_argument("--models", type=Path, default=Path("models"),
                               help="the models folder (default ./models; created if missing)")
    bundle_import.set_defaults(run=_run_bundle_import)
    bundle_history = bundle_commands.add_parser(
        "history", help="list a bundle's versions (its ancestors and itself) with their validation Dice")
    bundle_history.add_argument("bundle", type=Path)
    bundle_history.set_defaults(run=_run_bundle_history)

    suggest = commands.add_parser(
        "suggest", help="rank a store's unlabeled cases: which to correct next",
        description="Run a model bundle over the store's unlabeled images and rank them, most informative first: "
                    "networks A and B's disagreement per organ (1 - soft Dice of their probability maps), or the "
                    "mean predictive entropy over each organ's region, or (cgmm; bundles of the default guidednet) each "
                    "network's CGMM posterior against its own prediction, or a seeded random order. A case's score is the mean over organs of "
                    "per-organ scores in [0, 1], so a small organ counts as much as the liver. Scores are cached "
                    "per bundle and image (a second run with the same bundle runs no network). The ranking goes "
                    "to suggestions.json beside dataset.json; skipped cases stay in it, at the bottom.")
    suggest.add_argument("--store", type=Path, required=True, help="case store folder")
    suggest.add_argument("--model", type=Path, help="model bundle folder (not needed for --strategy random or --skip)")
    suggest.add_argument("-n", type=int, default=10, help="rows of the table to print (default 10; 0: all)")
    suggest.add_argument("--strategy", choices=("disagreement", "entropy", "cgmm", "random"), default="disagreement")
    suggest.add_argument("--seed", type=int, default=0, help="seed of --strategy random (default 0)")
    suggest.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto (default cpu)")
    suggest.add_argument("--skip", metavar="CASE", help="move CASE to the bottom of the saved ranking instead")
    suggest.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    suggest.set_defaults(run=_run_suggest)

    evaluate = commands.add_parser(
        "evaluate", help="score label maps against references: Dice, Jaccard, HD95, ASD",
        description="Score predicted label maps against reference label maps: per case and organ Dice, Jaccard, "
                    "HD95 and average surface distance in mm (MONAI metrics), mean and SD per organ over the "
                    "(case, organ) pairs whose reference is annotated, written as CSV and Markdown, with a bar "
                    "chart of Dice per organ and overlay pictures of each case. Labels are matched by name "
                    "(prediction and reference may number their organs differently); names either side lacks "
                    "are listed, and a pairing without a name in common is refused.")
    evaluate.add_argument("--pred", type=Path, required=True, help="predicted label map, or a folder of them")
    evaluate.add_argument("--ref", type=Path, required=True,
                          help="reference label map, a folder of them, or a case store (its test cases)")
    evaluate.add_argument("--labels", type=Path,
                          help="label names of the predictions: the model bundle that wrote them, its model.json, "
                               "or a dataset.json whose values they use (default: the names in .seg.nrrd files)")
    evaluate.add_argument("--ref-labels", type=Path,
                          help="label names of a folder of reference files: a dataset.json or a store folder (a "
                               "store's also gives each case's annotated organs); a store given as --ref names its own")
    evaluate.add_argument("--images", type=Path, help="the scans (file or folder), for the overlay pictures")
    evaluate.add_argument("--output", type=Path, required=True, help="new folder for the report (never overwritten)")
    evaluate.add_argument("--slices", type=int, default=3, help="overlay slices per case (default 3; 0: none)")
    evaluate.set_defaults(run=_run_evaluate)

    store = commands.add_parser("store", help="create, inspect and add to a case store")
    store_commands = store.add_subparsers(title="store commands", metavar="STORE_COMMAND")

    create = store_commands.add_parser("create", help="create an empty store with a label set")
    create.add_argument("store", type=Path)
    labels = create.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="value:name pairs, e.g. '1:liver,2:spleen' (0 is background)")
    labels.add_argument("--labels-from", type=Path, metavar="JSON",
                        help="take the label set from a dataset.json or a model bundle's JSON")
    create.add_argument("--modality", default="CT", help="CT, MRI, ... (default CT)")
    create.add_argument("--name", help="store name (default: the folder's name)")
    create.set_defaults(run=_run_create)

    info = store_commands.add_parser("info", help="summarise a store: cases, splits, organs annotated")
    info.add_argument("store", type=Path)
    info.add_argument("--check", action="store_true", help="also check that every file is there and lines up")
    info.add_argument("--json", action="store_true", help="print the summary as JSON")
    info.set_defaults(run=_run_info)

    add = store_commands.add_parser("add", help="copy an image (and its label) into the store as a new case")
    add.add_argument("store", type=Path)
    add.add_argument("--image", type=Path, required=True, help="volume file or DICOM series folder")
    add.add_argument("--label", type=Path, help="label map (.nii.gz, .nrrd, .seg.nrrd, ...); none: unlabeled")
    add.add_argument("--case", "--id", dest="case_id", help="case id (default: the image's file name)")
    add.add_argument("--test", action="store_true", help="add as a test case (never used for training)")
    _annotation_arguments(add)
    add.set_defaults(run=_run_add)

    ingest = store_commands.add_parser("ingest", help="store a corrected label for an existing case as a new version",
                                       description="Store a corrected label (a label file or a Slicer .seg.nrrd) "
                                                   "for an existing case. The previous version is kept.")
    ingest.add_argument("store", type=Path)
    ingest.add_argument("--case", required=True, help="case id")
    ingest.add_argument("--label", type=Path, required=True, help="label map or .seg.nrrd on the case's image grid")
    _annotation_arguments(ingest)
    ingest.set_defaults(run=_run_ingest)

    history = store_commands.add_parser("history", help="list a case's label versions with their provenance")
    history.add_argument("store", type=Path)
    history.add_argument("case")
    history.set_defaults(run=_run_history)
    return parser


def _annotation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotated", help="organs contoured or checked, comma-separated names or values "
                                            "(default: the organs present in the label)")
    parser.add_argument("--absent", help="organs checked and found absent, comma-separated")
    parser.add_argument("--source", default="cli", help="where the label comes from (recorded as provenance)")
    parser.add_argument("--model", help="the model bundle that produced the draft, if any (provenance)")


def _split_list(text: str | None) -> list[str] | None:
    return None if text is None else [item.strip() for item in text.split(",") if item.strip()]


# ----------------------------------------------------------------------------------------------


def _run_phantoms(args: argparse.Namespace) -> int:
    from .phantoms import write_phantom_store

    store = write_phantom_store(args.out, cases=args.cases, labeled=args.labeled, test=args.test, seed=args.seed,
                                size=tuple(args.size), spacing=tuple(args.spacing) if args.spacing else None,
                                progress=lambda text: print(text, flush=True))
    print(f"wrote {store.root}: {len(store.cases('labeled'))} labeled, {len(store.cases('unlabeled'))} unlabeled, "
          f"{len(store.cases('test'))} test cases")
    return 0


def _run_segment(args: argparse.Namespace) -> int:
    from .batch import Interrupted, plan_jobs, run_jobs, stop_on_signals
    from .progress import Reporter

    reporter = Reporter(args.progress)
    try:
        with stop_on_signals():
            jobs = plan_jobs(args.input, args.output, overwrite=args.overwrite)
            reporter.stage("load", 0, 1, model=str(args.model))
            from .inference import Predictor

            predictor = Predictor(args.model, args.device, args.ensemble)
            written = run_jobs(predictor, jobs, reporter, lcc=args.lcc)
    except GuidedSegError as error:
        reporter.close()
        reporter.emit({"stage": "error", "message": str(error)})
        raise
    except Interrupted as stop:
        reporter.close()
        reporter.emit({"stage": "stopped", "signal": stop.signum})
        print(f"guidedseg: stopped by signal {stop.signum}; no partial output was left", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        # Temporary files are gone already (the exception unwound through the writers); skip the
        # interpreter's slow teardown of torch so the process ends promptly.
        os._exit(128 + stop.signum)
    if args.progress != "json":
        print(f"wrote {len(written)} label map(s)" + (f": {written[0]}" if len(written) == 1 else f" into {args.output}"))
    return 0


def _run_bundle_info(args: argparse.Namespace) -> int:
    from .bundle import describe_bundle, read_metadata, weights_summary

    if args.json:
        print(json.dumps({**read_metadata(args.bundle), "weights": weights_summary(args.bundle)}, indent=2))
    else:
        print(describe_bundle(args.bundle))
    return 0


def _run_bundle_import(args: argparse.Namespace) -> int:
    from .bundle_import import import_bundle

    args.models.mkdir(parents=True, exist_ok=True)
    target = import_bundle(args.source, args.models)
    print(f"imported {args.source} as {target}")
    return 0


def _run_bundle_history(args: argparse.Namespace) -> int:
    from .lineage import format_history

    print(format_history(args.bundle))
    return 0


def _run_suggest(args: argparse.Namespace) -> int:
    from .progress import Reporter
    from .suggest import format_table, skip_case, suggest

    if args.skip:
        queue = skip_case(args.store, args.skip)
        print(f"skipped {args.skip}; next: {queue[0]['case'] if queue else 'none'}")
        return 0
    if args.model is None and args.strategy != "random":
        raise GuidedSegError(f"--strategy {args.strategy} needs --model BUNDLE")
    reporter = Reporter(args.progress)
    ranking = suggest(args.model, args.store, args.strategy, args.seed, args.device, reporter)
    if args.progress == "json":
        reporter.emit({"stage": "done", "progress": 1.0, "ranking": [s.to_dict() for s in ranking.items],
                       "strategy": ranking.strategy, "inferred": ranking.inferred})
    else:
        print(format_table(ranking, args.n or None))
        where = "no network runs for a random order" if ranking.strategy == "random" else \
            f"{ranking.inferred} run through the networks, the rest from the cache"
        print(f"ranked {len(ranking.items)} unlabeled case(s) ({where}); saved to {Path(args.store) / 'suggestions.json'}")
    return 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_folders

    report = evaluate_folders(args.pred, args.ref, args.output, labels=args.labels, ref_labels=args.ref_labels,
                              images=args.images, slices=args.slices,
                              progress=lambda text: print(text, file=sys.stderr, flush=True))
    print(report.markdown_summary())
    print(f"report written to {args.output}")
    return 0


def _run_create(args: argparse.Namespace) -> int:
    from .errors import StoreError
    from .store import CaseStore

    if args.labels_from:
        try:
            labels = json.loads(args.labels_from.read_text(encoding="utf-8"))["labels"]
        except (OSError, ValueError, KeyError) as error:
            raise StoreError(args.labels_from, f"has no readable 'labels' mapping ({error})") from None
    else:
        labels = {}
        for pair in _split_list(args.labels) or []:
            value, _, name = pair.partition(":")
            if not value.strip().isdigit() or not name.strip():
                raise StoreError(args.store, f"--labels entry {pair!r} is not of the form value:name")
            labels[int(value)] = name.strip()
    labels = {int(v): n for v, n in labels.items()}
    store = CaseStore.create(args.store, labels, name=args.name, modality=args.modality)
    print(f"created {store.root} with labels {store.organs}")
    return 0


def _run_info(args: argparse.Namespace) -> int:
    from .store import CaseStore

    store = CaseStore(args.store)
    splits = store.splits()
    counts = store.annotation_counts("labeled")
    n_labeled = len(splits.train) + len(splits.validation)
    summary = {
        "name": store.name,
        "root": str(store.root),
        "modality": store.modality,
        "labels": {str(v): n for v, n in store.labels.items()},
        "labeled": n_labeled,
        "train": len(splits.train),
        "validation": len(splits.validation),
        "unlabeled": len(splits.unlabeled),
        "test": len(splits.test),
        "annotated": {store.labels[v]: c for v, c in counts.items()},
        "corrected": sum(1 for c in store.cases("labeled") if c.label_version > 1),
    }
    problems = store.verify() if args.check else []
    if args.check:
        summary["problems"] = problems
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"{summary['name']}  ({summary['root']})  modality {summary['modality']}")
        print(f"cases: {n_labeled} labeled ({summary['train']} train / {summary['validation']} validation, "
              f"{summary['corrected']} with corrected labels), {summary['unlabeled']} unlabeled, {summary['test']} test")
        width = max([len(n) for n in store.organs.values()] + [5])
        print(f"{'value':>5}  {'organ':<{width}}  annotated in labeled cases")
        for value, name in store.organs.items():
            print(f"{value:>5}  {name:<{width}}  {counts[value]:>3}/{n_labeled}")
        if args.check:
            print("check: all files present and consistent" if not problems else f"check: {len(problems)} problem(s)")
            for problem in problems:
                print(f"  {problem}")
    return 1 if problems else 0


def _run_add(args: argparse.Namespace) -> int:
    from .store import CaseStore

    store = CaseStore(args.store)
    if args.test:
        case = store.add_test(args.image, args.label, args.case_id, annotated=_split_list(args.annotated),
                              absent=_split_list(args.absent), source=args.source)
    elif args.label is None:
        case = store.add_unlabeled(args.image, args.case_id, source=args.source)
    else:
        case = store.add_labeled(args.image, args.label, args.case_id, annotated=_split_list(args.annotated),
                                 absent=_split_list(args.absent), source=args.source, model=args.model)
    print(f"added {case.kind} case {case.case_id}" + _annotated_text(store, case))
    return 0


def _run_ingest(args: argparse.Namespace) -> int:
    from .store import CaseStore

    store = CaseStore(args.store)
    case = store.ingest_label(args.case, args.label, annotated=_split_list(args.annotated),
                              absent=_split_list(args.absent), source=args.source, model=args.model)
    print(f"stored label version {case.label_version} of {case.case_id}" + _annotated_text(store, case))
    return 0


def _run_history(args: argparse.Namespace) -> int:
    from .store import CaseStore

    store = CaseStore(args.store)
    for record in store.history(args.case):
        organs = ", ".join(store.labels.get(v, str(v)) for v in record.get("annotated", [])) or "-"
        absent = ", ".join(store.labels.get(v, str(v)) for v in record.get("absent", []))
        print(f"v{record['version']}  {record.get('time') or '-':<25}  source={record.get('source') or '-'}  "
              f"model={record.get('model') or '-'}  {record['label']}  annotated: {organs}"
              + (f"  absent: {absent}" if absent else ""))
    return 0


def _annotated_text(store, case) -> str:
    if case.label is None:
        return ""
    names = [store.labels[v] for v in store.annotated_labels(case)]
    absent = [store.labels[v] for v in case.absent]
    return f"; annotated: {', '.join(names) or 'none'}" + (f"; absent: {', '.join(absent)}" if absent else "")


if __name__ == "__main__":
    sys.exit(main())

"""Train GuidedNet, DK-UXNet (or the supervised / CPS baselines) on a case store and write a model bundle.

    python Training/train.py                                  # small GuidedNet on fresh phantoms
    python Training/train.py --store STORE --method cps --output runs/cps optim.iterations=2000
    python Training/train.py --store STORE --method dkuxnet   # UX-Net + kMaX, dual contrastive
    python Training/train.py --store STORE --method guidednet network.type=uxnet-kmax  # the network x objective cross
    python Training/train.py --store STORE --method dkuxnet network.type=unet3d        # (either way round)
    python Training/train.py --config Training/configs/guidednet-paper.yaml --store STORE
    python Training/train.py --output runs/cps --resume       # continue after a crash or Ctrl-C (settings as saved)
    python Training/train.py --init-from runs/cps/bundle --store STORE   # fine-tune: a new bundle from this one
    torchrun --nproc_per_node 2 Training/train.py ...         # several GPUs (or CPU processes)

Settings: the defaults, then --config YAML, then the flags below, then ``section.key=value``
overrides (see Training/config.py and Training/configs/). With --resume they start from the run's
saved config.yaml instead of the defaults; a setting given that differs from the saved one is refused. Ctrl-C or SIGTERM stops cleanly with a
checkpoint; the exit code is then 128 + the signal number.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="setting overrides")
    parser.add_argument("--config", help="YAML settings file")
    parser.add_argument("--store", help="case store folder (default: synthetic phantoms)")
    parser.add_argument("--method", help="a registered method: supervised, cps, guidednet, guidednet-paper, "
                                         "guidednet-authors or dkuxnet (GuidedSegLib/methods)")
    parser.add_argument("--output", help="run folder: checkpoints, logs, bundle")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--init-from", metavar="BUNDLE",
                        help="warm start: every network starts from this bundle's weights, with its preprocessing, "
                             "labels and settings, and Training/configs/finetune.yaml's short schedule; the new bundle "
                             "goes into a new <run>-ftN folder (or --output) and names its parent")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --output from its checkpoint, with the settings it saved")
    parser.add_argument("--progress", choices=("bar", "json", "none"), default="bar",
                        help="a progress bar, JSON lines on stdout (for the Slicer panel), or none (messages and the final table only)")
    args = parser.parse_args(argv)
    flags = [f"{k}={v}" for k, v in (("store", args.store), ("method", args.method), ("output", args.output),
                                       ("device", args.device), ("seed", args.seed)) if v is not None]
    try:
        from GuidedSegLib.errors import GuidedSegError
        from Training.config import TrainConfig, finetune_config, load_config, resume_config
    except ModuleNotFoundError as error:
        return _missing(error)
    try:
        if args.resume:
            config = resume_config(args.output or TrainConfig().output, args.config, flags + args.overrides)
        elif args.init_from:
            config = finetune_config(args.init_from, args.config, flags + args.overrides)
        else:
            config = load_config(args.config, flags + args.overrides)
        from Training.trainer import train

        result = train(config, resume=args.resume, progress=args.progress)
    except GuidedSegError as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        return _missing(error)
    except KeyboardInterrupt:  # outside the loop, which turns Ctrl-C into a checkpoint (e.g. preprocessing)
        print("train.py: interrupted outside the training loop; no new checkpoint was written", file=sys.stderr)
        return 130
    if result.status == "stopped":
        return 128 + int(result.signal or 0)
    return 0


def _missing(error: ModuleNotFoundError) -> int:
    """One line instead of a traceback when a package is not installed in this Python."""
    root = Path(__file__).resolve().parents[1]
    print(f"train.py: error: the Python package '{error.name}' is not installed for {sys.executable}; "
          f"create the environment with 'make setup' in {root} and run .venv/bin/python Training/train.py "
          f"(or install it here: {sys.executable} -m pip install -e '{root}[train]')", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

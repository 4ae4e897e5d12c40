"""The ``e3fast`` command line.

* ``e3fast example`` -- train the paper's U-Net for a few steps on a synthetic volume, report the
  speed and check rotation equivariance (about a minute on a 2-core CPU).
* ``e3fast train`` -- train a segmentation U-Net on an nnU-Net/MSD dataset (see
  :mod:`e3fast.training.command`).
* ``e3fast predict`` -- segment NIfTI cases with a checkpoint (:mod:`e3fast.inference.command`).
* ``e3fast evaluate`` -- Dice of label maps, Dice vs rotation angle (:mod:`e3fast.evaluation.command`).
* ``e3fast demo`` -- the embedded MNI152 brain demo: equivariant vs plain U-Net under rotations
  (:mod:`e3fast.demo.command`).
* ``e3fast bench`` -- run the CPU benchmark suite of a source checkout
  (``benchmarks/run_cpu.sh``) and write ``benchmarks/results/<machine>-<date>.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from e3fast.backends import BACKENDS
from e3fast.demo.command import add_demo_command
from e3fast.evaluation.command import add_evaluate_command
from e3fast.inference.command import add_predict_command
from e3fast.training.command import add_train_command

SOURCE_ROOT = Path(__file__).resolve().parent.parent
BENCH_SCRIPT = SOURCE_ROOT / "benchmarks" / "run_cpu.sh"


def run_example_command(args: argparse.Namespace) -> int:
    """Train the paper's equivariant U-Net for a few steps on a synthetic 3D volume (labels: intensity
    quartiles), print the loss per step and the speed, then rotate the input by 90 degrees and
    print how far the output is from the rotated output, in float32 and in float64.
    Exits 1 if the float64 error shows the network is not equivariant."""
    import torch

    import e3fast
    from e3fast.example import ExampleConfig, run_example

    if args.size % 8:
        raise SystemExit(f"e3fast example: --size must be a multiple of 8 (3 poolings), got {args.size}")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ExampleConfig(size=args.size, steps=args.steps, learning_rate=args.lr, seed=args.seed,
                           device=args.device)
    with e3fast.use_backend(None if args.backend == "auto" else args.backend):
        result = run_example(config)
    return 0 if result.is_equivariant else 1


def run_bench_command(args: argparse.Namespace) -> int:
    """Run benchmarks/run_cpu.sh of the source checkout this package was imported from."""
    if not BENCH_SCRIPT.is_file():
        raise SystemExit(f"e3fast bench runs the benchmarks of a source checkout; {BENCH_SCRIPT} was not found "
                         "(clone the repository and run it from there)")
    env = dict(os.environ, PYTHON=sys.executable)
    if args.size is not None:
        env["E3FAST_BENCH_SIZE"] = str(args.size)
    return subprocess.call(["bash", str(BENCH_SCRIPT), *args.pytest_args], env=env, cwd=SOURCE_ROOT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="e3fast", description="Fused SO(3)-steerable voxel convolutions "
                                     "and the equivariant U-Net.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    example = commands.add_parser("example", help="train the paper's U-Net briefly and check its equivariance",
                                  description=run_example_command.__doc__.replace("\n    ", " "))
    example.add_argument("--size", type=int, default=32, help="edge of the cubic volume, multiple of 8 (32)")
    example.add_argument("--steps", type=int, default=20, help="training steps (20)")
    example.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (0.01)")
    example.add_argument("--seed", type=int, default=0, help="seed of the volume and the weights (0)")
    example.add_argument("--backend", choices=("auto",) + BACKENDS, default="auto",
                         help="fused-op backend (auto: the fastest usable here)")
    example.add_argument("--device", default="cpu", help="torch device (cpu)")
    example.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    example.set_defaults(handler=run_example_command)

    add_train_command(commands)
    add_predict_command(commands)
    add_evaluate_command(commands)
    add_demo_command(commands)

    bench = commands.add_parser("bench", help="run the CPU benchmarks of a source checkout",
                                description="Runs benchmarks/run_cpu.sh; results go to benchmarks/results/. "
                                "Other arguments go to pytest, e.g. `e3fast bench --size 16 -k unet`.")
    bench.add_argument("--size", type=int, help="edge of the benchmark volumes (default 64)")
    bench.set_defaults(handler=run_bench_command, accepts_extra_arguments=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_extra_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.pytest_args = extra
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())

"""``e3fast train``: the command-line front of :func:`e3fast.training.train`.

``e3fast train DATASET -o OUTPUT_DIR`` trains with the paper's recipe (Adam 5e-3, cross-entropy,
early stopping on a validation split); ``--check-only`` checks the dataset and exits;
``--resume`` continues a stopped run from OUTPUT_DIR/checkpoint.pt. Under
``torchrun --nproc_per_node=N -m e3fast train ...`` every process trains on its own patches (DDP).
"""
from __future__ import annotations

import argparse
import sys

from e3fast.models.factory import MODEL_KINDS
from e3fast.training.config import EQUIVARIANCES, ROTATION_AUGMENTATIONS, TrainConfig
from e3fast.training.losses import LOSSES

DEFAULTS = TrainConfig(dataset="", output_dir="")
TRAIN_DESCRIPTION = (
    "Train the paper's equivariant U-Net (or --model plain) on a dataset in the nnU-Net v2 raw or Medical "
    "Segmentation Decathlon layout: Adam, lr 5e-3, cross-entropy, early stopping on a validation split. "
    "Writes OUTPUT_DIR/checkpoint.pt (atomically, every --checkpoint-every steps and at the end) and "
    "OUTPUT_DIR/metrics.csv; --resume continues a stopped run exactly. Multi-GPU: "
    "torchrun --nproc_per_node=N -m e3fast train ...")


def _patch_size(text: str) -> tuple[int, int, int]:
    """``'64'`` -> (64, 64, 64); ``'64,64,32'`` or ``'64x64x32'`` -> (64, 64, 32)."""
    parts = text.replace("x", ",").split(",")
    try:
        sizes = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"patch size must be N or X,Y,Z integers, got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"patch size must be N or X,Y,Z positive integers, got {text!r}")
    return sizes


def _optional_bool(text: str) -> bool | None:
    choices = {"auto": None, "on": True, "off": False}
    if text not in choices:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {text!r}")
    return choices[text]


def add_train_command(subparsers) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to an argparse ``subparsers`` object; returns its parser."""
    parser = subparsers.add_parser("train", help="train a segmentation U-Net on an nnU-Net/MSD dataset",
                                   description=TRAIN_DESCRIPTION)
    parser.add_argument("dataset", help="dataset folder (nnU-Net v2 raw or Medical Segmentation Decathlon layout)")
    parser.add_argument("-o", "--output-dir", help="where checkpoint.pt and metrics.csv go (required unless "
                        "--check-only)")
    parser.add_argument("--check-only", action="store_true", help="check the dataset, print a summary and exit")
    parser.add_argument("--no-check", action="store_true", help="skip the dataset check at the start")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODEL_KINDS, default=DEFAULTS.model,
                       help="equivariant U-Net (the paper's) or the plain U-Net baseline (equivariant)")
    model.add_argument("--width", type=int, default=DEFAULTS.width, help="equivariant irreps multiplicity n: "
                       "4n x0e + 2n x1e + n x2e on the top level, doubling per level (2: the paper's 8:4:2)")
    model.add_argument("--features", type=int, default=DEFAULTS.features,
                       help="plain U-Net top-level channels (30)")
    model.add_argument("--equivariance", choices=EQUIVARIANCES, default=DEFAULTS.equivariance, help="(SO3)")
    model.add_argument("--lmax", type=int, default=DEFAULTS.lmax, help="highest spherical harmonic (2)")
    model.add_argument("--n-downsample", type=int, default=DEFAULTS.n_downsample, help="pooling levels (3)")
    model.add_argument("--kernel-voxels", type=int, default=DEFAULTS.kernel_voxels,
                       help="kernel edge in voxels of the finest axis (5)")
    model.add_argument("--num-radial-basis", type=int, default=DEFAULTS.num_radial_basis, help="(5)")
    model.add_argument("--scalar-upsampling", action="store_true", help="upsample only scalar features")

    optimization = parser.add_argument_group("optimization")
    optimization.add_argument("--steps", type=int, default=DEFAULTS.steps,
                              help="training steps, 0 for no limit (%(default)s)")
    optimization.add_argument("--minutes", type=float, help="wall-clock budget of training, minutes (none)")
    optimization.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="per process (%(default)s)")
    optimization.add_argument("--patch-size", type=_patch_size, default=DEFAULTS.patch_size,
                              help="N or X,Y,Z voxels (64)")
    optimization.add_argument("--lr", type=float, default=DEFAULTS.lr, help="Adam learning rate (%(default)s)")
    optimization.add_argument("--loss", choices=LOSSES, default=DEFAULTS.loss, help="(ce)")
    optimization.add_argument("--rotation-augmentation", choices=ROTATION_AUGMENTATIONS,
                              default=DEFAULTS.rotation_augmentation,
                              help="random 90-degree rotations, small arbitrary ones, both or none (none)")
    optimization.add_argument("--rotation-degrees", type=float, default=DEFAULTS.rotation_degrees,
                              help="largest small rotation, degrees (%(default)s)")
    optimization.add_argument("--foreground-fraction", type=float, default=DEFAULTS.foreground_fraction,
                              help="share of patches centred on foreground (%(default)s)")
    optimization.add_argument("--no-nonzero-mask", action="store_true",
                              help="z-score over all voxels, not only the non-zero ones")
    optimization.add_argument("--validation-fraction", type=float, default=DEFAULTS.validation_fraction,
                              help="training cases held out for early stopping (%(default)s)")
    optimization.add_argument("--validate-every", type=int, default=DEFAULTS.validate_every, help="steps (%(default)s)")
    optimization.add_argument("--validation-patches", type=int, default=DEFAULTS.validation_patches,
                              help="(%(default)s)")
    optimization.add_argument("--patience", type=int, default=DEFAULTS.patience,
                              help="validations without improvement before stopping (%(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=DEFAULTS.seed, help="(%(default)s)")
    run.add_argument("--device", default=DEFAULTS.device, help="auto, cpu, cuda, cuda:1 ... (auto)")
    run.add_argument("--bf16", type=_optional_bool, default=None, help="auto (on for CUDA), on or off")
    run.add_argument("--channels-last", type=_optional_bool, default=None, help="auto, on or off")
    run.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every, help="steps (%(default)s)")
    run.add_argument("--num-workers", type=int, default=DEFAULTS.num_workers, help="loader processes (%(default)s)")
    run.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_train_command)
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the parsed arguments describe."""
    return TrainConfig(
        dataset=args.dataset, output_dir=args.output_dir, model=args.model, steps=args.steps or None,
        minutes=args.minutes, batch_size=args.batch_size, patch_size=args.patch_size, lr=args.lr, loss=args.loss,
        width=args.width, features=args.features, n_downsample=args.n_downsample, kernel_voxels=args.kernel_voxels,
        num_radial_basis=args.num_radial_basis, lmax=args.lmax, equivariance=args.equivariance,
        scalar_upsampling=args.scalar_upsampling, rotation_augmentation=args.rotation_augmentation,
        rotation_degrees=args.rotation_degrees, foreground_fraction=args.foreground_fraction,
        use_nonzero_mask=not args.no_nonzero_mask, seed=args.seed, device=args.device, bf16=args.bf16,
        channels_last=args.channels_last, checkpoint_every=args.checkpoint_every,
        validation_fraction=args.validation_fraction, validate_every=args.validate_every,
        validation_patches=args.validation_patches, patience=args.patience, num_workers=args.num_workers,
        progress=not args.no_progress, resume=args.resume, threads=args.threads, check=not args.no_check)


def run_train_command(args: argparse.Namespace) -> int:
    """Check the dataset (and stop there with --check-only) or train; errors become one clear line."""
    from e3fast.data import DatasetError, check_dataset
    from e3fast.training.trainer import train

    try:
        if args.check_only:
            print(check_dataset(args.dataset).summary())
            print("dataset OK")
            return 0
        if not args.output_dir:
            raise SystemExit("e3fast train: --output-dir is required (or pass --check-only)")
        config = config_from_args(args)
        result = train(config)
    except (DatasetError, ValueError, FileNotFoundError) as error:
        print(f"e3fast train: error: {error}", file=sys.stderr)
        return 2
    if result.rank == 0:
        print(f"stopped at step {result.last_step} ({result.stop_reason}); checkpoint {result.checkpoint_path}, "
              f"metrics {result.metrics_path}")
    return 0

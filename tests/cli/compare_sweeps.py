"""Exit 0 when two sweep reports hold the same results: every numeric dataset under /sweep/points,
/sweep/grid and /captures, bit for bit (NaN equal to NaN). Wall times and provenance are not compared
(a resumed sweep ran in two processes).

usage: compare_sweeps.py A.h5 B.h5
"""
import sys

import h5py
import numpy as np

GROUPS = ["/sweep/points", "/sweep/grid", "/captures"]


def datasets(group, prefix):
    for name, item in group.items():
        path = f"{prefix}/{name}"
        if isinstance(item, h5py.Group):
            yield from datasets(item, path)
        elif item.dtype.kind in "fiu":
            yield path, item


def main():
    a_path, b_path = sys.argv[1:3]
    differences = compared = 0
    with h5py.File(a_path, "r") as a, h5py.File(b_path, "r") as b:
        for group in GROUPS:
            if group not in a or group not in b:
                print(f"{group}: missing in {a_path if group not in a else b_path}")
                differences += 1
                continue
            for path, dataset in datasets(a[group], group):
                if path not in b:
                    print(f"{path}: missing in {b_path}")
                    differences += 1
                    continue
                x, y = dataset[...], b[path][...]
                compared += 1
                if x.shape != y.shape or x.dtype != y.dtype or x.tobytes() != y.tobytes():
                    print(f"{path}: differs")
                    differences += 1
    print(f"compared {compared} datasets: {differences} differ")
    return 1 if differences or compared == 0 else 0


if __name__ == "__main__":
    sys.exit(main())

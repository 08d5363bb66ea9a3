"""Exits 0 when two hysparse reports hold the same numbers, bit for bit.

Every dataset must exist in both files with the same shape, dtype and bytes (NaN equals NaN: the
bytes are compared), and every attribute must be equal, except the provenance attributes that
describe the run rather than its results (named in RUN_ATTRIBUTES). Differences are printed.

usage: compare_reports.py A.h5 B.h5
"""
import sys

import h5py
import numpy as np

# Root attributes that say how and when the run happened, not what it computed.
RUN_ATTRIBUTES = {"command_line", "created_utc", "device", "threads", "replay_seconds", "input_sha256_source"}
# The same, on any object (a sweep's per-capture digest source).
RUN_ATTRIBUTES_ANYWHERE = {"sha256_source"}


def same_values(a, b):
    """Bitwise for numbers (so NaN equals NaN and -0.0 differs from 0.0), by value for strings."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "OSU" or b.dtype.kind in "OSU":
        return a.dtype.kind == b.dtype.kind and a.tolist() == b.tolist()
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def describe_difference(a, b):
    """Where two numeric arrays of one shape differ, and by how much."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype or a.dtype.kind != "f":
        return f" (shape {a.shape} {a.dtype} vs {b.shape} {b.dtype})"
    unequal = a.view(f"u{a.itemsize}") != b.view(f"u{b.itemsize}")
    index = tuple(int(i) for i in np.argwhere(unequal)[0])
    return (f": {int(unequal.sum())} of {a.size} values, first at {list(index)}: {a[index]!r} vs {b[index]!r}, "
            f"largest difference {np.nanmax(np.abs(a - b)):.3g}")


def main():
    path_a, path_b = sys.argv[1], sys.argv[2]
    differences = []
    with h5py.File(path_a, "r") as a, h5py.File(path_b, "r") as b:
        names_a, names_b = [], []
        a.visit(names_a.append)
        b.visit(names_b.append)
        if sorted(names_a) != sorted(names_b):
            differences.append(f"objects differ: only in A {sorted(set(names_a) - set(names_b))}, "
                               f"only in B {sorted(set(names_b) - set(names_a))}")
        datasets = 0
        for name in ["/"] + sorted(set(names_a) & set(names_b)):
            obj_a, obj_b = a[name], b[name]
            if isinstance(obj_a, h5py.Dataset):
                datasets += 1
                x, y = obj_a[()], obj_b[()]
                if not same_values(x, y):
                    differences.append(f"dataset {name} differs{describe_difference(x, y)}")
            keys_a, keys_b = set(obj_a.attrs), set(obj_b.attrs)
            if name == "/":
                keys_a, keys_b = keys_a - RUN_ATTRIBUTES, keys_b - RUN_ATTRIBUTES
            keys_a, keys_b = keys_a - RUN_ATTRIBUTES_ANYWHERE, keys_b - RUN_ATTRIBUTES_ANYWHERE
            if keys_a != keys_b:
                differences.append(f"{name}: attributes differ: {sorted(keys_a ^ keys_b)}")
            for key in sorted(keys_a & keys_b):
                if key == "DIMENSION_LIST" or key == "REFERENCE_LIST":
                    continue  # object references: compared through the datasets they point to
                if not same_values(obj_a.attrs[key], obj_b.attrs[key]):
                    differences.append(f"{name}: attribute {key} differs")
    for line in differences[:20]:
        print(line)
    print(f"compare_reports: {datasets} datasets compared, {len(differences)} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main())

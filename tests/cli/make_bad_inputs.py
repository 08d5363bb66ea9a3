"""Writes one malformed capture per case of the README's "Bad input and faults" table.

Each case starts from a copy of a valid capture (made by `hysparse synth`) and breaks exactly one
thing with h5py, so the error the tool reports is the one for that case.

usage: make_bad_inputs.py VALID_CAPTURE OUTPUT_DIR
Prints the name of every file written.
"""
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np


def replace_dataset(f, path, data, **attrs):
    del f[path]
    f[path] = data
    for key, value in attrs.items():
        f[path].attrs[key] = value


def wrong_format(f):
    f.attrs["format"] = "not-a-hysparse-capture"


def wrong_version(f):
    f.attrs["format_version"] = 2


def wrong_rank(f):
    q = f["layers/0/q"][...]
    replace_dataset(f, "layers/0/q", q.reshape(q.shape[0] * q.shape[1], q.shape[2]))


def wrong_shape(f):
    k = f["layers/1/k"][...]
    replace_dataset(f, "layers/1/k", k[:, :-1, :])


def heads_do_not_divide(f):
    f.attrs["num_q_heads"] = 6
    f.attrs["num_kv_heads"] = 4


def missing_layer(f):
    del f["layers/1"]


def nan_value(f):
    q = f["layers/0/q"][...]
    q[1, 5, 3] = np.nan
    f["layers/0/q"][...] = q


def inf_value(f):
    k = f["layers/1/k"][...]
    k[0, 7, 2] = np.inf
    f["layers/1/k"][...] = k


def bfloat16_without_attribute(f):
    q = f["layers/0/q"][...].astype(np.float32)
    bits = (q.view(np.uint32) >> 16).astype(np.uint16)
    replace_dataset(f, "layers/0/q", bits)  # uint16 storage, but no dtype="bfloat16" attribute


def dimensions_overflow(f):
    f.attrs["seq_len"] = 2**40
    f.attrs["num_q_heads"] = 2**24
    f.attrs["num_kv_heads"] = 2**24


def zero_length_sequence(f):
    f.attrs["seq_len"] = 0
    for name in f["layers"]:
        for tensor in ("q", "k", "v"):
            path = f"layers/{name}/{tensor}"
            if path in f:
                shape = f[path].shape
                replace_dataset(f, path, np.zeros((shape[0], 0, shape[2]), dtype=np.float32))


CASES = {
    "wrong_format": wrong_format,
    "wrong_version": wrong_version,
    "wrong_rank": wrong_rank,
    "wrong_shape": wrong_shape,
    "heads_do_not_divide": heads_do_not_divide,
    "missing_layer": missing_layer,
    "nan_value": nan_value,
    "inf_value": inf_value,
    "bfloat16_without_attribute": bfloat16_without_attribute,
    "dimensions_overflow": dimensions_overflow,
    "zero_length_sequence": zero_length_sequence,
}


def main():
    valid, out_dir = Path(sys.argv[1]), Path(sys.argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, breaker in CASES.items():
        path = out_dir / f"{name}.h5"
        shutil.copyfile(valid, path)
        with h5py.File(path, "r+") as f:
            breaker(f)
        print(path.name)


if __name__ == "__main__":
    main()

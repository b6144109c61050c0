"""Peak memory of converting a ViT-L/16-sized official checkpoint (~1.2 GB float32).

    python benchmarks/convert_memory.py [--save] [--dir DIR]

Writes a random checkpoint with the official ViT-L/16 layout (224 px, 1000
classes: 304,326,632 float32 values), then measures, each in a fresh Python
process so that peaks do not mix:

    import     keras_vit imported (the TensorFlow runtime alone)
    build      ViT_L16(weights=None): the model's own weights
    convert    ViT_L16(weights=CKPT.npz): build + strict load from the .npz
    + save     (with --save) the same, then model.save_weights(OUT.weights.h5),
               i.e. `keras-vit convert CKPT.npz OUT.weights.h5 --model ViT_L16`

Peak resident memory is the process's ru_maxrss. The figure of merit is
(peak - import) / checkpoint size: the number of checkpoint-sized copies
alive at the worst moment. The model itself is one copy, so a loader that
read the whole archive into a dict first would show >= 2; keras_vit reads
and assigns one array at a time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


CHILD = r"""
import json, os, resource, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
mode, checkpoint, output = sys.argv[1:4]

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

import keras_vit
result = {"import": peak_mib()}
start = time.perf_counter()
model = keras_vit.ViT_L16(weights=None if mode == "build" else checkpoint)
if mode == "save":
    model.save_weights(output)
result.update(peak=peak_mib(), seconds=time.perf_counter() - start, params=model.count_params())
print(json.dumps(result))
"""


def measure(mode, checkpoint, output):
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, mode, checkpoint, output],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        sys.exit(f"{mode} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save", action="store_true", help="also measure saving a .weights.h5")
    parser.add_argument("--dir", default=None, help="where to write the ~1.2 GB checkpoint (default: a temp dir)")
    args = parser.parse_args()

    import keras_vit  # noqa: F401 (only for VARIANTS, in this parent process)
    from keras_vit.testing import official_arrays, write_checkpoint

    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        checkpoint = os.path.join(folder, "L_16.npz")
        output = os.path.join(folder, "L_16.weights.h5")
        start = time.perf_counter()
        write_checkpoint(checkpoint, official_arrays(**keras_vit.VARIANTS["L/16"], image_size=224, classes=1000))
        size_mib = os.path.getsize(checkpoint) / 2**20
        print(f"checkpoint: {size_mib:,.0f} MiB, written in {time.perf_counter() - start:.0f} s")

        modes = ["build", "convert"] + (["save"] if args.save else [])
        results = {mode: measure(mode, checkpoint, output) for mode in modes}
        baseline = results["convert"]["import"]
        print(f"{'':10}{'peak RSS':>12}{'peak - import':>16}{'/ checkpoint':>14}{'time':>8}")
        print(f"{'import':10}{baseline:>9,.0f} MiB")
        for mode, result in results.items():
            extra = result["peak"] - result["import"]
            print(f"{mode:10}{result['peak']:>9,.0f} MiB{extra:>12,.0f} MiB{extra / size_mib:>13.2f}x"
                  f"{result['seconds']:>7.0f}s")
        loading = results["convert"]["peak"] - results["build"]["peak"]
        print(f"loading on top of building: {loading:,.0f} MiB = {loading / size_mib:.2f}x the checkpoint")


if __name__ == "__main__":
    main()

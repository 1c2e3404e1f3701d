"""GPU smoke check of the inference paths: whole image, tiled, and tiled + external mask + flip
self-ensemble, in fp32/fp16/bf16 on CUDA, against the CPU fp32 result.

  python -m benchmarks.cuda_check
"""
import argparse
import time

import torch

from cliprpn_core import Derainer, DerainOptions, default_model_path, load_model


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    ck = default_model_path()
    ref = Derainer(load_model(ck))  # CPU fp32 reference
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 300, 437, generator=g)
    m = torch.rand(2, 1, 300, 437, generator=g)
    tiled = DerainOptions(tile=128, overlap=32)
    ensemble = DerainOptions(tile=128, overlap=32, self_ensemble=True)
    r_cpu = ref.derain(x, ensemble, mask=m)
    for dt in ("fp32", "fp16", "bf16"):
        d = Derainer(load_model(ck), device="cuda", dtype=dt)
        for name, opt, mask in (("whole", DerainOptions(), None), ("tiled", tiled, None),
                                ("tiled+mask+self_ensemble", ensemble, m)):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r = d.derain(x, opt, mask=mask)
            torch.cuda.synchronize()
            ok = r.images.device.type == "cpu" and r.images.shape == x.shape and bool(torch.isfinite(r.images).all())
            extra = ""
            if opt.self_ensemble:
                extra = f" max|cuda-cpu| {float((r.images - r_cpu.images).abs().max()):.4f}"
            print(dt, name, "ok" if ok else "BAD", f"{1000 * (time.perf_counter() - t):.0f} ms" + extra, flush=True)


if __name__ == "__main__":
    main()

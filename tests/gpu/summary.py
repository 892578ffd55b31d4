"""One JSON summary of `make gpu-check` from the files tests/gpu/check.sh wrote into DIR."""
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch


def tier(path: Path) -> dict:
    if not path.exists():
        return {"ran": False}
    s = ET.parse(path).getroot()
    s = s if s.tag == "testsuite" else s.find("testsuite")
    cases = []
    for c in s.iter("testcase"):
        state = "failed" if c.find("failure") is not None or c.find("error") is not None else \
            "skipped" if c.find("skipped") is not None else "passed"
        cases.append({"test": c.get("name"), "state": state, "seconds": float(c.get("time", 0))})
    return {"ran": True, "passed": sum(c["state"] == "passed" for c in cases),
            "failed": sum(c["state"] == "failed" for c in cases),
            "skipped": sum(c["state"] == "skipped" for c in cases), "cases": cases}


def bench(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


BENCH_1B = ["model.size=1B", "train.tokens_per_batch=32768", "train.dtype=bf16", "model.attn_backend=varlen",
            "parallel.zero_stage=0", "model.in_channels=4"]
"""The 1B bench step's recipe (scaling/bench/step.py defaults with check.sh's --set)."""


def planned(measured: dict | None) -> dict | None:
    """`vidscale plan`'s per-rank memory for the 1B bench step against its measured peak."""
    if not measured or not measured.get("peak_memory_bytes"):
        return None
    from vidscale.scaling.config import load_config
    from vidscale.scaling.train.planner import memory
    m = memory(load_config(None, BENCH_1B), 1)
    m.pop("runtime")  # the CUDA context is not in max_memory_allocated
    pred = sum(m.values())
    got = measured["peak_memory_bytes"]
    return {"predicted_bytes": pred, "measured_bytes": got, "rel_err": abs(pred - got) / got, "breakdown": m}


def main(out: Path) -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    b1 = bench(out / "bench_1B.json")
    return {"machine": {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda},
            "tier": tier(out / "tier.xml"), "bench_step_30M": bench(out / "bench_30M.json"),
            "bench_step_1B_32k": b1, "plan_vs_bench_1B": planned(b1), "bench_wan_1B_32k": bench(out / "bench_wan.json")}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))

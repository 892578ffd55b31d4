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


def main(out: Path) -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"machine": {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda},
            "tier": tier(out / "tier.xml"), "bench_step_30M": bench(out / "bench_30M.json"),
            "bench_step_1B_32k": bench(out / "bench_1B.json")}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1))

"""Reading back what wandb wrote offline (tests of `logging.wandb`): the records of a run-*.wandb
file, and a run's id, config and history from them."""
import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2


def wandb_records(path: Path):
    """The records of a run-*.wandb file: wandb's LevelDB-style log (a 7-byte file header, 32 KiB
    blocks of chunks with a 7-byte header: crc32c, length, type full/first/middle/last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb transaction log"
    pos, chunk = 7, b""
    while pos < len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # full, last
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            yield rec


def offline_runs(run: Path) -> list[Path]:
    """The offline wandb runs under RUN/wandb, one per start of the run (oldest first)."""
    return sorted(run.glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)


def offline_run(path: Path) -> tuple[str, dict, dict[int, dict]]:
    """(run id, config, {step: {key: value}}) of one offline wandb run."""
    run_id, config, history = "", {}, {}
    for rec in wandb_records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "run":  # the run record; wandb may send it again with only some fields set
            run_id = run_id or rec.run.run_id
            config.update({u.key: json.loads(u.value_json) for u in rec.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in rec.config.update})
        elif kind == "history":
            row = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
            history[row.pop("_step")] = row
    return run_id, config, history

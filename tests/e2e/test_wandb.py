"""`logging.wandb` end to end: a 2-rank ZeRO-3 run of recipes/debug.yaml in wandb's offline mode
logs every metrics.jsonl scalar at its step with the same value, the resolved config and the
sample video, from rank 0 only, without a single connection to the W&B server; with the server
unreachable the run warns once and trains exactly as without wandb."""
import hashlib
import json
import socket
import threading
from pathlib import Path

import pytest
import yaml

from conftest import DEBUG_ZERO3, cli_env, read_losses, set_args, vidscale  # noqa: E402
from wandb_log import offline_run, offline_runs  # noqa: E402

pytestmark = pytest.mark.e2e


class Listener:
    """A TCP port on 127.0.0.1 standing in for the W&B server: counts the connections it gets
    and closes them at once (every request fails)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


@pytest.fixture
def server():
    s = Listener()
    yield s
    s.close()


def wandb_env(tmp_path: Path, server: Listener, **extra: str) -> dict:
    """No wandb setting of this machine's; its files under tmp_path; the 'server' at `server`."""
    env = {k: v for k, v in cli_env().items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_DIR": str(tmp_path / "wandb-dir"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
            "WANDB_BASE_URL": server.url, "WANDB_ERROR_REPORTING": "false", **extra}


def test_offline_run_logs_the_metrics_config_and_samples(tmp_path, server, debug_zero3_reference):
    run = tmp_path / "run"
    home_before = home_files()
    r = vidscale("train", "recipes/debug.yaml", "--nproc", "2", "--run-dir", run,
                 *set_args([*DEBUG_ZERO3, "logging.wandb=true", "logging.sample_every=40"]),
                 env=wandb_env(tmp_path, server, WANDB_MODE="offline"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "warning: logging.wandb" not in r.stderr
    assert server.connections == 0  # offline: nothing tried the server
    assert read_losses(run) == debug_zero3_reference  # tracking changed nothing in training

    first = offline_runs(run)
    assert len(first) == 1, f"expected one wandb run (rank 0's), found {first}"
    run_id, config, history = offline_run(first[0])
    assert run_id == (run / "wandb" / "run_id").read_text().strip()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [m["step"] for m in metrics] == list(range(5, 41, 5))
    same_scalars(history, metrics)

    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert {k: config[k] for k in resolved} == resolved

    sample = run / "samples" / "step_0000040_0.mp4"
    video = history[40]["samples/0"] if "samples/0" in history[40] else {
        k.split(".", 1)[1]: v for k, v in history[40].items() if k.startswith("samples/0.")}
    assert video["_type"] == "video-file"
    assert video["sha256"] == hashlib.sha256(sample.read_bytes()).hexdigest()
    assert (next(run.glob("wandb/offline-run-*/files")) / video["path"]).read_bytes() == sample.read_bytes()
    assert home_files() == home_before  # wandb wrote nothing under the home directory

    # a resume continues the same wandb run
    r = vidscale("resume", run, "--nproc", "2", "--set", "train.steps=45",
                 env=wandb_env(tmp_path, server, WANDB_MODE="offline"))
    assert r.returncode == 0, r.stderr[-3000:]
    second = [p for p in offline_runs(run) if p not in first]
    assert len(second) == 1, offline_runs(run)
    resumed_id, _, resumed = offline_run(second[0])
    assert resumed_id == run_id and sorted(resumed) == [45]
    same_scalars(resumed, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1:])
    assert server.connections == 0


def same_scalars(history: dict[int, dict], metrics: list[dict]) -> None:
    """Every metrics.jsonl scalar is in wandb's history at its step with the same value (wandb
    keeps ints as ints where metrics.jsonl writes floats: equal as numbers)."""
    for m in metrics:
        row = history[m["step"]]
        assert {k: row[k] for k in m if k != "step"} == {k: v for k, v in m.items() if k != "step"}, m["step"]


def home_files() -> set[Path]:
    """What wandb would write under the home directory without WANDB_*_DIR."""
    home = Path.home()
    return {p for d in (".config/wandb", ".cache/wandb", ".local/share/wandb") for p in (home / d).rglob("*")} | (
        {home / ".netrc"} if (home / ".netrc").exists() else set())


def test_unreachable_service_warns_once_and_trains_the_same(tmp_path, server, debug_zero3_reference):
    run = tmp_path / "run"
    env = wandb_env(tmp_path, server, WANDB_MODE="online", WANDB_API_KEY="0" * 40)
    r = vidscale("train", "recipes/debug.yaml", "--nproc", "2", "--run-dir", run,
                 *set_args([*DEBUG_ZERO3, "logging.wandb=true", "logging.wandb_timeout_s=5"]), env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert server.connections > 0  # it did try the server
    warnings = [line for line in r.stderr.splitlines() if "logging.wandb" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: logging.wandb: could not start"), warnings
    assert read_losses(run) == debug_zero3_reference

"""Every `vidscale bench` runs with `--json --quick` (the smallest sizes that still exercise its
code) and prints the keys its module docstring and the README document."""
import json

import pytest

from vidscale.scaling.cli.bench import BENCHES

from conftest import cli_env, vidscale  # noqa: E402

pytestmark = pytest.mark.e2e

SCHEME_KEYS = {"memory_ratio", "time_ratio", "max_abs_diff", "peak_bytes_sp1", "peak_bytes_sp2", "bytes_per_layer",
               "analytic_bytes_per_layer"}
KEYS = {
    "packing": {"efficiency", "pad_efficiency", "bucket_efficiency", "efficiency_full_bins", "bins", "videos",
                "budget", "lookahead", "tokens_min", "tokens_max", "pack_videos_per_s", "goal_efficiency",
                "goal_met"},
    "loader": {"loader_batches_per_s", "step_batches_per_s", "loader_speedup", "goal_speedup", "goal_met",
               "videos_per_batch", "packing_efficiency", "samples", "shards", "prepare_s", "workers",
               "tokens_per_batch", "model"},
    "step": {"mfu", "mfu_cpu_time", "tokens_per_s", "real_tokens_per_s", "peak_flops", "model_flops_per_s",
             "peak_flops_per_cpu_s", "model_flops_per_cpu_s", "step_s", "step_flops", "split", "goal_mfu", "model",
             "params", "tokens_per_step", "dtype", "device", "zero_stage", "compile", "threads", "reps"},
    "dp": {"dp_time_ratio", "goal_dp_time_ratio", "goal_met", "step_s_dp1", "step_s_dp2", "tokens_per_rank",
           "tokens_per_s_dp1", "tokens_per_s_dp2", "overrides"},
    "sp": {"tokens", "sp", "ulysses", "ring", "memory_ratio", "time_ratio", "max_abs_diff"},
    "zero": {"stage", "size", "state_bytes_dp1", "state_bytes_dp2", "state_bytes_ratio", "breakdown_dp1",
             "breakdown_dp2"},
    "checkpoint": {"ckpt_MB", "files", "save_MBps", "raw_write_MBps", "save_ratio", "load_MBps", "raw_read_MBps",
                   "load_ratio", "load_noverify_MBps", "load_noverify_ratio", "stall_s", "stall_sync_s", "step_s",
                   "model_size"},
    "hosts": {"cross_host_bytes_per_step", "cross_host_ratio", "analytic_ratio", "analytic_bytes_per_step",
              "goal_cross_host_ratio", "goal_met", "bytes_by_host", "step_s", "run_s", "losses", "max_loss_diff", "params",
              "param_bytes", "hosts", "ranks_per_host", "steps", "warmup_steps", "activation_checkpointing",
              "overrides"},
    "wan": {"vidscale_tokens_per_s", "wan_tokens_per_s", "speedup", "goal_speedup", "tokens", "hidden", "depth",
            "heads", "params_vidscale", "params_wan", "device"},
    "plan": {"cases", "max_rel_err_memory", "max_rel_err_time", "calibrated_mfu", "calibrated_on", "peak_flops",
             "machine"},
}
QUICK_HERE = sorted(set(KEYS) - {"hosts"})
"""`bench hosts` needs root and a test bed of hosts: tests/cluster/test_bench_hosts.py runs it."""


def test_every_bench_has_its_keys_listed_here():
    assert set(KEYS) == {name for name, _, _ in BENCHES}


@pytest.mark.parametrize("name", QUICK_HERE)
def test_bench_quick_json(name):
    r = vidscale("bench", name, "--json", "--quick", timeout=300, env=cli_env())
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert KEYS[name] <= set(out), sorted(KEYS[name] - set(out))
    if name == "sp":
        for scheme in ("ulysses", "ring"):
            assert SCHEME_KEYS <= set(out[scheme])
        assert out["max_abs_diff"] < 1e-4  # quick, still exact
    if name == "step":
        assert out["model"] == "debug" and out["reps"] == 1 and out["split"]
    if name == "zero":
        assert set(out["breakdown_dp1"]) == {"params", "master_params", "grads", "optimizer", "ema", "total"}
        assert out["state_bytes_ratio"] < 1
    if name == "plan":  # a ZeRO-0 and a ZeRO-3 sp=2 case; the planner's memory within the goal
        assert len(out["cases"]) == 2 and {c["world"] for c in out["cases"]} == {1, 2}
        for c in out["cases"]:
            assert {"config", "predicted_bytes", "measured_bytes", "rel_err"} <= set(c)
        assert out["max_rel_err_memory"] <= 0.15, out["cases"]
    if name == "checkpoint":
        assert out["files"] > 0 and out["ckpt_MB"] > 0

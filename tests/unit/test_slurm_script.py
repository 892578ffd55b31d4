"""The sbatch script vidscale renders: options, quoting, validation (no cluster needed)."""
import os
import subprocess
from pathlib import Path

import pytest

from vidscale.cluster.job import new_job, read_job
from vidscale.cluster.slurm import plan, render, time_seconds
from vidscale.cluster.slurm_task import torch_env
from vidscale.scaling.config import load_config

from conftest import ROOT  # noqa: E402


def cfg_with(tmp_path, *over):
    return load_config(ROOT / "recipes/debug.yaml", [f"train.run_dir={tmp_path / 'run'}", "cluster.nproc=4",
                                                     "parallel.zero_stage=3", *over])


def sbatch_options(script: str) -> list[str]:
    return [l.split(None, 1)[1] for l in script.splitlines() if l.startswith("#SBATCH ")]


def test_script_has_every_requested_option(tmp_path):
    cfg = cfg_with(tmp_path, "cluster.slurm.nodes=2", "cluster.slurm.gpus_per_node=4",
                   "cluster.slurm.cpus_per_task=8", "cluster.slurm.time=2-00:00:00",
                   "cluster.slurm.partition=gpu", "cluster.slurm.account=proj42", "cluster.slurm.qos=high",
                   "cluster.slurm.constraint=a100&ib", "cluster.slurm.signal_seconds=300",
                   "cluster.slurm.extra=[--exclusive,--mem=0]")
    opts = sbatch_options(render(plan(cfg)))
    for o in ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=4", "--cpus-per-task=8", "--time=2-00:00:00",
              "--partition=gpu", "--account=proj42", "--qos=high", "--constraint=a100&ib", "--requeue",
              "--open-mode=append", "--signal=B:USR1@300", "--exclusive", "--mem=0",
              f"--output={tmp_path / 'run'}/slurm-%j.out"]:
        assert o in opts, (o, opts)


def test_hostile_run_name_cannot_inject_shell(tmp_path):
    evil = tmp_path / "pwned"
    name = f'x"; touch {evil}; echo "$(touch {evil})`touch {evil}`\nrm -rf /'
    cfg = cfg_with(tmp_path)
    cfg.name = name
    script = render(plan(cfg))
    for bad in ['"; touch', "$(touch", "`touch", "\nrm -rf"]:
        assert bad not in script
    assert "#SBATCH --job-name=vidscale-x___touch_" in script
    # run the script with stand-ins for srun/scontrol: it must create nothing
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in [("srun", "exit 0"), ("scontrol", "echo localhost")]:
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    (tmp_path / "run").mkdir()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "localhost"}
    r = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert not evil.exists()


@pytest.mark.parametrize("key,value,words", [
    ("cluster.slurm.partition", "'gpu;reboot'", ["cluster.slurm.partition", "verbatim"]),
    ("cluster.slurm.account", "'a b'", ["cluster.slurm.account"]),
    ("cluster.slurm.extra", "['--mem=1G --exclusive']", ["cluster.slurm.extra", "--mem=1G --exclusive"]),
    ("cluster.slurm.extra", "['#SBATCH --x']", ["cluster.slurm.extra"]),
    ("cluster.slurm.time", "soon", ["cluster.slurm.time", "soon"]),
    ("cluster.slurm.signal_seconds", "4000", ["cluster.slurm.signal_seconds", "01:00:00"]),
    ("cluster.slurm.nodes", "3", ["cluster.nproc", "cluster.slurm.nodes"]),
])
def test_bad_slurm_options_are_one_line_errors(tmp_path, key, value, words):
    cfg = cfg_with(tmp_path, f"{key}={value}")
    with pytest.raises(ValueError) as e:
        plan(cfg)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_run_dir_with_shell_characters_is_refused(tmp_path):
    cfg = cfg_with(tmp_path, f"train.run_dir={tmp_path}/a$(reboot)")
    with pytest.raises(ValueError, match="train.run_dir"):
        plan(cfg)


def test_slurm_time_formats():
    assert time_seconds("30") == 1800
    assert time_seconds("10:30") == 630
    assert time_seconds("01:00:00") == 3600
    assert time_seconds("1-2") == 93600
    assert time_seconds("1-02:03:04") == 93784


def test_torch_env_from_slurm_task_variables():
    env = torch_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
                     "SLURM_NNODES": "4", "SLURM_NTASKS_PER_NODE": "2(x4)"})
    assert env == {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "NODE_RANK": "2",
                   "GROUP_RANK": "2"}
    with pytest.raises(ValueError, match="srun"):
        torch_env({})


def test_job_record_keeps_history(tmp_path):
    job = new_job("slurm", tmp_path, ["vidscale", "train", "x.yaml"], job_ids=["12"], state="PENDING")
    job.save()
    job.set_state("COMPLETED")
    again = new_job("slurm", tmp_path, ["vidscale", "resume", str(tmp_path)], job_ids=["13"])
    again.save()
    back = read_job(tmp_path)
    assert back.job_ids == ["13"] and back.history[0]["job_ids"] == ["12"]
    assert back.history[0]["state"] == "COMPLETED" and back.launcher == "slurm"


def test_ray_on_slurm_starts_every_ray_process_with_a_job_token(tmp_path):
    script = render(plan(cfg_with(tmp_path, "cluster.slurm.ray=true")))
    setup = script.index("export RAY_AUTH_MODE=token")
    assert setup < script.index("start --head") < script.index("start --address") < script.index("ray_launcher")
    assert 'RAY_AUTH_TOKEN_PATH="$RUN_DIR/.ray-token-$SLURM_JOB_ID"' in script and "umask 077" in script
    # the token lines as the batch script runs them: a fresh 0600 file
    lines = script[setup:script.index("srun --nodes=1")]
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    # (a submitting shell that drove a local cluster passes on Ray's single-machine mode, in
    # which the head would not print the address the other nodes join: it is dropped)
    r = subprocess.run(["bash", "-c", f"set -u; RUN_DIR={run}; SLURM_JOB_ID=7\n{lines}\necho $RAY_AUTH_MODE "
                        "${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-unset}"], capture_output=True, text=True, timeout=30,
                       env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert r.returncode == 0 and r.stdout.strip() == "token unset", r.stdout + r.stderr
    token = run / ".ray-token-7"
    assert (token.stat().st_mode & 0o777) == 0o600 and len(token.read_text().strip()) == 64


@pytest.mark.parametrize("node_line,want", [
    # Slurm 22.05 `scontrol show -o node NAME`: the address Slurm itself uses, whatever NAME resolves to
    ("NodeName=gpu-a01 Arch=x86_64 CoresPerSocket=1 NodeAddr=10.1.2.3 NodeHostName=gpu-a01 Version=22.05.8",
     "10.1.2.3"),
    ("", "gpu-a01"),  # scontrol cannot say: the node's name, as before
])
def test_rendezvous_is_the_first_nodes_address(tmp_path, node_line, want):
    """The script's rendezvous lines run by bash against a stand-in `scontrol` that answers as
    Slurm does (hostnames of the job's node list, then the first node's record)."""
    script = render(plan(cfg_with(tmp_path, "cluster.slurm.nodes=2")))
    lines = script.split("# rendezvous", 1)[1].split("export MASTER_PORT", 1)[0]
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text(f"""#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'gpu-a01\\ngpu-a02\\n' ;;
  "show -o") [ "$3 $4" = "node gpu-a01" ] && [ -n '{node_line}' ] && echo '{node_line}' || exit 1 ;;
esac
""")
    (bin_ / "scontrol").chmod(0o755)
    r = subprocess.run(["bash", "-c", f"#{lines}\necho $MASTER_ADDR"], capture_output=True, text=True,
                       env={"PATH": f"{bin_}:/usr/bin:/bin", "SLURM_JOB_NODELIST": "gpu-a[01-02]"})
    assert r.returncode == 0 and r.stdout.strip() == want, r.stdout + r.stderr


def test_a_state_recorded_meanwhile_is_not_overwritten_from_an_older_read(tmp_path):
    """`status` / `cancel` read job.json, look at the launching process, then write: the
    launcher may have recorded how the run ended in between, and that must stay."""
    new_job("local", tmp_path, ["vidscale", "train"], state="RUNNING", pid=1).save()
    seen = read_job(tmp_path)  # what `status` read
    read_job(tmp_path).set_state("COMPLETED")  # the launcher, just before it exited
    assert not seen.replace_state("EXITED", {"RUNNING"})
    assert seen.state == "COMPLETED" and read_job(tmp_path).state == "COMPLETED"
    again = read_job(tmp_path)
    again.set_state("RUNNING")
    assert read_job(tmp_path).replace_state("EXITED", {"RUNNING"}) and read_job(tmp_path).state == "EXITED"
    # a record of a newer launch (resume) is never written over by what was read of the old one
    new_job("local", tmp_path, ["vidscale", "resume"], state="RUNNING", pid=2).save()
    assert not again.replace_state("EXITED", {"RUNNING"}) and read_job(tmp_path).pid == 2


def test_a_slurm_command_that_does_not_answer_is_one_line(tmp_path):
    from vidscale.cluster.slurm import SlurmTimeout, call
    with pytest.raises(SlurmTimeout) as e:
        call(["sleep", "5"], timeout=0.3)
    assert str(e.value) == "sleep 5: no answer in 0.3 s (is the Slurm controller down or overloaded?)"
    assert isinstance(e.value, ValueError)  # the CLI prints it as one line


def test_a_percent_in_the_run_dir_stays_literal_in_the_log_path(tmp_path):
    cfg = load_config(ROOT / "recipes/debug.yaml", [f"train.run_dir={tmp_path / 'lr%x'}", "cluster.nproc=2"])
    opts = sbatch_options(render(plan(cfg)))
    assert f"--output={tmp_path}/lr%%x/slurm-%j.out" in opts, opts
    script = render(plan(cfg))
    assert 'if ! scontrol requeue "$SLURM_JOB_ID"; then' in script and "exit 1" in script

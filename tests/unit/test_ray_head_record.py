"""`python -m vidscale.cluster.ray_cluster up/down` find their head through DIR/head.json. A
record outlives a head that was killed; its pid may then belong to another process of the
user, which `down` (and `up`, replacing a head that does not answer) must never signal."""
import json
import subprocess
import sys

from vidscale.cluster.proctree import proc
from vidscale.cluster.ray_cluster import RayHead, private_dir, read_head, stop_head

from conftest import ROOT  # noqa: E402


def test_a_stale_head_record_whose_pid_was_reused_is_never_signalled(tmp_path):
    d = private_dir(tmp_path / "ray")
    other = subprocess.Popen(["sleep", "120"])  # the user's editor, say, now holding the dead head's pid
    try:
        record = {"pid": other.pid, "gcs_address": "127.0.0.1:1", "dashboard": "http://127.0.0.1:1", "dir": str(d),
                  "token": ""}
        (d / "head.json").write_text(json.dumps({**record, "start": proc(other.pid).start - 1}))
        assert read_head(d) is None
        r = subprocess.run([sys.executable, "-m", "vidscale.cluster.ray_cluster", "down", "--dir", str(d)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "no Ray head recorded" in r.stdout, r.stdout + r.stderr
        assert other.poll() is None
        # a record written before start times were kept: a process that is not `ray start --head` is not it
        (d / "head.json").write_text(json.dumps(record))
        assert read_head(d) is None
        assert stop_head(RayHead(**record)) is False and not (d / "head.json").exists()
        assert other.poll() is None
        # the record of the live head itself (pid and start time) is the head
        (d / "head.json").write_text(json.dumps({**record, "start": proc(other.pid).start}))
        assert read_head(d) == RayHead(**record, start=proc(other.pid).start)
    finally:
        other.kill()
        other.wait()

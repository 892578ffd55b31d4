"""cluster/proctree.py on real processes: the tree of what a process started, stopped even when
it ignores SIGTERM and outlives its parent (as Ray's agents do), and nothing else."""
import os
import signal
import subprocess
import sys
import time

from vidscale.cluster.proctree import alive, children, proc, stop_tree, tree

# a parent that starts a child ignoring SIGTERM, prints the child's pid, then waits
PARENT = "trap '' TERM; sleep 300 & echo $!; wait"


def test_stop_tree_ends_a_tree_whose_members_ignore_sigterm():
    before = children(os.getpid())
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])  # started before: not ours
    parent = subprocess.Popen(["bash", "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        kid = int(parent.stdout.readline())
        roots = [p for p in map(proc, children(os.getpid()) - before) if p and p.pid == parent.pid]
        found = tree(roots)
        assert {p.pid for p in found} == {parent.pid, kid}
        os.kill(parent.pid, signal.SIGKILL)  # the parent goes first: the child is orphaned, still alive
        parent.wait()
        orphan = next(p for p in found if p.pid == kid)
        assert alive(orphan) and tree(roots) == []  # no longer reachable from the root: hence the snapshot
        os.kill(kid, signal.SIGTERM)
        time.sleep(0.3)
        assert alive(orphan)  # ignored
        t0 = time.monotonic()
        assert stop_tree(found, grace_s=0.5) == []  # SIGKILL after the grace
        assert time.monotonic() - t0 < 10 and not alive(orphan)
        assert other.poll() is None  # a process outside the tree is left alone
    finally:
        for p in (parent, other):
            if p.poll() is None:
                p.kill()
                p.wait()

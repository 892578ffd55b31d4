"""`make setup`'s warmup and torch's extension build lock: a lock left by a killed build made
every later load wait for ever; the warmup removes one that old and leaves a live one."""
from vidscale.scaling.warmup import STALE_LOCK_S, build_lock, clear_stale_lock


def test_a_stale_build_lock_is_removed_and_a_live_one_kept(tmp_path):
    lock = tmp_path / "lock"
    assert clear_stale_lock(lock) == ""
    lock.touch()
    made = lock.stat().st_mtime
    assert clear_stale_lock(lock, now=made + 5) == "building" and lock.exists()  # another build at work
    assert clear_stale_lock(lock, now=made + STALE_LOCK_S + 1) == "removed" and not lock.exists()


def test_the_lock_is_in_the_build_folder_of_deepspeeds_own_shm_op():
    """The extension name is DeepSpeed's (it could change with a DeepSpeed version)."""
    from deepspeed.ops.op_builder import ShareMemCommBuilder
    lock = build_lock()
    assert lock.name == "lock" and lock.parent.name == ShareMemCommBuilder().name

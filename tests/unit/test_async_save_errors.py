"""checkpoint.async_save: a save that fails in the background is raised by the run at its next
save, or at its end, never lost; the failed save leaves nothing behind and earlier checkpoints
and `latest` stay as they were."""
import errno

import pytest

from vidscale.scaling.checkpoint import storage
from vidscale.scaling.train.loop import train

from conftest import short_run


@pytest.mark.parametrize("fail_at,steps,every", [(2, 6, 2), (4, 4, 2)], ids=["at-the-next-save", "at-the-end"])
def test_a_failed_background_save_is_raised(tmp_path, monkeypatch, fail_at, steps, every):
    monkeypatch.setenv(storage.FAULT_ENV, f"enospc@{fail_at}")
    run = tmp_path / "run"
    cfg = short_run(run, f"train.steps={steps}", f"checkpoint.every={every}", "checkpoint.async_save=true")
    with pytest.raises(storage.CheckpointError) as e:
        train(cfg)
    assert isinstance(e.value.__cause__ or e.value, OSError)
    assert "No space left" in str(e.value) or str(errno.ENOSPC) in str(e.value)
    assert str(run / "checkpoints") in str(e.value)  # names the file it could not write
    root = run / "checkpoints"
    tags = [t for _, t in storage.committed(root)]
    assert storage.tag_for(fail_at) not in tags and not list(root.glob(".tmp-*"))
    if fail_at == 2:  # raised at the step-4 save: nothing after the failure was committed either
        assert tags == []
    else:  # the step-2 save before it is intact and still the latest
        assert tags == [storage.tag_for(2)] and storage.read_latest(root) == storage.tag_for(2)
        storage.verify(root / tags[0])

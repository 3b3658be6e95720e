"""The Checkpointer's temporary directories, without training: a failed save removes what it
created and nothing else; what a killed save left is removed when a writer opens the
directory, never by a reader. (Full disks and damaged checkpoints of a real run:
test_workdir_safety.py.)"""

import errno
import os

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest

from attn.training import checkpoint

TMP = ocp.utils.TMP_DIR_SUFFIX  # Orbax writes step N to N.orbax-checkpoint-tmp, then renames it


def state(step: int) -> dict:
    return {'step': jnp.asarray(step, jnp.int32), 'w': jnp.full((256,), step, jnp.float32)}


class FullDisk:
    """A data iterator whose state cannot be written, as on a full disk: the save fails after
    it has created its temporary directory, which is recorded as it fails."""

    def __init__(self, directory):
        self.directory = directory
        self.seen: list[str] = []

    def get_state(self):
        self.seen = sorted(os.listdir(self.directory))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize('async_save', [True, False])
def test_a_failed_save_removes_only_what_it_created(tmp_path, async_save):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=None, async_save=async_save)
    ckpt.save(1, state(1))
    ckpt.wait()
    # Saves of another process in progress beside this one: of the same step (named as older
    # Orbax versions name them) and of another.
    foreign = [tmp_path / f'2{TMP}-4242', tmp_path / f'3{TMP}']
    for path in foreign:
        path.mkdir()
        (path / 'array').write_bytes(b'not ours')
    disk = FullDisk(tmp_path)
    with pytest.raises(
        checkpoint.CheckpointError,
        match=rf'No space left on device: saving checkpoint 2 in {tmp_path} failed .*'
        'Checkpoints 1 are intact',
    ):
        ckpt.save(2, state(2), disk)
        ckpt.wait()
    ckpt.close()
    assert f'2{TMP}' in disk.seen  # the failed save had created its temporary directory
    assert sorted(os.listdir(tmp_path)) == sorted(['1', *(p.name for p in foreign)])
    assert all((p / 'array').read_bytes() == b'not ours' for p in foreign)
    assert checkpoint.Checkpointer(tmp_path, keep=None, create=False).all_steps() == [1]


def test_a_killed_save_is_removed_by_the_next_writer_and_never_by_a_reader(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, keep=None, async_save=False)
    ckpt.save(1, state(1))
    ckpt.close()
    killed = tmp_path / f'2{TMP}'  # a save whose process was killed: never renamed
    (killed / 'state').mkdir(parents=True)
    reader = checkpoint.Checkpointer(tmp_path, keep=None, create=False)
    assert reader.all_steps() == [1]
    reader.close()
    assert killed.exists()
    writer = checkpoint.Checkpointer(tmp_path, keep=None, async_save=False)
    writer.save(3, state(3))  # after Orbax's clean-up, which the writer started on opening
    writer.close()
    assert sorted(os.listdir(tmp_path)) == ['1', '3']

"""A stranger's SB3 checkpoint runs no code: agents.sb3.load rebuilds every pickled field of
model.zip from sb3_config.json and refuses a zip holding any other pickled field, unread."""

from __future__ import annotations

import base64
import json
import os
import zipfile

import numpy as np
import pytest

from agents import sb3

KWARGS = {"max_steps": 4, "token_mode": "topk", "k": 4}


class _Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_entry(marker: str) -> dict:
    import cloudpickle

    return {
        ":type:": "<class 'object'>",
        ":serialized:": base64.b64encode(cloudpickle.dumps(_Payload(marker))).decode(),
    }


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = sb3.SB3Config(num_envs=2, n_steps=4, batch_size=4, n_epochs=1)
    model = sb3.build("textenvs/Summarize-v0", config, **KWARGS)
    model.learn(8)
    folder = tmp_path_factory.mktemp("ckpt") / "ppo"
    sb3.save(model, folder, config, "textenvs/Summarize-v0", KWARGS)
    return folder, model


def _tampered(folder, tmp_path, field: str, marker: str):
    """A copy of the checkpoint whose model.zip has ``field`` set to a code-running pickle."""
    import shutil

    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    zip_path = copy / "model.zip"
    with zipfile.ZipFile(zip_path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(entries["data"])
    data[field] = _payload_entry(marker)
    entries["data"] = json.dumps(data).encode()
    with zipfile.ZipFile(zip_path, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    return copy


def test_a_pickle_in_a_field_we_do_not_rebuild_is_refused_unread(checkpoint, tmp_path):
    folder, _ = checkpoint
    marker = tmp_path / "ran"
    tampered = _tampered(folder, tmp_path, "evil_field", str(marker))
    with pytest.raises(ValueError, match="pickled fields \\['evil_field'\\].*nothing was loaded"):
        sb3.load(tampered)
    assert not marker.exists()


@pytest.mark.parametrize("field", ["policy_class", "observation_space", "lr_schedule"])
def test_a_pickle_in_a_rebuilt_field_is_never_unpickled(checkpoint, tmp_path, field):
    folder, model = checkpoint
    marker = tmp_path / "ran"
    loaded, _ = sb3.load(_tampered(folder, tmp_path, field, str(marker)))
    assert not marker.exists()
    assert type(loaded.policy) is type(model.policy)


def test_our_own_checkpoint_loads_and_acts_the_same(checkpoint):
    folder, model = checkpoint
    loaded, meta = sb3.load(folder)
    obs = np.random.default_rng(0).normal(size=(5, *model.observation_space.shape))
    obs = obs.astype(np.float32)
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )
    assert meta["env_kwargs"] == KWARGS
    assert sb3.serialized_fields(folder / "model.zip") <= set(sb3.REBUILT_FIELDS)


def test_a_file_that_is_not_a_model_zip_is_refused(tmp_path):
    path = tmp_path / "model.zip"
    path.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="not an SB3 model.zip"):
        sb3.serialized_fields(path)

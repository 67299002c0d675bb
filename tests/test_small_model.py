"""The embedded model's recipe (`training.small_model`): stage configs and continuing from a finished model."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import config_from_dict
from training.small_model import main, stage_config


def test_stage_configs_carry_the_recipe_and_its_options(tmp_path):
    first = config_from_dict(stage_config(1, tmp_path, [tmp_path / "clips"], 10, "init"))
    assert Path(first.output_dir) == tmp_path / "stage1" and first.train.mouth_weight == 0.0
    assert first.data.num_frames == 1 and first.train.learning_rate == 5e-4
    default = config_from_dict(stage_config(2, tmp_path, [tmp_path / "clips"], 10, "init"))
    assert default.train.mouth_weight == 4.0 and default.train.condition_dropout.motion == 0.2
    assert default.train.learning_rate == 2e-4 and Path(default.output_dir) == tmp_path / "stage2"
    assert (first.train.seed, default.train.seed) == (1, 2)  # the shipped model's documented commands
    more = config_from_dict(
        stage_config(2, tmp_path, [tmp_path / "clips"], 10, "model", name="stage2_continued", mouth_weight=8.0,
                     motion_dropout=0.3, learning_rate=1e-4, seed=5)
    )  # fmt: skip
    assert Path(more.output_dir) == tmp_path / "stage2_continued" and more.init.pipeline == "model"
    assert more.train.mouth_weight == 8.0 and more.train.condition_dropout.motion == 0.3
    assert more.train.learning_rate == 1e-4 and more.train.max_steps == 10 and more.train.seed == 7


def test_continuing_from_a_folder_that_is_not_a_model_is_a_clear_error(tmp_path, monkeypatch):
    import training.small_model as small_model

    clips = tmp_path / "clips"
    monkeypatch.setattr(small_model, "prepare_data", lambda *args: (clips, tmp_path / "photos"))
    monkeypatch.setattr("training.mouth.measure_clips", lambda clips: None)
    with pytest.raises(SystemExit, match=r"--continue-from .*nothing: not a model folder"):
        main(["--work", str(tmp_path / "work"), "--continue-from", str(tmp_path / "nothing")])

"""Specification of common/protocol.py: what server and client agree on."""

import dataclasses

import pytest

from common.protocol import PHASES, TRAIN_FEDTAN, TrainSettings


def test_train_settings_travel_through_a_config_unchanged():
    settings = TrainSettings(
        batch_size=12, local_steps=5, lr=0.05, momentum=0.9, weight_decay=1e-4, freeze_bn_stats=True
    )
    assert TrainSettings.from_config(settings.to_config()) == settings


def test_a_config_without_a_training_setting_is_refused_by_name():
    config = TrainSettings(
        batch_size=12, local_steps=1, lr=0.1, momentum=0.0, weight_decay=0.0
    ).to_config()
    del config["weight-decay"]
    with pytest.raises(ValueError, match="lacks 'weight-decay'"):
        TrainSettings.from_config(config)


@pytest.mark.parametrize("phase", list(PHASES))
def test_each_phase_names_its_payloads_vectors(phase):
    spec = PHASES[phase]
    vectors = [f.name for f in dataclasses.fields(spec.payload) if f.name != "count"]
    assert spec.name == phase and list(spec.fields) == vectors
    assert spec.query.category == "query"


def test_a_message_type_splits_into_flowers_category_and_action():
    assert (TRAIN_FEDTAN.category, TRAIN_FEDTAN.action) == ("train", "fedtan")

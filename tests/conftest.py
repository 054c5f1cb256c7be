import os

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.checkpoints import tiny_bert, tiny_gpt2  # noqa: E402

from analysis.presets import FIJI  # noqa: E402,F401  (the notebook's text)

REPEATS = "The cat sat on the mat. The cat sat on the mat again, and the dog watched the cat."


@pytest.fixture(scope="session")
def gpt2_path(tmp_path_factory):
    """8 layers, 12 heads, as the core issue asks: layer 6 exists, as in the notebook."""
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def bert_path(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def gpt2(gpt2_path):
    from analysis import load_model

    return load_model(str(gpt2_path))


@pytest.fixture(scope="session")
def minilm():
    from analysis import load_model

    return load_model("auto")


@pytest.fixture(scope="session")
def pickle_only_path(tmp_path_factory, gpt2_path):
    """A GPT-2 checkpoint whose weights exist only as a pickle file."""
    from transformers import AutoModel

    path = tmp_path_factory.mktemp("pickle-only")
    model = AutoModel.from_pretrained(gpt2_path)
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="session")
def t5_path(tmp_path_factory):
    from transformers import T5Config, T5Model

    path = tmp_path_factory.mktemp("tiny-t5")
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    T5Model(config).save_pretrained(path)
    return path


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium driven by playwright (never `playwright install`: it downloads)."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does this)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()

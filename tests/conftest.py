import atexit
import os
import shutil
import tempfile

# Before anything imports huggingface_hub (which reads these once, at import): nothing in the tests may reach
# the hub, and no test may see this machine's Hugging Face cache (a cached gpt2 would turn `auto` into GPT-2).
# The served app and the CLI run in subprocesses that inherit this environment, so they see the same empty cache.
HF_HOME = tempfile.mkdtemp(prefix="headscope-test-hf-")
atexit.register(shutil.rmtree, HF_HOME, ignore_errors=True)
os.environ.update(HF_HUB_OFFLINE="1", HF_HOME=HF_HOME, HF_HUB_CACHE=os.path.join(HF_HOME, "hub"),
                  HF_XET_CACHE=os.path.join(HF_HOME, "xet"), HF_ASSETS_CACHE=os.path.join(HF_HOME, "assets"))
os.environ.pop("TRANSFORMERS_CACHE", None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from analysis.presets import FIJI  # noqa: F401  (the notebook's text)
from tests.checkpoints import tiny_bert, tiny_gpt2

REPEATS = "The cat sat on the mat. The cat sat on the mat again, and the dog watched the cat."


@pytest.fixture(autouse=True, scope="session")
def validated_specs():
    """Every chart spec a test renders into a page is checked against Vega-Lite's schema, as the CLI and the app
    skip for speed (reports.html.VALIDATE_SPECS)."""
    import reports.html

    reports.html.VALIDATE_SPECS = True
    yield
    reports.html.VALIDATE_SPECS = False


@pytest.fixture(scope="session")
def gpt2_path(tmp_path_factory):
    """8 layers, 12 heads, as the core issue asks: layer 6 exists, as in the notebook."""
    return tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def steady_gpt2_path(tmp_path_factory):
    """gpt2_path's shape with GPT-2's own initializer_range (0.02): for runs compared across processes, where the
    CPU's BLAS may round differently. A one-ulp change of every embedding moves its head scores by ~6e-8; gpt2_path's
    sharp heads (0.2) grow it to ~2e-6, and a CI rerun of a batch report saw a sink score move by 1.3e-5."""
    return tiny_gpt2(tmp_path_factory.mktemp("steady-gpt2"), initializer_range=0.02)


@pytest.fixture(scope="session")
def steady_gpt2(steady_gpt2_path):
    from analysis import load_model

    return load_model(str(steady_gpt2_path))


@pytest.fixture(scope="session")
def bert_path(tmp_path_factory):
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def gpt2(gpt2_path):
    from analysis import load_model

    return load_model(str(gpt2_path))


@pytest.fixture(scope="session")
def minilm():
    """The bundled all-MiniLM-L6-v2, by name (not `auto`, which means gpt2 wherever gpt2 is cached)."""
    from analysis import load_model
    from analysis.loading import BUNDLED_ID

    loaded = load_model("minilm")
    assert (loaded.info.id, loaded.info.architecture) == (BUNDLED_ID, "BertModel")
    return loaded


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
    """Debian's headless Chromium driven by playwright (never `playwright install`: it downloads).

    A missing playwright or chromium fails the browser tests instead of skipping them: CI installs both, and a
    skipped browser test would let a report that draws nothing pass."""
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail("playwright is missing: pip install -r requirements-dev.txt (.ci/run does this)")
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does this)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()

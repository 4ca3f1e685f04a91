"""The checkpoint registry: which decoder file goes with which network, latent format, VAE and text encoder.

All model knowledge lives in `registry.yaml` (at the repository's top level) so that supporting a new checkpoint (or
a user's fine-tune) is a data change, not a new code branch. User files (`--registry FILE`, `$PID_REGISTRY`) use the
same schema and are validated on load; every error names the file, the entry and the field so a typo is quick to
find. Values that become paths (repo ids, Hub file paths, revisions, entry ids) must stay inside their folder, and
a registry path must be a regular file (a FIFO or a device would block or never end).
"""

from __future__ import annotations

import copy
import itertools
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REGISTRY_ENV = "PID_REGISTRY"


def _builtin_registry() -> Path:
    """The built-in registry: `pid_cli/registry.yaml` in an installed wheel, else the repository's top-level
    `registry.yaml`. The tree holds one copy, at the top where maintainers look for it; setup.py copies it into
    the wheel's package at build time, so a source checkout or an editable install (`pip install -e .`, which
    runs this file from the checkout) finds no packaged copy and reads the top-level file."""
    here = Path(__file__).resolve().parent
    packaged = here / "registry.yaml"
    return packaged if packaged.is_file() else here.parent / "registry.yaml"


BUILTIN_REGISTRY = _builtin_registry()

# Fields a `base:` entry does not pass on: they identify or rank an entry rather than describe the model.
_NOT_INHERITED = ("id", "answers_to", "superseded", "experiment")
_TOP_KEYS = {"version", "targets", "default_variants", "aliases", "shared", "entries"}
_ENTRY_KEYS = {"id", "base", "backbone", "variant", "answers_to", "superseded", "experiment", "hub", "path",
               "tensor_bytes", "num_tensors", "net_config", "latent", "vae", "text_encoder", "sampler",
               "sr_scale", "output_sizes", "licence"}
# Hugging Face repo ids (huggingface_hub's validate_repo_id, ASCII only, with the owner required): each part
# starts and ends with a letter, digit or '_', has no '--' or '..', at most 96 characters.
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_RE = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
# Entry ids name files (`<id>.safetensors` of `pid convert`): one file-name-like token, never a path.
_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_DEFAULT_ALLOW = ("*.json", "*.safetensors", "*.model")


# VAE formats whose encoder pid implements (`pid_cli.vae`), by codec kind; entries with another format
# decode latents only. The RAE (DINOv2) and Scale-RAE (SigLIP-2) encoders have no decoder in pid.
IMAGE_ENCODER_KINDS = {"bfl-flux1-ae": "flux1", "bfl-flux2-ae": "flux2", "diffusers-sd3-vae": "sd3",
                       "diffusers-sdxl-vae": "sdxl", "qwenimage-vae-2d": "qwenimage", "rae-dinov2": "dinov2",
                       "scale-rae-siglip2": "siglip"}


class RegistryError(ValueError):
    """A registry file is malformed, or a backbone/variant request cannot be satisfied."""


@dataclass(frozen=True)
class FileRef:
    """One file: on the Hub when `repo` is set (`path` relative to the repo root), else a local file."""

    path: str
    repo: str | None = None
    revision: str = "main"
    size: int | None = None
    sha256: str | None = None

    @property
    def is_local(self) -> bool:
        return self.repo is None

    def describe(self) -> str:
        return self.path if self.is_local else f"{self.repo}/{self.path}"


@dataclass(frozen=True)
class RepoRef:
    """A whole model folder (text encoder, Hugging Face encoders): a Hub repo filtered by patterns, or local."""

    repo: str | None = None
    path: str | None = None
    revision: str = "main"
    allow_patterns: tuple[str, ...] = _DEFAULT_ALLOW

    @property
    def is_local(self) -> bool:
        return self.repo is None

    def describe(self) -> str:
        return str(self.path) if self.is_local else f"{self.repo} ({', '.join(self.allow_patterns)})"


@dataclass(frozen=True)
class Latent:
    channels: int
    vae_factor: int
    unpatchify: int = 1
    patchify: int = 1
    normalisation: dict[str, Any] = field(default_factory=dict)
    fixed_grid: tuple[int, int] | None = None
    # "euler-ve": x_t = x0 + σ·ε as SDXL's Euler scheduler keeps it (docs/model.md#sdxl-sigma-frame)
    sigma_frame: str = "flow"
    comfyui: str | None = None  # what ComfyUI's LATENT holds: "raw" VAE output, "pid" (normalised), None: no such


@dataclass(frozen=True)
class Vae:
    format: str
    files: dict[str, FileRef] = field(default_factory=dict)
    repos: dict[str, RepoRef] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sampler:
    type: str
    t_list: tuple[float, ...]


@dataclass(frozen=True)
class OutputSizes:
    buckets: tuple[tuple[int, int], ...] = ()  # (width, height)
    levels: tuple[int, ...] = ()
    aspect_ratios: tuple[str, ...] = ()
    multiple_of: int = 16
    fixed: bool = False


@dataclass(frozen=True)
class Licence:
    name: str
    url: str | None = None


@dataclass(frozen=True)
class Entry:
    """One decoder checkpoint and everything needed to run it. Treat the dict fields as read-only."""

    id: str
    backbone: str
    variant: str
    weights: FileRef
    net_config: dict[str, Any]
    latent: Latent
    sampler: Sampler
    sr_scale: int
    answers_to: tuple[str, ...] = ()
    superseded: bool = False
    experiment: str | None = None
    tensor_bytes: int | None = None
    num_tensors: int | None = None
    vae: Vae | None = None
    text_encoder: RepoRef | None = None
    output_sizes: OutputSizes = OutputSizes()
    licence: Licence | None = None
    source: str = ""  # the registry file this entry came from

    @property
    def names(self) -> tuple[str, ...]:
        """Every variant name that selects this entry."""
        return (self.variant, *self.answers_to)

    @property
    def approx_size(self) -> int | None:
        """Exact file size when the registry knows it, else the tensor payload (a close lower bound)."""
        return self.weights.size or self.tensor_bytes


def normalise_variant(name: str) -> str:
    """`2kto4k_v1pt5` (upstream spelling) and `2KTO4K-V1.5` both mean `2kto4k-v1.5`."""
    return name.strip().lower().replace("_", "-").replace("v1pt5", "v1.5")


# ---------------------------------------------------------------------------------------------------------
# Names that become paths


def path_problem(path: str) -> str | None:
    """Why a repo file path (or a revision) is unsafe to join to a folder, or None when it is safe.

    Hub paths and revisions become local paths (`<dir>/<owner>/<repo>/<path>`, the HF cache's snapshots/ and
    refs/), from the registry or from whatever an HF_ENDPOINT mirror lists, so each must stay inside its folder
    on POSIX and Windows alike: '/'-separated, relative, no '..', '.' or empty components, no drive letters."""
    if not path:
        return "is empty"
    if any(ord(c) < 32 or c == "\x7f" for c in path):
        return "contains a NUL or control character"
    if "\\" in path:
        return "contains a backslash"
    if path.startswith("/"):
        return "is absolute"
    parts = path.split("/")
    if "" in parts:
        return "has an empty component ('//' or a trailing '/')"
    for dots in ("..", "."):
        if dots in parts:
            return f"has a {dots!r} component"
    if any(_DRIVE_RE.match(p) for p in parts):
        return "has a drive letter ('C:')"
    return None


def repo_id_problem(repo: str) -> str | None:
    """Why `repo` is not a Hugging Face repo id ('owner/name'), or None; the id becomes `<dir>/<owner>/<name>`."""
    if _REPO_RE.fullmatch(repo) and "--" not in repo and ".." not in repo and not repo.endswith(".git"):
        return None
    return ("expected 'owner/name' (letters, digits, '-', '_', '.'; each part starts and ends with a letter, "
            "digit or '_'; no '--' or '..'; not ending in '.git')")


def entry_id_problem(entry_id: str) -> str | None:
    """Why `entry_id` is not a safe id, or None: ids name files (`<cache>/converted/<id>.safetensors`)."""
    if _ID_RE.fullmatch(entry_id) and ".." not in entry_id:
        return None
    return ("expected a file-name-like id (letters, digits, '.', '_', '-', '+'; starting with a letter, digit "
            "or '_'; no '/', '\\' or '..'; at most 128 characters)")


# ---------------------------------------------------------------------------------------------------------
# Parsing and validation


class _Where:
    """Error context: which file, which entry, which field."""

    def __init__(self, file: str, entry: str | None = None):
        self.file, self.entry = file, entry

    def error(self, fld: str | None, msg: str) -> RegistryError:
        parts = [self.file]
        if self.entry is not None:
            parts.append(f"entry {self.entry}")
        if fld:
            parts.append(f"field '{fld}'")
        return RegistryError(": ".join(parts) + f": {msg}")


def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _get(where: _Where, data: Mapping, key: str, kind: type | tuple, prefix: str = "", *,
         required: bool = True, default: Any = None) -> Any:
    fld = f"{prefix}{key}"
    if key not in data or data[key] is None:
        if required:
            raise where.error(fld, "is required")
        return default
    value = data[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int subclass; a `true` where a number belongs is a typo, not a 1.
    if isinstance(value, bool) and bool not in kinds:
        raise where.error(fld, f"expected {'/'.join(k.__name__ for k in kinds)}, got bool")
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kinds):
        raise where.error(fld, f"expected {'/'.join(k.__name__ for k in kinds)}, got {_typename(value)} "
                               f"({value!r})")
    return value


def _positive(where: _Where, fld: str, value: int | None) -> int | None:
    if value is not None and value <= 0:
        raise where.error(fld, f"must be positive, got {value}")
    return value


def _check_keys(where: _Where, data: Mapping, allowed: Iterable[str], prefix: str = "") -> None:
    unknown = sorted(set(map(str, data)) - set(allowed))
    if unknown:
        raise where.error(f"{prefix}{unknown[0]}", f"unknown field (allowed: {', '.join(sorted(allowed))})")


def _local_path(base_dir: Path, value: str) -> str:
    path = Path(os.path.expanduser(os.path.expandvars(value)))
    return str(path if path.is_absolute() else (base_dir / path).resolve())


def _file_ref(where: _Where, data: Any, fld: str, base_dir: Path) -> FileRef:
    if not isinstance(data, Mapping):
        raise where.error(fld, f"expected a mapping with repo/path, got {_typename(data)}")
    _check_keys(where, data, {"repo", "path", "revision", "size", "sha256"}, f"{fld}.")
    path = _get(where, data, "path", str, f"{fld}.")
    repo = _hub_repo(where, data, fld)
    sha = _get(where, data, "sha256", str, f"{fld}.", required=False)
    if sha is not None and not _SHA256_RE.fullmatch(sha.lower()):
        raise where.error(f"{fld}.sha256", "expected 64 hexadecimal digits")
    if repo is not None and (problem := path_problem(path)) is not None:
        raise where.error(f"{fld}.path", f"must be a relative path inside the repo, got {path!r}: it {problem}")
    return FileRef(
        path=path if repo is not None else _local_path(base_dir, path),
        repo=repo,
        revision=_revision(where, data, fld),
        size=_positive(where, f"{fld}.size", _get(where, data, "size", int, f"{fld}.", required=False)),
        sha256=sha.lower() if sha else None,
    )


def _hub_repo(where: _Where, data: Mapping, fld: str) -> str | None:
    repo = _get(where, data, "repo", str, f"{fld}.", required=False)
    if repo is not None and (problem := repo_id_problem(repo)) is not None:
        raise where.error(f"{fld}.repo", f"{problem}, got {repo!r}")
    return repo


def _revision(where: _Where, data: Mapping, fld: str) -> str:
    """A branch, tag or commit; huggingface_hub keeps `refs/<revision>` in its cache, so it is a path too."""
    revision = _get(where, data, "revision", str, f"{fld}.", required=False, default="main")
    if (problem := path_problem(revision)) is not None:
        raise where.error(f"{fld}.revision", f"expected a branch, tag or commit, got {revision!r}: it {problem}")
    return revision


def _repo_ref(where: _Where, data: Any, fld: str, base_dir: Path) -> RepoRef:
    if not isinstance(data, Mapping):
        raise where.error(fld, f"expected a mapping with repo or path, got {_typename(data)}")
    _check_keys(where, data, {"repo", "path", "revision", "allow_patterns"}, f"{fld}.")
    repo = _get(where, data, "repo", str, f"{fld}.", required=False)
    path = _get(where, data, "path", str, f"{fld}.", required=False)
    if (repo is None) == (path is None):
        raise where.error(fld, "give exactly one of 'repo' (Hugging Face model) or 'path' (local folder)")
    _hub_repo(where, data, fld)
    patterns = _get(where, data, "allow_patterns", list, f"{fld}.", required=False, default=list(_DEFAULT_ALLOW))
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise where.error(f"{fld}.allow_patterns", "expected a non-empty list of glob patterns")
    return RepoRef(
        repo=repo,
        path=_local_path(base_dir, path) if path is not None else None,
        revision=_revision(where, data, fld),
        allow_patterns=tuple(patterns),
    )


_NORMALISATION_FIELDS: dict[str, dict[str, type | tuple]] = {
    "affine": {"shift": float, "scale": float},
    "per_channel": {"mean": list, "std": list},
    "batchnorm": {"eps": float},
    "stats_file": {"eps": float, "file_role": str},
    "layernorm": {"eps": float},
    "none": {},
}


def _latent(where: _Where, data: Any, net: Mapping[str, Any]) -> Latent:
    if not isinstance(data, Mapping):
        raise where.error("latent", f"expected a mapping, got {_typename(data)}")
    _check_keys(where, data, {"channels", "vae_factor", "unpatchify", "patchify", "normalisation", "fixed_grid",
                              "sigma_frame", "comfyui"}, "latent.")
    channels = _positive(where, "latent.channels", _get(where, data, "channels", int, "latent."))
    vae_factor = _positive(where, "latent.vae_factor", _get(where, data, "vae_factor", int, "latent."))
    unpatchify = _positive(where, "latent.unpatchify",
                           _get(where, data, "unpatchify", int, "latent.", required=False, default=1))
    patchify = _positive(where, "latent.patchify",
                         _get(where, data, "patchify", int, "latent.", required=False, default=1))
    norm = _get(where, data, "normalisation", dict, "latent.", required=False, default={"kind": "none"})
    kind = _get(where, norm, "kind", str, "latent.normalisation.")
    if kind not in _NORMALISATION_FIELDS:
        raise where.error("latent.normalisation.kind",
                          f"unknown kind {kind!r} (known: {', '.join(_NORMALISATION_FIELDS)})")
    for key, typ in _NORMALISATION_FIELDS[kind].items():
        value = _get(where, norm, key, typ, "latent.normalisation.")
        if typ is list and (len(value) != channels or not all(isinstance(v, (int, float)) for v in value)):
            raise where.error(f"latent.normalisation.{key}", f"expected {channels} numbers (one per channel)")
    grid = _get(where, data, "fixed_grid", list, "latent.", required=False)
    if grid is not None and (len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid)):
        raise where.error("latent.fixed_grid", "expected [height, width] in latent cells")
    # The latent description and the network must agree, or the first decode would fail deep inside the net.
    for fld, value, net_key in (("channels", channels, "lq_latent_channels"),
                                ("unpatchify", unpatchify, "lq_latent_unpatchify_factor"),
                                ("vae_factor", vae_factor, "latent_spatial_down_factor")):
        if net_key in net and net[net_key] != value:
            raise where.error(f"latent.{fld}", f"{value} disagrees with net_config.{net_key} = {net[net_key]}")
    frame = _get(where, data, "sigma_frame", str, "latent.", required=False, default="flow")
    if frame not in ("flow", "euler-ve"):
        raise where.error("latent.sigma_frame", f"expected 'flow' or 'euler-ve', got {frame!r}")
    comfyui = _get(where, data, "comfyui", str, "latent.", required=False)
    if comfyui not in (None, "raw", "pid"):
        raise where.error("latent.comfyui", f"expected 'raw' or 'pid', got {comfyui!r}")
    return Latent(channels, vae_factor, unpatchify, patchify, dict(norm), tuple(grid) if grid else None, frame,
                  comfyui)


def _vae(where: _Where, data: Any, base_dir: Path) -> Vae:
    if not isinstance(data, Mapping):
        raise where.error("vae", f"expected a mapping, got {_typename(data)}")
    _check_keys(where, data, {"format", "files", "repos", "options"}, "vae.")
    files = _get(where, data, "files", dict, "vae.", required=False, default={})
    repos = _get(where, data, "repos", dict, "vae.", required=False, default={})
    if not files and not repos:
        raise where.error("vae", "needs at least one entry under 'files' or 'repos'")
    return Vae(
        format=_get(where, data, "format", str, "vae."),
        files={str(role): _file_ref(where, ref, f"vae.files.{role}", base_dir) for role, ref in files.items()},
        repos={str(role): _repo_ref(where, ref, f"vae.repos.{role}", base_dir) for role, ref in repos.items()},
        options=dict(_get(where, data, "options", dict, "vae.", required=False, default={})),
    )


def _sampler(where: _Where, data: Any) -> Sampler:
    if not isinstance(data, Mapping):
        raise where.error("sampler", f"expected a mapping, got {_typename(data)}")
    _check_keys(where, data, {"type", "t_list"}, "sampler.")
    kind = _get(where, data, "type", str, "sampler.")
    if kind not in ("sde", "ode"):
        raise where.error("sampler.type", f"expected 'sde' or 'ode', got {kind!r}")
    t_list = _get(where, data, "t_list", list, "sampler.")
    if (len(t_list) < 2 or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in t_list)
            or any(b > a for a, b in itertools.pairwise(t_list)) or t_list[-1] != 0):
        raise where.error("sampler.t_list", "expected a non-increasing list of times ending at 0")
    return Sampler(kind, tuple(float(t) for t in t_list))


def _output_sizes(where: _Where, data: Any) -> OutputSizes:
    if not isinstance(data, Mapping):
        raise where.error("output_sizes", f"expected a mapping, got {_typename(data)}")
    _check_keys(where, data, {"buckets", "levels", "aspect_ratios", "multiple_of", "fixed"}, "output_sizes.")
    multiple = _positive(where, "output_sizes.multiple_of",
                         _get(where, data, "multiple_of", int, "output_sizes.", required=False, default=16))
    buckets = []
    for i, text in enumerate(_get(where, data, "buckets", list, "output_sizes.", required=False, default=[])):
        m = _SIZE_RE.match(str(text))
        if not m or int(m[1]) % 16 or int(m[2]) % 16:
            raise where.error(f"output_sizes.buckets[{i}]", f"expected WIDTHxHEIGHT in multiples of 16, got {text!r}")
        buckets.append((int(m[1]), int(m[2])))
    levels = _get(where, data, "levels", list, "output_sizes.", required=False, default=[])
    if not all(isinstance(v, int) and v > 0 for v in levels):
        raise where.error("output_sizes.levels", "expected a list of positive integers")
    ratios = _get(where, data, "aspect_ratios", list, "output_sizes.", required=False, default=[])
    if not all(isinstance(r, str) and re.match(r"^\d+:\d+$", r) for r in ratios):
        raise where.error("output_sizes.aspect_ratios", "expected strings like \"16:9\" (quote them in YAML)")
    return OutputSizes(tuple(buckets), tuple(levels), tuple(ratios), multiple,
                       _get(where, data, "fixed", bool, "output_sizes.", required=False, default=False))


def _parse_entry(where: _Where, data: Mapping[str, Any], base_dir: Path, source: str) -> Entry:
    _check_keys(where, data, _ENTRY_KEYS - {"base"})
    has_hub, has_path = data.get("hub") is not None, data.get("path") is not None
    if has_hub == has_path:
        raise where.error("hub", "give exactly one of 'hub: {repo, path}' or 'path: /local/file'")
    if has_hub:
        weights = _file_ref(where, data["hub"], "hub", base_dir)
        if weights.is_local:
            raise where.error("hub.repo", "is required (use top-level 'path:' for a local file)")
    else:
        weights = FileRef(path=_local_path(base_dir, _get(where, data, "path", str)))
    net = _get(where, data, "net_config", dict)
    for key in ("lq_latent_channels", "sr_scale", "latent_spatial_down_factor"):
        _positive(where, f"net_config.{key}", _get(where, net, key, int, "net_config."))
    sr_scale = _positive(where, "sr_scale", _get(where, data, "sr_scale", int))
    if sr_scale != net["sr_scale"]:
        raise where.error("sr_scale", f"{sr_scale} disagrees with net_config.sr_scale = {net['sr_scale']}")
    answers = _get(where, data, "answers_to", list, required=False, default=[])
    if not all(isinstance(a, str) and a for a in answers):
        raise where.error("answers_to", "expected a list of variant names")
    licence = _get(where, data, "licence", dict, required=False)
    if licence is not None:
        _check_keys(where, licence, {"name", "url"}, "licence.")
        licence = Licence(_get(where, licence, "name", str, "licence."),
                          _get(where, licence, "url", str, "licence.", required=False))
    entry_id = _get(where, data, "id", str)
    if (problem := entry_id_problem(entry_id)) is not None:
        raise where.error("id", f"{problem}, got {entry_id!r}")
    vae = data.get("vae")
    text = data.get("text_encoder")
    return Entry(
        id=entry_id,
        backbone=_get(where, data, "backbone", str).strip().lower(),
        variant=normalise_variant(_get(where, data, "variant", str)),
        answers_to=tuple(normalise_variant(a) for a in answers),
        superseded=_get(where, data, "superseded", bool, required=False, default=False),
        experiment=_get(where, data, "experiment", str, required=False),
        weights=weights,
        tensor_bytes=_positive(where, "tensor_bytes", _get(where, data, "tensor_bytes", int, required=False)),
        num_tensors=_positive(where, "num_tensors", _get(where, data, "num_tensors", int, required=False)),
        net_config=copy.deepcopy(dict(net)),
        latent=_latent(where, data.get("latent"), net) if "latent" in data else _missing(where, "latent"),
        vae=_vae(where, vae, base_dir) if vae is not None else None,
        text_encoder=_repo_ref(where, text, "text_encoder", base_dir) if text is not None else None,
        sampler=_sampler(where, data["sampler"]) if "sampler" in data else _missing(where, "sampler"),
        sr_scale=sr_scale,
        output_sizes=_output_sizes(where, data["output_sizes"]) if "output_sizes" in data else OutputSizes(),
        licence=licence,
        source=source,
    )


def _missing(where: _Where, fld: str) -> Any:
    raise where.error(fld, "is required")


# ---------------------------------------------------------------------------------------------------------
# The merged registry


@dataclass
class Registry:
    entries: list[Entry]
    aliases: dict[str, str]
    targets: dict[str, str]
    default_variants: tuple[str, ...]
    sources: tuple[str, ...] = ()

    def get(self, entry_id: str) -> Entry:
        for entry in self.entries:
            if entry.id == entry_id:
                return entry
        raise RegistryError(f"no registry entry with id {entry_id!r} (known: {', '.join(self.ids())})")

    def ids(self) -> list[str]:
        return [e.id for e in self.entries]

    def backbones(self) -> list[str]:
        """Canonical backbone names in registry order (aliases excluded)."""
        return list(dict.fromkeys(e.backbone for e in self.entries))

    def canonical_backbone(self, name: str) -> str:
        key = name.strip().lower()
        key = self.aliases.get(key, key)
        if key not in self.backbones():
            raise RegistryError(f"unknown backbone {name!r}. {self.describe_pairs()}")
        return key

    def variant_names(self, backbone: str) -> list[str]:
        """Every variant name accepted for a backbone, canonical names first."""
        entries = [e for e in self.entries if e.backbone == backbone]
        names = [e.variant for e in entries]
        names += [a for e in entries if not e.superseded for a in e.answers_to]
        return list(dict.fromkeys(names))

    def describe_pairs(self) -> str:
        """The valid backbone/variant pairs, for error messages."""
        lines = []
        for backbone in self.backbones():
            aliases = sorted(a for a, b in self.aliases.items() if b == backbone)
            label = backbone + (f" (also {', '.join(aliases)})" if aliases else "")
            lines.append(f"  {label}: {', '.join(self.variant_names(backbone))}")
        return "Valid backbone/variant pairs:\n" + "\n".join(lines)

    def _variant_name(self, variant: str | None, target: str | None) -> str | None:
        if variant is not None and target is not None:
            raise RegistryError("give either a variant or a target, not both")
        if target is not None:
            key = target.strip().lower()
            if key not in self.targets:
                raise RegistryError(f"unknown target {target!r} (known: {', '.join(self.targets)})")
            return self.targets[key]
        return normalise_variant(variant) if variant is not None else None

    def _lookup(self, backbone: str, name: str) -> Entry | None:
        # Later entries win, so a user registry can override a built-in entry.
        for entry in reversed(self.entries):
            if entry.backbone == backbone and entry.variant == name:
                return entry
        for entry in reversed(self.entries):
            if entry.backbone == backbone and name in entry.answers_to and not entry.superseded:
                return entry
        return None

    def resolve(self, backbone: str, variant: str | None = None, target: str | None = None) -> Entry:
        """The entry for a backbone (or alias) and a variant name or target; errors list the valid pairs.

        With neither variant nor target, the first of `default_variants` the backbone has is used.
        """
        canonical = self.canonical_backbone(backbone)
        name = self._variant_name(variant, target)
        candidates = [name] if name is not None else list(self.default_variants)
        for candidate in candidates:
            entry = self._lookup(canonical, candidate)
            if entry is not None:
                return entry
        asked = name if name is not None else f"any of the defaults ({', '.join(self.default_variants)})"
        raise RegistryError(f"no PiD checkpoint for backbone {backbone!r} with variant {asked}. "
                            f"{self.describe_pairs()}")

    def entries_for_variant(self, variant: str | None = None, target: str | None = None,
                            backbones: Sequence[str] | None = None) -> list[Entry]:
        """Entries for several backbones at once (`pid download --variant 2kto4k`).

        Without `backbones`, every backbone that has the variant, skipping superseded checkpoints (those are
        only chosen when both backbone and exact variant are named). Named backbones must all have it.
        """
        if backbones:
            chosen = [self.resolve(b, variant, target) for b in backbones]
        else:
            name = self._variant_name(variant, target)
            if name is None:
                raise RegistryError("name a variant, a target or at least one backbone")
            chosen = [e for b in self.backbones() if (e := self._lookup(b, name)) is not None and not e.superseded]
            if not chosen:
                raise RegistryError(f"no backbone has a variant {name!r}. {self.describe_pairs()}")
        return list({e.id: e for e in chosen}.values())


MAX_REGISTRY_BYTES = 16 << 20  # the built-in registry is ~30 KB
MAX_REGISTRY_NODES = 100_000  # values after expanding YAML aliases (the built-in registry: ~2,600)


def _read_regular_file(path: Path, limit: int) -> bytes:
    """Up to `limit` bytes of a regular file (symlinks followed). A FIFO would block the open until a writer
    comes and a device (/dev/zero, a tty) reads without end, so anything else is refused before it is opened,
    and the open itself never blocks (O_NONBLOCK, checked again on the descriptor in case the path changed)."""
    def refuse(st: os.stat_result) -> RegistryError:
        mode = st.st_mode
        kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket or another special file")
        return RegistryError(f"{path}: a registry must be a regular YAML file, this is {kind}")

    try:
        if not stat.S_ISREG((st := os.stat(path)).st_mode):
            raise refuse(st)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as fh:
            if not stat.S_ISREG((st := os.fstat(fd)).st_mode):
                raise refuse(st)
            return fh.read(limit)
    except OSError as exc:
        raise RegistryError(f"{path}: cannot read registry file: {exc.strerror or exc}") from exc


def _read_yaml(path: Path) -> Any:
    raw = _read_regular_file(path, MAX_REGISTRY_BYTES + 1)
    if len(raw) > MAX_REGISTRY_BYTES:
        raise RegistryError(f"{path}: registry file is larger than {MAX_REGISTRY_BYTES >> 20} MB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RegistryError(f"{path}: not valid YAML: {exc}") from exc
    except RecursionError:
        raise RegistryError(f"{path}: YAML nested too deeply") from None
    except Exception as exc:  # a constructor's own error, e.g. an integer beyond Python's digit limit
        raise RegistryError(f"{path}: not valid YAML ({type(exc).__name__}: {str(exc)[:200]})") from None
    _check_expansion(path, data)
    return data


def _check_expansion(path: Path, data: Any) -> None:
    """Refuse alias bombs ("billion laughs") and self-referencing aliases before anything walks the data.

    yaml.safe_load shares one object per anchor, so loading is cheap, but every later walk (validation,
    `base:` inheritance, json.dumps) sees the expanded tree. Sizes are counted per object, not per visit."""
    sizes: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        key = id(node)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if done:
            active.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(c), 1) for c in children)
            if sizes[key] > MAX_REGISTRY_NODES:
                raise RegistryError(f"{path}: YAML aliases expand to more than {MAX_REGISTRY_NODES} values "
                                    "(an alias bomb?)")
            continue
        if key in active:
            raise RegistryError(f"{path}: a YAML alias refers to a value that contains it (a cycle)")
        if key in sizes:
            continue
        active.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if isinstance(c, (dict, list)))


def _merge_file(reg: Registry, path: Path) -> None:
    """Validate one registry file and fold it into `reg` (later definitions replace earlier ones)."""
    src = str(path)
    top = _Where(src)
    data = _read_yaml(path)
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise top.error(None, f"expected a mapping with an 'entries' list, got {_typename(data)}")
    _check_keys(top, data, _TOP_KEYS)
    version = data.get("version", 1)
    if version != 1:
        raise top.error("version", f"unsupported schema version {version!r} (this pid understands 1)")
    for key, value in _get(top, data, "aliases", dict, required=False, default={}).items():
        if not isinstance(value, str):
            raise top.error(f"aliases.{key}", f"expected a backbone name, got {_typename(value)}")
        reg.aliases[str(key).lower()] = value.lower()
    for key, value in _get(top, data, "targets", dict, required=False, default={}).items():
        if not isinstance(value, str):
            raise top.error(f"targets.{key}", f"expected a variant name, got {_typename(value)}")
        reg.targets[str(key).lower()] = normalise_variant(value)
    defaults = _get(top, data, "default_variants", list, required=False)
    if defaults is not None:
        reg.default_variants = tuple(normalise_variant(str(v)) for v in defaults)

    raw_entries = _get(top, data, "entries", list, required=False, default=[])
    seen_ids: set[str] = set()
    seen_pairs: dict[tuple[str, str], str] = {}
    base_dir = path.resolve().parent
    for index, raw in enumerate(raw_entries):
        label = f"#{index + 1}"
        if isinstance(raw, Mapping) and isinstance(raw.get("id"), str):
            label = f"'{raw['id']}' (#{index + 1})"
        where = _Where(src, label)
        if not isinstance(raw, Mapping):
            raise where.error(None, f"expected a mapping, got {_typename(raw)}")
        _check_keys(where, raw, _ENTRY_KEYS)
        raw = dict(raw)
        if "base" in raw:
            base_id = _get(where, raw, "base", str)
            try:
                base = next(e for e in reversed(reg.entries) if e.id == base_id)
            except StopIteration:
                raise where.error("base", f"no earlier entry with id {base_id!r}") from None
            raw = _inherit(base, raw)
        entry = _parse_entry(where, raw, base_dir, src)
        if entry.id in seen_ids:
            raise where.error("id", f"duplicate id {entry.id!r} in this file")
        pair = (entry.backbone, entry.variant)
        if pair in seen_pairs:
            raise where.error("variant", f"{entry.backbone}/{entry.variant} is already defined by "
                                         f"{seen_pairs[pair]!r} in this file")
        seen_ids.add(entry.id)
        seen_pairs[pair] = entry.id
        reg.entries = [e for e in reg.entries if e.id != entry.id and (e.backbone, e.variant) != pair]
        reg.entries.append(entry)
    reg.sources += (src,)


def _inherit(base: Entry, raw: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the raw mapping of `base` and overlay `raw` on it, for `base:` entries."""
    inherited: dict[str, Any] = {
        "backbone": base.backbone, "variant": base.variant, "net_config": copy.deepcopy(base.net_config),
        "latent": _unparse(base.latent), "sampler": {"type": base.sampler.type, "t_list": list(base.sampler.t_list)},
        "sr_scale": base.sr_scale, "output_sizes": _unparse(base.output_sizes),
        "tensor_bytes": base.tensor_bytes, "num_tensors": base.num_tensors,
    }
    if base.vae is not None:
        inherited["vae"] = _unparse(base.vae)
    if base.text_encoder is not None:
        inherited["text_encoder"] = _unparse(base.text_encoder)
    if base.licence is not None:
        inherited["licence"] = _unparse(base.licence)
    if "hub" not in raw and "path" not in raw:
        inherited.update({"path": base.weights.path} if base.weights.is_local else {"hub": _unparse(base.weights)})
    for key in _NOT_INHERITED:
        inherited.pop(key, None)
    inherited.update({k: v for k, v in raw.items() if k != "base"})
    return inherited


def _unparse(obj: Any) -> Any:
    """Dataclass → the YAML-shaped value it was parsed from (tuples as lists, sizes as WxH)."""
    if isinstance(obj, OutputSizes):
        return {"buckets": [f"{w}x{h}" for w, h in obj.buckets], "levels": list(obj.levels),
                "aspect_ratios": list(obj.aspect_ratios), "multiple_of": obj.multiple_of, "fixed": obj.fixed}
    if hasattr(obj, "__dataclass_fields__"):
        return {k: _unparse(getattr(obj, k)) for k in obj.__dataclass_fields__ if getattr(obj, k) is not None}
    if isinstance(obj, (list, tuple)):
        return [_unparse(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _unparse(v) for k, v in obj.items()}
    return obj


def _check_aliases(reg: Registry) -> None:
    backbones = set(reg.backbones())
    for alias, target in reg.aliases.items():
        if alias in backbones:
            raise RegistryError(f"alias {alias!r} shadows a backbone of the same name (sources: "
                                f"{', '.join(reg.sources)})")
        if target not in backbones:
            raise RegistryError(f"alias {alias!r} points to {target!r}, which has no entries (sources: "
                                f"{', '.join(reg.sources)})")


def user_registry_files(extra: Sequence[str | os.PathLike[str]] = ()) -> list[Path]:
    """User registries in precedence order: `$PID_REGISTRY` first, then `--registry` files."""
    env = [p for p in os.environ.get(REGISTRY_ENV, "").split(os.pathsep) if p.strip()]
    return [Path(os.path.expanduser(p)) for p in [*env, *extra]]


def load_registry(extra: Sequence[str | os.PathLike[str]] = (), *, builtin: bool = True,
                  use_env: bool = True) -> Registry:
    """The built-in registry merged with `$PID_REGISTRY` and then `extra` files (later wins)."""
    reg = Registry(entries=[], aliases={}, targets={}, default_variants=())
    files = ([BUILTIN_REGISTRY] if builtin else []) + (user_registry_files(extra) if use_env else
                                                        [Path(p) for p in extra])
    for path in files:
        _merge_file(reg, path)
    if not reg.entries:
        raise RegistryError(f"no registry entries found in {', '.join(map(str, files)) or 'no files'}")
    _check_aliases(reg)
    return reg


def resolve(backbone: str, variant: str | None = None, target: str | None = None,
            registry: Registry | None = None) -> Entry:
    """`load_registry().resolve(...)`, for callers that do not keep a registry around."""
    return (registry or load_registry()).resolve(backbone, variant, target)


def entries_for_variant(variant: str | None = None, target: str | None = None,
                        backbones: Sequence[str] | None = None, registry: Registry | None = None) -> list[Entry]:
    return (registry or load_registry()).entries_for_variant(variant, target, backbones)

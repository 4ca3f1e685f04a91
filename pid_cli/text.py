"""Text conditioning: Gemma-2 caption embeddings exactly as PiD was trained on them (docs/model.md#text-conditioning).

Pipeline per caption: ``CHI_PREFIX + caption`` → tokens (BOS, right padding/truncation to
``N_chi + M − 2``) → Gemma-2 final-norm hidden states → keep BOS + last ``M − 1`` positions
→ ``[M, D]`` with ``M = 300``, ``D = 2304``. No mask is passed on to PiD: pad-position states
are part of the conditioning.

Embeddings are cached on disk (one safetensors file per prompt) so a second run with the same
prompt never loads the 5 GB encoder, and can be exported with :func:`save_prompt_embeds` so
render nodes never need Gemma at all.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pid_cli.devices import resolve_device
from pid_cli.paths import cache_dir

if TYPE_CHECKING:
    import tokenizers

TEXT_ENCODER_REPO = "Efficient-Large-Model/gemma-2-2b-it"
MODEL_MAX_LENGTH = 300  # M: text tokens PiD sees (y_pos_embedding has 300 rows)
EMBEDS_FORMAT = "pid-prompt-embeds/1"

# Spec §6.2 — data, byte-exact: 8 lines joined by "\n", no trailing newline, ends with "User Prompt: ".
CHI_PREFIX = "\n".join([
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable'
    " for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial"
    " relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without"
    " overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape,"
    " sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing"
    " street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by"
    " towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional"
    " commentary or evaluations:",
    "User Prompt: ",
])
CHI_SHA256 = hashlib.sha256(CHI_PREFIX.encode("utf-8")).hexdigest()


class TextEncoderError(RuntimeError):
    """The text encoder snapshot is missing or unusable."""


class PromptEmbedsError(ValueError):
    """A prompt-embeddings file is malformed or lacks a needed prompt."""


# ---------------------------------------------------------------------------------------------
# Token selection (docs/model.md#text-conditioning) — pure, testable with any tokenizer.


def padded_length(n_chi: int, model_max_length: int = MODEL_MAX_LENGTH) -> int:
    """Length every caption is padded/truncated to: ``N_chi + M − 2`` (N_chi counts BOS)."""
    return n_chi + model_max_length - 2


def selection_indices(seq_len: int, model_max_length: int = MODEL_MAX_LENGTH) -> list[int]:
    """Positions kept from the Gemma output: BOS plus the last ``M − 1`` positions."""
    if seq_len < model_max_length:
        raise ValueError(f"sequence of {seq_len} tokens is shorter than model_max_length={model_max_length}")
    return [0, *range(seq_len - (model_max_length - 1), seq_len)]


def select_tokens(hidden: torch.Tensor, model_max_length: int = MODEL_MAX_LENGTH) -> torch.Tensor:
    """[B, L, D] → [B, M, D]."""
    return hidden[:, selection_indices(hidden.shape[1], model_max_length)]


@dataclass
class CaptionTokenizer:
    """A `tokenizers.Tokenizer` that adds BOS (no EOS) and pads with ``pad_id`` on the right.

    We drive the Rust tokenizer directly rather than through `transformers.AutoTokenizer` so the
    token ids don't depend on the installed transformers' tokenizer classes (their defaults, e.g.
    Gemma's padding side, changed between major versions); this reproduces what 4.57.1's
    ``GemmaTokenizerFast(..., padding="max_length", truncation=True)`` produced.
    """

    tokenizer: tokenizers.Tokenizer
    pad_id: int
    pad_token: str

    @classmethod
    def from_snapshot(cls, folder: Path) -> CaptionTokenizer:
        from tokenizers import Tokenizer, processors

        if not folder.is_dir():
            raise TextEncoderError(f"{folder}: text-encoder snapshot folder not found")
        cfg = _read_json(folder / "tokenizer_config.json") or {}
        bos, pad = _token_str(cfg.get("bos_token"), "<bos>"), _token_str(cfg.get("pad_token"), "<pad>")
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        else:  # e.g. only a sentencepiece model: let transformers convert it once
            try:
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True).backend_tokenizer
            except Exception as exc:
                msg = f"{folder}: no usable tokenizer (expected tokenizer.json): {exc}"
                raise TextEncoderError(msg) from exc
        bos_id, pad_id = tok.token_to_id(bos), tok.token_to_id(pad)
        if bos_id is None or pad_id is None:
            raise TextEncoderError(f"{folder}: tokenizer lacks the BOS {bos!r} or pad {pad!r} token")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)]
        )
        return cls(tok, pad_id, pad)

    def count(self, text: str) -> int:
        """Number of tokens (BOS included) of ``text`` alone, untruncated."""
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        return len(self.tokenizer.encode(text).ids)

    def batch(self, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-truncate/right-pad to exactly ``length`` → (input_ids, attention_mask), [B, length] int64."""
        self.tokenizer.enable_truncation(length, direction="right")
        self.tokenizer.enable_padding(direction="right", pad_id=self.pad_id, pad_token=self.pad_token,
                                      length=length)
        encs = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encs], dtype=torch.long)
        return ids, mask


def tokenize_captions(tok: CaptionTokenizer, captions: Sequence[str], chi: str = CHI_PREFIX,
                      model_max_length: int = MODEL_MAX_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec §6.3 steps 1–3: prefix each caption with ``chi`` and pad/truncate to ``N_chi + M − 2``."""
    length = padded_length(tok.count(chi), model_max_length)
    return tok.batch([chi + c for c in captions], length)


# ---------------------------------------------------------------------------------------------
# The encoder (lazy).


def _device(device: str | torch.device | None) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as exc:
        raise TextEncoderError(str(exc)) from exc


def snapshot_revision(folder: Path) -> str:
    """A cache-key identity for a snapshot folder without hashing 5 GB of weights.

    A Hugging Face cache snapshot is named after its commit hash; anything else is fingerprinted
    from its config/tokenizer bytes and the names and sizes of its weight files.
    """
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", folder.name):
        return folder.name
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            h.update(name.encode() + b"\0" + (folder / name).read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
    return "local-" + h.hexdigest()[:16]


class TextEncoder:
    """Gemma-2 text encoder loaded lazily from a local snapshot folder.

    ``encode`` returns ``[B, M, D]`` on the CPU, in the compute dtype: bfloat16 when run on a GPU
    (what upstream fed PiD), float32 on the CPU (bf16 matmuls on CPU are slow and no more faithful).
    Nothing is read from disk until the first ``encode``; ``unload`` gives the GPU memory back.
    """

    def __init__(self, snapshot: str | Path, *, device: str | torch.device | None = "auto",
                 dtype: torch.dtype | None = None, revision: str | None = None,
                 model_max_length: int = MODEL_MAX_LENGTH, batch_size: int = 8) -> None:
        self.snapshot = Path(snapshot)
        self.device = _device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model_max_length = model_max_length
        self.batch_size = batch_size
        self._revision = revision
        self._tokenizer: CaptionTokenizer | None = None
        self._model: torch.nn.Module | None = None

    @property
    def revision(self) -> str:
        if self._revision is None:
            self._revision = snapshot_revision(self.snapshot)
        return self._revision

    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    @property
    def hidden_size(self) -> int | None:
        """D, from the snapshot's config.json (the model is not loaded); None when it does not say."""
        try:
            size = (_read_json(self.snapshot / "config.json") or {}).get("hidden_size")
        except (OSError, ValueError, AttributeError):
            return None
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None

    def cache_namespace(self) -> dict[str, str]:
        """Everything besides the prompt that determines the embedding (cache key material)."""
        return {"revision": self.revision, "chi_sha256": CHI_SHA256,
                "model_max_length": str(self.model_max_length),
                "dtype": str(self.dtype).removeprefix("torch.")}

    @property
    def tokenizer(self) -> CaptionTokenizer:
        if self._tokenizer is None:
            self._tokenizer = CaptionTokenizer.from_snapshot(self.snapshot)
        return self._tokenizer

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:
            self._model = load_gemma2(self.snapshot, self.device, self.dtype)
        return self._model

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``[B, L, D]`` of the full (prefix + caption + padding) sequence."""
        out = self.model(input_ids.to(self.device), attention_mask.to(self.device))
        return out[0]

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions (without prefix) → ``[B, M, D]`` on the CPU."""
        if not captions:
            raise ValueError("encode() needs at least one caption")
        chunks = []
        for i in range(0, len(captions), self.batch_size):
            ids, mask = tokenize_captions(self.tokenizer, captions[i:i + self.batch_size], CHI_PREFIX,
                                          self.model_max_length)
            hidden = self.hidden_states(ids, mask)                    # [b, N_chi+M-2, D]
            chunks.append(select_tokens(hidden, self.model_max_length).cpu())  # [b, M, D]
        return torch.cat(chunks)

    def unload(self) -> None:
        """Drop the model (and its GPU memory) so the decoder gets the whole card."""
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def load_gemma2(folder: Path, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The bare Gemma-2 decoder (no LM head), eval mode, WITHOUT attention-logit soft-capping.

    Upstream (transformers 4.57.1) ran Gemma-2 through SDPA, which silently skips the
    ``attn_logit_softcapping=50`` of the config; newer transformers refuse SDPA for Gemma-2 and
    apply the soft-cap in eager attention. Clearing the setting and using eager attention gives the
    un-softcapped attention the checkpoints were trained on, on any transformers version.
    """
    import transformers
    from packaging.version import Version
    from transformers import AutoConfig, AutoModel

    if not (folder / "config.json").is_file():
        raise TextEncoderError(f"{folder}: not a text-encoder snapshot (config.json missing)")
    config = AutoConfig.from_pretrained(str(folder))
    if getattr(config, "model_type", None) != "gemma2":
        raise TextEncoderError(f"{folder}: expected a Gemma-2 model, config says {config.model_type!r}")
    config.attn_logit_softcapping = None
    # transformers ≥ 4.56 calls it `dtype` (5.x defaults to the config's bf16); older ones `torch_dtype`.
    dtype_kw = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModel.from_pretrained(str(folder), config=config, attn_implementation="eager",
                                      **{dtype_kw: dtype})
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Disk cache + embedder.


class EmbeddingCache:
    """One safetensors file per (encoder identity, prompt) under ``<cache_dir>/text-embeddings``."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir() / "text-embeddings"

    @staticmethod
    def key(namespace: dict[str, str], prompt: str) -> str:
        blob = json.dumps({**namespace, "prompt": prompt}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def get(self, namespace: dict[str, str], prompt: str, dim: int | None = None) -> torch.Tensor | None:
        """The cached ``[M, D]`` embedding, or None: missing, unreadable, or not what the encoder of `namespace`
        makes (``M = model_max_length`` rows, ``dim`` columns when given, the namespace's dtype, finite values).
        A None is a miss: the caller recomputes the embedding and `put` overwrites the bad entry, so a damaged
        or foreign file is never decoded with and never trusted again."""
        path = self.path(self.key(namespace, prompt))
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                if meta.get("prompt") != prompt or any(meta.get(k) != v for k, v in namespace.items()):
                    return None
                embedding = f.get_tensor("embedding")
        except Exception:
            return None
        # Damaged on disk, or written by something else: recompute rather than decode with it.
        return embedding if _usable_embedding(embedding, namespace, dim) else None

    def put(self, namespace: dict[str, str], prompt: str, embedding: torch.Tensor) -> None:
        path = self.path(self.key(namespace, prompt))
        _atomic_save({"embedding": embedding.contiguous()}, path, {**namespace, "prompt": prompt})


def _usable_embedding(embedding: torch.Tensor, namespace: dict[str, str], dim: int | None) -> bool:
    """``[model_max_length, dim]``, in the namespace's dtype, every value finite."""
    rows, dtype = namespace.get("model_max_length"), namespace.get("dtype")
    return (embedding.dim() == 2 and embedding.shape[1] > 0 and rows in (None, str(embedding.shape[0]))
            and dim in (None, embedding.shape[1]) and embedding.is_floating_point()
            and dtype in (None, str(embedding.dtype).removeprefix("torch."))
            and bool(torch.isfinite(embedding).all()))


class PromptEmbedder:
    """Embeddings for prompts, from the disk cache when possible; Gemma is loaded only for misses."""

    def __init__(self, encoder: TextEncoder, cache: EmbeddingCache | None = None) -> None:
        self.encoder = encoder
        self.cache = cache
        self.hits = 0
        self.misses = 0

    def embed(self, prompts: Sequence[str], *, unload: bool = True) -> torch.Tensor:
        """``[N, M, D]`` on the CPU, row i for ``prompts[i]``; unloads Gemma afterwards by default.

        A lone surrogate (undecodable bytes of a command-line argument, a "\\udc80" escape in a JSON manifest)
        cannot be tokenised or stored: such characters are embedded as "?"."""
        prompts = [p.encode("utf-8", "replace").decode("utf-8") for p in prompts]
        unique = list(dict.fromkeys(prompts))
        ns = self.encoder.cache_namespace()
        found: dict[str, torch.Tensor] = {}
        if self.cache is not None:
            dim = self.encoder.hidden_size
            for p in unique:
                if (t := self.cache.get(ns, p, dim)) is not None:
                    found[p] = t
        missing = [p for p in unique if p not in found]
        self.hits, self.misses = len(found), len(missing)
        if missing:
            computed = self.encoder.encode(missing)
            for p, emb in zip(missing, computed, strict=True):
                found[p] = emb.clone()  # own storage: a view would save the whole batch
                if self.cache is not None:
                    self.cache.put(ns, p, found[p])
            if unload:
                self.encoder.unload()
        return torch.stack([found[p] for p in prompts])


# ---------------------------------------------------------------------------------------------
# Export / import of prompt embeddings (`pid embed -o`, `pid decode --prompt-embeds`).


def save_prompt_embeds(path: str | Path, prompts: Sequence[str], embeds: torch.Tensor,
                       info: dict[str, str] | None = None) -> None:
    """Write ``[N, M, D]`` embeddings with their prompts (in metadata) to a safetensors file.

    Duplicate prompts are stored once. ``info`` (e.g. ``TextEncoder.cache_namespace()``) is kept
    in the metadata for provenance.
    """
    if embeds.ndim != 3 or embeds.shape[0] != len(prompts):
        raise ValueError(f"expected embeds [N={len(prompts)}, M, D], got {list(embeds.shape)}")
    first: dict[str, int] = {}
    for i, p in enumerate(prompts):
        first.setdefault(p, i)
    order = list(first.values())
    meta = {**(info or {}), "format": EMBEDS_FORMAT, "prompts": json.dumps([prompts[i] for i in order])}
    _atomic_save({"prompt_embeds": embeds[order].contiguous()}, Path(path), meta)


def load_prompt_embeds(path: str | Path, model_max_length: int = MODEL_MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Read a file written by :func:`save_prompt_embeds` → ``{prompt: [M, D]}`` (bit-exact)."""
    path = Path(path)
    if not path.is_file():
        raise PromptEmbedsError(f"{path}: prompt-embeddings file not found")
    try:
        with safe_open(str(path), "pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            if "prompt_embeds" not in keys:
                raise PromptEmbedsError(f"{path}: no 'prompt_embeds' tensor (has {keys}); "
                                        "expected a file written by `pid embed`")
            embeds = f.get_tensor("prompt_embeds")
    except PromptEmbedsError:
        raise
    except Exception as exc:
        raise PromptEmbedsError(f"{path}: not a readable safetensors file ({exc})") from exc
    if embeds.ndim != 3 or embeds.shape[1] != model_max_length:
        raise PromptEmbedsError(f"{path}: 'prompt_embeds' is {list(embeds.shape)}, expected "
                                f"[N, {model_max_length}, D]")
    if not embeds.is_floating_point():
        raise PromptEmbedsError(f"{path}: 'prompt_embeds' has dtype {embeds.dtype}, expected floating point")
    if not torch.isfinite(embeds).all():
        raise PromptEmbedsError(f"{path}: 'prompt_embeds' holds NaN or Inf values (they decode to blank images)")
    try:
        prompts = json.loads(meta["prompts"])
    except (KeyError, ValueError):
        prompts = None
    if not (isinstance(prompts, list) and all(isinstance(p, str) for p in prompts)):
        raise PromptEmbedsError(f"{path}: metadata 'prompts' must be a JSON list of strings")
    if len(prompts) != embeds.shape[0]:
        raise PromptEmbedsError(f"{path}: {len(prompts)} prompts in metadata, {embeds.shape[0]} embeddings")
    return dict(zip(prompts, embeds.unbind(0), strict=True))


def lookup_prompt_embeds(table: dict[str, torch.Tensor], prompts: Sequence[str],
                         source: str | Path = "--prompt-embeds") -> torch.Tensor:
    """Stack the embeddings for ``prompts`` → ``[N, M, D]``; a missing prompt is an error, not a re-encode."""
    missing = [p for p in dict.fromkeys(prompts) if p not in table]
    if missing:
        have = ", ".join(repr(_short(p)) for p in list(table)[:5]) + (", …" if len(table) > 5 else "")
        raise PromptEmbedsError(f"{source}: no embedding for prompt {_short(missing[0])!r}"
                                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; "
                                f"it holds {len(table)}: {have}. Re-run `pid embed` with the same prompts.")
    return torch.stack([table[p] for p in prompts])


def embed_prompts(prompts: Sequence[str], *, prompt_embeds: str | Path | None = None,
                  text_encoder: str | Path | None = None, device: str | torch.device | None = "auto",
                  use_cache: bool = True, model_max_length: int = MODEL_MAX_LENGTH) -> torch.Tensor:
    """What decode calls: ``[N, M, D]`` on the CPU, row i for ``prompts[i]``.

    With ``prompt_embeds`` (a `pid embed` file) Gemma is never touched and a missing prompt is an
    error. Otherwise each prompt comes from the disk cache, or Gemma is loaded for the misses and
    unloaded again before returning, so the decoder gets the GPU to itself.
    """
    if prompt_embeds is not None:
        table = load_prompt_embeds(prompt_embeds, model_max_length)
        return lookup_prompt_embeds(table, prompts, source=prompt_embeds)
    encoder = TextEncoder(resolve_text_encoder(text_encoder), device=device, model_max_length=model_max_length)
    return PromptEmbedder(encoder, EmbeddingCache() if use_cache else None).embed(prompts)


# ---------------------------------------------------------------------------------------------
# Locating the snapshot.


def resolve_text_encoder(path: str | Path | None = None) -> Path:
    """The local text-encoder snapshot folder. Never downloads.

    Order: explicit path → ``$PID_TEXT_ENCODER`` → the copy `pid download` fetched
    (``pid_cli.hub.text_encoder_snapshot()``).
    """
    if path is None and (env := os.environ.get("PID_TEXT_ENCODER")):
        path = env
    if path is not None:
        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise TextEncoderError(f"{folder}: not a text-encoder snapshot folder (no config.json)")
        return folder
    from pid_cli import hub

    try:
        return Path(hub.text_encoder_snapshot())
    except hub.HubError as exc:
        raise TextEncoderError(
            f"no local copy of the text encoder {TEXT_ENCODER_REPO} found. Pass --text-encoder PATH "
            "(a folder with config.json, the weights and tokenizer.json), set PID_TEXT_ENCODER, or fetch it:\n"
            f"{exc}") from exc


# ---------------------------------------------------------------------------------------------
# Helpers.


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _token_str(value: Any, default: str) -> str:
    if isinstance(value, dict):  # {"content": "<bos>", ...} in some tokenizer_config.json files
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"

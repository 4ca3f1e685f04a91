"""Text conditioning (docs/model.md#text-conditioning): CHI prefix, token selection, Gemma-2 without soft-cap,
cache, export.

Uses the tiny random Gemma-2 fixture (vocab 512, hidden 64) and a BPE tokenizer trained in memory;
nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import CHI_SHA256, FIXTURE, LONG, TINY_GEMMA, train_tokenizer
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

from pid_cli import text
from pid_cli.cli import app
from pid_cli.text import (
    CHI_PREFIX,
    CaptionTokenizer,
    EmbeddingCache,
    PromptEmbedder,
    PromptEmbedsError,
    TextEncoder,
    TextEncoderError,
    embed_prompts,
    load_prompt_embeds,
    lookup_prompt_embeds,
    padded_length,
    save_prompt_embeds,
    select_tokens,
    selection_indices,
    tokenize_captions,
)

M = 300


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the network or the user's caches."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "pid-cache"))
    monkeypatch.delenv("PID_TEXT_ENCODER", raising=False)


@pytest.fixture(scope="module")
def raw_tokenizer() -> Tokenizer:
    return train_tokenizer()


@pytest.fixture
def caption_tokenizer(raw_tokenizer) -> CaptionTokenizer:
    return CaptionTokenizer(Tokenizer.from_str(raw_tokenizer.to_str()), pad_id=0, pad_token="<pad>")


@pytest.fixture
def snapshot(tmp_path, raw_tokenizer) -> Path:
    """A local snapshot folder like the real one: config + weights + tokenizer files."""
    snap = tmp_path / "gemma-snapshot"
    shutil.copytree(TINY_GEMMA, snap)
    raw_tokenizer.save(str(snap / "tokenizer.json"))
    (snap / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "pad_token": "<pad>"}))
    return snap


def test_chi_prefix_is_byte_exact():
    assert hashlib.sha256(CHI_PREFIX.encode("utf-8")).hexdigest() == CHI_SHA256
    lines = CHI_PREFIX.split("\n")
    assert len(lines) == 8 and lines[-1] == "User Prompt: " and not CHI_PREFIX.endswith("\n")


def test_padding_length_and_selection_rule():
    assert padded_length(10, M) == 308
    idx = selection_indices(308, M)
    assert idx == [0, *range(9, 308)] and len(idx) == M
    hidden = torch.arange(2 * 308, dtype=torch.float32).view(2, 308, 1).expand(2, 308, 3)
    out = select_tokens(hidden, M)
    assert out.shape == (2, M, 3)
    assert out[0, :, 0].tolist() == [float(i) for i in idx]
    with pytest.raises(ValueError, match="shorter"):
        selection_indices(M - 1, M)


def test_tokenization_applies_prefix_pads_and_truncates(caption_tokenizer, raw_tokenizer):
    chi_ids = raw_tokenizer.encode(CHI_PREFIX).ids
    n_chi = len(chi_ids)
    assert chi_ids[0] == 2  # N_chi counts BOS
    ids, mask = tokenize_captions(caption_tokenizer, ["", "a cat", LONG], CHI_PREFIX, M)
    length = n_chi + M - 2
    assert ids.shape == mask.shape == (3, length) and ids.dtype == torch.long
    # Empty caption = the CHI prefix alone, right-padded with <pad>=0.
    assert ids[0, :n_chi].tolist() == chi_ids and mask[0].sum() == n_chi
    assert (ids[0, n_chi:] == 0).all() and (mask[0, n_chi:] == 0).all()
    # Every row carries the prefix (its lone trailing "▁" may merge with the caption's first word).
    assert (ids[:, : n_chi - 1] == torch.tensor(chi_ids[:-1])).all()
    expected = raw_tokenizer.encode(CHI_PREFIX + "a cat").ids
    assert ids[1, : len(expected)].tolist() == expected and mask[1].sum() == len(expected)
    # Long captions are truncated on the right to exactly N_chi + M - 2 tokens, no EOS.
    assert mask[2].all() and ids[2].tolist() == raw_tokenizer.encode(CHI_PREFIX + LONG).ids[:length]


def test_tokenization_matches_upstream_transformers_call(tmp_path, caption_tokenizer, raw_tokenizer):
    """Same ids/mask as upstream's `tokenizer(texts, max_length=..., padding="max_length", truncation=True)`."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(raw_tokenizer.to_str()), bos_token="<bos>",
                                 eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", padding_side="right")
    n_chi = len(hf.encode(CHI_PREFIX))
    texts = [CHI_PREFIX + c for c in ["", "a cat", LONG]]
    ref = hf(texts, max_length=n_chi + M - 2, padding="max_length", truncation=True, return_tensors="pt")
    ids, mask = tokenize_captions(caption_tokenizer, ["", "a cat", LONG], CHI_PREFIX, M)
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"])


def test_gemma_reproduces_unsoftcapped_reference():
    """Upstream's SDPA path ignored attn_logit_softcapping; the encoder must match that, not eager+cap."""
    fx = load_file(FIXTURE / "tiny_gemma2_fixture.safetensors")
    enc = TextEncoder(TINY_GEMMA, device="cpu")
    out = enc.hidden_states(fx["input_ids"], fx["attention_mask"])
    assert out.dtype == torch.float32 and out.shape == fx["last_hidden_state"].shape
    assert (out - fx["last_hidden_state"]).abs().max() <= 1e-4
    assert (out - fx["last_hidden_state_eager_softcapped"]).abs().max() > 1e-2


def test_encoder_is_lazy_and_selects_bos_plus_last_positions(snapshot, caption_tokenizer):
    enc = TextEncoder(snapshot, device="cpu")
    assert not enc.is_loaded
    emb = enc.encode(["a cat", ""])
    assert enc.is_loaded and emb.shape == (2, M, 64) and emb.dtype == torch.float32  # D from config
    ids, mask = tokenize_captions(caption_tokenizer, ["a cat", ""], CHI_PREFIX, M)
    hidden = enc.hidden_states(ids, mask)
    length = ids.shape[1]
    assert torch.equal(emb[:, 0], hidden[:, 0])  # BOS state
    assert torch.equal(emb[:, 1:], hidden[:, length - (M - 1):])  # last 299, padding states included
    assert torch.allclose(enc.encode(["a cat"])[0], emb[0], atol=1e-5)  # batching does not change it
    enc.unload()
    assert not enc.is_loaded


def test_bad_snapshot_is_a_clear_error(tmp_path, snapshot):
    with pytest.raises(TextEncoderError, match="snapshot folder not found"):
        TextEncoder(tmp_path / "nowhere", device="cpu").encode(["a cat"])
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(TextEncoderError, match="expected a Gemma-2 model"):
        TextEncoder(snapshot, device="cpu").encode(["a cat"])


def test_cache_hit_never_loads_gemma(snapshot, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "cache")
    first = PromptEmbedder(TextEncoder(snapshot, device="cpu"), cache)
    a = first.embed(["a cat", "a dog", "a cat"])
    assert a.shape == (3, M, 64) and torch.equal(a[0], a[2])
    assert (first.hits, first.misses) == (0, 2) and not first.encoder.is_loaded  # unloaded after use

    def boom(*args, **kwargs):
        raise AssertionError("Gemma must not be loaded on a cache hit")

    monkeypatch.setattr(text, "load_gemma2", boom)
    second = PromptEmbedder(TextEncoder(snapshot, device="cpu"), cache)
    b = second.embed(["a dog", "a cat"])
    assert (second.hits, second.misses) == (2, 0) and not second.encoder.is_loaded
    assert torch.equal(b, a[[1, 0]])  # bit-identical from disk

    # Only the missing prompt reaches the encoder.
    monkeypatch.undo()
    calls = []
    third = PromptEmbedder(TextEncoder(snapshot, device="cpu"), cache)
    orig = third.encoder.encode
    third.encoder.encode = lambda prompts: calls.append(list(prompts)) or orig(prompts)
    third.embed(["a cat", "a red fox"])
    assert calls == [["a red fox"]] and (third.hits, third.misses) == (1, 1)


def test_cache_key_covers_revision_prefix_and_prompt(snapshot, tmp_path):
    ns = TextEncoder(snapshot, device="cpu", revision="abc").cache_namespace()
    assert ns["revision"] == "abc" and ns["chi_sha256"] == CHI_SHA256 and ns["dtype"] == "float32"
    key = EmbeddingCache.key
    assert key(ns, "x") != key(ns, "y")
    assert key(ns, "x") != key({**ns, "revision": "def"}, "x")
    assert key(ns, "x") != key({**ns, "chi_sha256": "0" * 64}, "x")
    assert key(ns, "x") == key(dict(ns), "x")
    # Without an explicit revision, a fingerprint of the snapshot is used (stable, no weights hashed).
    rev = TextEncoder(snapshot).revision
    assert rev.startswith("local-") and rev == TextEncoder(snapshot).revision


def test_corrupt_cache_entry_is_recomputed(snapshot, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    enc = TextEncoder(snapshot, device="cpu")
    good = PromptEmbedder(enc, cache).embed(["a cat"])
    path = cache.path(cache.key(enc.cache_namespace(), "a cat"))
    path.write_bytes(b"not a safetensors file")
    again = PromptEmbedder(enc, cache)
    assert torch.equal(again.embed(["a cat"]), good) and again.misses == 1
    assert not list(path.parent.glob("*.tmp"))  # atomic writes leave no temp files


@pytest.mark.parametrize("damage", ["rows", "width", "dtype", "nan", "truncated"])
def test_cache_entry_of_the_wrong_shape_dtype_or_values_is_recomputed_and_replaced(snapshot, tmp_path, damage):
    cache = EmbeddingCache(tmp_path / "cache")
    enc = TextEncoder(snapshot, device="cpu")
    ns = enc.cache_namespace()
    good = PromptEmbedder(enc, cache).embed(["a cat"])[0]
    path = cache.path(cache.key(ns, "a cat"))
    bad = {"rows": good[:-1], "width": good[:, :32], "dtype": good.half(),
           "nan": good.clone().index_fill_(0, torch.tensor([5]), float("nan"))}.get(damage)
    if bad is None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a readable file for this very prompt and encoder, holding what this encoder never makes
        save_file({"embedding": bad.contiguous()}, str(path), metadata={**ns, "prompt": "a cat"})
    assert cache.get(ns, "a cat", enc.hidden_size) is None
    again = PromptEmbedder(enc, cache)
    assert torch.equal(again.embed(["a cat"])[0], good) and (again.hits, again.misses) == (0, 1)
    assert torch.equal(load_file(path)["embedding"], good)  # overwritten: the next run hits the good entry
    third = PromptEmbedder(enc, cache)
    assert torch.equal(third.embed(["a cat"])[0], good) and (third.hits, third.misses) == (1, 0)


def test_save_load_prompt_embeds_is_bit_identical(tmp_path):
    emb = torch.randn(3, M, 8).to(torch.bfloat16)
    path = tmp_path / "emb.safetensors"
    save_prompt_embeds(path, ["b", "a", "b"], emb, info={"revision": "r"})
    table = load_prompt_embeds(path)
    assert list(table) == ["b", "a"]  # duplicates stored once, first wins
    assert table["b"].dtype == torch.bfloat16 and torch.equal(table["b"], emb[0]) and torch.equal(table["a"], emb[1])
    assert torch.equal(lookup_prompt_embeds(table, ["a", "b", "a"]), emb[[1, 0, 1]])
    with pytest.raises(PromptEmbedsError, match=r"no embedding for prompt 'c'.*pid embed"):
        lookup_prompt_embeds(table, ["a", "c"], source=path)


@pytest.mark.parametrize(("tensors", "meta", "match"), [
    ({"prompt_embeds": torch.zeros(2, 77, 8)}, {"prompts": '["a", "b"]'}, r"\[2, 77, 8\], expected \[N, 300, D\]"),
    ({"prompt_embeds": torch.zeros(2, M, 8)}, {"prompts": '["a"]'}, "1 prompts in metadata, 2 embeddings"),
    ({"prompt_embeds": torch.zeros(1, M, 8)}, {}, "metadata 'prompts'"),
    ({"other": torch.zeros(1)}, {}, "no 'prompt_embeds' tensor"),
])
def test_load_prompt_embeds_rejects_bad_files(tmp_path, tensors, meta, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(PromptEmbedsError, match=match) as err:
        load_prompt_embeds(path)
    assert str(path) in str(err.value)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(PromptEmbedsError, match="not a readable safetensors"):
        load_prompt_embeds(tmp_path / "junk.safetensors")


def test_embed_cli_round_trip(snapshot, tmp_path, monkeypatch):
    out = tmp_path / "emb.safetensors"
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red fox\n\na cat\n")
    runner = CliRunner()
    args = ["embed", "a cat", "a dog", "-o", str(out), "--prompt-file", str(prompt_file),
            "--text-encoder", str(snapshot), "--device", "cpu"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "3 prompt(s)" in res.output and "0 from cache, 3 computed" in res.output
    table = load_prompt_embeds(out)
    assert list(table) == ["a cat", "a dog", "a red fox"]
    # decode --prompt-embeds (embed_prompts with a file) needs no text encoder at all, and gets exactly
    # the embeddings `pid embed` computed (compared with the cache entries it wrote).
    monkeypatch.setattr(text, "load_gemma2", lambda *a, **k: pytest.fail("Gemma loaded"))
    order = ["a dog", "a red fox", "a cat", "a dog"]
    from_file = embed_prompts(order, prompt_embeds=out)
    from_cache = embed_prompts(order, text_encoder=snapshot, device="cpu")
    assert from_file.shape == (4, M, 64) and torch.equal(from_file, from_cache)
    with pytest.raises(PromptEmbedsError, match="no embedding for prompt 'a horse'"):
        embed_prompts(["a horse"], prompt_embeds=out)
    # A second run is served entirely from the cache.
    res = runner.invoke(app, [*args[:5], "--text-encoder", str(snapshot), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "2 from cache, 0 computed" in res.output


def test_embed_cli_default_caption_and_missing_encoder(snapshot, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["embed", "-o", str(tmp_path / "null.safetensors")])
    assert res.exit_code == 2 and "--text-encoder" in res.output
    res = runner.invoke(app, ["embed", "-o", str(tmp_path / "null.safetensors"), "--text-encoder", str(snapshot),
                              "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert list(load_prompt_embeds(tmp_path / "null.safetensors")) == [""]  # the empty caption

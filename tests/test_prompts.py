"""Prompt sources and their precedence: --prompt > --prompt-file/manifest > sidecar > metadata > ""."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pid_cli.inputs.prompts import (
    Prompt,
    PromptSourceError,
    prompts_from_file,
    read_manifest,
    resolve_prompts,
)


def _latent(path: Path, prompt: str | None = None) -> Path:
    save_file({"latent": torch.zeros(1, 4, 2, 2)}, str(path), metadata={"prompt": prompt} if prompt else None)
    return path


@pytest.fixture
def inputs(tmp_path) -> list[Path]:
    """a: sidecar + metadata, b: metadata only, c: nothing (a PNG-like input)."""
    a = _latent(tmp_path / "a.safetensors", "meta a")
    (tmp_path / "a.txt").write_text("  sidecar a\n")
    b = _latent(tmp_path / "b.safetensors", "meta b")
    c = tmp_path / "c.png"
    c.write_bytes(b"")
    return [a, b, c]


def texts(prompts: list[Prompt]) -> list[str]:
    return [p.text for p in prompts]


def test_fallbacks_sidecar_then_metadata_then_empty(inputs):
    got = resolve_prompts(inputs)
    assert texts(got) == ["sidecar a", "meta b", ""]
    assert got[0].source.endswith("a.txt") and "metadata" in got[1].source and "default" in got[2].source
    assert texts(resolve_prompts(inputs, sidecars=False)) == ["meta a", "meta b", ""]
    assert texts(resolve_prompts(inputs, sidecars=False, metadata=False)) == ["", "", ""]


def test_explicit_prompt_wins_even_when_empty(inputs, tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("x\ny\nz\n")
    assert texts(resolve_prompts(inputs, prompt="a fox", prompt_file=pf)) == ["a fox"] * 3
    assert texts(resolve_prompts(inputs, prompt="")) == ["", "", ""]


def test_prompt_file_matches_by_order_and_beats_sidecar(inputs, tmp_path):
    pf = tmp_path / "prompts.txt"
    pf.write_text("\ufeff first \n\n second\r\nthird\nextra\n", encoding="utf-8")  # BOM, blank line, CRLF
    got = resolve_prompts(inputs, prompt_file=pf)
    assert texts(got) == ["first", "second", "third"]
    assert got[1].source == f"{pf}, prompt 2"


def test_prompt_file_with_too_few_lines_is_an_error(inputs, tmp_path):
    pf = tmp_path / "short.txt"
    pf.write_text("one\ntwo\n")
    with pytest.raises(PromptSourceError, match=r"short\.txt: 2 prompt\(s\) for 3 input\(s\)"):
        resolve_prompts(inputs, prompt_file=pf)
    with pytest.raises(PromptSourceError, match="not found"):
        resolve_prompts(inputs, prompt_file=tmp_path / "missing.txt")


def test_manifest_matches_by_path_then_falls_through(inputs, tmp_path):
    sub = tmp_path / "lists"
    sub.mkdir()
    manifest = sub / "m.jsonl"
    manifest.write_text("\n".join([
        json.dumps({"input": "../b.safetensors", "prompt": "manifest b"}),  # relative to the manifest
        "",
        json.dumps({"input": "elsewhere/c.png", "prompt": "manifest c"}),  # unique file name
        json.dumps({"input": str(inputs[0]), "note": "no prompt here"}),  # no prompt → falls through
    ]))
    got = resolve_prompts(inputs, prompt_file=manifest)
    assert texts(got) == ["sidecar a", "manifest b", "manifest c"]
    assert got[1].source == f"{manifest} line 1" and got[2].source == f"{manifest} line 3"
    assert prompts_from_file(manifest) == ["manifest b", "manifest c"]


def test_manifest_ambiguous_file_name_does_not_match(inputs, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps({"input": f"{d}/c.png", "prompt": d}) for d in ("x", "y")))
    assert texts(resolve_prompts(inputs, prompt_file=manifest))[2] == ""


@pytest.mark.parametrize(("line", "match"), [
    ("{not json", r"m\.jsonl line 2: not valid JSON"),
    ('["a.png", "p"]', r'm\.jsonl line 2: expected an object with a string "input"'),
    ('{"prompt": "p"}', r'm\.jsonl line 2: expected an object with a string "input"'),
    ('{"input": "a.png", "prompt": 3}', r'm\.jsonl line 2: "prompt" must be a string, got int'),
])
def test_malformed_manifest_line_is_reported(tmp_path, line, match):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"input": "ok.png", "prompt": "ok"}) + "\n" + line + "\n")
    with pytest.raises(PromptSourceError, match=match):
        read_manifest(manifest)


def test_prompts_from_text_file(tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("a cat\n  \n a dog \n")
    assert prompts_from_file(pf) == ["a cat", "a dog"]


def test_unreadable_safetensors_metadata_is_reported(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    with pytest.raises(PromptSourceError, match=r"bad\.safetensors: cannot read safetensors metadata"):
        resolve_prompts([bad])

"""Names from outside become paths only inside their folder; files are written only where they were asked for.

Hub listings (an HF_ENDPOINT mirror), registry values, `pid convert -o` and registry paths that are not files.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import shutil
import threading
from pathlib import Path

import pytest
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from pid_cli import hub
from pid_cli.cli import app
from pid_cli.registry import FileRef, RegistryError, entry_id_problem, load_registry, path_problem, repo_id_problem

try:
    from hubserver import fake_hub, populate
except ImportError:  # tests/ imported as a package
    from tests.hubserver import fake_hub, populate
from conftest import PARITY, tiny_config

__all__ = ["fake_hub"]  # the fixture, used by name below

GEMMA = "Efficient-Large-Model/gemma-2-2b-it"
SOURCE = PARITY / "v1_flux" / "model_ema_bf16.pth"


@pytest.fixture
def served(fake_hub):
    populate(fake_hub, load_registry(use_env=False).entries)
    return fake_hub


def hostile_mirror(hub_server, monkeypatch, repo: str, name: str) -> None:
    """Serve `name` of `repo` also at the address the client asks for once it has folded the `..` of
    `/{repo}/resolve/main/{name}` away, as a mirror that lists such a name would."""
    folded = posixpath.normpath(f"/{repo}/resolve/main/{name}")
    handler = hub_server._server.RequestHandlerClass
    route = handler.do_GET

    def answer(self):
        if self.path.split("?")[0] == folded:
            self.path = f"/{repo}/resolve/main/{name}"
        return route(self)

    monkeypatch.setattr(handler, "do_GET", answer)
    monkeypatch.setattr(handler, "do_HEAD", answer)


def escaped(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if "evil" in p.name]


def registry_file(tmp_path: Path, **fields) -> Path:
    """A user registry with one entry (the tiny v1_flux decoder) and `fields` on top of it."""
    entry = {"id": "x", "base": "flux-2k", "variant": "tiny", "path": str(SOURCE),
             "net_config": tiny_config("v1_flux"), **fields}
    path = tmp_path / "user.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "entries": [entry]}))
    return path


# ---------------------------------------------------------------------------------------------------------
# 1. Paths a Hub listing names


@pytest.mark.parametrize("name", ["../../../evil.safetensors", "ABSOLUTE/evil.safetensors",
                                  "..\\..\\..\\evil.safetensors", "sub//evil.safetensors", "C:evil.safetensors",
                                  "sub/\0evil.safetensors"])
def test_download_refuses_a_listed_path_that_would_leave_its_folder(served, tmp_path, monkeypatch, name):
    name = name.replace("ABSOLUTE", str(tmp_path / "outside"))
    served.add(GEMMA, name, b"E" * 500)  # matches '*.safetensors' of the text encoder's allow patterns
    hostile_mirror(served, monkeypatch, GEMMA, name)
    target = tmp_path / "models"
    result = CliRunner().invoke(app, ["download", "--dir", str(target), "-b", "flux", "--variant", "2k",
                                      "--no-vae"])
    assert not escaped(tmp_path)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{GEMMA}: refusing the file path {name!r} listed by the Hub at {served.url}" in result.output
    assert not served.requested("GET", "/resolve/")  # refused before any file was fetched


def test_a_hand_made_file_ref_cannot_write_outside_the_folder(served, tmp_path, monkeypatch):
    name = "../../../evil.safetensors"
    served.add("nvidia/PiD", name, b"E" * 500)
    hostile_mirror(served, monkeypatch, "nvidia/PiD", name)
    flux = load_registry(use_env=False).resolve("flux", "2k")
    entry = dataclasses.replace(flux, weights=FileRef(name, "nvidia/PiD"))  # a library caller's entry
    with pytest.raises(hub.HubError, match=r"nvidia/PiD: refusing the file path '\.\./\.\./\.\./evil") as err:
        try:
            hub.ensure_files(entry, vae=False, text_encoder=False, local_dir=tmp_path / "models")
        finally:
            assert not escaped(tmp_path)
    assert "inside the repository's folder" in str(err.value) and not served.requested("GET", "/resolve/")


# ---------------------------------------------------------------------------------------------------------
# 2. Registry values that become paths


@pytest.mark.parametrize(("fields", "field", "message"), [
    ({"path": None, "hub": {"repo": "../..", "path": "w.pth"}}, "hub.repo", "expected 'owner/name'"),
    ({"path": None, "hub": {"repo": "a/..", "path": "w.pth"}}, "hub.repo", "expected 'owner/name'"),
    ({"path": None, "hub": {"repo": ".x/y", "path": "w.pth"}}, "hub.repo", "expected 'owner/name'"),
    ({"path": None, "hub": {"repo": "a--b/c", "path": "w.pth"}}, "hub.repo", "no '--'"),
    ({"text_encoder": {"repo": "../.."}}, "text_encoder.repo", "expected 'owner/name'"),
    ({"vae": {"format": "bfl-flux1-ae", "files": {"weights": {"repo": "x/..", "path": "ae.st"}}}},
     "vae.files.weights.repo", "expected 'owner/name'"),
    ({"path": None, "hub": {"repo": "a/b", "path": "../../w.pth"}}, "hub.path", "has a '..' component"),
    ({"path": None, "hub": {"repo": "a/b", "path": "dir\\w.pth"}}, "hub.path", "contains a backslash"),
    ({"path": None, "hub": {"repo": "a/b", "path": "C:/w.pth"}}, "hub.path", "has a drive letter"),
    ({"path": None, "hub": {"repo": "a/b", "path": "dir//w.pth"}}, "hub.path", "has an empty component"),
    ({"path": None, "hub": {"repo": "a/b", "path": "w\0.pth"}}, "hub.path", "NUL"),
    ({"path": None, "hub": {"repo": "a/b", "path": "w.pth", "revision": "../../../evil"}},
     "hub.revision", "has a '..' component"),
    ({"id": "../evil"}, "id", "file-name-like id"),
    ({"id": "a/b"}, "id", "file-name-like id"),
    ({"id": "a\\b"}, "id", "file-name-like id"),
    ({"id": ".hidden"}, "id", "file-name-like id"),
    ({"id": "x\0y"}, "id", "file-name-like id"),
])
def test_registry_values_that_would_become_paths_are_refused(tmp_path, fields, field, message):
    path = registry_file(tmp_path, **fields)
    with pytest.raises(RegistryError) as err:
        load_registry([path], use_env=False)
    text = str(err.value)
    assert text.startswith(f"{path}: entry ") and f"field '{field}'" in text and message in text, text


def test_every_builtin_id_repo_path_and_revision_passes_the_checks():
    reg = load_registry(use_env=False)
    refs = [r for e in reg.entries for r in (e.weights, e.text_encoder, *(e.vae.files.values() if e.vae else ()),
                                             *(e.vae.repos.values() if e.vae else ())) if r is not None]
    assert {r.repo for r in refs} == {"nvidia/PiD", GEMMA, "facebook/dinov2-with-registers-base",
                                      "google/siglip2-so400m-patch14-224"}
    assert all(repo_id_problem(r.repo) is None and path_problem(r.revision) is None for r in refs)
    assert all(path_problem(r.path) is None for r in refs if isinstance(r, FileRef))
    assert all(entry_id_problem(e.id) is None for e in reg.entries)


def test_download_with_a_repo_id_that_is_a_path_is_a_clean_error(served, tmp_path):
    user = registry_file(tmp_path, path=None, hub={"repo": "../..", "path": "w.pth"})
    target = tmp_path / "deep" / "models"
    result = CliRunner().invoke(app, ["download", "--registry", str(user), "-b", "flux", "--variant", "tiny",
                                      "--dir", str(target), "--no-vae", "--no-text-encoder"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert f"{user}: entry 'x' (#1): field 'hub.repo'" in result.output and "'../..'" in result.output
    assert not served.requests and not target.exists()


def test_convert_with_an_entry_id_that_is_a_path_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache" / "pid"))
    user = registry_file(tmp_path, id="../evil")
    result = CliRunner().invoke(app, ["convert", str(SOURCE), "--registry", str(user), "-b", "flux",
                                      "--variant", "tiny"])
    assert result.exit_code == 1 and f"{user}: entry '../evil' (#1): field 'id'" in result.output, result.output
    assert not escaped(tmp_path) and not list(tmp_path.rglob("*.safetensors"))


def test_converted_path_refuses_a_hand_made_entry_id():
    flux = load_registry(use_env=False).resolve("flux", "2k")
    with pytest.raises(hub.HubError, match=r"registry entry '\.\./evil'.*file-name-like id"):
        hub.converted_path(dataclasses.replace(flux, id="../evil"))


# ---------------------------------------------------------------------------------------------------------
# 3. pid convert -o


def convert(tmp_path: Path, source: Path, output: Path, *options: str):
    pytest.importorskip("pid_cli.model")
    return CliRunner().invoke(app, ["convert", str(source), "--registry", str(registry_file(tmp_path)), "-b", "flux",
                                    "--variant", "tiny", "-o", str(output), *options])


def test_convert_refuses_an_existing_output_unless_overwrite(tmp_path):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    result = convert(tmp_path, SOURCE, out)
    assert result.exit_code == 1 and f"{out}: already exists; pass --overwrite" in result.output, result.output
    assert out.read_bytes() == b"keep me"
    result = convert(tmp_path, SOURCE, out, "--overwrite")
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as fh:
        assert fh.metadata()["pid.entry"] == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "user.yaml"]  # no temp file


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
@pytest.mark.parametrize("options", [(), ("--overwrite",)])
def test_convert_never_writes_over_its_source(tmp_path, how, options):
    source = tmp_path / "model_ema_bf16.pth"
    shutil.copyfile(SOURCE, source)
    out = source if how == "same path" else tmp_path / "link.st"
    if how == "symlink":
        out.symlink_to(source)
    elif how == "hard link":
        out.hardlink_to(source)
    result = convert(tmp_path, source, out, *options)
    assert result.exit_code == 1, result.output
    assert f"{out}: refusing to write over the source checkpoint {source}" in result.output
    assert source.read_bytes() == SOURCE.read_bytes()


# ---------------------------------------------------------------------------------------------------------
# 4. Registry files that are not regular files


def test_registry_that_is_a_fifo_is_refused_without_blocking(tmp_path, monkeypatch):
    fifo = tmp_path / "registry.fifo"
    os.mkfifo(fifo)
    monkeypatch.setenv("PID_REGISTRY", str(fifo))
    outcome: list[BaseException | None] = []

    def load() -> None:
        try:
            load_registry()
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # blocked in open(): give it a writer so the thread ends, then fail
        with open(fifo, "wb"):
            pass
        worker.join(10)
        pytest.fail(f"reading the registry {fifo} blocked on a FIFO")
    assert isinstance(outcome[0], RegistryError), outcome
    assert str(outcome[0]) == f"{fifo}: a registry must be a regular YAML file, this is a FIFO"


@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a device"), ("/dev/null", "a device"),
                                            ("FOLDER", "a directory")])
def test_registry_that_is_a_device_or_folder_is_refused(tmp_path, path, kind):
    path = str(tmp_path) if path == "FOLDER" else path
    if not os.path.exists(path):
        pytest.skip(f"no {path} here")
    result = CliRunner().invoke(app, ["list", "--registry", path])
    assert result.exit_code == 1, result.output
    assert f"{path}: a registry must be a regular YAML file, this is {kind}" in result.output


def test_registry_behind_a_symlink_is_read(tmp_path):
    real = registry_file(tmp_path)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    assert load_registry([link], use_env=False).resolve("flux", "tiny").id == "x"

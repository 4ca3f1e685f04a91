"""The `pid` command line. Each command is a thin shell over the library modules."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pid_cli import __version__

if TYPE_CHECKING:
    from pid_cli import hub

app = typer.Typer(
    name="pid",
    help="Decode latents (or images) to 2K/4K PNGs with NVIDIA's PiD pixel diffusion decoder.",
    no_args_is_help=True,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"pid {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """PiD decoder command line."""


@app.command()
def embed(
    output: Annotated[Path, typer.Option(
        "-o", "--output", help="safetensors file to write: [N, 300, 2304] plus the prompts.")],
    prompts: Annotated[list[str] | None, typer.Argument(
        help="Captions to embed. With none (and no --prompt-file) the empty caption is embedded: "
             "the dropped-caption condition PiD saw in training, used when no prompt is given.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt-file", help='Also embed every prompt of this file: one per line, or a JSONL manifest '
                              'of {"input": ..., "prompt": ...} lines.')] = None,
    text_encoder: Annotated[Path | None, typer.Option(
        "--text-encoder", help="Local snapshot folder of Efficient-Large-Model/gemma-2-2b-it (config.json, "
                               "weights, tokenizer.json). Default: $PID_TEXT_ENCODER, else the copy pid "
                               "downloaded.")] = None,
    device: Annotated[str, typer.Option(
        "--device", help="auto, cpu, cuda or cuda:N. GPU: Gemma in bf16 (as upstream); CPU: fp32.")] = "auto",
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache", help="Reuse and fill the on-disk embedding cache.")] = True,
) -> None:
    """Compute Gemma-2 prompt embeddings once, for `pid decode --prompt-embeds`.

    Each caption is embedded behind PiD's fixed CHI prefix. Cached prompts never load Gemma; the
    output file (~1.4 MB per prompt in bf16) lets render nodes decode without the 5 GB text encoder.
    """
    from pid_cli import hub
    from pid_cli.inputs.prompts import PromptSourceError, prompts_from_file
    from pid_cli.text import (
        EmbeddingCache,
        PromptEmbedder,
        PromptEmbedsError,
        TextEncoder,
        TextEncoderError,
        resolve_text_encoder,
        save_prompt_embeds,
    )

    try:
        texts = list(prompts or []) + (prompts_from_file(prompt_file) if prompt_file else [])
        texts = texts or [""]
        encoder = TextEncoder(resolve_text_encoder(text_encoder), device=device)
        embedder = PromptEmbedder(encoder, EmbeddingCache() if cache else None)
        embeds = embedder.embed(texts)  # [N, 300, D]
        save_prompt_embeds(output, texts, embeds, info=encoder.cache_namespace())
    except (PromptSourceError, PromptEmbedsError, TextEncoderError, hub.HubError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    n = len(dict.fromkeys(texts))
    typer.echo(f"wrote {output}: {n} prompt(s), [{n}, {embeds.shape[1]}, {embeds.shape[2]}] "
               f"{str(embeds.dtype).removeprefix('torch.')} ({embedder.hits} from cache, "
               f"{embedder.misses} computed)", err=True)


# ---------------------------------------------------------------------------------------------------------
# Registry and downloads: `pid download`, `pid list`, `pid convert` (library: registry.py, hub.py, convert.py)

RegistryFiles = Annotated[list[Path] | None, typer.Option(
    "--registry", help="Extra registry YAML with your own entries (repeatable; also $PID_REGISTRY, "
                       "separated by the OS path separator).")]
DownloadDir = Annotated[Path | None, typer.Option(
    "--dir", help="A plain folder (<dir>/<owner>/<repo>/<path>) instead of the Hugging Face cache.")]


def _hub_error(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(1)


@app.command()
def download(
    backbone: Annotated[list[str] | None, typer.Option(
        "--backbone", "-b", help="Backbone or alias (repeatable). Without it: every backbone that has the "
                                 "variant.")] = None,
    variant: Annotated[str | None, typer.Option(
        "--variant", help="2k, 2kto4k (best 4K decoder), 2kto4k-v1 or 2kto4k-v1.5.")] = None,
    target: Annotated[str | None, typer.Option("--target", help="2k or 4k: picks the variant.")] = None,
    vae: Annotated[bool, typer.Option("--vae/--no-vae", help="Also fetch the paired VAE/encoder.")] = True,
    text_encoder: Annotated[bool, typer.Option(
        "--text-encoder/--no-text-encoder",
        help="Also fetch the Gemma text encoder (skip it on nodes that use exported prompt embeddings).")] = True,
    directory: DownloadDir = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only print the plan.")] = False,
    registry: RegistryFiles = None,
) -> None:
    """Download exactly the files the chosen checkpoints need, verified against the Hub's size and SHA-256.

    Uses the Hugging Face cache (HF_HOME / HF_HUB_CACHE) unless --dir is given; HF_TOKEN authenticates;
    HF_HUB_OFFLINE=1 only checks the cache.
    """
    from rich.console import Console

    from pid_cli import hub
    from pid_cli.registry import RegistryError, load_registry

    console = Console()
    try:
        if not backbone and variant is None and target is None:
            raise RegistryError("name a --variant/--target and/or --backbone, e.g. `pid download --variant 2kto4k`")
        entries = load_registry(registry or []).entries_for_variant(variant, target, backbone)
        settings = hub.Settings.from_env(directory)
        why = None if settings.offline else hub.hub_unreachable(settings, entries[0].weights)
        sizes_from = ("the Hub" if not settings.offline and why is None else "the registry: offline"
                      if settings.offline else f"the registry: the Hub is out of reach, {why}")
        plan = hub.plan_downloads(entries, vae=vae, text_encoder=text_encoder, settings=settings,
                                  query_hub=sizes_from == "the Hub")
        if not console.is_terminal:  # a log or a pipe: no need to fold names, so print them whole on a line
            console = Console(width=max(console.width, 100 + max(len(i.describe()) for i in plan)))
        console.print(_plan_table(plan, sizes_from, fold_names=console.is_terminal))
        if dry_run:
            return
        command = hub.download_command(entries, vae=vae, text_encoder=text_encoder, local_dir=settings.local_dir)
        hub.run_plan(plan, settings, command=command, notice=lambda text: console.print(f"[yellow]{text}[/]"),
                     on_done=lambda item, path: console.print(f"[green]✓[/] {item.describe()} → {path}"))
    except (RegistryError, hub.HubError) as exc:
        raise _hub_error(exc) from exc


@app.command("list")
def list_checkpoints(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON records instead of a table.")] = False,
    directory: DownloadDir = None,
    registry: RegistryFiles = None,
) -> None:
    """Show every checkpoint (backbones × variants) with its size and whether it is on disk. No network."""
    import json

    from rich.console import Console

    from pid_cli import hub
    from pid_cli.registry import RegistryError, load_registry

    try:
        reg = load_registry(registry or [])
        records = hub.list_records(reg, hub.Settings.from_env(directory, offline=True))
    except RegistryError as exc:
        raise _hub_error(exc) from exc
    if as_json:
        typer.echo(json.dumps(records, indent=2))
    else:
        Console().print(_list_table(reg, records))


@app.command()
def convert(
    source: Annotated[Path, typer.Argument(help="A released model_ema_bf16.pth.", exists=True, dir_okay=False)],
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="safetensors file to write. Default: where the loader looks for it "
                               "(pid's cache dir, or <dir>/converted with --dir).")] = None,
    backbone: Annotated[str | None, typer.Option(
        "--backbone", "-b", help="Registry entry to validate against (default: guessed from the path).")] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="With --backbone.")] = None,
    directory: DownloadDir = None,
    registry: RegistryFiles = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing output file (never the source checkpoint itself).")] = False,
) -> None:
    """Convert a released pickle to safetensors (mmap-loadable, no pickle at load time).

    Every key and shape is checked against the network the registry entry describes before anything is
    written; the file is written atomically. Keys are stored without the `net.` prefix, dtypes unchanged.
    An existing output is kept unless --overwrite is given.
    """
    from pid_cli import convert as conv
    from pid_cli import hub
    from pid_cli.registry import RegistryError, load_registry

    try:
        reg = load_registry(registry or [])
        if backbone is not None:
            entry = reg.resolve(backbone, variant)
        elif variant is not None:
            raise RegistryError("--variant needs --backbone")
        else:
            entry = conv.guess_entry(source, reg.entries)
            if entry is None:
                raise RegistryError(f"cannot tell which checkpoint {source} is from its path; pass --backbone "
                                    "and --variant")
        target = output or hub.converted_path(entry, directory)
        report = conv.convert_checkpoint(source, target, entry, overwrite=overwrite)
    except (RegistryError, hub.HubError, conv.ConvertError) as exc:
        raise _hub_error(exc) from exc
    note = f"; dropped {len(report.dropped)} training-only tensors" if report.dropped else ""
    typer.echo(f"validated {report.num_tensors} tensors against {entry.id}{note}\n"
               f"wrote {report.output} ({hub.format_size(report.output.stat().st_size)})")


@app.command()
def doctor(
    timing: Annotated[bool, typer.Option("--timing/--no-timing", help="On a GPU, time a full-size decode.")] = True,
) -> None:
    """Check the install: torch/CUDA/attention backend, upstream parity on a bundled fixture,
    weights on disk, and (on a GPU) the expected decode speed. Exit 1 if a check fails."""
    from rich.console import Console
    from rich.table import Table

    from pid_cli.doctor import run

    table = Table("check", "", "detail")
    rows = run(time_gpu=timing)
    for name, ok, detail in rows:
        table.add_row(name, {True: "[green]ok[/]", False: "[red]FAIL[/]", None: ""}[ok], detail)
    Console().print(table)
    raise typer.Exit(1 if any(ok is False for _, ok, _ in rows) else 0)


def _parse_devices(text: str | None) -> list:
    import torch

    from pid_cli.devices import resolve_device

    if text is None or text == "auto":
        return [resolve_device(None)]
    if text == "all":
        if not torch.cuda.is_available():
            raise typer.BadParameter("no CUDA GPUs are visible", param_hint="--devices")
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    devices = []
    for part in text.split(","):
        try:
            device = torch.device(part.strip())
        except RuntimeError as e:
            raise typer.BadParameter(f"{part!r} is not a device (cpu, cuda:N, all)", param_hint="--devices") from e
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= visible:
            raise typer.BadParameter(f"{part} is not available on this machine", param_hint="--devices")
        devices.append(device)
    return devices


@app.command()
def decode(
    inputs: Annotated[list[str], typer.Argument(
        help="Latent files (.safetensors .latent .pt .pth .npy .npz), images (.png .jpg .jpeg .webp .tif "
             ".tiff: encoded by the backbone's VAE, then decoded at 4x: super-resolution), folders, globs, "
             'JSONL manifests ({"input": ..., "prompt": ..., "degrade_sigma": ..., "output": ...}) or - (paths '
             "on stdin). Images a folder or glob finds inside --out are left out (earlier outputs).")],
    backbone: Annotated[str, typer.Option("--backbone", "-b", help="Latent model: flux, flux2, sd3, sdxl, "
                                          "qwenimage, dinov2, siglip or an alias (zimage, flux2-klein-4b, ...).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("pid_out"),
    target: Annotated[str | None, typer.Option("--target", help="2k or 4k: picks the checkpoint and checks "
                                               "that the latents give that size.")] = None,
    variant: Annotated[str | None, typer.Option("--variant", help="Checkpoint by name: 2k, 2kto4k, "
                                                "2kto4k-v1, 2kto4k-v1.5 (see `pid list`).")] = None,
    registry: Annotated[list[Path] | None, typer.Option("--registry", help="Extra registry file(s) "
                                                        "(also $PID_REGISTRY).")] = None,
    name: Annotated[str, typer.Option("--name", help="Output name template: {dir} {stem} {name} {index} "
                                      "{sigma}; items of a batch file get _{index} appended unless it is used, "
                                      "a σ sweep _sigma{sigma}.")] =
        "{dir}/{stem}.png",
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend into sub-folders.")] = False,
    key: Annotated[str | None, typer.Option("--key", help="Tensor name inside a multi-tensor file.")] = None,
    latent_format: Annotated[str, typer.Option("--latent-format", help="auto, pid, packed or raw. pid: "
                                               "normalised [B,C,h,w] (diffusers output_type='latent', InvokeAI); "
                                               "packed: diffusers token sequences; raw: un-normalised VAE "
                                               "latents (vae.encode(), FLUX.2-klein output). auto reads ComfyUI "
                                               ".latent files by ComfyUI's convention per backbone, and warns when "
                                               "a latent's scale suggests another format (README: Inputs).")] = "auto",
    latent_size: Annotated[str | None, typer.Option("--latent-size", help="HxW of a packed token sequence "
                                                    "whose file does not say its size: the VAE's latent grid "
                                                    "(image px / 8, e.g. 128x128 for a 1024 px image) or the "
                                                    "token grid (image px / 16), for every backbone; the token "
                                                    "count tells which, and the run says which it took.")] = None,
    degrade_sigma: Annotated[str | None, typer.Option("--degrade-sigma", help="Noise level. Latents: the one σ "
                                                      "they were made at (0 = clean; an LDM x_t: its scheduler "
                                                      "σ; SDXL: the Euler σ). Images: their encoded latent is "
                                                      "noised to σ in [0, 1] before decoding (more σ: more "
                                                      "generated detail, less faithful); a comma list "
                                                      "(0,0.4,0.7) writes one PNG per σ, named by {sigma} in "
                                                      "--name or _sigma<σ>. Manifest and metadata win.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Caption for all inputs. Without any prompt "
                                               "source the empty caption is used (PiD's dropped-caption "
                                               "condition).")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="One prompt per line in input "
                                                     "order, or a JSONL manifest.")] = None,
    prompt_embeds: Annotated[Path | None, typer.Option("--prompt-embeds", help="Embeddings from `pid embed`: "
                                                       "Gemma is never loaded.")] = None,
    text_encoder: Annotated[Path | None, typer.Option("--text-encoder", help="Local Gemma-2 snapshot "
                                                      "folder.")] = None,
    batch_size: Annotated[str, typer.Option("--batch-size", help="Images per GPU batch, or auto (per "
                                            "output size: 4 at 2K, 1 at 4K, fewer if memory is short).")] = "auto",
    devices: Annotated[str | None, typer.Option("--devices", help="cpu, cuda:0, cuda:0,cuda:1 or all "
                                                "(default: the first GPU, else the CPU); several devices run "
                                                "one worker process each.")] = None,
    gpus_per_image: Annotated[int, typer.Option("--gpus-per-image", min=1, help="Split each image across N "
                                                "of --devices (1, 2, 4 or 8; attention heads spread over them) "
                                                "for latency, at the cost of total throughput "
                                                "(docs/performance.md#gpus-per-image).")] = 1,
    shard: Annotated[str | None, typer.Option("--shard", help="K/N: decode the K-th of N partitions of the "
                                              "sorted inputs (default from torchrun or Slurm).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Item i of an input file uses seed+i.")] = 0,
    steps: Annotated[int, typer.Option("--steps", min=1, max=4, help="Sampler steps (1-4).")] = 4,
    dtype: Annotated[str | None, typer.Option("--dtype", help="bf16 or fp32 (default: bf16 on GPU, fp32 on "
                                              "CPU).")] = None,
    attention: Annotated[str, typer.Option("--attention", help="bf16 (cuDNN, exact to the bf16 policy) or "
                                           "8bit: INT8 Q.K and FP8 P.V on Hopper/Ada GPUs, faster at a small, "
                                           "measured error (docs/performance.md#speed-modes); recorded in the "
                                           "PNG metadata.")] = "bf16",
    matmul: Annotated[str, typer.Option("--matmul", help="bf16 or fp8: the image-token matmuls in FP8 on "
                                        "Hopper/Ada GPUs, faster (most with --attention 8bit) at a small, "
                                        "measured error (docs/performance.md#speed-modes); recorded in the "
                                        "PNG metadata.")] = "bf16",
    check_psnr: Annotated[float, typer.Option("--check-psnr", min=0, help="With --attention 8bit or --matmul "
                                              "fp8: the first image of each output size is also decoded on the "
                                              "exact path and compared (PSNR in its PNG metadata and record); "
                                              "below this many dB that size falls back to the exact path, with "
                                              "a warning. 0 turns the check off "
                                              "(docs/performance.md#8-bit-accuracy).")] = 40.0,
    compile: Annotated[str, typer.Option("--compile", help="on, off or auto: torch.compile the network on GPUs "
                                         "(faster per image, after a start-up cost per output size: "
                                         "docs/performance.md#compile); auto "
                                         "compiles only when each GPU has over 400 output megapixels to decode "
                                         "(~96 2K or 24 4K images).")] = "auto",
    bit_depth: Annotated[int, typer.Option("--bit-depth", help="8 or 16 bits per channel.")] = 8,
    metadata: Annotated[bool, typer.Option("--metadata/--no-metadata", help="PNG text metadata.")] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo existing outputs.")] = False,
    fail_fast: Annotated[bool, typer.Option("--fail-fast", help="Stop at the first failed input.")] = False,
    manifest_out: Annotated[Path | None, typer.Option("--manifest-out", help="Append a JSONL record per "
                                                      "input here.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Stream the JSONL records on stdout.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")] = False,
    fit: Annotated[bool, typer.Option("--fit", help="Image inputs: resize (Lanczos, scale to cover, centre-crop "
                                      "the overhang) so the output is the trained size of closest aspect ratio "
                                      "within --target, e.g. a 1000x750 photo -> 1024x768 -> 4096x3072. Without "
                                      "it images are centre-cropped to a multiple of 16 px, never resized.")] = False,
    compare: Annotated[bool, typer.Option("--compare", help="Also write NAME.vae.png (the backbone VAE's own "
                                          "decode of the same latent, Lanczos-upscaled to PiD's size) and "
                                          "NAME.compare.png (8-bit strip: [input |] VAE | PiD).")] = False,
    color_fix: Annotated[str, typer.Option("--color-fix", help="none, mean-std or wavelet: match the PiD "
                                           "output's low-frequency colour to the VAE decode of the same latent "
                                           "(for brightened dark scenes or a colour cast); recorded in the PNG "
                                           "metadata.")] = "none",
) -> None:
    """Decode stored latents (or images: single-pass super-resolution) to 2K/4K PNGs.

    Exit codes: 0 all decoded or skipped, 1 some inputs failed, 2 usage or configuration error,
    130 interrupted. Existing outputs are skipped, so rerunning a command resumes it.
    """
    from pid_cli import hub
    from pid_cli.decode import EXIT_USAGE, DecodeJob, run
    from pid_cli.inputs.collection import InputError, parse_shard, parse_sigmas, shard_from_env
    from pid_cli.inputs.latent_files import FORMATS, parse_size
    from pid_cli.model.inference import ATTENTION_MODES
    from pid_cli.model.linear8 import MATMUL_MODES
    from pid_cli.registry import RegistryError, load_registry

    def usage(message: str) -> typer.Exit:
        typer.echo(f"error: {message}", err=True)
        return typer.Exit(EXIT_USAGE)

    if latent_format not in FORMATS:
        raise usage(f"--latent-format must be one of {', '.join(FORMATS)}")
    if bit_depth not in (8, 16):
        raise usage("--bit-depth must be 8 or 16")
    if dtype not in (None, "bf16", "fp32"):
        raise usage("--dtype must be bf16 or fp32")
    if attention not in ATTENTION_MODES:
        raise usage(f"--attention must be {' or '.join(ATTENTION_MODES)}")
    if matmul not in MATMUL_MODES:
        raise usage(f"--matmul must be {' or '.join(MATMUL_MODES)}")
    if compile not in ("auto", "on", "off"):
        raise usage("--compile must be auto, on or off")
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) > 0):
        raise usage("--batch-size must be a positive integer or auto")
    if color_fix not in ("none", "mean-std", "wavelet"):
        raise usage("--color-fix must be none, mean-std or wavelet")
    try:
        reg = load_registry(registry or [])
        entry = reg.resolve(backbone, variant, target)
        job = DecodeJob(  # the run checks inputs, --out and prompts before it fetches a checkpoint
            inputs=inputs, out=out, entry=entry, template=name,
            batch_size=None if batch_size == "auto" else int(batch_size), devices=_parse_devices(devices),
            gpus_per_image=gpus_per_image,
            seed=seed, steps=steps, dtype=dtype, attention=attention, matmul=matmul, check_psnr=check_psnr or None,
            compile=compile,
            bit_depth=bit_depth, metadata=metadata, overwrite=overwrite, fail_fast=fail_fast, recursive=recursive,
            latent_format=latent_format, key=key,
            latent_size=parse_size(latent_size) if latent_size else None,
            degrade_sigma=parse_sigmas(degrade_sigma) if degrade_sigma is not None else None,
            target=target.lower() if target else None, prompt=prompt, prompt_file=prompt_file,
            prompt_embeds=prompt_embeds, text_encoder=text_encoder,
            shard=parse_shard(shard) if shard else shard_from_env(), manifest_out=manifest_out,
            json_stdout=json_out, quiet=quiet, fit=fit, compare=compare, color_fix=color_fix)
        code = run(job)
    except (RegistryError, InputError, hub.HubError, PermissionError, ValueError) as e:
        raise usage(str(e)) from e
    raise typer.Exit(code)


# ---------------------------------------------------------------------------------------------------------
# Tables for `pid download` / `pid list`


def _plan_table(items: Sequence[hub.PlanItem], sizes_from: str = "the Hub", fold_names: bool = True) -> Any:
    """The download plan as a table: whole file names (folded on a terminal, on one line each otherwise, never
    cut), and a total that says what it knows: exact sizes from the Hub, estimates from the registry offline,
    and how many sizes are unknown."""
    from rich.table import Table

    from pid_cli import hub

    todo = [i for i in items if i.on_disk is None]
    total, exact = hub.plan_total(items)
    unknown = sum(i.size is None for i in todo)
    if not todo:
        caption = f"everything is on disk ({len(items)} item(s))"
    else:
        known = f"{hub.format_size(total, exact)}" if len(todo) > unknown else ""
        caption = (f"to download: {len(todo)} of {len(items)} item(s), "
                   + " + ".join(filter(None, [known, f"{unknown} of unknown size" if unknown else ""]))
                   + f" (sizes from {sizes_from})")
    table = Table(title="Download plan", caption=caption)
    for column in ("file", "role", "used by", "size", "status"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold",
                         no_wrap=column in ("size", "status") or (column == "file" and not fold_names))
    for item in items:
        status = "[green]on disk[/]" if item.on_disk is not None else "[yellow]download[/]"
        table.add_row(item.describe(), item.role, ", ".join(item.entry_ids),
                      hub.format_size(item.size, item.size_exact), status)
    return table


def _list_table(registry: Any, records: Sequence[dict[str, Any]]) -> Any:
    """Backbones × variants; bold marks what `2kto4k` picks, dim marks superseded checkpoints."""
    from rich.table import Table

    from pid_cli import hub

    variants = list(dict.fromkeys(r["variant"] for r in records))
    takes_images = {b: any(r["image_inputs"] for r in records if r["backbone"] == b) for b in registry.backbones()}
    table = Table(title="PiD checkpoints", caption="✓ decoder on disk (+ VAE, + text encoder: ✓✓✓) · "
                  "bold: chosen by its 'answers_to' names (e.g. 2kto4k) · dim: superseded"
                  + ("" if all(takes_images.values()) else " · latents only: no image encoder for its VAE format"))
    table.add_column("backbone")
    for variant in variants:
        table.add_column(variant, justify="right")
    for backbone in registry.backbones():
        aliases = [a for a, b in registry.aliases.items() if b == backbone]
        cells = []
        for variant in variants:
            rec = next((r for r in records if r["backbone"] == backbone and r["variant"] == variant), None)
            if rec is None:
                cells.append("[dim]-[/]")
                continue
            disk = rec["on_disk"]
            marks = "✓" * (bool(disk["decoder"]) + (bool(disk["decoder"]) and disk["vae"])
                           + (bool(disk["decoder"]) and disk["vae"] and disk["text_encoder"]))
            text = f"{hub.format_size(rec['size'], rec['size_exact'])} {marks or '·'}"
            style = "dim" if rec["superseded"] else "bold" if rec["answers_to"] else ""
            cells.append(f"[{style}]{text}[/]" if style else text)
        label = backbone + ("" if takes_images[backbone] else " [dim](latents only)[/]")
        label += f"\n[dim]{', '.join(aliases)}[/]" if aliases else ""
        table.add_row(label, *cells)
    return table


if __name__ == "__main__":
    app()

"""``mvlm export``, ``mvlm quantize``, ``mvlm bench ...``: GGUF export, quantization, device benchmarks."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from flows.cli_groups import default_command_group, fail
from flows.logs import console

_RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})/?$")


bench_app = typer.Typer(
    cls=default_command_group("submit"),
    no_args_is_help=True,
    help="Device benchmarks: `mvlm bench MODEL --pool host-cpu` submits one; `mvlm bench report` shows them.",
)


def register(app: typer.Typer) -> None:
    """Attach ``export``, ``quantize`` and the ``bench`` group to the root app."""
    app.command("export")(export_command)
    app.command("quantize")(quantize_command)
    app.add_typer(bench_app, name="bench")


# --- export / quantize ------------------------------------------------------------------------


def export_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint folder (config.json, safetensors, tokenizer.json).")
    ],
    out: Annotated[
        Path | None, typer.Argument(help="Output folder (default <runs_root>/export/<export_id>).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Language-model matrices: f16 or f32.")] = "f16",
    mmproj_dtype: Annotated[str, typer.Option(help="mmproj matrices: f16 or f32.")] = "f16",
    check: Annotated[
        bool, typer.Option(help="Run the llama.cpp checks (logits, image embeddings, answers).")
    ] = True,
) -> None:
    """Export a checkpoint as a LLaMA GGUF (with tokenizer) and, for a VLM, an mmproj GGUF for llama.cpp."""
    from model.gguf_export import GGUFExportError
    from tasks.ship.export import ExportConfig, ExportError, export_checkpoint

    try:
        result = export_checkpoint(checkpoint, out, ExportConfig(dtype, mmproj_dtype), check=check)
    except (ExportError, GGUFExportError) as err:
        raise fail(str(err)) from err
    table = Table(
        "field", "value", title=f"export {result.export_id}" + (" (reused)" if result.reused else "")
    )
    table.add_row("folder", str(result.out_dir))
    table.add_row("language model", result.llm.name)
    table.add_row("mmproj", result.mmproj.name if result.mmproj else "-")
    for name, values in result.checks.items():
        table.add_row(f"check {name}", json.dumps(values, default=float))
    console.print(table)


def quantize_command(
    gguf: Annotated[Path, typer.Argument(help="The model-*.gguf written by `mvlm export`.")],
    quant_type: Annotated[
        str, typer.Option("--type", help="llama.cpp type: q4_k_s (paper's 4-bit), q8_0, q4_0, ...")
    ] = "q4_k_s",
    out: Annotated[Path | None, typer.Option(help="Output folder (default <export>/quant/<type>).")] = None,
    eval_text: Annotated[
        Path | None, typer.Option(help="Held-out text file for the perplexity check.")
    ] = None,
    threads: Annotated[int, typer.Option(help="Threads for quantizing and checking.")] = 2,
    mlflow: Annotated[
        bool, typer.Option(help="Log the GGUFs to MLflow (benchmarks fetch them from there).")
    ] = True,
) -> None:
    """Quantize a GGUF with llama.cpp, check it (tensor types, perplexity vs its source), log it to MLflow."""
    from tasks.ship.quantize import QuantizeError, quantize

    text = eval_text.read_text() if eval_text else None
    try:
        result = quantize(gguf, quant_type, out, eval_text=text, threads=threads)
    except QuantizeError as err:
        raise fail(str(err)) from err
    checks = result.manifest.get("checks", {})
    table = Table(
        "field",
        "value",
        title=f"quant {result.quant_type} {result.quant_id}" + (" (reused)" if result.reused else ""),
    )
    table.add_row("folder", str(result.out_dir))
    table.add_row("size", f"{result.manifest['size_bytes'] / 1e6:.2f} MB")
    table.add_row("tensor types", json.dumps(checks.get("tensor_types", {}).get("histogram", {})))
    table.add_row("k-quant fallbacks", str(checks.get("tensor_types", {}).get("note", "")))
    ppl = checks.get("perplexity", {})
    if ppl:
        table.add_row(
            "perplexity",
            f"{ppl['perplexity']:.3f} vs {ppl['reference_perplexity']:.3f} ({ppl['reference']}), "
            f"ratio {ppl['ratio']:.4f}",
        )
    if mlflow:
        from tasks.lineage.tracking import tracking_uri

        table.add_row("MLflow run", f"{_log_quant(result)} at {tracking_uri()}")
    console.print(table)


def _log_quant(result: Any) -> str:
    """Log a quant to MLflow, or fail with what to do when the server is down."""
    from tasks.lineage.quant_artifacts import log_quant
    from tasks.lineage.tracking import reachable, tracking_uri

    uri = tracking_uri()
    if not reachable(uri):
        raise fail(
            f"MLflow at {uri} is unreachable; start it (or set MLFLOW_TRACKING_URI) and rerun: the quant "
            "folder is reused and only the upload happens; or pass --no-mlflow"
        )
    return log_quant(result)


# --- bench ------------------------------------------------------------------------------------


def _setting_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs typed after BenchSettings' fields."""
    from tasks.ship.bench import BenchSettings

    types = {f.name: f.type for f in dataclasses.fields(BenchSettings)}
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in types:
            raise fail(f"--set {pair!r}: expected key=value with key in {sorted(types)}")
        kind = types[key]
        out[key] = (
            value.lower() in ("1", "true", "yes")
            if kind == "bool"
            else int(value)
            if kind == "int"
            else value
        )
    return out


def _quant_run_id(model: str) -> str:
    """A quant run id from ``runs:/<id>``, a bare run id, or a quant folder (logged to MLflow if needed)."""
    match = _RUN_ID.match(model)
    if match:
        return match.group(1)
    folder = Path(model)
    if not (folder / "manifest.json").is_file():
        raise fail(
            f"{model} is neither an MLflow run id nor a quant folder with manifest.json (see `mvlm quantize`)"
        )
    from tasks.core.identity import read_json
    from tasks.ship.quantize import QuantResult

    manifest = read_json(folder / "manifest.json")
    if manifest.get("kind") != "quant":
        raise fail(f"{folder}/manifest.json is a {manifest.get('kind')!r} manifest; pass a quant folder")
    mmproj = folder / manifest["mmproj"] if manifest.get("mmproj") else None
    result = QuantResult(
        manifest["id"], manifest["quant_type"], folder, folder / manifest["llm"], mmproj, True, manifest
    )
    return _log_quant(result)


@bench_app.command("submit")
def bench_submit(
    model: Annotated[
        str, typer.Argument(help="Quant folder (from `mvlm quantize`) or the MLflow run id of a quant.")
    ],
    pool: Annotated[
        str, typer.Option(help="Device work pool: host-cpu, snapdragon-888, jetson-orin, ...")
    ] = "host-cpu",
    local: Annotated[
        bool | None,
        typer.Option(
            "--local/--submit",
            help="Run the flow here, or submit to the pool's workers (here unless PREFECT_API_URL is set).",
        ),
    ] = None,
    wait: Annotated[float, typer.Option(help="Seconds to wait for a submitted run (0: do not wait).")] = 0.0,
    rerun: Annotated[
        bool, typer.Option(help="Measure again even if this result is already in MLflow.")
    ] = False,
    setting: Annotated[
        list[str] | None,
        typer.Option("--set", help="Protocol setting key=value (repeatable), e.g. --set lm_tokens=64."),
    ] = None,
) -> None:
    """Benchmark a quantized model on a device pool; results go to MLflow as a run linked to the model."""
    from tasks.ship.bench import device_class

    try:
        device_class(pool)
    except KeyError as err:
        raise fail(err.args[0]) from err
    overrides = _setting_overrides(setting or [])
    run_id = _quant_run_id(model)
    here = local if local is not None else not os.environ.get("PREFECT_API_URL")
    if here:
        from flows.device_benchmark import device_benchmark

        summary = device_benchmark(quant_run_id=run_id, pool=pool, settings=overrides or None, rerun=rerun)
        _print_summary(summary)
        return
    from flows.device_benchmark import submit

    flow_run = submit(run_id, pool, overrides or None, rerun, wait)
    state = flow_run.state.name if flow_run.state else "?"
    console.print(f"flow run {flow_run.name} ({flow_run.id}) on pool {pool}: {state}")


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table("field", "value", title=f"benchmark {summary['identity']}: {summary['status']}")
    table.add_row("MLflow run", str(summary.get("run_id") or f"queued in {summary.get('outbox')}"))
    for key, value in sorted((summary.get("metrics") or {}).items()):
        table.add_row(key, f"{value:.4g}")
    console.print(table)


@bench_app.command("report")
def bench_report(
    chart: Annotated[Path, typer.Option(help="Where to write the bar chart (PNG).")] = Path(
        "bench_report.png"
    ),
) -> None:
    """A table per device and quant type (ours beside the paper's numbers) and a bar chart."""
    from tasks.lineage.bench_runs import report_rows
    from tasks.ship.bench import REPORT_COLUMNS, report_groups, write_chart

    rows = report_rows()
    for (device, quant_type), group in report_groups(rows).items():
        headers = [f"{row['source']}: {row['model']}" for row in group]
        table = Table("metric", *headers, title=f"{device} / {quant_type}")
        table.add_row("backend", *[str(row["backend"]) for row in group])
        for key, label in REPORT_COLUMNS:
            if any(key in row for row in group):
                table.add_row(label, *[_cell(row.get(key)) for row in group])
        console.print(table)
    console.print(f"chart: {write_chart(rows, chart)}")


def _cell(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"


@bench_app.command("deploy")
def bench_deploy(
    pool: Annotated[
        list[str] | None, typer.Option(help="Pools to deploy to (default: every pool in pools.yaml).")
    ] = None,
    source: Annotated[
        str | None, typer.Option(help="Where workers load the flow: this checkout (default) or a git URL.")
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE for every flow run (repeatable), e.g. MLFLOW_TRACKING_URI=http://..."),
    ] = None,
) -> None:
    """Create the work pools and one `device-benchmark` deployment per pool on the Prefect API."""
    from flows.device_benchmark import deploy

    variables = dict(pair.split("=", 1) for pair in env or [] if "=" in pair)
    for name, deployment_id in deploy(pool, source, variables).items():
        console.print(f"pool {name}: deployment device-benchmark/{name} ({deployment_id})")


@bench_app.command("flush")
def bench_flush() -> None:
    """Send results waiting in the outbox (kept there while MLflow was unreachable)."""
    from tasks.lineage.push import Outbox, flush

    report = flush(Outbox())
    console.print(f"sent {len(report.sent)}, still waiting {len(report.kept)}")


@bench_app.command("pools")
def bench_pools() -> None:
    """The device classes (work pools) and how each runs the model."""
    from tasks.ship.bench import load_pools

    pools = load_pools()
    table = Table(Column("pool", no_wrap=True), "soc", "backend", "transport", "threads")
    for name, device in pools.items():
        table.add_row(name, device.soc, device.backend, device.transport, str(device.threads))
    console.print(table)
    for name, device in pools.items():
        console.print(f"{name}: {device.description}", markup=False)

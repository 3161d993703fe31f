"""The ``sparsify`` command line: each command parses, calls one library function, writes.

Heavy modules (torch, numba) are imported inside the commands that use them, so ``--help``
answers at once. Errors print one line ``error: …`` on stderr and exit 1; usage errors exit 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import click

from . import __version__

MODEL_HELP = "a .gguf path or a bundled name (smollm2-135m, gemma3-270m)"


def _err(msg: str) -> None:
    # Names read from a hostile file may hold terminal escapes, control characters or
    # unpaired surrogates: print them as escapes, so the message stays one printable line.
    safe = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in msg)
    click.echo(f"error: {safe}", err=True)


def _interrupted(as_program: bool) -> NoReturn:
    _err("interrupted")
    if as_program:
        # A KeyboardInterrupt that passed through exec() of a string on its way here (scipy's
        # lazy imports, which numba triggers mid-profile, do that) makes CPython end the
        # process by SIGINT after finalization, whatever code sys.exit asked for: exit 1 was
        # -2 in about one run in twelve. Every finally block has run; leave with the code.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(1)
    sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the click group, turning every failure into one line on stderr."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    if argv is None:
        from . import interrupt

        interrupt.install()
    try:
        cli.main(args=args, prog_name="sparsify", standalone_mode=False)
    except click.exceptions.Abort:
        _interrupted(argv is None)
    except click.UsageError as e:
        if debug:
            raise
        e.show()
        sys.exit(2)
    except click.ClickException as e:
        if debug:
            raise
        _err(e.format_message())
        sys.exit(1)
    except KeyboardInterrupt:
        if debug:
            raise
        _interrupted(argv is None)
    except BrokenPipeError:
        sys.exit(1)
    except Exception as e:
        if debug:
            raise
        from .errors import SparsifyError

        if isinstance(e, SparsifyError):
            _err(str(e))
        elif isinstance(e, MemoryError):
            _err("out of memory")
        else:
            _err(f"{type(e).__name__}: {' '.join(str(e).split())}")
        sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sparsify")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Training-free activation sparsity for GGUF models."""


@cli.command()
@click.argument("model", metavar="MODEL")
def info(model: str) -> None:
    """Architecture, dimensions, tensors, types and bytes of MODEL."""
    from .info import describe

    click.echo(describe(model))


# sparsify generate and sparsify bench: the GPU engine's cache type (engine_cuda.KV_CACHES).
_kv_cache_option = click.option(
    "--kv-cache", type=click.Choice(["f32", "f16"]), default=None,
    help="KV cache element type on cuda [default: f32]; f16 halves its memory and the bytes "
         "attention reads.")


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("-p", "--prompt", required=True, help="Prompt text.")
@click.option("-n", "n_tokens", type=click.IntRange(1, 1 << 20), default=64, show_default=True,
              help="Tokens to generate.")
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Sampling temperature; 0 is greedy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--table", type=click.Path(dir_okay=False), default=None,
              help="Threshold table to apply (see `sparsify profile`).")
@click.option("--sparsity", type=click.FloatRange(0, 1), default=None,
              help="Model-wide sparsity level to apply from --table.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@_kv_cache_option
def generate(model: str, prompt: str, n_tokens: int, temperature: float, seed: int,
             table: str | None, sparsity: float | None, device: str,
             kv_cache: str | None) -> None:
    """Generate text from MODEL, streaming it to stdout (tokens/s on stderr)."""
    from .run import run_generate

    if (table is None) != (sparsity is None):
        raise click.UsageError("--table and --sparsity go together")
    _cuda_only(kv_cache, device)
    run_generate(model, prompt, n_tokens, temperature, seed, table, sparsity, device, kv_cache)


def _cuda_only(kv_cache: str | None, device: str) -> None:
    if kv_cache is not None and device != "cuda":
        raise click.UsageError("--kv-cache applies to --device cuda only")



@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Table file to write [default: <model file stem>.<criterion>.thresholds.json].")
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False), default=None,
              help="UTF-8 text file to calibrate on instead of the built-in corpus.")
@click.option("--tokens", type=click.IntRange(1), default=32768, show_default=True,
              help="Calibration tokens.")
@click.option("--seq-len", type=click.IntRange(2), default=512, show_default=True,
              help="Tokens per calibration sequence.")
@click.option("--criterion", type=click.Choice(["magnitude", "weight-aware"]),
              default="magnitude", show_default=True,
              help="Score: |x|, or |x| times the weight column norm.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def profile(model: str, output: str | None, corpus: str | None, tokens: int, seq_len: int,
            criterion: str, seed: int, force: bool) -> None:
    """Record activation distributions of MODEL and write a threshold table."""
    from .profile import run_profile

    run_profile(model, output, corpus, tokens, seq_len, criterion, seed, force)


@cli.command()
@click.argument("model", metavar="MODEL")
@click.argument("table_path", metavar="TABLE", type=click.Path(dir_okay=False))
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Where to write the table with allocations [default: replace TABLE, which "
                   "needs --force].")
@click.option("--method", "methods", multiple=True, type=click.Choice(["greedy", "cross-layer"]),
              default=("greedy", "cross-layer"), show_default=True)
@click.option("--corpus", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Calibration text [default: the built-in corpus's calibration part].")
@click.option("--tokens", type=click.IntRange(1), default=4096, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def allocate(model: str, table_path: str, output: str | None, methods: tuple[str, ...],
             corpus: str | None, tokens: int, force: bool) -> None:
    """Add per-tensor sparsity allocations for model-wide targets to TABLE."""
    from .allocate import run_allocate

    run_allocate(model, table_path, output, list(methods), corpus, tokens, force)


@cli.group()
def table() -> None:
    """Inspect and check threshold tables."""


@table.command("show")
@click.argument("table_path", metavar="TABLE", type=click.Path(dir_okay=False))
@click.option("--sparsity", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Level whose per-tensor thresholds are listed.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Also write a PNG plot of thresholds per block.")
@click.option("--force", is_flag=True, help="Overwrite an existing plot file.")
def table_show(table_path: str, sparsity: float, plot: str | None, force: bool) -> None:
    """Model, provenance and per-tensor thresholds of TABLE."""
    from .table import run_show

    run_show(table_path, sparsity, plot, force)


@table.command("check")
@click.argument("table_path", metavar="TABLE", type=click.Path(dir_okay=False))
@click.argument("model", metavar="MODEL")
def table_check(table_path: str, model: str) -> None:
    """Exit 0 only if TABLE was made for MODEL."""
    from .table import run_check

    run_check(table_path, model)


@cli.command("eval")
@click.argument("model", metavar="MODEL")
@click.option("--table", "table_path", required=True, type=click.Path(dir_okay=False))
@click.option("--sparsity", required=True, help="Comma-separated model-wide levels, e.g. 0,0.4,0.5")
@click.option("--method", default="uniform", show_default=True,
              help="uniform, or an allocation stored in the table (e.g. greedy, cross-layer).")
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Held-out text [default: the built-in corpus's held-out part].")
@click.option("--tokens", type=click.IntRange(1), default=8192, show_default=True)
@click.option("--seq-len", type=click.IntRange(2), default=512, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--force", is_flag=True, help="Overwrite an existing JSON file.")
def eval_(model: str, table_path: str, sparsity: str, method: str, text: str | None,
          tokens: int, seq_len: int, json_out: str | None, force: bool) -> None:
    """Perplexity, KL to dense and realized sparsity of MODEL at each level."""
    from .evaluate import run_eval

    run_eval(model, table_path, _levels(sparsity), method, text, tokens, seq_len, json_out, force)


@cli.command()
@click.argument("model", metavar="MODEL")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--sparsity", default="0,0.4,0.5", show_default=True,
              help="Comma-separated model-wide levels.")
@click.option("--table", "table_path", type=click.Path(dir_okay=False), default=None,
              help="Threshold table; needed for levels above 0.")
@click.option("--format", "fmt", type=click.Choice(["fp32", "int8", "fp16", "bf16"]),
              default=None, help="Weight format [default: int8 on cpu, fp16 on cuda].")
@click.option("--tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None)
@click.option("--context", type=click.IntRange(1), default=None,
              help="Decode after this many tokens of built-in text (attention then reads that "
                   "many cached keys) instead of a one-line prompt.")
@_kv_cache_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--force", is_flag=True, help="Overwrite an existing JSON file.")
def bench(model: str, device: str, sparsity: str, table_path: str | None, fmt: str | None,
          tokens: int, repeats: int, threads: int | None, context: int | None,
          kv_cache: str | None, json_out: str | None, force: bool) -> None:
    """Decode tokens/s of MODEL, dense and sparse (and llama.cpp's when installed)."""
    from .bench import run_bench

    _cuda_only(kv_cache, device)
    run_bench(model, device, _levels(sparsity), table_path, fmt, tokens, repeats, threads,
              json_out, force, context, kv_cache)


def _levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.UsageError(f"--sparsity wants comma-separated numbers, got {text!r}") from None
    if not levels or any(not 0 <= s <= 1 for s in levels):
        raise click.UsageError(f"--sparsity levels must lie in [0, 1], got {text!r}")
    return levels

if __name__ == "__main__":
    main()

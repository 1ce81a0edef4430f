"""The ``postroom`` command: migrate, relay, worker and the tools for people on call."""

from __future__ import annotations

import signal
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from postroom import cli_ops, cli_outbox
from postroom.cli_consumers import consumers_app
from postroom.cli_dead_letters import dead_letters_app
from postroom.cli_monitoring import monitoring_app
from postroom.cli_topology import topology_app
from postroom.errors import ConfigError, PostroomError
from postroom.settings import Settings


class _Answering(TyperGroup):
    """Run a command; end any failure with one line and its exit code (``explain``).

    The traceback is printed too (secrets masked) with ``--debug`` or
    ``POSTROOM_LOG_LEVEL=DEBUG``, and for an unexpected error (a bug, not a misconfiguration).
    """

    def invoke(self, ctx: Any) -> Any:  # typer's (vendored) click Context
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
            raise  # usage errors, exits and ^C are click's to report
        except Exception as exc:
            from postroom.diagnosis import explain

            try:
                settings: Settings | None = Settings.from_env()
            except ConfigError:
                settings = None
            answer = explain(exc, settings)
            debug = bool(ctx.meta.get("postroom.debug")) or (
                settings is not None and settings.log_level == "DEBUG"
            )
            if debug or answer.unexpected:
                text = "".join(traceback.format_exception(exc))
                typer.echo(settings.mask(text) if settings else text, err=True, nl=False)
            fail(answer.line, answer.code)


if TYPE_CHECKING:
    from postroom.router import Router

app = typer.Typer(
    cls=_Answering,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: typer's rich panels show flags as "--yes <bool>"
    help="postroom: transactional outbox, relay and idempotent consumers.",
)


@app.callback()
def _options(
    ctx: typer.Context,
    debug: Annotated[
        bool, typer.Option("--debug", help="On failure, print the traceback too.")
    ] = False,
) -> None:
    """postroom: transactional outbox, relay and idempotent consumers."""
    ctx.meta["postroom.debug"] = debug


def fail(message: str, code: int = 2) -> NoReturn:
    """Print *message* to stderr and exit with *code*; for errors a person can fix."""
    typer.secho(f"postroom: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


def load_settings() -> Settings:
    """Build settings from the environment, or exit 2 naming what is wrong."""
    try:
        return Settings.from_env()
    except ConfigError as exc:
        fail(str(exc))


def _configure_logs(settings: Settings) -> None:
    from postroom import logs

    logs.configure(settings.log_format, settings.log_level, secrets=settings.secrets())


def _run(check: Any) -> None:
    """Run the pre-flight coroutine *check* to completion before the service starts."""
    import asyncio

    asyncio.run(check)


@app.command()
def migrate(
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Create or upgrade postroom's tables in their own schema (idempotent)."""
    settings = load_settings()
    _configure_logs(settings)
    from postroom.migrate import upgrade_reporting

    for line in upgrade_reporting(settings, revision).lines():
        typer.echo(line)


@app.command()
def relay() -> None:
    """Publish committed outbox rows to RabbitMQ until SIGTERM."""
    settings = load_settings()
    _configure_logs(settings)
    from postroom.preflight import preflight
    from postroom.process import run_service
    from postroom.service import run_relay

    _run(preflight(settings, name="postroom-relay"))
    run_service(lambda stop: run_relay(settings, stop), event_loop=settings.event_loop)


RouterArg = Annotated[
    str, typer.Argument(help="Import path of a Router, e.g. billing.consumers:router.")
]
AppDir = Annotated[
    str | None,
    typer.Option(
        "--app-dir", help="Look for ROUTER's module here first (default: the current folder)."
    ),
]


def configured_router(settings: Settings, router: str, app_dir: str | None) -> Router:
    """Import ROUTER and configure the process's outbox from *settings*, or exit 2.

    The outbox is configured after the import, so a module that configured postroom
    differently at import time is a clear error here rather than events split between
    two schemas.
    """
    from postroom.loader import load_router
    from postroom.outbox import configure

    try:
        loaded = load_router(router, app_dir=app_dir)
        configure(settings)
    except PostroomError as exc:
        fail(str(exc))
    return loaded


@app.command()
def worker(router: RouterArg, app_dir: AppDir = None) -> None:
    """Consume every consumer of ROUTER until SIGTERM, then drain gracefully."""
    settings = load_settings()
    _configure_logs(settings)
    from postroom.preflight import preflight
    from postroom.process import run_service
    from postroom.service import run_worker

    loaded = configured_router(settings, router, app_dir)
    _run(preflight(settings, name="postroom-worker"))
    run_service(lambda stop: run_worker(settings, loaded, stop), event_loop=settings.event_loop)


@app.command()
def dev(
    router: RouterArg,
    app_dir: AppDir = None,
    reload: Annotated[
        bool,
        typer.Option(
            "--reload",
            help="Restart when a .py file under --app-dir changes (needs postroom[reload]).",
        ),
    ] = False,
) -> None:
    """Run a relay and ROUTER's worker in one process, for development.

    Logs are readable on a terminal; a summary line per POSTROOM_LOG_INTERVAL says what
    each consumer did. Stop with Ctrl-C (the worker drains first).
    """
    settings = load_settings()
    if reload:
        _reload(router, app_dir)
        return
    _configure_logs(settings)
    from postroom.preflight import preflight
    from postroom.process import run_service
    from postroom.service import run_dev

    loaded = configured_router(settings, router, app_dir)
    _run(preflight(settings, name="postroom-dev"))
    run_service(lambda stop: run_dev(settings, loaded, stop), event_loop=settings.event_loop)


def _reload(router: str, app_dir: str | None) -> None:
    """Run ``postroom dev`` in a child process, restarted when a Python file changes."""
    import os
    import shlex

    try:
        import watchfiles
    except ImportError:
        fail("--reload needs watchfiles: pip install 'postroom[reload]'")
    directory = os.path.abspath(app_dir or os.getcwd())
    child = [sys.executable, "-m", "postroom", "dev", router, "--app-dir", directory]
    typer.echo(f"postroom dev: watching {directory} for changes to .py files", err=True)
    watchfiles.run_process(
        directory,
        target=shlex.join(child),
        target_type="command",
        watch_filter=watchfiles.PythonFilter(),
    )


@app.command()
def check(
    timeout: Annotated[float, typer.Option(help="Seconds each check may take.")] = 5.0,
) -> None:
    """Pre-flight: config valid, database reachable, schema at head, broker reachable.

    Prints one line per check; exits 1 if a check fails, 2 if the configuration is invalid.
    """
    import asyncio

    from postroom.check import check_config, run_checks

    settings, config = check_config()
    typer.echo(config.line())
    if settings is None:
        raise typer.Exit(2)
    _configure_logs(settings)
    results = asyncio.run(run_checks(settings, timeout=timeout))
    for result in results:
        typer.echo(result.line())
    if not all(result.ok for result in results):
        raise typer.Exit(1)


@app.command("config-reference")
def config_reference() -> None:
    """Print the Markdown reference of every setting (docs/configuration.md)."""
    from postroom.settings import reference

    typer.echo(reference(), nl=False)


@app.command()
def asyncapi(
    router: Annotated[
        str, typer.Argument(help="Import path of a Router, e.g. billing.consumers:router.")
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    title: Annotated[str | None, typer.Option(help="Document title (default: ROUTER).")] = None,
    api_version: Annotated[str, typer.Option(help="The document's info.version.")] = "1.0.0",
    app_dir: AppDir = None,
    exchange: Annotated[
        str | None,
        typer.Option(help="Events exchange (default: POSTROOM_EXCHANGE, else postroom.events)."),
    ] = None,
) -> None:
    """Write an AsyncAPI 3.0.0 document of what ROUTER consumes and publishes."""
    from postroom.asyncapi import document, dumps
    from postroom.loader import load_router

    try:
        loaded = load_router(router, app_dir=app_dir)
    except PostroomError as exc:
        fail(str(exc))
    if exchange is None:
        try:
            exchange = Settings.from_env().exchange
        except ConfigError:  # no database configured where docs are built: the default
            exchange = str(Settings.model_fields["exchange"].default)
    text = dumps(document(loaded, title=title or router, version=api_version, exchange=exchange))
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)
        typer.echo(f"wrote {output}", err=True)


@app.command()
def demo(
    orders: Annotated[int, typer.Option(min=1, help="Orders to place.")] = 200,
    rate: Annotated[float, typer.Option(min=0, help="Orders per second; 0: a burst.")] = 0.0,
    concurrency: Annotated[int, typer.Option(min=1, help="Orders placed at once.")] = 8,
    timeout: Annotated[float, typer.Option(help="Seconds to wait after the last order.")] = 120.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Run the demo shop end to end: relay, worker, a load of orders, a summary."""
    import importlib
    import os

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the demo lives in a checkout's examples/
    try:
        shop = importlib.import_module("examples.shop.run")
    except ModuleNotFoundError as exc:
        if exc.name not in ("examples", "examples.shop", "examples.shop.run"):
            raise
        fail(
            "the demo shop is not importable: run `postroom demo` from the root of a "
            "postroom checkout (it lives in examples/), or put that directory on PYTHONPATH"
        )
    options = {"orders": orders, "rate": rate, "concurrency": concurrency, "timeout": timeout}
    raise typer.Exit(shop.main(**options, json_output=json_output))


@app.command()
def console(
    router: Annotated[
        str | None,
        typer.Option(help="Import path of the Router: its consumers are listed (before they "
        "ran) and their redaction applies."),
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind here (default: console_host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: console_port).")] = None,
) -> None:
    """Serve the web console: groups, dead letters, replay and purge, pauses, audit."""
    settings = load_settings()
    _configure_logs(settings)
    try:
        from postroom.console.app import serve
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("starlette", "jinja2", "uvicorn", "multipart"):
            fail("the console needs its optional extra: pip install 'postroom[console]'")
        raise
    loaded = None
    if router is not None:
        from postroom.loader import load_router

        try:
            loaded = load_router(router)
        except PostroomError as exc:
            fail(str(exc))
    changes = {"console_host": host, "console_port": port}
    settings = settings.model_copy(update={k: v for k, v in changes.items() if v is not None})
    typer.echo(
        f"postroom console on http://{settings.console_host}:{settings.console_port}/", err=True
    )
    try:
        serve(settings, router=loaded)
    except ConfigError as exc:
        fail(str(exc))


app.add_typer(dead_letters_app, name="dead-letters")
app.add_typer(cli_ops.outbox_app, name="outbox")
cli_ops.outbox_app.command("list")(cli_outbox.list_rows)
cli_ops.outbox_app.command("show")(cli_outbox.show_row)
cli_ops.outbox_app.command()(cli_outbox.retry)
cli_ops.outbox_app.command()(cli_outbox.discard)
app.add_typer(topology_app, name="topology")
app.add_typer(monitoring_app, name="monitoring")
app.add_typer(consumers_app, name="consumers")
app.command()(cli_ops.prune)
app.command()(cli_ops.audit)


def main() -> None:
    """Console-script entry point."""
    # A SIGTERM during start-up (imports, settings) has nothing to drain: exit 0 at once.
    # The running service replaces this with its own handler that drains first.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)

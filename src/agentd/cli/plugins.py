"""``agentd plugins``: keys, signing and verification of a plugin folder (docs/plugins.md).

Errors are one line on stderr: exit 2 for a bad argument (a folder or key file that is not
one), exit 1 when the folder fails verification or cannot be written.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["plugins"]

plugins = typer.Typer(
    name="plugins",
    help="Plugin folders: ed25519 keys, MANIFEST signing and checking; a server's loaded plugins.",
    no_args_is_help=True,
)


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _files(count: int) -> str:
    return f"{count} file{'' if count == 1 else 's'}"


def _folder(path: Path) -> Path:
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise _fail(f"{path} {what}", 2)
    return path


@plugins.command("keygen")
def keygen(
    out: Annotated[
        Path, typer.Option(help="Folder to write agentd-plugins.key and agentd-plugins.pub in.")
    ] = Path("."),
) -> None:
    """Write a new ed25519 key pair for signing plugin folders.

    The private key (mode 0600, never printed) signs; keep it off the servers. The servers
    trust the public key (plugin_trusted_keys).
    """
    from agentd.errors import InvalidArgument
    from agentd.plugins.signing import generate_keypair

    try:
        private, public, text = generate_keypair(out)
    except InvalidArgument as exc:
        raise _fail(exc.message, 2) from None
    typer.echo(f"private key: {private} (mode 0600; sign with it, keep it secret)")
    typer.echo(f"public key:  {public}")
    typer.echo(f"trust it with plugin_trusted_keys: {text}")


@plugins.command("sign")
def sign(
    folder: Annotated[Path, typer.Argument(help="The plugin folder.")],
    key: Annotated[
        Path | None,
        typer.Option(help="Private key (from keygen); without it MANIFEST only, unsigned."),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            envvar="AGENTD_CONFIG",
            help="The server's config file: listed too when it is inside FOLDER.",
        ),
    ] = None,
) -> None:
    """Hash FOLDER's plugin files into FOLDER/MANIFEST and sign it into FOLDER/MANIFEST.sig.

    Covers agents/*.py, tools/*.py, every file under models/<name>/, and the config file
    when it is inside FOLDER.
    """
    from agentd.errors import InvalidArgument
    from agentd.plugins.manifest import sign_folder
    from agentd.plugins.signing import key_file_is_shared, load_signing_key

    _folder(folder)
    signer = None
    if key is not None:
        try:
            signing_key = load_signing_key(key)
        except InvalidArgument as exc:
            raise _fail(exc.message, 2) from None
        if key_file_is_shared(key):
            typer.echo(f"warning: {key} is readable by others (chmod 600 {key})", err=True)
        signer = signing_key.sign
    try:
        manifest, removed = sign_folder(folder, signer, config)
    except InvalidArgument as exc:
        raise _fail(exc.message, 1) from None
    count = _files(len(manifest.entries))
    if key is not None:
        typer.echo(f"signed {count}: {folder / 'MANIFEST'}, {folder / 'MANIFEST.sig'}")
        typer.echo(f"public key: {signing_key.public_key}")
    else:
        typer.echo(f"wrote {folder / 'MANIFEST'} ({count}, unsigned)")
        if removed:
            typer.echo(f"removed the stale {folder / 'MANIFEST.sig'}")


@plugins.command("verify")
def verify(
    folder: Annotated[Path, typer.Argument(help="The plugin folder.")],
    key: Annotated[
        list[str] | None,
        typer.Option(
            help="A trusted public key: PEM file or base64 (repeat for several); "
            "default: plugin_trusted_keys."
        ),
    ] = None,
    require_signature: Annotated[
        bool | None,
        typer.Option(
            "--require-signature/--no-require-signature",
            help="Fail without a valid MANIFEST.sig \\[default: the require_signature setting].",
        ),
    ] = None,
) -> None:
    """Check FOLDER against its MANIFEST and MANIFEST.sig.

    Every listed file's hash, no unlisted plugin file, and MANIFEST.sig made by a trusted
    key. Exit 1 naming each problem otherwise.
    """
    from agentd.cli.tools import settings_or_exit
    from agentd.errors import InvalidArgument
    from agentd.plugins.manifest import MANIFEST_FILE, SIGNATURE_FILE, PluginRefused, Verifier
    from agentd.plugins.signing import read_public_key

    _folder(folder)
    settings = settings_or_exit()
    specs = key or settings.plugin_trusted_keys
    keys = []
    for spec in specs:
        try:
            keys.append(read_public_key(spec))
        except InvalidArgument as exc:
            raise _fail(f"--key: {exc.message}", 2) from None
    required = settings.require_signature if require_signature is None else require_signature
    if required and not keys:
        raise _fail("--require-signature needs a trusted key (--key or plugin_trusted_keys)", 2)
    if not (folder / MANIFEST_FILE).is_file():
        raise _fail(f"{folder} has no MANIFEST (agentd plugins sign {folder} writes one)", 1)
    verifier = Verifier(folder, keys, require_signature=required, config=settings.config)
    try:
        problems = verifier.problems()
    except PluginRefused as exc:
        raise _fail(exc.reason, 1) from None
    for problem in problems:
        typer.echo(f"error: {problem}", err=True)
    if problems:
        raise typer.Exit(1)
    manifest = verifier.manifest
    count = _files(len(manifest.entries) if manifest is not None else 0)
    if verifier.signed_by is not None:
        typer.echo(f"ok: {count} checked against MANIFEST, signed by {verifier.signed_by}")
    elif not (folder / SIGNATURE_FILE).exists():
        typer.echo(f"ok: {count} checked against MANIFEST (unsigned)")
    else:
        typer.echo(f"ok: {count} checked against MANIFEST")
        typer.echo(
            "warning: MANIFEST.sig not checked: no trusted key (--key or plugin_trusted_keys)",
            err=True,
        )


_AGENT_HEADER = ("FILE", "TYPES", "VERSION", "LOADED", "LAST FAILURE")
_TOOL_HEADER = ("FILE", "TOOLS", "VERSION", "LOADED", "LAST FAILURE")
_MODEL_HEADER = ("NAME", "KIND", "STATE", "VERSION", "LOADED", "LAST FAILURE")
_SETTINGS_HEADER = ("FILE", "APPLIED", "NEEDS A RESTART", "LOADED", "LAST FAILURE")


@plugins.command("status")
def status(
    url: Annotated[str, typer.Option(help="Gateway URL.")] = "http://127.0.0.1:8080",
    token: Annotated[str | None, typer.Option(help="Bearer token \\[env: AGENTD_TOKEN].")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the server's JSON.")] = False,
) -> None:
    """What a running server has loaded (GET /v1/plugins): a table each for its agent
    plugin files (types), tool files (tools) and models, with version, load time and the
    last failed reload (the previous version serves)."""
    import httpx

    from agentd.cli.call import answer_json, not_agentd
    from agentd.cli.tools import _client_headers as client_headers

    try:
        response = httpx.get(f"{url}/v1/plugins", headers=client_headers(token), timeout=30)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise _fail(f"cannot reach {url}: {exc}", 1) from None
    body = answer_json(response, url)
    if response.status_code != 200:
        message = body.get("message", response.text) if isinstance(body, dict) else response.text
        raise _fail(f"{response.status_code} {message}", 1)
    try:
        tables = [
            ("agent plugins", _AGENT_HEADER, [_agent_row(row) for row in body["agents"]]),
            ("tools", _TOOL_HEADER, [_tool_row(row) for row in body.get("tools", [])]),
            ("models", _MODEL_HEADER, [_model_row(row) for row in body.get("models", [])]),
        ]
        settings = [_settings_row(row) for row in body.get("settings", [])]
        if settings:  # only a node that watches a config file has this table
            tables.append(("settings", _SETTINGS_HEADER, settings))
    except (KeyError, TypeError, AttributeError, ValueError):
        not_agentd(url, response)
    if as_json:
        typer.echo(json.dumps(body, indent=2))
        return
    for index, (what, header, rows) in enumerate(tables):
        if index:
            typer.echo("")
        if not rows:
            typer.echo(f"no {what} loaded")
            continue
        _table(header, rows)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        # The last column unpadded: a failure's reason can be long.
        padded = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)]
        typer.echo("  ".join([*padded, row[-1]]).rstrip())


def _agent_row(agent: dict[str, Any]) -> tuple[str, ...]:
    return (
        Path(agent["file"]).name,
        ", ".join(agent["types"]) or "-",
        _version(agent["version"]),
        _when(agent["loaded_at"]),
        _failure(agent["last_failure"]),
    )


def _tool_row(tool: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(tool["file"]),
        ", ".join(tool["tools"]) or "-",
        _version(tool["version"]),
        _when(tool["loaded_at"]),
        _failure(tool["last_failure"]),
    )


def _settings_row(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        Path(row["file"]).name,
        ", ".join(row["applied"]) or "-",
        ", ".join(row["needs_restart"]) or "-",
        _when(row["loaded_at"]),
        _failure(row["last_failure"]),
    )


def _model_row(model: dict[str, Any]) -> tuple[str, ...]:
    return (
        str(model["name"]),
        str(model["kind"]),
        str(model["state"]),
        _version(model["version"]),
        _when(model["loaded_at"]),
        _failure(model["last_failure"]),
    )


def _version(version: str | None) -> str:
    return (version or "-")[:12]


def _failure(failure: dict[str, Any] | None) -> str:
    if not failure:
        return "-"
    return f"{failure['outcome']} {_when(failure['at'])}: {failure['reason']}"


def _when(at: float | None) -> str:
    return "-" if at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))

"""The ``alignloop`` command: parse a stage's config (YAML, then ``--section.key=value``
overrides) and call that stage. No training logic lives here.

Exit codes: 0 done, 2 bad input (config, data, model path: one line on stderr), 130 interrupted
(after a checkpoint was saved).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from alignloop.config import STAGES, ServeConfig, describe, load_config
from alignloop.errors import AlignloopError, ConfigError, TrainingInterrupted

log = logging.getLogger("alignloop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignloop",
        description="The RLHF loop, end to end: pretrain/SFT → reward → optimise → evaluate → serve → feedback.",
        epilog="Each stage takes --config FILE.yaml and any --section.key=value; `alignloop STAGE --help` lists them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also show library warnings and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser("demo", help="offline demo of the whole loop: a tiny base model, a server, simulated users, 3 loop iterations")
    demo.add_argument("--task", default="chat", choices=["chat", "sentiment"],
                      help="chat: a tiny language model and simulated users with hidden tastes; sentiment: a MiniLM "
                           "classifier that learns from simulated labellers' correct/wrong verdicts (default: chat)")
    demo.add_argument("--output-dir", default="runs", help="parent of the demo's run folder (default: runs)")
    demo.add_argument("--base", default="shipped", choices=["shipped", "scratch"],
                      help="shipped: start the loop from chitchat-5m, the base model inside the package; scratch: "
                           "build the base model first (pretrain --model, then SFT) as the shipped one was, briefly (default: shipped)")
    demo.add_argument("--model", default="tiny-5m", help="--base scratch: built-in size or model path to start from (default: tiny-5m)")
    demo.add_argument("--pretrain-steps", type=int, default=200, help="--base scratch: continued-pretraining steps (default: 200)")
    demo.add_argument("--sft-steps", type=int, default=150, help="--base scratch: SFT steps (default: 150)")
    demo.add_argument("--preference", default="mixture", choices=["mixture", "sentiment", "length", "topic"],
                      help="the simulated users' hidden preference (default: mixture)")
    demo.add_argument("--iterations", type=int, default=3, help="loop iterations (default: 3)")
    demo.add_argument("--users", type=int, default=32, help="simulated users (default: 32)")
    demo.add_argument("--turns-per-user", type=int, default=15, help="chat turns with feedback per user per iteration (default: 15)")
    demo.set_defaults(handler=_run_demo)

    report = commands.add_parser("reward-report", help="how good is a reward model? accuracy, calibration, length bias on preference pairs",
                                 description="Score held-out preference pairs with a saved reward model and write report.md, metrics.json and plots.")
    report.add_argument("--model", required=True, help="reward model folder (an `alignloop reward` run's final/)")
    report.add_argument("--data", required=True, help="preference records (prompt, chosen, rejected): a file, or ukp:/hh-rlhf: PATH")
    report.add_argument("--out", default="reward-report", help="folder for report.md, metrics.json and the plots (default: reward-report)")
    report.add_argument("--batch-size", type=int, default=32, help="pairs scored at once (default: 32)")
    report.add_argument("--max-length", type=int, default=None, help="tokens per row (default: the length the model was trained with)")
    report.add_argument("--max-samples", type=int, default=None, help="score only the first N pairs")
    report.set_defaults(handler=_run_reward_report)

    convert = commands.add_parser("convert", help="convert HH-RLHF or UKPConvArg files to standard preference JSONL",
                                  description="Write a foreign preference format as JSONL records in TRL's field names (prompt, chosen, rejected).")
    convert.add_argument("format", choices=["hh-rlhf", "ukp"], help="hh-rlhf: Anthropic's Human/Assistant transcripts (.jsonl or .jsonl.gz); ukp: UKPConvArg1 TSV files or their folder")
    convert.add_argument("source", help="the file or folder to read")
    convert.add_argument("output", help="the JSONL file to write")
    convert.set_defaults(handler=_run_convert)

    db_help = "database URL (default: $ALIGNLOOP_DB or sqlite:///feedback.db; PostgreSQL: postgresql+psycopg://USER@HOST/DB)"
    db = commands.add_parser("db", help="the feedback database: apply its migrations")
    db_actions = db.add_subparsers(dest="action", metavar="ACTION", required=True)
    db_upgrade = db_actions.add_parser("upgrade", help="create the feedback tables or migrate them to this version's schema")
    db_upgrade.add_argument("--db", help=db_help)
    db_upgrade.set_defaults(handler=_run_db_upgrade)

    users = commands.add_parser("users", help="who may use `alignloop serve`: add users (prints their API key), list, revoke or rotate keys")
    users_actions = users.add_subparsers(dest="action", metavar="ACTION", required=True)
    users_add = users_actions.add_parser("add", help="add a user and print their API key (shown once: only a hash is stored)")
    users_add.add_argument("name", help="the user's name, unique")
    users_add.add_argument("--admin", action="store_true", help="may export all feedback (GET /admin/export)")
    users_add.add_argument("--db", help=db_help)
    users_add.set_defaults(handler=_run_users_add)
    users_list = users_actions.add_parser("list", help="list the users: id, name, admin")
    users_list.add_argument("--db", help=db_help)
    users_list.set_defaults(handler=_run_users_list)
    for action, handler, about in (
            ("revoke", _run_users_revoke, "take a user's API key away (refused from the next request, also by a running server)"),
            ("rotate", _run_users_rotate, "give a user a new API key (printed once) in place of the old one")):
        key_action = users_actions.add_parser(action, help=about)
        key_action.add_argument("name", help="the user's name")
        key_action.add_argument("--db", help=db_help)
        key_action.set_defaults(handler=handler)

    feedback = commands.add_parser("feedback", help="export collected feedback as training records")
    feedback_actions = feedback.add_subparsers(dest="action", metavar="ACTION", required=True)
    export = feedback_actions.add_parser("export", help="write feedback as JSONL training records (TRL field names, with provenance)",
                                         description="pairs: pairwise a/b votes and corrections → prompt, chosen, rejected; "
                                                     "kto: thumbs → prompt, completion, label; sft: corrections → prompt, completion; "
                                                     "ratings: → prompt, completion, rating, user.")
    export.add_argument("--kind", required=True, choices=["pairs", "kto", "sft", "ratings", "bandit"], help="which training records to write")
    export.add_argument("--out", required=True, help="the JSONL file to write")
    export.add_argument("--db", help=db_help)
    export.set_defaults(handler=_run_feedback_export)

    models = commands.add_parser("models", help="the model registry: every version, its parent, feedback rows, evaluation, which is deployed")
    models.add_argument("--db", help=db_help)
    models.set_defaults(handler=_run_models)
    lineage = commands.add_parser("lineage", help="which feedback made a model version, or which versions a user's feedback reached")
    lineage.add_argument("version", nargs="?", help="a model version (`alignloop models` lists them)")
    lineage.add_argument("--user", help="instead: the versions this user's feedback trained")
    lineage.add_argument("--db", help=db_help)
    lineage.set_defaults(handler=_run_lineage)
    deploy = commands.add_parser("deploy", help="mark a model version as the deployed one (promotion, or a rollback to an earlier version)")
    deploy.add_argument("version", help="a registered model version")
    deploy.add_argument("--db", help=db_help)
    deploy.add_argument("--server", help="a running `alignloop serve` (URL) to switch to this version now, through /admin/deploy; "
                                         "without it the registry changes and running servers on the database follow within their --registry-poll-seconds")
    deploy.add_argument("--admin-key", help="an admin's API key for --server (default: $ALIGNLOOP_ADMIN_KEY)")
    deploy.set_defaults(handler=_run_deploy)

    serve = commands.add_parser("serve", help="serve models: OpenAI-compatible API (streaming), chat page, feedback store",
                                description=(ServeConfig.__doc__ or "").strip(), allow_abbrev=False)
    serve.add_argument("--config", metavar="FILE", help="YAML with any of the keys below; command-line options override it")
    serve.add_argument("--model", dest="models", action="append", metavar="[NAME=]PATH",
                       help="a model to serve (repeat for several): an HF id or folder such as runs/sft/final; "
                            "a classifier folder is served on /v1/classify, as with --classifier")
    serve.add_argument("--classifier", dest="classifiers", action="append", metavar="[NAME=]PATH",
                       help="a classifier to serve on /v1/classify (repeat for several): a sequence or token (NER) classifier folder")
    serve.add_argument("--no-auth", dest="auth", action="store_const", const="false",
                       help="no API keys: every request is the user 'anonymous' (local demos only)")
    serve.add_argument("--upstream-model", dest="upstream_models", action="append", metavar="[NAME=]ID",
                       help="with --upstream: a model of the upstream to serve (repeat for several), by the id the upstream "
                            "knows it by (a folder transformers serve loads, a Hub id, a vLLM adapter name); default: every "
                            "model the upstream lists")
    for key, type_name, default, help_text in describe(ServeConfig):
        if key not in ("models", "classifiers", "auth", "upstream_models"):
            _add_config_option(serve, key, type_name, default, help_text)
    serve.set_defaults(handler=_run_serve)

    for name, stage in STAGES.items():
        about = (stage.about or stage.config.__doc__ or "").strip()
        sub = commands.add_parser(name, help=stage.help, description=f"{about} Data: {' or '.join(stage.reads)} records.",
                                  allow_abbrev=False)
        sub.add_argument("--config", metavar="FILE", help="YAML config; command-line keys override it")
        if "train" in {f.name for f in dataclasses.fields(stage.config)}:
            sub.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                             help="shortcut for --train.resume (auto: the newest checkpoint of the run folder)")
        for key, type_name, default, help_text in stage.options():
            _add_config_option(sub, key, type_name, default, help_text)
        sub.set_defaults(handler=_run_stage, stage=name)
    return parser


def _run_stage(args: argparse.Namespace, extra: list[str]) -> int:
    """Load the stage's config and run it; a stage that returns an int (evaluate's gate) sets the exit code."""
    stage = STAGES[args.stage]
    keys = {key for key, *_ in stage.options()}
    overrides = {key: value for key, value in vars(args).items() if key in keys}
    overrides.update(_parse_unknown(extra))  # load_config rejects them with a suggestion
    if getattr(args, "resume", None) is not None:
        overrides["train.resume"] = args.resume
    config = stage.load(args.config, overrides)
    result = stage.run(config)
    return result if isinstance(result, int) else 0


def _run_demo(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"demo: unknown option {extra[0]!r}; see `alignloop demo --help`")
    from alignloop.demo import run_demo, run_sentiment_demo

    if args.task == "sentiment":
        run_sentiment_demo(args.output_dir, args.iterations)
        return 0
    run_demo(args.output_dir, args.base, args.model, args.pretrain_steps, args.sft_steps, args.preference,
             args.iterations, args.users, args.turns_per_user)
    return 0


def _run_reward_report(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"reward-report: unknown option {extra[0]!r}; see `alignloop reward-report --help`")
    from pathlib import Path

    from alignloop.evaluate.reward_model import report_reward_model

    path = report_reward_model(args.model, args.data, Path(args.out), args.batch_size, args.max_length, args.max_samples)
    log.info("reward report: %s", path)
    return 0


def _run_convert(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"convert: unknown option {extra[0]!r}; see `alignloop convert --help`")
    from alignloop.data.convert import write_jsonl
    from alignloop.data.load import read_rows

    rows = read_rows(f"{args.format}:{args.source}")
    write_jsonl((row.fields for row in rows), args.output)
    log.info("convert: %d %s records from %s written to %s", len(rows), args.format, args.source, args.output)
    return 0


def _add_config_option(parser: argparse.ArgumentParser, key: str, type_name: str, default: Any, help_text: str) -> None:
    """The option of config key ``key``. A section's key keeps its YAML spelling
    (``--train.max_steps``); a top-level key is kebab-case like every other option
    (``--admin-key``), and its underscore spelling (``--admin_key``) still works, unlisted, so
    scripts written before the rename keep running."""
    kwargs: dict[str, Any] = {"nargs": "?", "const": "true"} if type_name == "bool" else {}
    shown = key if "." in key else key.replace("_", "-")
    parser.add_argument(f"--{shown}", dest=key, default=argparse.SUPPRESS, metavar=type_name,
                        help=_option_help(help_text, default), **kwargs)
    if shown != key:
        parser.add_argument(f"--{key}", dest=key, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def _option_help(text: str, default: Any) -> str:
    """A config option's help line; % doubled, as argparse formats help strings with %. A help
    text that states its default already (``$ALIGNLOOP_DB or ...``) gets no second one."""
    shown = text if "(default:" in text else f"{text} (default: {json.dumps(default)})"
    return shown.replace("%", "%%")


def _run_serve(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise ConfigError(f"serve: unknown option {extra[0]!r}; see `alignloop serve --help`")
    keys = {key for key, *_ in describe(ServeConfig)}
    overrides = {key: value for key, value in vars(args).items() if key in keys and value is not None}
    if args.models:
        overrides["models"] = list(args.models)  # typed already: each a PATH or NAME=PATH
    if args.classifiers:
        overrides["classifiers"] = list(args.classifiers)
    if args.upstream_models:
        overrides["upstream_models"] = list(args.upstream_models)
    config = load_config(ServeConfig, args.config, overrides)
    from alignloop.serve.run import serve_forever

    serve_forever(config)
    return 0


def _store(args: argparse.Namespace) -> Any:
    """The feedback store named by ``--db`` (else $ALIGNLOOP_DB, else sqlite:///feedback.db)."""
    from alignloop.feedback.store import FeedbackStore, resolve_db_url

    return FeedbackStore(resolve_db_url(args.db))


def _no_extra(command: str, extra: list[str]) -> None:
    if extra:
        raise ConfigError(f"{command}: unknown option {extra[0]!r}; see `alignloop {command} --help`")


def _run_db_upgrade(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("db upgrade", extra)
    from alignloop.feedback.store import resolve_db_url, shown_url, upgrade

    url = resolve_db_url(args.db)
    log.info("db upgrade: %s is at schema revision %s", shown_url(url), upgrade(url))
    return 0


def _run_users_add(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("users add", extra)
    with _store(args) as store:
        key = store.add_user(args.name, admin=args.admin)
    log.info("users add: %s%s added; their API key follows (shown once, only its hash is stored)",
             args.name, " (admin)" if args.admin else "")
    print(key)  # alone on stdout, so `KEY=$(alignloop users add NAME)` works
    return 0


def _run_models(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("models", extra)
    with _store(args) as store:
        rows = store.models()
    print(f"{'version':<18} {'parent':<18} {'deployed':<8} {'feedback':>8}  {'evaluation':<30} path")
    for m in rows:
        evaluation = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (m["evaluation"] or {}).items())
        print(f"{m['version']:<18} {m['parent_version'] or '-':<18} {'yes' if m['deployed'] else '':<8} {m['feedback_rows']:>8}  "
              f"{evaluation[:30]:<30} {m['path']}")
    return 0


def _run_lineage(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("lineage", extra)
    if (args.version is None) == (args.user is None):
        raise ConfigError("lineage: give a VERSION (which feedback made it) or --user NAME (which versions it reached), one of them")
    with _store(args) as store:
        if args.user is not None:
            return _print_reached_by(store, args.user)
        rows = store.lineage(args.version)
    print(f"{'feedback_id':>11}  {'kind':<10} user")
    for row in rows:
        print(f"{row['feedback_id']:>11}  {row['kind']:<10} {row['user_name']}")
    return 0


def _print_reached_by(store: Any, name: str) -> int:
    """The versions ``name``'s feedback trained, one a line; when none did, a line on stderr
    saying so and which votes they have, rather than no output at all: "nothing printed" looked
    like a broken command when the user's votes were thumbs and the recipe trained on pairs."""
    versions = store.reached_by(name.strip())
    for version in versions:
        print(version)
    if not versions:
        user = store.user_named(name)
        if user is None:
            raise ConfigError(f"lineage: no user named {name!r}; `alignloop users list` shows them")
        votes = store.live_votes_by_kind(user.id)
        held = ", ".join(f"{count} {kind}" for kind, count in votes.items()) or "none"
        log.info("lineage: no model version was trained on %s's feedback (their live votes: %s); a version the loop "
                 "trains counts only the votes behind the datasets its recipe used (dpo: pairs, from pairwise votes, "
                 "corrections and thumbs on sibling answers; kto: thumbs; sft: corrections)", user.name, held)
    return 0


def _run_deploy(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("deploy", extra)
    with _store(args) as store:
        if not args.server:
            store.deploy(args.version)
            log.info("deploy: %s is now the deployed version in the registry; running servers on this database load it "
                     "within their --registry-poll-seconds (or at once with --server URL)", args.version)
            return 0
        row = next((m for m in store.models() if m["version"] == args.version), None)
    if row is None:
        raise ConfigError(f"deploy: model version {args.version!r} is not registered; `alignloop models` lists them")
    from alignloop.loop.server import Server, admin_key

    answer = Server(args.server.rstrip("/"), admin_key(args.admin_key, "--admin-key")).deploy(row["name"], row["path"])  # the server marks it deployed
    if answer["version"] != args.version:
        raise ConfigError(f"deploy: {row['path']} now hashes to {answer['version']}, not {args.version}: "
                          "the folder changed since it was registered (or the server loads another dtype)")
    log.info("deploy: %s serves %s (was %s)", args.server, answer["version"], answer.get("previous_version"))
    return 0


def _run_users_list(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("users list", extra)
    with _store(args) as store:
        users = store.list_users()
    print(f"{'id':>5}  {'admin':<5}  {'key':<7}  name")
    for user in users:
        print(f"{user.id:>5}  {'yes' if user.admin else 'no':<5}  {'active' if user.has_key else 'none':<7}  {user.name}")
    return 0


def _run_users_revoke(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("users revoke", extra)
    with _store(args) as store:
        store.revoke_user(args.name)
    log.info("users revoke: %s's API key no longer works (a running server refuses it from the next request); "
             "`alignloop users rotate %s` gives them a new one", args.name, args.name)
    return 0


def _run_users_rotate(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("users rotate", extra)
    with _store(args) as store:
        key = store.rotate_key(args.name)
    log.info("users rotate: %s has a new API key, which follows (shown once); the old one no longer works", args.name)
    print(key)
    return 0


def _run_feedback_export(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra("feedback export", extra)
    from alignloop.data.convert import write_jsonl

    with _store(args) as store:
        records, skipped = store.export(args.kind)
    write_jsonl(records, args.out, private=True)  # people's words and names: owner-only, like the database
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "none"
    log.info("feedback export: %d %s records written to %s; skipped: %s", len(records), args.kind, args.out, reasons)
    return 0


def _parse_unknown(tokens: list[str]) -> dict[str, str]:
    overrides: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}; options look like --section.key=value")
        key, has_value, value = token[2:].partition("=")
        if not has_value and i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            value, i = tokens[i + 1], i + 1
        overrides[key] = value
        i += 1
    return overrides


def _log_level(environ: Mapping[str, str]) -> int:
    """INFO, except on the ranks after the first of a multi-process run (torchrun sets ``RANK``):
    they would repeat every line rank 0 writes ("sft done: ..." once per process), so they only
    write warnings and errors."""
    return logging.INFO if int(environ.get("RANK", "0")) == 0 else logging.WARNING


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=_log_level(os.environ), format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        for name in ("transformers", "accelerate", "peft", "httpx", "matplotlib"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # transformers' own "Loading weights" bars would sit above an error line; Hub download bars stay.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.handler(args, extra)
    except TrainingInterrupted as e:
        print(f"alignloop: {e}", file=sys.stderr)
        return 130
    except AlignloopError as e:
        print(f"alignloop: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the command reads or writes: missing, unwritable, a directory, a full disk
        where = f"{e.filename}: " if e.filename else ""
        print(f"alignloop: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("alignloop: interrupted", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


_LEAVE_TIMEOUT = timedelta(minutes=2)  # how long a finished rank waits for the others at the end


def _leave_process_group() -> None:
    """Destroy the torch.distributed group a multi-process run (torchrun) joined, if any.

    Left to the interpreter's exit, or destroyed by one rank after its peer has already exited,
    the gloo group's teardown can hang that rank for good. So the ranks first meet at a barrier
    (rank 0 may still be writing the report while the others are done) and then destroy the
    group while all are alive. The barrier has a timeout, so a rank whose peer died does not wait
    forever.
    """
    dist = sys.modules.get("torch.distributed")  # not imported: no group to leave (and no torch import for `users list`)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=_LEAVE_TIMEOUT)
        else:
            dist.barrier()
    except RuntimeError as e:  # a peer is gone: nothing left to wait for
        print(f"alignloop: leaving the process group without the other ranks: {e}", file=sys.stderr)
    dist.destroy_process_group()


def run() -> None:
    """The ``alignloop`` command (and ``python -m alignloop``): :func:`main`, then exit.

    A rank of a multi-process run (torchrun sets ``WORLD_SIZE``) leaves with ``os._exit`` once its
    output is flushed: gloo's teardown at interpreter exit can otherwise abort ("terminate called
    without an active exception") or hang a rank after the work has succeeded.
    """
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()

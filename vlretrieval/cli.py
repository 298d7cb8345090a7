"""`vlretrieval <command>`: prepare-data, train, eval, demo, index, search, continual, benchmark, convert.

Every command takes `--config FILE[:ARG]` and any number of `--config.key=value` overrides.
Bad input (an unknown config key, a missing file, an unwritable workdir, a diverged loss) ends with
one `error: ...` line and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import warnings

from vlretrieval.arguments import OneLineParser
from vlretrieval.errors import UserError
from vlretrieval.preemption import Preempted

log = logging.getLogger("vlretrieval.cli")  # not __name__: run as `python -m`, that is __main__

DEFAULT_CONFIG = os.path.join("configs", "demo.py")


def _command(commands, name: str, help_text: str, workdir: bool = True) -> argparse.ArgumentParser:
    """A subcommand with the options every command shares."""
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.add_argument("--config", default=DEFAULT_CONFIG, help="config file, optionally FILE:ARG")
    if workdir:
        sub.add_argument("--workdir", required=True, help="where checkpoints and results go")
    sub.add_argument(
        "--data_dir", help="shorthand for --config.data.data_dir (where datasets are built)"
    )
    sub.add_argument("--no_progress", action="store_true", help="no progress bar")
    return sub


def _with_init_from(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument(
        "--init_from",
        help="start from another run's parameters (a workdir or checkpoints/<step>): "
        "shorthand for --config.train.init_from",
    )
    return sub


def _with_hosts(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = sub.add_argument_group(
        "multi-host", "join a run of several processes (JAX's distributed runtime); without "
        "these, SLURM and Cloud TPU pods are detected from the environment"
    )
    group.add_argument("--coordinator_address", help="HOST:PORT of process 0")
    group.add_argument("--num_processes", type=int, help="processes in the run")
    group.add_argument("--process_id", type=int, help="this process's index, 0-based")
    group.add_argument(
        "--heartbeat_timeout", type=int, default=60,
        help="seconds without a peer's heartbeat before every process stops (default 60)",
    )
    return sub


def _with_checkpoint_choice(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument(
        "--step", type=int,
        help="the checkpoint step to use (default: the latest): shorthand for --config.eval.step",
    )
    sub.add_argument(
        "--fallback", action="store_true",
        help="if the latest checkpoint cannot be read, use the newest one that can (default: "
        "fail naming the damaged step): shorthand for --config.eval.fallback=true",
    )
    return sub


def _add_eval_arguments(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument(
        "--mode",
        choices=("towers", "joint", "rerank"),
        default=None,
        help="towers: two encoder passes + a matrix product (default); joint: the joint model's "
        "ITM score for every (image, text) pair; rerank: towers shortlist, joint model re-orders",
    )
    evaluate.add_argument("--shortlist", type=int, help="candidates per query for --mode rerank")
    evaluate.add_argument(
        "--joint_from",
        help="the checkpoint whose joint model scores pairs (default: the evaluated one), e.g. "
        "the joint model before decomposition",
    )
    evaluate.add_argument(
        "--index", dest="eval_index",
        help="rank against this saved image index (`vlretrieval index`) instead of embedding the "
        "images: shorthand for --config.eval.index",
    )


def _add_search_arguments(search_command: argparse.ArgumentParser) -> None:
    search_command.add_argument("--index", required=True, help="an index written by `vlretrieval index`")
    search_command.add_argument("--query", action="append", help="a text query (repeatable)")
    search_command.add_argument("--queries_file", help="a UTF-8 file of queries, one per line")
    search_command.add_argument("--k", type=int, default=10, help="results per query (default 10)")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="vlretrieval",
        description="Image-text retrieval in JAX/Flax: train, evaluate and inspect models.",
        epilog="Override any config field with --config.SECTION.KEY=VALUE, e.g. "
        "--config.train.batch_size=64.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _command(commands, "prepare-data",
             "Build the config's dataset and tokenizer (the demo set is generated); webdataset "
             "shards are each read once, counted and indexed.", workdir=False)
    _with_hosts(_with_init_from(_command(
        commands, "train", "Train (resuming from the latest checkpoint in --workdir), then evaluate."
    )))
    _add_eval_arguments(_with_checkpoint_choice(_with_hosts(_command(
        commands, "eval", "Evaluate the latest checkpoint in --workdir and write results.json."
    ))))
    _with_hosts(_command(commands, "demo", "Train and evaluate the demo end to end and print the results table."))
    index_command = _with_checkpoint_choice(_with_hosts(_command(
        commands, "index", "Embed the images of config.eval.split with the latest checkpoint in "
        "--workdir and save them as an index (safetensors: embeddings, item ids, step, config hash).")))
    index_command.add_argument("--output", required=True, help="the index file to write")
    index_command.add_argument("--codes", action="store_true",
                               help="store packed binary codes (a hashing head's, else the embeddings' signs: "
                               "8 bytes an item at 64 bits), searched by Hamming distance")
    _add_search_arguments(_with_checkpoint_choice(_with_hosts(_command(
        commands, "search", "Embed text queries with the latest checkpoint in --workdir and print "
        "each one's top k items of a saved index, one JSON line per query."))))
    continual_command = _with_hosts(_with_init_from(_command(
        commands, "continual", "Train a sequence of tasks one after another (each from the previous one's "
        "parameters), index each task's test gallery when it is learnt, and write the recall matrix "
        "[task trained x task evaluated] and forgetting, re-indexing and keeping the saved indexes "
        "(continual.json, .md, .png).")))
    continual_command.add_argument("--tasks", required=True, help="the tasks file (JSON: docs/continual.md)")
    benchmark_command = _with_checkpoint_choice(_with_hosts(_command(
        commands, "benchmark", "Evaluate the checkpoint in --workdir over a suite of datasets and tasks "
        "(retrieval, zero-shot classification) and write one JSON per dataset, language and task, a CSV, "
        "a Markdown table and plots.")))
    benchmark_command.add_argument("--suite", required=True, help="the suite file (JSON: docs/benchmark.md)")
    benchmark_command.add_argument("--output", help="where the results go (default: WORKDIR/benchmark)")
    convert_help = ("Convert checkpoints: a Hugging Face folder (BertModel, XLMRobertaModel, "
                    "ViTModel, CLIPModel, SiglipModel, SiglipVisionModel, ViltModel, or a "
                    "sentence-transformers folder) to a vlretrieval run folder, or a "
                    "vlretrieval checkpoint's towers to a Hugging Face folder.")
    from vlretrieval.convert.command import add_arguments

    add_arguments(commands.add_parser("convert", help=convert_help, description=convert_help),
                  DEFAULT_CONFIG)
    return parser


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.key=value` (or `--config.key value`) overrides from ordinary flags."""
    rest, overrides = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        if arg.startswith("--config."):
            key_value = arg[len("--config.") :]
            if "=" not in key_value:
                if index + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value: {arg}=VALUE")
                key_value = f"{key_value}={argv[index + 1]}"
                index += 1
            overrides.append(key_value)
        else:
            rest.append(arg)
        index += 1
    return rest, overrides


# Shorthand flag (argparse dest) -> the config key it sets.
SHORTHANDS = {
    "data_dir": "data.data_dir", "init_from": "train.init_from", "mode": "eval.mode",
    "joint_from": "eval.joint_from", "shortlist": "eval.shortlist", "eval_index": "eval.index",
    "step": "eval.step", "fallback": "eval.fallback",
}


def _shorthand_overrides(args: argparse.Namespace) -> list[str]:
    """`key=value` overrides for the shorthand flags given (a flag left out sets nothing)."""
    overrides = []
    for flag, key in SHORTHANDS.items():
        value = getattr(args, flag, None)
        if value is None or value is False or value == "":
            continue
        overrides.append(f"{key}={'true' if value is True else value}")
    return overrides


def run(argv: list[str]) -> int:
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if args.command == "convert":
        from vlretrieval.convert.command import run_convert

        return run_convert(args, overrides)
    # The shorthand flags come first, so an explicit --config.KEY=VALUE still wins.
    overrides = _shorthand_overrides(args) + overrides

    # Imports after argument parsing: `--help` stays instant, and JAX starts only when needed.
    from vlretrieval.config import load_config
    from vlretrieval.config_checks import check_config

    config = load_config(args.config, overrides)
    check_config(config)  # every command: bad settings fail before any data is built or file written
    if args.command == "search" and args.k < 1:
        raise UserError(f"--k is {args.k}; it must be 1 or more")
    if args.command == "continual":  # a bad tasks file fails before JAX starts
        from vlretrieval.continual.protocol import read_tasks

        tasks = read_tasks(args.tasks, config)
    if args.command == "prepare-data":
        from vlretrieval.data import datasets

        data = datasets.open_dataset(config.data, seed=config.seed)
        if data.shards is not None:  # webdataset: every shard read once, counted, indexed
            from vlretrieval.data import shard_index

            index = shard_index.build_index(data.shards, config.data.data_dir, config.data.on_bad_record,
                                            progress=not args.no_progress)
            log.info(f"shards checked: {shard_index.describe(index)}; index written to "
                     f"{shard_index.index_path(config.data.data_dir, data.shards.paths)}")
            log.info(f"evaluation dataset in {data.directory}; tokenizer vocabulary {data.tokenizer.vocab_size}")
            return 0
        log.info(f"dataset ready in {data.directory}; tokenizer vocabulary {data.tokenizer.vocab_size}")
        return 0

    from vlretrieval.parallel import hosts

    # Before anything touches JAX's devices: every process of a multi-host run joins here.
    if hosts.initialize(hosts.host_setup(
        args.coordinator_address, args.num_processes, args.process_id, args.heartbeat_timeout
    )):
        hosts.start_watchdog(timeout=args.heartbeat_timeout / 2)
    import jax

    from vlretrieval import train
    from vlretrieval.evaluation import checkpoints
    from vlretrieval.evaluation.report import format_table

    progress = not args.no_progress and jax.process_index() == 0
    if args.command in ("train", "demo"):
        try:
            results = train.train_and_evaluate(config, args.workdir, progress=progress)
        except Preempted:
            hosts.finish()  # every host stopped at the same step
            raise
        hosts.finish()
        if args.command == "demo":
            log.info(f"\nresults: {os.path.join(args.workdir, 'results.json')}; "
                  f"wall time {results['wall_seconds']:.0f} s")
        return 0
    if args.command == "continual":
        from vlretrieval.continual import results as continual_results
        from vlretrieval.continual.runner import run_continual

        try:
            summary = run_continual(config, args.workdir, tasks, progress=progress)
        except Preempted:
            hosts.finish()
            raise
        hosts.finish()
        log.info(continual_results.headline(summary, args.workdir))
        return 0
    if args.command == "eval":
        results = checkpoints.evaluate_checkpoint(config, args.workdir)
        hosts.finish()
        log.info(format_table(results, config.eval.recall_at))
        return 0
    if args.command == "benchmark":
        from vlretrieval.evaluation import suite_commands

        summary = suite_commands.benchmark(config, args.workdir, args.suite, args.output)
        hosts.finish()
        log.info(summary)
        return 0
    if args.command in ("index", "search"):
        from vlretrieval.evaluation import index_commands

        if args.command == "index":
            summary = index_commands.build_index(config, args.workdir, args.output, binary=args.codes)
        else:
            queries = index_commands.read_queries(args.query, args.queries_file)
            found = index_commands.search_index(config, args.workdir, args.index, queries, args.k)
        hosts.finish()
        if args.command == "index":
            what = (f"{summary['code_bits']}-bit codes ({summary['code_source']})" if "code_bits" in summary
                    else f"embeddings of dimension {summary['dim']}")
            log.info(f"wrote {summary['items']} {what}, {summary['bytes_per_item']} bytes an item "
                     f"(checkpoint step {summary['step']}), to {summary['index']}")
        elif jax.process_index() == 0:  # the command's output (JSON lines to pipe), not a log line
            index_commands.print_results(found)
        return 0
    raise AssertionError(args.command)


def _closed_loop(error: BaseException | None) -> bool:
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _drop_abandoned_reads(unraisable) -> None:
    if inspect.iscoroutine(unraisable.object) or _closed_loop(unraisable.exc_value):
        return
    sys.__unraisablehook__(unraisable)


def _quiet_abandoned_reads() -> None:
    """When a checkpoint read fails, orbax abandons its other asynchronous reads, and four kinds
    of report follow, up to thousands of lines burying the one `error:` line: Python's
    "Exception ignored in: <coroutine ...>" and "RuntimeWarning: coroutine ... was never awaited"
    for each unawaited read, asyncio's "Future exception was never retrieved" for their futures,
    and TensorStore's threads completing into the closed event loop ("Event loop is closed",
    reported as unraisable from their callbacks). Those are dropped; anything else is reported."""
    sys.unraisablehook = _drop_abandoned_reads
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> None:
    _quiet_abandoned_reads()
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        log.error(str(error))
        code = 2
    except Preempted as stopped:
        log.warning(str(stopped))
        code = stopped.exit_status
    except KeyboardInterrupt:
        log.error("interrupted")
        code = 130
    if code in (2, 130) and argv is None:
        # A failed run as a command: TensorStore's threads may still be reading (a damaged
        # checkpoint) and print tracebacks into a closed event loop while Python tears down.
        # Nothing is left to finish (the trainer waits for its saves before an error leaves
        # it), so the one error line is the last word.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()

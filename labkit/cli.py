"""The command line: `labkit run`, `labkit report`, `labkit chat`, `labkit export` (also `python -m labkit`)."""

from __future__ import annotations

import argparse
import sys
import textwrap

from . import config as cfg
from .errors import LabkitError

RUNS_DIR_HELP = "folder holding run folders (default: $LABKIT_RUNS_DIR, else runs/ at the labkit checkout's root)"
EPILOG = "fields for --set (FIELD=VALUE, any number of times):\n" + "\n".join(
    textwrap.fill(line, 100, initial_indent="  ", subsequent_indent="      ") for line in cfg.describe()
)


def parse_assignments(assignments: list[str]) -> dict:
    """['data.n_people=50', 'seed=3'] -> {'data': {'n_people': '50'}, 'seed': '3'} (values parsed later)."""
    nested: dict = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise cfg.ConfigError(f"--set expects FIELD=VALUE, got {assignment!r}")
        *sections, name = key.strip().split(".")
        target = nested
        for section in sections:
            target = target.setdefault(section, {})
        target[name] = value.strip()
    return nested


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="labkit", description="Build a large language model stage by stage.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the pipeline's stages into a run folder",
        description="Run the stages in order into DIR/NAME/, reusing a stage whose artifacts "
        "are complete and were made from the same settings, then write the report card.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--preset",
        choices=list(cfg.PRESETS),
        default=None,
        help="named bundle of sizes: tiny (seconds, for tests), cpu (default, minutes on a laptop), gpu, gpu-check "
        "(gpu, a few steps per stage), real (gpu on FineWeb-Edu, SmolTalk and GSM8K from the hub)",
    )
    run.add_argument("--run", default="default", metavar="NAME", help="run folder name (default: default)")
    run.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)
    run.add_argument(
        "--stages",
        default=None,
        metavar="LIST",
        help=f"comma-separated stages to run, with their missing inputs (default: all): {','.join(cfg.STAGES)}",
    )
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        dest="assignments",
        help="override one preset field, e.g. --set data.n_people=50 --set seed=3",
    )
    run.add_argument("--force", action="store_true", help="rebuild the named stages even if complete")

    report = commands.add_parser("report", help="print the Markdown report card of a run and write it to report.md")
    report.add_argument("--run", default="default", metavar="NAME", help="run folder name (default: default)")
    report.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)

    chat = commands.add_parser("chat", help="chat with a post-trained model of a run in the terminal")
    chat.add_argument("--run", default="default", metavar="NAME", help="run folder name (default: default)")
    chat.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)
    chat.add_argument("--model", default="sft", choices=["sft", "ppo", "dpo", "grpo", "halluc"], help="which model")

    export = commands.add_parser(
        "export", help="write a model of a run and its tokenizer as a Hugging Face transformers folder"
    )
    export.add_argument("--run", default="default", metavar="NAME", help="run folder name (default: default)")
    export.add_argument("--runs-dir", default=None, metavar="DIR", help=RUNS_DIR_HELP)
    export.add_argument(
        "--model", default="sft", choices=["base", "sft", "ppo", "dpo", "grpo", "halluc"], help="which model"
    )
    export.add_argument("--out", required=True, metavar="FOLDER", help="folder to write (replaced if it exists)")
    return parser


def _run(args) -> None:
    from .distributed import is_main_process, teardown, world_size
    from .pipeline import check_world_size, ensure
    from .report import write_report
    from .run import Run, load_run

    config = cfg.get_config(args.preset, **parse_assignments(args.assignments))
    stages = cfg.parse_stages(args.stages)
    check_world_size(stages, config, world_size())
    cfg.check_config(config, stages)  # and the rules of the stages asked for, before any is built
    run = Run(args.run, args.runs_dir)
    main = is_main_process()  # under torchrun, only rank 0 prints and writes
    if main:
        print(
            f"labkit: preset {config.preset}, run folder {run.path.resolve()}, stages {', '.join(stages)}",
            file=sys.stderr,
        )
    for stage in stages:
        ensure(stage, config, run, force=args.force)
    if main:
        print(write_report(load_run(args.run, args.runs_dir)))
        print(f"labkit: report card written to {run.path.resolve() / 'report.md'}", file=sys.stderr)
    teardown()


def _report(args) -> None:
    from .report import write_report
    from .run import load_run

    print(write_report(load_run(args.run, args.runs_dir)))


def _chat(args) -> None:
    from .run import Run

    chat_loop(Run(args.run, args.runs_dir), args.model)


def _export(args) -> None:
    from .checkpoint import load_model, model_path
    from .export import export
    from .run import Run
    from .tokenizer import Tokenizer

    run = Run(args.run, args.runs_dir)
    model = load_model(model_path(run, args.model))
    folder = export(model, Tokenizer.load(run.path / "tokenizer"), args.out)
    print(f"labkit: the {args.model} model of run {args.run} written to {folder.resolve()}", file=sys.stderr)


def chat_loop(
    run,
    model_name: str = "sft",
    *,
    device: str = "auto",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    input_stream=None,
    output_stream=None,
) -> None:
    """Chat in the terminal: read a line, print the reply, until end of input or 'exit'."""
    from .engine import chat
    from .sft import load_assistant

    input_stream, output_stream = input_stream or sys.stdin, output_stream or sys.stdout
    model, tokenizer = load_assistant(run, device, model_name)
    interactive = input_stream.isatty()
    if interactive:
        print(
            f"chatting with the {model_name} model of run {run.name!r} (empty line or 'exit' to stop)", file=sys.stderr
        )
    messages: list[dict] = []
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = input_stream.readline()
        if not line or line.strip() in ("exit", "quit"):
            break
        if not line.strip():
            if interactive:
                break
            continue
        messages.append({"role": "user", "content": line.strip()})
        reply = chat(model, tokenizer, messages, max_new_tokens, temperature=temperature)
        messages.append({"role": "assistant", "content": reply})
        print(reply, file=output_stream, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        {"run": _run, "report": _report, "chat": _chat, "export": _export}[args.command](args)
    except (LabkitError, FileNotFoundError) as error:  # bad input: one line, no traceback
        message = " ".join(str(error).splitlines())
        print(f"labkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

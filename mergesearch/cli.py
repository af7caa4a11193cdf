"""Command-line interface: argument parsing only; each sub-command calls one library function.

Library modules are imported inside the command functions so that `--help` stays fast (config, which
declares the defaults the help shows, imports no torch; the merge methods are read from the operator
registry only when `merge --help` is printed).
To add a sub-command: write `_add_<name>(sub)` that registers its parser with
`set_defaults(func=_cmd_<name>)`, and list it in `_COMMANDS`.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from collections.abc import Sequence

from mergesearch import __version__
from mergesearch.errors import MergeSearchError

log = logging.getLogger("mergesearch")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the hand-made line breaks of descriptions."""


METHODS = "{methods}"  # in a description: replaced by the registered merge methods when the help is printed


class _MethodsHelpFormatter(_HelpFormatter):
    """Lists the merge methods from the operator registry, imported only when this help is shown (torch)."""

    def _format_text(self, text: str) -> str:
        if METHODS in text:
            from mergesearch import operators

            text = text.replace(METHODS, textwrap.fill(", ".join(operators.names()) + ".", width=88))
        # argparse has no public hook for description text: overriding _format_text is how its own
        # RawDescriptionHelpFormatter changes it (tests/test_cli.py checks the methods are listed)
        return super()._format_text(text)


def _parser(name: str, sub, help: str, description: str | None = None,
            formatter_class: type[argparse.HelpFormatter] = _HelpFormatter) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description or help, formatter_class=formatter_class)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads for this process (default: a fair share, the cores divided among the "
                        "mergesearch run/worker/demo processes and zoo builds on this machine, re-checked before each "
                        "evaluation and fit step)")


# --- inspect -----------------------------------------------------------------------------------


def _add_inspect(sub) -> None:
    p = _parser(
        "inspect",
        sub,
        "describe a base model and its experts: architecture, sizes, task-vector norms and cosines",
    )
    p.add_argument("base", help="base model folder (Hugging Face layout, safetensors)")
    p.add_argument("experts", nargs="*", help="expert folders fine-tuned from the base")
    p.add_argument("--merge-common-vocab", action="store_true",
                   help="accept experts with added tokens and compare only the rows they share")
    p.set_defaults(func=_cmd_inspect)


def _cmd_inspect(args) -> int:
    from mergesearch.checkpoints import inspect_models

    print(inspect_models(args.base, args.experts, merge_common_vocab=args.merge_common_vocab))
    return 0


# --- eval --------------------------------------------------------------------------------------


def _add_eval(sub) -> None:
    from mergesearch.config import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS

    p = _parser("eval", sub, "score a model folder on calibration tasks (JSONL, BIG-bench JSON, lm-eval)")
    p.add_argument("model", help="model folder (Hugging Face layout, safetensors): an expert or an exported merge")
    p.add_argument("--task", action="append", default=None, metavar="PATH_OR_NAME",
                   help="a .jsonl, a BIG-bench .json, an lm-eval task .yaml or lmeval:NAME; repeat for several")
    p.add_argument("--study", default=None, metavar="STUDY.yaml",
                   help="score on a study's own tasks, as its YAML declares them (decoding keys, few-shot, metric, "
                        "calib limit): the scores the study computes, for any model folder")
    p.add_argument("--split", choices=["calib", "test"], default="test",
                   help="with --study: which split of its tasks (calib with the study's limit and seed)")
    p.add_argument("--limit", type=int, default=None,
                   help="score N examples per --task, a random subset drawn with --seed (lm-eval's --limit takes the "
                        "first N instead)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsample order and few-shot draws")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples per prompt")
    p.add_argument("--fewshot", default=None, metavar="PATH",
                   help="file the few-shot examples of a .jsonl / BIG-bench --task are drawn from (a separate split)")
    p.add_argument("--until", action="append", default=None, metavar="STOP",
                   help="stop string of the .jsonl / BIG-bench --task: the output is cut at the first of them; "
                        "repeat for several; backslash escapes are read (\\n is a newline); not given: the newline")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help=f"most tokens generated per example (default: {DEFAULT_MAX_NEW_TOKENS}, or the longest gold "
                        "answer + 1)")
    p.add_argument("--extract", default=None, metavar="REGEX",
                   help="the answer in the output: group 1, or the whole match; no match is wrong (a chain of "
                        "thought: 'The answer is (\\S+)\\.')")
    p.add_argument("--data-files", default=None, help="test data file for an lm-eval task .yaml template")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="examples per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--json", default=None, metavar="OUT", help="also write scores and per-example records here")
    p.add_argument("--lmeval-hf", action="store_true",
                   help="answer lm-eval tasks with lm-eval's own HFLM (a check; slower) instead of mergesearch's engine")
    p.set_defaults(func=_cmd_eval)


def _unescape(text: str) -> str:
    """A stop string as typed in a shell: backslash escapes read (\\n, \\t, \\u2028), other characters kept."""
    import codecs

    return codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")


def _cmd_eval(args) -> int:
    from mergesearch.evaluate.run import evaluate_model_dir, format_table, write_json

    study_tasks = []
    if args.study:
        from mergesearch.study.workbench import study_tasks as tasks_of

        study_tasks = tasks_of(args.study, args.split)
    result = evaluate_model_dir(args.model, args.task or [], tasks=study_tasks, limit=args.limit, seed=args.seed,
                                num_fewshot=args.num_fewshot, fewshot=args.fewshot,
                                until=None if args.until is None else [_unescape(u) for u in args.until],
                                max_new_tokens=args.max_new_tokens, extract=args.extract,
                                data_files=args.data_files, batch_size=args.batch_size, device=args.device,
                                lmeval_hf=args.lmeval_hf)
    print(format_table(result))
    if args.json:
        write_json(result, args.json)
    return 0


# --- zoo ---------------------------------------------------------------------------------------


def _add_zoo(sub) -> None:
    from mergesearch.zoo.presets import PRESETS

    p = _parser("zoo", sub, "the tiny expert zoo: a base model and one expert per skill, trained on the CPU")
    zsub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    b = _parser("build", zsub, "train a zoo (base/, expert-<skill>/, data/, zoo.json) and print its report")
    b.add_argument("--preset", default="demo", choices=["test", "demo"],
                   help="demo: the models the demo searches over; test: seconds-fast, for tests")
    b.add_argument("--out", required=True, help="folder to create (built in a temporary sibling, moved at the end)")
    b.add_argument("--seed", type=int, default=0, help="same seed -> same weights on the same machine")
    b.add_argument("--tokenizer", choices=["char", "bpe"], default=None,
                   help="char: one token per character; bpe: a byte-level BPE trained on the zoo's own text, as "
                        "real LLMs have (default: the preset's, char)")
    b.add_argument("--overwrite", action="store_true", help="replace an existing zoo folder at --out")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    b.set_defaults(func=_cmd_zoo_build)
    ship = _parser("ship", zsub, "re-train a zoo shipped in the package (mergesearch/zoo/shipped/) with its sha256 "
                   "manifest: after any change to the zoo's code or presets")
    ship.add_argument("preset", nargs="?", choices=list(PRESETS), help="the zoo to re-train (or --all)")
    ship.add_argument("--seed", type=int, default=0, help="the seed of the shipped zoo")
    ship.add_argument("--tokenizer", choices=["char", "bpe"], default=None, help="default: the preset's, char")
    ship.add_argument("--all", action="store_true", help="every shipped zoo: demo, test and test with the BPE tokenizer")
    ship.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ship.set_defaults(func=_cmd_zoo_ship)


def _cmd_zoo_build(args) -> int:
    import json
    from pathlib import Path

    from mergesearch.zoo import build_zoo, format_report

    out = build_zoo(args.out, args.preset, args.seed, overwrite=args.overwrite, progress=not args.no_progress,
                    tokenizer=args.tokenizer)
    manifest = json.loads((out / "zoo.json").read_text())
    if "report" in manifest:
        print(format_report(json.loads((out / manifest["report"]).read_text())))
    print(f"zoo {args.preset!r} (seed {args.seed}) built in {manifest['build_seconds']:.0f}s: {Path(out)}")
    return 0


def _cmd_zoo_ship(args) -> int:
    import json

    from mergesearch.errors import ConfigError
    from mergesearch.zoo import format_report
    from mergesearch.zoo.shipped import SHIPPED, ship_zoo

    if args.all == (args.preset is not None):
        raise ConfigError("name one preset to ship (`mergesearch zoo ship demo`) or pass --all, not both")
    for preset, seed, tokenizer in SHIPPED if args.all else [(args.preset, args.seed, args.tokenizer)]:
        out = ship_zoo(preset, seed, tokenizer, progress=not args.no_progress)
        manifest = json.loads((out / "zoo.json").read_text())
        if "report" in manifest:
            print(format_report(json.loads((out / manifest["report"]).read_text())))
        print(f"zoo {preset!r} (seed {seed}) shipped in {manifest['build_seconds']:.0f}s: {out} "
              f"({len(manifest['files'])} files, sha256 in zoo.json)")
    print("next: `mergesearch demo` and copy its tables into the README when the demo zoo changed; commit the zoos")
    return 0


# --- merge -------------------------------------------------------------------------------------


def _add_merge(sub) -> None:
    p = _parser(
        "merge",
        sub,
        "merge models from a recipe YAML (ours or mergekit's) and save a Hugging Face folder",
        description=(
            "Merge models from a recipe and save the result (safetensors, base config and tokenizer,\n"
            "provenance.json with the recipe and source hashes).\n\n"
            "The recipe is either mergesearch's format (`method:`, per-layer/per-chunk parameters,\n"
            "see README 'Merging') or mergekit's (`merge_method:`, `models:` with `parameters:`).\n"
            f"Methods:\n{METHODS}"
        ),
        formatter_class=_MethodsHelpFormatter,
    )
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda[:N]")
    p.add_argument("--dtype", default=None, help="float32/bfloat16/float16 (default: the recipe's dtype)")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    from mergesearch.materializer import merge_recipe

    out = merge_recipe(args.recipe, args.out, force=args.force, device=args.device, dtype=args.dtype)
    print(f"merged model written to {out}")
    return 0


# --- study: run / worker / status / export / validate ----------------------------------------------


def _add_run(sub) -> None:
    p = _parser("run", sub, "create or resume a study and run it to its n_trials total",
                "Create the study of STUDY.yaml, or resume it (after Ctrl-C or a crash) and run it to its\n"
                "n_trials total: baselines first, then the search, then the held-out test check.")
    _add_study_process(p, config_help="study YAML (see studies/)",
                       n_trials_help="run this many trials more than the study has")
    p.set_defaults(func=_cmd_run, worker=False)


def _add_worker(sub) -> None:
    p = _parser("worker", sub, "join a running study as one more worker (shared SQLite/PostgreSQL/journal storage)")
    _add_study_process(p, config_help="the same study YAML the `run` process uses",
                       n_trials_help="stop after this many trials more")
    p.set_defaults(func=_cmd_run, worker=True)


def _add_study_process(p, *, config_help: str, n_trials_help: str) -> None:
    """The arguments `run` and `worker` share: both run trials of one study."""
    p.add_argument("config", help=config_help)
    p.add_argument("--n-trials", type=int, default=None, help=n_trials_help)
    p.add_argument("--timeout", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default=None,
                   help="override the study's merge.device, e.g. cuda:1 (one worker per GPU on the same storage)")
    _add_threads(p)


def _cmd_run(args) -> int:
    from mergesearch.config import load_config
    from mergesearch.study import format_status, run_study, study_status
    from mergesearch.threads import apply_threads

    apply_threads(args.threads)
    overrides = {"study.timeout": args.timeout} if args.timeout else {}
    if args.device:
        from mergesearch.checkpoints import resolve_device

        resolve_device(args.device)  # a device this machine lacks is refused before any work
        overrides["merge.device"] = args.device
    cfg = load_config(args.config, overrides)
    study = run_study(cfg, extra_trials=args.n_trials, worker=args.worker, progress=not args.no_progress)
    print(format_status(study_status(args.config, study.study_name)))
    if not args.worker:
        print(f"resume or extend: mergesearch run {args.config} [--n-trials N]")
        print(f"report:           mergesearch report {args.config}")
        print(f"export the best:  mergesearch export {args.config} --trial best --out merged/")
    return 0


def _add_status(sub) -> None:
    p = _parser("status", sub, "trials done, best so far, baselines and ETA of a study")
    p.add_argument("study", help="study YAML, storage URL, or .db/.log file")
    p.add_argument("--study-name", default=None, help="which study, when the storage holds several")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_status)


def _cmd_status(args) -> int:
    import json

    from mergesearch.study import format_status, study_status

    st = study_status(args.study, args.study_name)
    print(json.dumps(st, indent=2, default=str) if args.json else format_status(st))
    return 0


def _add_export(sub) -> None:
    p = _parser("export", sub, "write a trial's merged model (HF folder), its recipe and a mergekit YAML")
    p.add_argument("study", help="study YAML, storage URL, or .db/.log file")
    p.add_argument("--trial", default="best",
                   help="'best' (the best feasible trial: with constraints.max_drop_vs_base, no task more than that "
                        "below the base model), a trial number, or a baseline by name (base, uniform, "
                        "expert:NAME, task_arithmetic@0.7)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--study-name", default=None, help="which study, when the storage holds several")
    p.add_argument("--device", default=None, help="override the study's merge device")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args) -> int:
    from mergesearch.study import export_trial

    path = export_trial(args.study, args.trial, args.out, force=args.force, study_name=args.study_name,
                        device=args.device)
    from pathlib import Path

    mk = (Path(path) / "mergekit.yaml").is_file()
    print(f"wrote {path} (model, recipe.yaml, provenance.json{', mergekit.yaml' if mk else ''})"
          + ("" if mk else "; no mergekit.yaml: this merge is not expressible in mergekit's format"))
    return 0


def _add_validate(sub) -> None:
    p = _parser("validate", sub, "check a study YAML (config, models, tasks, space) without loading weights")
    p.add_argument("config", help="study YAML")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_validate)


def _cmd_validate(args) -> int:
    import json

    from mergesearch.study import validate_study

    v = validate_study(args.config)
    if args.json:
        print(json.dumps(v, indent=2, default=str))
        return 0
    est = v["estimated_seconds_per_trial"]
    print(f"{v['config']}: OK")
    print(f"method {v['method']}, {len(v['experts'])} experts, {v['parameters']:,} parameters per model")
    searched = [f"{k} {n}" for k, n in v["space"]["searched"].items()]
    if v.get("fit") and v["fit"]["n_knobs"]:
        searched.append(f"fit knobs {v['fit']['n_knobs']}")
    print(f"searched parameters: {v['n_params']} ({', '.join(searched) or 'none'})")
    if v.get("fit"):
        f = v["fit"]
        print(f"fitted coefficients: {f['coefficients']} ({f['granularity']}, {f['objective']}, up to {f['steps']} "
              f"steps per trial); fit knobs searched: {', '.join(f['knobs']) or 'none'}")
    print(f"calibration examples: {v['calib_examples']}")
    fit = f"fit up to {est['fit_s']:.1f} s, " if est.get("fit_s") else ""
    print(f"estimated time per trial: {est['total_s']:.2f} s ({fit}merge {est['merge_s']:.2f} s, "
          f"evaluation {est['eval_s']:.2f} s; {est['note']})")
    from mergesearch.memory import format_estimate

    mem = v["memory"]
    for plan in ("resident", "streaming"):
        print(*format_estimate(mem[plan]), sep="\n")
    print(f"free on {mem['resident']['device']} now: {mem['free'] / 2 ** 30:.1f} GiB; {mem['why']}")
    if mem.get("host_warning"):
        print(f"warning: {mem['host_warning']}")
    print(f"storage: {v['storage']} ({'study exists: run resumes it' if v['storage_exists'] else 'new study'})")
    return 0


def _add_demo(sub) -> None:
    p = _parser("demo", sub, "fit a merge on the shipped demo zoo and print what it found",
                "Uses the demo expert zoo shipped in the package (the same weights on every machine), runs\n"
                "studies/demo_global.yaml (a global search: one weight per expert) and studies/demo.yaml\n"
                "(per-tensor x chunk coefficients fitted by gradient) with live progress, prints base /\n"
                "experts / uniform / best baseline merge / global search / fitted merge on the calib and\n"
                "test splits, and writes the fitted study's report.")
    p.add_argument("--seed", type=int, default=0, help="search seed (seed N > 0 runs a study named demo-sN)")
    p.add_argument("--n-trials", type=int, default=None, help="override the study's n_trials")
    p.add_argument("--timeout", type=float, default=None, help="stop the search after this many seconds")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="do not write the HTML report")
    p.add_argument("--no-compare", action="store_true", help="skip the global search printed for comparison")
    _add_threads(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from mergesearch.demo import format_comparison, run_demo
    from mergesearch.threads import apply_threads

    apply_threads(args.threads)
    out = run_demo(seed=args.seed, n_trials=args.n_trials, timeout=args.timeout, progress=not args.no_progress,
                   report=not args.no_report, compare=not args.no_compare)
    print(format_comparison(out["table"]))
    print(f"\ndemo finished in {out['seconds'] / 60:.1f} min (zoo {out['zoo_seconds']:.0f} s)")
    resume = f"mergesearch run {out['config']}" if args.seed == 0 else f"mergesearch demo --seed {args.seed}"
    print(f"resume or extend: {resume} [--n-trials N]")
    print(f"status:           mergesearch status {out['storage']} --study-name {out['study']}")
    if out["report"]:
        print(f"report:           open {out['report']}")
    print(f"export the best:  mergesearch export {out['storage']} --study-name {out['study']} --out merged/")
    return 0


# --- report / dashboard --------------------------------------------------------------------------


def _add_report(sub) -> None:
    p = _parser("report", sub, "write a study's report: one self-contained HTML file that opens offline",
                "Write the study's report: Pareto front with the baselines, optimisation history, the\n"
                "coefficient heatmap of one trial, parameter importances, calibration vs test and time per\n"
                "trial, under a short summary of what was found. Read-only: run it again while the study runs.")
    p.add_argument("study", help="study YAML, storage URL, or .db/.log file")
    p.add_argument("--study-name", default=None, help="which study, when the storage holds several")
    p.add_argument("--trial", default="best",
                   help="trial of the coefficient heatmap: 'best' (the best feasible trial) or a trial number")
    p.add_argument("--out", default="report.html", help="HTML file to write (replaced atomically)")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from pathlib import Path

    from mergesearch.report import build_report, save_report
    from mergesearch.study import load_study

    rep = build_report(load_study(args.study, args.study_name), trial=args.trial)
    out = save_report(rep, args.out)
    for line in rep.summary.sentences:
        print(line)
    missing = "".join(f"\n  {k}: {v}" for k, v in rep.notes.items())
    print(f"report written to {Path(out).resolve()} ({len(rep.figures)} figures)"
          + (f"; not drawn:{missing}" if missing else ""))
    return 0


def _add_dashboard(sub) -> None:
    p = _parser("dashboard", sub, "serve optuna-dashboard on a study's storage (Ctrl-C stops it)")
    p.add_argument("study", help="study YAML, storage URL, or .db/.log file")
    p.add_argument("--study-name", default=None, help="which study, when the storage holds several")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback exposes the study without authentication")
    p.add_argument("--port", type=int, default=8080, help="port to listen on (0: a free one)")
    p.set_defaults(func=_cmd_dashboard)


def _cmd_dashboard(args) -> int:
    from mergesearch.report import make_dashboard_server

    server, url = make_dashboard_server(args.study, study_name=args.study_name, host=args.host, port=args.port)
    print(f"optuna-dashboard: {url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


_COMMANDS = [_add_demo, _add_run, _add_worker, _add_status, _add_export, _add_validate, _add_inspect, _add_zoo, _add_merge, _add_eval, _add_report, _add_dashboard]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mergesearch",
        formatter_class=_HelpFormatter,
        description=(
            "Search for the best way to merge fine-tuned language models.\n\n"
            "A study proposes merge coefficients (per layer, per chunk, per method parameter),\n"
            "merges each candidate in memory and scores it on a calibration set.\n"
            "Run `mergesearch COMMAND --help` for the options of each command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"mergesearch {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code (0 ok, 2 user error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except MergeSearchError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

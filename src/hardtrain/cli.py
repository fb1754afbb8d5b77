"""The ``hardtrain`` command: inspect and verify checkpoints, torture a training command,
probe the GPUs.

    hardtrain ls RUN_DIR [--no-verify]
    hardtrain verify RUN_DIR [--step N]
    hardtrain metadata [RUN_DIR] [--step N] [--json]
    hardtrain torture [--kills N] [--signal term|kill|mix] [--seed S] ... -- CMD ...
    hardtrain health [--dcgm-level N] [--dcgm-health] [--timeout S] [--json]

RUN_DIR is a local path or an fsspec URL (s3://bucket/run). Exit codes of ls and verify:
0 all good, 1 something failed verification, 2 bad usage or nothing to look at. metadata
without RUN_DIR prints this environment's run metadata as JSON; with one, what differs
from the run.json of its newest committed checkpoint that has a readable one: 0 nothing
that breaks bit-exactness, 1 something that does, 2 bad usage or no run.json. Those of torture: see
``hardtrain torture --help`` (``hardtrain.torture``). Those of health: 0 healthy (or
only warnings), 1 unhealthy, 3 could not check (no NVML, dcgmi missing or failing), 2 bad
usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import fsspec

from hardtrain import health, torture
from hardtrain.checkpoint import CheckpointInfo, CheckpointStore, FileProblem, VerifyReport
from hardtrain.checkpoint._format import step_dir_name
from hardtrain.errors import CHECKPOINT_RUNBOOK, ENVIRONMENT_RUNBOOK, CheckpointError
from hardtrain.metadata import METADATA_FILE, capture_metadata, metadata_changes


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="hardtrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ls = commands.add_parser("ls", help="list checkpoints with their state")
    ls.add_argument("run_dir")
    ls.add_argument(
        "--no-verify", action="store_true", help="read manifests only, skip the checksums"
    )
    verify = commands.add_parser("verify", help="check sizes and checksums of checkpoints")
    verify.add_argument("run_dir")
    verify.add_argument("--step", type=int, help="one step (default: every committed one)")
    metadata = commands.add_parser(
        "metadata", help="this environment's run metadata, or its differences from a run's")
    metadata.add_argument("run_dir", nargs="?", help="compare with this run's checkpoint")
    metadata.add_argument("--step", type=int, help="that checkpoint (default: the newest "
                          "committed one with a readable run.json)")
    metadata.add_argument("--json", action="store_true", help="print the differences as JSON")
    _add_torture(commands)
    _add_health(commands)
    # Everything after the first "--" is torture's command, split off here: argparse's
    # REMAINDER would take the command's own options for ours.
    split = argv.index("--") if "--" in argv else len(argv)
    if "torture" in argv[:split]:
        args, extra = parser.parse_known_args(argv[:split])
        if args.command == "torture":
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)} (the command to "
                             "torture goes after --)")
            return _torture(args, argv[split + 1:])
    args = parser.parse_args(argv)
    if args.command == "health":
        return _health(args)
    try:
        if args.command == "ls":
            return _ls(args.run_dir, verify=not args.no_verify)
        if args.command == "metadata":
            return _metadata(args.run_dir, args.step, as_json=args.json)
        return _verify(args.run_dir, args.step)
    except _UsageError as e:
        print(f"hardtrain: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # storage unreachable, credentials refused, ...: one line
        print(f"hardtrain: {args.run_dir}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


class _UsageError(Exception):
    pass


def _add_torture(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    doc = (torture.__doc__ or "").split("\n\n")
    parser = commands.add_parser(
        "torture", help=doc[0].split(": ", 1)[1], usage="hardtrain torture [options] -- CMD ...",
        description="\n\n".join(doc[2:]), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kills", type=int, default=5, metavar="N",
                        help="interruptions of the tortured run (>= 1; default 5)")
    parser.add_argument("--signal", choices=torture.SIGNAL_MODES, default="mix",
                        help="SIGTERM, SIGKILL, or either at random each time (default mix)")
    parser.add_argument("--seed", type=int, default=None, metavar="S",
                        help="draws the interruptions (default: a random one, printed)")
    parser.add_argument("--grace", type=float, default=30.0, metavar="SECONDS",
                        help="after SIGTERM, time until what still runs is SIGKILLed "
                             "(default 30)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="limit for each start (default: 3x the reference run + 60 s, "
                             "and none for the reference)")
    parser.add_argument("--work-dir", default=None, metavar="DIR",
                        help="for reference/, tortured/ and a log per start (default: a new "
                             "temp dir); removed after EXACT unless --keep")
    parser.add_argument("--keep", action="store_true", help="keep the work dir after EXACT")


def _torture(args: argparse.Namespace, command: list[str]) -> int:
    try:
        report = torture.run_torture(
            command, num_kills=args.kills, signals=args.signal, seed=args.seed,
            grace_s=args.grace, timeout_s=args.timeout, work_dir=args.work_dir,
            keep=args.keep, echo=lambda line: print(line, flush=True),
        )
    except ValueError as e:
        print(f"hardtrain torture: {e}. See {torture.DOCS}", file=sys.stderr)
        return 2
    except torture.TortureError as e:
        print(f"hardtrain torture: {e}", file=sys.stderr)
        print(f"See {torture.DOCS}; for a start that failed after an interruption, also "
              f"{torture.RUNBOOK}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the start running then was killed on the way out
        print("hardtrain torture: interrupted; the work dir is kept", file=sys.stderr)
        return 130
    for line in report.summary():
        print(line)
    return report.exit_code


HEALTH_EXIT = {health.HealthStatus.HEALTHY: 0, health.HealthStatus.WARN: 0,
               health.HealthStatus.UNHEALTHY: 1, health.HealthStatus.UNAVAILABLE: 3}
HEALTH_EPILOG = """exit codes:
  0  healthy: every probe passed or does not apply (warnings, if any, are listed)
  1  unhealthy: a probe failed (the output names it, its value and its runbook)
  2  bad usage
  3  could not check: NVML is missing, or a dcgmi asked for is missing, failed or timed
     out; never counted as healthy

Probes and thresholds: docs/health.md"""


def _add_health(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "health", help="probe this host's GPUs (NVML, optionally dcgmi)",
        description="Probe this host's GPUs through NVML (ECC, row remapping, NVLink, "
        "clocks, temperature, PCIe, recovery action) and, if asked, dcgmi.",
        epilog=HEALTH_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dcgm-level", type=int, choices=(1, 2, 3, 4), metavar="N",
                        help="also run `dcgmi diag -r N -j` (1 quick ... 4 extended)")
    parser.add_argument("--dcgm-health", action="store_true",
                        help="also run `dcgmi health -c -j` (watches set beforehand)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="limit for each dcgmi command (default: by level; 60 s for "
                             "health)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _health(args: argparse.Namespace) -> int:
    try:
        report = health.probe(dcgm_level=args.dcgm_level, dcgm_health=args.dcgm_health,
                              timeout_s=args.timeout)
    except ValueError as e:
        print(f"hardtrain health: {e}", file=sys.stderr)
        return 2
    code = HEALTH_EXIT.get(report.verdict, 3)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
        return code
    rows = [("GPU", "PROBE", "STATUS", "VALUE")] + [
        ("-" if r.gpu is None else str(r.gpu), r.probe, r.status.name, _short(r.value))
        for r in report.results]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print(f"{report.host}: {report.verdict.name} (action: {report.action.value})")
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)), row[3])
    for index, uuid in sorted({(r.gpu, r.uuid) for r in report.results
                               if r.gpu is not None and r.uuid}):
        print(f"GPU {index}: {uuid}")
    for problem in report.problems():
        print(f"{problem.status.name}: {problem.where()} {problem.probe}: "
              f"{_printable(problem.reason)}")  # dcgmi's words: no terminal control codes
    print(f"verdict {report.verdict.name}: exit {code}")
    return code


def _short(value: Any) -> str:
    text = "-" if value is None else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 60 else text[:57] + "..."


def _open(run_dir: str) -> tuple[CheckpointStore, list[CheckpointInfo]]:
    try:
        fs, path = fsspec.core.url_to_fs(run_dir)
        exists = fs.exists(path)
        store = CheckpointStore(run_dir, events=_Quiet())
        infos = store.list(include_uncommitted=True) if exists else []
    except (ValueError, ImportError, OSError) as e:
        raise _UsageError(f"cannot open {run_dir}: {e}") from None
    if not exists:
        raise _UsageError(f"{run_dir} does not exist")
    if not infos:
        raise _UsageError(f"{run_dir}: no checkpoints (is this a run directory?)")
    return store, infos


class _Quiet:
    """The CLI only looks: it records no events in the run directory."""

    def record(self, event: str, **fields: object) -> None:
        pass


def _ls(run_dir: str, *, verify: bool) -> int:
    store, infos = _open(run_dir)
    rows: list[tuple[int, str, str, str, str]] = []
    bad = 0
    for info in infos:
        created = info.created.strftime("%Y-%m-%d %H:%M:%S") if info.created else "-"
        size = _human(info.num_bytes) if info.num_bytes is not None else "-"
        if not info.committed:
            state = "uncommitted (ignored)"
        elif info.problem:
            state, bad = f"BAD: {info.problem}", bad + 1
        elif verify:
            report = _verify_step(store, info.step)
            state = "verified" if report.ok else "BAD: " + "; ".join(map(str, report.problems))
            bad += not report.ok
        else:
            state = "committed"
        rows.append((info.step, str(info.step), created, size, state))
    for aside in store.list_set_aside():
        when = f" {aside.set_aside:%Y-%m-%d %H:%M:%S}" if aside.set_aside else ""
        reason = aside.reason or "no note with the reason; see events.jsonl"
        rows.append((aside.step, str(aside.step), "-", "-", f"set aside{when} (ignored): "
                     f"{reason} [{aside.path.rsplit('/', 1)[-1]}]"))
    rows.sort(key=lambda row: row[0])
    table = [("STEP", "CREATED (UTC)", "SIZE", "STATE"), *(row[1:] for row in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for row in table:
        cells = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
        print(cells, _printable(row[3]))
    if bad:
        print(f"{bad} damaged checkpoint(s); see {CHECKPOINT_RUNBOOK}", file=sys.stderr)
    return 1 if bad else 0


def _printable(text: str) -> str:
    """``text`` with control characters escaped: names and reasons come from the run
    directory and must not move a terminal's cursor or draw lines of their own."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _verify_step(store: CheckpointStore, step: int) -> VerifyReport:
    """``store.verify(step)``; what it raises is that step's problem, never the end of
    the listing: the other steps are still reported."""
    try:
        return store.verify(step)
    except Exception as e:
        return VerifyReport(step, f"{store.root.rstrip('/')}/checkpoints/"
                            f"{step_dir_name(step)}", (FileProblem(
                                "-", "unreadable", f"{type(e).__name__}: {e}"),))


def _verify(run_dir: str, step: int | None) -> int:
    store, infos = _open(run_dir)
    steps = [step] if step is not None else [i.step for i in infos if i.committed]
    if not steps:
        raise _UsageError(f"{run_dir}: no committed checkpoint to verify")
    if step is not None and step not in {i.step for i in infos}:
        raise _UsageError(f"{run_dir}: no checkpoint folder for step {step}")
    bad = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in steps:
            report = _verify_step(store, s)
            print(_printable(f"{report.path}: {'ok' if report.ok else 'FAILED'}"))
            for problem in report.problems:
                print(f"  {_printable(str(problem))}")
            for name in report.ignored:
                print(f"  ignored, not in the manifest: {_printable(name)}")
            bad += not report.ok
    if bad:
        print(f"{bad} of {len(steps)} checkpoint(s) failed; see {CHECKPOINT_RUNBOOK}")
        return 1
    print(f"all {len(steps)} checkpoint(s) verified")
    return 0


def _metadata(run_dir: str | None, step: int | None, *, as_json: bool) -> int:
    if run_dir is None:
        now = capture_metadata(repo=".")  # the current directory, not hardtrain's own
        now["git"].pop("diff", None)  # diff_bytes and diff_sha256 stay; the diff is long
        print(json.dumps(now, indent=1, sort_keys=True))
        return 0
    store, infos = _open(run_dir)
    # newest first; run.json is verified on its own (not the whole, maybe huge, checkpoint)
    steps = [step] if step is not None else [i.step for i in reversed(infos) if i.committed]
    saved, problems = None, []
    for candidate in steps:
        try:
            saved = json.loads(store.read_file(candidate, METADATA_FILE))
            step = candidate
            break
        except (CheckpointError, FileNotFoundError, ValueError, RecursionError) as e:
            if len(steps) == 1:
                hint = "" if isinstance(e, CheckpointError) else \
                    ": written with metadata=None or by an older hardtrain"
                raise _UsageError(f"{e}{hint}") from None
            problems.append(f"step {candidate}: {e}")
    if saved is None:
        raise _UsageError(f"{run_dir}: no checkpoint with a readable {METADATA_FILE} ("
                          + "; ".join(problems) + ")")
    root = (saved.get("git") or {}).get("root")
    # the run's repository if it is here, else the current directory (not hardtrain's own)
    now = capture_metadata(repo=root if isinstance(root, str) and os.path.isdir(root) else ".")
    # The job sets these itself (fit compares them on resume); this one process cannot know
    # them, nor the ranks' devices and the world size.
    for key in ("config", "determinism", "world"):
        now[key] = saved.get(key)
    changes = metadata_changes(saved, now)
    breaking = [c for c in changes if c.breaks_exactness]
    if as_json:
        print(json.dumps([c.as_json() for c in changes], indent=1))
    else:
        for problem in problems:
            print(f"skipped {_printable(problem)}")
        print(f"step {step} of {run_dir} against this environment:")
        _print_changes("breaks bit-exactness", breaking)
        _print_changes("other differences", [c for c in changes if not c.breaks_exactness])
        if not changes:
            print("  no differences")
        print("not compared: config, seed, determinism flags, world size and the ranks' "
              "devices (the job sets them; fit compares them when it resumes)")
        if breaking:
            print(f"a resume here may not match the run bit for bit; see {ENVIRONMENT_RUNBOOK}")
    return 1 if breaking else 0


def _print_changes(title: str, changes: Sequence[Any]) -> None:
    if changes:
        print(f"{title}:")
        for change in changes:
            print(f"  {change}")


def _human(num_bytes: int) -> str:
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


if __name__ == "__main__":
    sys.exit(main())

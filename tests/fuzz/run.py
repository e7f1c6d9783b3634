#!/usr/bin/env python3
"""Run the fuzz harnesses of tests/fuzz/ under atheris (coverage-guided libFuzzer).

    python tests/fuzz/run.py NAME [--runs N] [--seconds S]   one harness
    python tests/fuzz/run.py --all --seconds 10              each, in turn (CI's smoke)
    python tests/fuzz/run.py NAME --repro FILE...            replay saved inputs
    python tests/fuzz/run.py --list

Each harness runs in its own process, so one crash hides none of the others,
with libFuzzer's rules for what is a finding besides an escaped exception: an
input that takes more than ``--timeout`` s (1) or a process past
``--rss-limit-mb`` (2048).  The corpus grows in ``--workdir`` (default
``.fuzz/NAME/corpus`` in the repository; git ignores it), seeded each run from
the harness's ``seeds()``; a crashing input is saved under ``.fuzz/NAME/`` and
named in the report.  Prints, per harness, the inputs executed, libFuzzer's
coverage figure (``cov``: edges of the instrumented Python code), the corpus
size and the findings; exits 1 if any harness had a finding.

Run it nice'd on a shared machine: ``nice -n 10 python tests/fuzz/run.py ...``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)")
_UNITS = re.compile(r"stat::number_of_executed_units: (\d+)")
_ARTIFACT = re.compile(r"Test unit written to (\S+)")


def harnesses() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))


@dataclass
class Result:
    name: str
    inputs: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    seconds: float = 0.0
    rc: int = 0
    findings: list[str] = field(default_factory=list)

    def line(self) -> str:
        found = f"{len(self.findings)} finding(s)" if self.findings else "0 findings"
        return (f"{self.name}: {self.inputs:,} inputs, cov {self.cov} (ft {self.ft}), "
                f"corpus {self.corpus}, {found}, {self.seconds:.1f} s")


def run_one(name: str, args: argparse.Namespace) -> Result:
    script = HERE / f"fuzz_{name}.py"
    work = Path(args.workdir or ROOT / ".fuzz") / name
    corpus, seeds = work / "corpus", work / "seeds"
    corpus.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VIRIDIAN_FUZZ": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    subprocess.run([sys.executable, str(script), "--write-seeds", str(seeds)], check=True,
                   env={**env, "VIRIDIAN_FUZZ": "0"}, cwd=ROOT)
    cmd = [sys.executable, str(script), f"-timeout={args.timeout}",
           f"-rss_limit_mb={args.rss_limit_mb}", f"-max_len={args.max_len}",
           f"-artifact_prefix={work}/", "-print_final_stats=1"]
    if args.repro:
        cmd += [str(Path(f).resolve()) for f in args.repro]
    else:
        if args.runs:
            cmd.append(f"-runs={args.runs}")
        if args.seconds or not args.runs:
            cmd.append(f"-max_total_time={args.seconds or 10}")
        cmd += [str(corpus), str(seeds)]
    res = Result(name)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace")
    res.seconds = time.monotonic() - t0
    res.rc = proc.returncode
    out = proc.stdout
    log = work / "last.log"
    log.write_text(out)
    for ln in out.splitlines():
        if m := _STATUS.match(ln):
            res.inputs, res.cov, res.ft, res.corpus = (int(x) for x in m.groups())
        elif m := _UNITS.search(ln):
            res.inputs = int(m.group(1))
        elif m := _ARTIFACT.search(ln):
            res.findings.append(m.group(1))
    if proc.returncode and not res.findings:
        res.findings.append(f"exit status {proc.returncode} (see {log})")
    if res.findings or args.verbose:
        tail = [ln for ln in out.splitlines() if not ln.startswith(("#", "INFO:"))]
        print("\n".join(tail[-40:]), file=sys.stderr)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="harnesses (fuzz_NAME.py); --list shows them")
    ap.add_argument("--all", action="store_true", help="every harness, one after another")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--runs", type=int, help="stop after this many inputs")
    ap.add_argument("--seconds", type=int,
                    help="stop after this long (default 10 s unless --runs; both: the first)")
    ap.add_argument("--repro", nargs="+", metavar="FILE", help="replay these inputs")
    ap.add_argument("--timeout", type=int, default=1, help="seconds one input may take (1)")
    ap.add_argument("--rss-limit-mb", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=8192, help="longest input (8192 bytes)")
    ap.add_argument("--workdir", help="corpus and crash files (default: .fuzz/)")
    ap.add_argument("-v", "--verbose", action="store_true", help="show libFuzzer's output")
    args = ap.parse_args(argv)
    known = harnesses()
    if args.list:
        print("\n".join(known))
        return 0
    names = known if args.all else args.names
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        ap.error(f"name harnesses ({', '.join(known)}) or --all" +
                 (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed: pip install -e '.[dev]'", file=sys.stderr)
        return 2
    results = []
    for name in names:
        res = run_one(name, args)
        print(res.line(), flush=True)
        for f in res.findings:
            print(f"  finding: {f}  (replay: python tests/fuzz/run.py {name} --repro {f})",
                  flush=True)
        results.append(res)
    bad = [r.name for r in results if r.findings]
    print(f"fuzz: {len(results)} harness(es), {sum(r.inputs for r in results):,} inputs, "
          f"findings in {', '.join(bad) if bad else 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

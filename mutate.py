"""Mutation testing for this flat repo: small, realistic bugs put into the scripts one at a time, each run against
only the tests that execute its line. A mutant a test catches is killed; one every covering test passes survived.

    python mutate.py --mutants 60           # a seeded sample, spread over the files in proportion to their mutants
    python mutate.py --mutants 60 --again   # the same sample after new tests: only its survivors run again
    python mutate.py --file data.py --line 123

The line -> tests map comes from one run of the suite under coverage (subprocesses included), cached in .mutate/
until a .py file changes. Mutants run in a scratch copy of the repo: the working tree is never written."""

import argparse
import ast
import copy
import hashlib
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPTS = tuple(
    "common.py pcam_files.py data.py run_folder.py train.py evaluate.py plot_loss.py eda.py manage_data.py "
    "model.py".split()
)
FLIPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
FLIPS |= {ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.And: ast.Or, ast.Or: ast.And}
FLIPS |= {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Mutation testing: how many small bugs do the tests catch?")
    parser.add_argument("--mutants", type=int, default=60, metavar="N", help="mutants to sample (default: 60)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="sampling seed (default: 0)")
    parser.add_argument("--file", metavar="PATH", help="try every mutant of one file's --line instead of a sample")
    parser.add_argument("--line", type=int, metavar="N", help="the line of --file")
    parser.add_argument("--files", nargs="+", default=SCRIPTS, metavar="PATH", help="files to mutate (the scripts)")
    parser.add_argument("--tests", nargs="+", metavar="PATH", help="test files (default: the root's test_*.py)")
    parser.add_argument(
        "--max-tests", type=int, default=25, metavar="N", help="fastest covering tests run (default: 25)"
    )
    parser.add_argument(
        "--grace", type=float, default=60, metavar="S", help="seconds past 5 times the tests' time (default: 60)"
    )
    parser.add_argument("--root", default=".", metavar="DIR", help="the repo (default: .)")
    parser.add_argument("--equivalents", default="mutants_equivalent.txt", metavar="PATH", help="mutants to skip")
    parser.add_argument(
        "--again",
        action="store_true",
        help="the last sample again, running only its survivors and uncovered mutants (after new tests)",
    )
    args = parser.parse_args(argv)
    args.tests = args.tests or sorted(path.name for path in Path(args.root).glob("test_*.py"))
    if (args.file is None) != (args.line is None):
        parser.error("--file and --line go together")
    if args.again and args.file:
        parser.error("--again re-runs the last sample; it does not go with --file")
    return args


# ---- mutants: one operator change each, as text replacing one node, so the file's other lines stay as they are ----


def statement_nodes(statement):
    """The expression nodes of one statement, not those of statements nested in it, nor of f-strings."""
    pending = [child for child in ast.iter_child_nodes(statement) if not isinstance(child, ast.stmt)]
    while pending:
        node = pending.pop()
        yield node
        if not isinstance(node, ast.JoinedStr):
            pending.extend(child for child in ast.iter_child_nodes(node) if not isinstance(child, ast.stmt))


def variants(node):
    if isinstance(node, ast.Compare):
        for position, op in enumerate(node.ops):
            if type(op) in FLIPS:
                mutant = copy.deepcopy(node)
                mutant.ops[position] = FLIPS[type(op)]()
                yield mutant
    elif isinstance(node, (ast.BoolOp, ast.BinOp)) and type(node.op) in FLIPS:
        yield ast.fix_missing_locations(type(node)(**{**vars(copy.deepcopy(node)), "op": FLIPS[type(node.op)]()}))
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        yield node.operand
    elif isinstance(node, ast.Constant) and isinstance(node.value, bool):
        yield ast.Constant(not node.value)
    elif isinstance(node, ast.Constant) and type(node.value) is int:
        yield ast.Constant(node.value + 1)
    elif isinstance(node, ast.Return) and node.value is not None and ast.unparse(node.value) != "None":
        yield ast.Return(ast.Constant(None))
    elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
        yield ast.Pass()


def mutants_of(root, name):
    """Every mutant of a file: dicts of file, line (of the statement, as coverage counts lines), change, source."""
    source = (Path(root) / name).read_text()
    encoded = source.encode()  # ast's column offsets count UTF-8 bytes
    lines = encoded.splitlines(keepends=True)
    starts = [0, *itertools.accumulate(map(len, lines))]  # each line's offset in encoded
    found = []
    for statement, where in statements(ast.parse(source)):
        for node in [statement, *statement_nodes(statement)]:
            for mutant in variants(node):
                text = ast.unparse(mutant) if isinstance(mutant, ast.stmt) else f"({ast.unparse(mutant)})"
                start = starts[node.lineno - 1] + node.col_offset
                end = starts[node.end_lineno - 1] + node.end_col_offset
                mutated = (encoded[:start] + text.encode() + encoded[end:]).decode()
                change = f"{shortened(ast.unparse(node))} -> {shortened(ast.unparse(mutant))}"
                if isinstance(node, ast.Constant):  # "0 -> 1" alone does not say which 0 of the line
                    line = lines[node.lineno - 1].decode()
                    before, after = line[: node.col_offset].lstrip()[-20:], line[node.end_col_offset :].rstrip()[:20]
                    change = f"{before}{node.value!r}{after} -> {before}{mutant.value!r}{after}"
                code = shortened(lines[node.lineno - 1].decode())
                mutant = {"file": name, "line": statement.lineno, "where": where, "code": code, "change": change}
                if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef)):  # its defaults act in its calls
                    mutant["body"] = [statement.body[0].lineno, statement.end_lineno]
                found.append({**mutant, "source": mutated})
    return [mutant for mutant in found if compiles(mutant["source"])]


def statements(tree, where="<module>"):
    """(statement, the qualified name of the function or class holding it), for every statement in tree."""
    for child in ast.iter_child_nodes(tree):
        inner = where
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            inner = child.name if where == "<module>" else f"{where}.{child.name}"
        if isinstance(child, ast.stmt):
            yield child, inner  # a def's own line (its defaults, decorators) counts as the function's
        yield from statements(child, inner)


def shortened(code):
    code = " ".join(code.split())
    return code if len(code) <= 60 else code[:57] + "..."


def compiles(source):
    try:
        compile(source, "mutant", "exec")
        return True
    except SyntaxError:
        return False


def label(mutant):
    return f"{mutant['file']}:{mutant['line']}: {mutant['change']}"


def key(mutant):
    """A mutant's name in the equivalents file: by function and code, not line number, so it outlives edits above it."""
    return f"{mutant['file']}:{mutant['where']}: {mutant['change']}  in  {mutant['code']}"


def read_equivalents(path):
    """The keys of mutants that cannot change behaviour: `file:function: original -> mutated  in  code  # why`."""
    if not os.path.exists(path):
        return set()
    lines = (line.rsplit("  #", 1)[0].strip() for line in Path(path).read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


# ---- the scratch copy and the line -> tests map ----


def scratch_copy(root):
    """A temporary copy of the repo's tracked and unignored files, sharing its .venv."""
    command = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    listing = subprocess.run(command, cwd=root, capture_output=True, text=True) if os.path.isdir(root) else None
    if listing is None or listing.returncode != 0:
        sys.exit(f"mutate.py: error: {root} is not a git work tree; run mutate.py in the repo or give --root")
    scratch = tempfile.mkdtemp(prefix="mutate-")
    for name in listing.stdout.splitlines():
        if os.path.isfile(os.path.join(root, name)) and not os.path.islink(os.path.join(root, name)):
            os.makedirs(os.path.join(scratch, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(root, name), os.path.join(scratch, name))
    for command in (["init", "-q"], ["add", "-A"]):  # a work tree of these files: the tests list the project by git
        subprocess.run(["git", *command], cwd=scratch, capture_output=True, check=True)
    if os.path.isdir(os.path.join(root, ".venv")):
        os.symlink(os.path.abspath(os.path.join(root, ".venv")), os.path.join(scratch, ".venv"))
    return scratch


def covering_tests(root, scratch, args):
    """({file: {line: [test ids, fastest first]}}, {test id: seconds}), from the cache while no .py file changed."""
    digest = hashlib.sha256(" ".join([*args.tests, *args.files]).encode())
    for path in sorted(Path(scratch).glob("*.py")):
        if path.name != os.path.basename(__file__):  # the runner's own changes leave the map as it was
            digest.update(path.name.encode() + path.read_bytes())
    cache = Path(root) / ".mutate" / "map.json"
    cached = read_json(cache)
    if isinstance(cached, dict) and cached.get("key") == digest.hexdigest() and "map" in cached:
        return cached["map"]
    print("mutate: mapping lines to tests (one run of the suite under coverage)", flush=True)
    lines_and_seconds = measure(scratch, args)
    cache.parent.mkdir(exist_ok=True)
    (cache.parent / ".gitignore").write_text("*\n")
    cache.write_text(json.dumps({"key": digest.hexdigest(), "map": lines_and_seconds}))
    return lines_and_seconds


def measure(scratch, args):
    """Run the suite once under coverage: each test a context of its own, its subprocesses a data file of their own."""
    import coverage  # a dev tool that make mutate installs, not a dependency of the project

    data_dir = Path(tempfile.mkdtemp(prefix="coverage-", dir=scratch))
    include = "".join(f"\n    {os.path.join(scratch, name)}" for name in args.files)
    (data_dir / "coveragerc").write_text(f"[run]\nparallel = true\ninclude ={include}\n")
    command = [sys.executable, "-m", "coverage", "run", f"--rcfile={data_dir / 'coveragerc'}"]
    command += [f"--data-file={data_dir / 'main'}", "-m", "pytest"]
    command += [*args.tests, "-q", "-m", "not slurm", "-p", "mutate", "-p", "no:cacheprovider"]
    plugin_path = os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)), os.getenv("PYTHONPATH")]))
    env = {**os.environ, "MUTATE_MAP_DIR": str(data_dir), "PYTHONPATH": plugin_path}
    ended = subprocess.run(command, cwd=scratch, env=env, check=False).returncode  # 1: some tests failed, left out
    if ended not in (0, 1) or not (data_dir / "tests.json").exists():
        sys.exit(
            f"mutate.py: error: pytest ended with exit code {ended} before the suite's end; its output above says why"
        )
    tests = json.loads((data_dir / "tests.json").read_text())
    covering = {name: {} for name in args.files}
    for data_file in [*data_dir.glob("main.*"), *data_dir.glob("test-*.*[!c]")]:
        data = coverage.CoverageData(basename=str(data_file))
        data.read()
        for name in args.files:
            path = os.path.join(scratch, name)
            if data_file.name.startswith("main."):
                by_line = data.contexts_by_lineno(path)
            else:
                test_id = tests[int(data_file.name.split(".")[0].removeprefix("test-"))]["id"]
                by_line = {line: [test_id] for line in data.lines(path) or ()}
            for line, ids in by_line.items():
                covering[name].setdefault(str(line), set()).update(ids)
    seconds = {test["id"]: test["seconds"] for test in tests if test["passed"]}
    lines = {
        name: {line: sorted(ids & seconds.keys(), key=seconds.get) for line, ids in by_line.items()}
        for name, by_line in covering.items()
    }
    return lines, seconds


# ---- the map run's pytest plugin (-p mutate): which test runs, and the data file its subprocesses write ----

MAP_TESTS = []


def pytest_runtest_protocol(item):
    if "MUTATE_MAP_DIR" in os.environ:
        import coverage

        coverage.Coverage.current().switch_context(item.nodeid)
        # subprocesses start coverage from this file (coverage's .pth hook), into a data file named for the test
        data_dir = Path(os.environ["MUTATE_MAP_DIR"])
        config = data_dir / f"test-{len(MAP_TESTS)}.rc"
        config.write_text(f"{(data_dir / 'coveragerc').read_text()}data_file = {data_dir}/test-{len(MAP_TESTS)}\n")
        os.environ["COVERAGE_PROCESS_START"] = str(config)
        MAP_TESTS.append({"id": item.nodeid, "seconds": 0.0, "passed": True})


def pytest_runtest_logreport(report):
    if MAP_TESTS and MAP_TESTS[-1]["id"] == report.nodeid:
        MAP_TESTS[-1]["seconds"] += report.duration
        MAP_TESTS[-1]["passed"] &= not report.failed  # a test failing unmutated cannot kill a mutant


def pytest_sessionfinish(session):
    if "MUTATE_MAP_DIR" in os.environ:
        Path(os.environ["MUTATE_MAP_DIR"], "tests.json").write_text(json.dumps(MAP_TESTS))


# ---- running the mutants ----


def run_mutant(mutant, test_ids, timeout, scratch):
    """killed, killed (timeout) or survived: the covering tests run, fastest first, on the mutated copy."""
    path = Path(scratch) / mutant["file"]
    original = path.read_text()
    path.write_text(mutant["source"])
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *test_ids]
    process = subprocess.Popen(
        command, cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        exit_code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        exit_code = None
    finally:  # on a timeout or Ctrl-C, stop the tests' own subprocesses too
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        path.write_text(original)
    if exit_code is None:
        return "killed (timeout)"
    return "survived" if exit_code == 0 else "killed"  # a failed test, or an import or collection error


def main(argv=None):
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))  # still remove the scratch copy
    root = os.path.abspath(args.root)
    scratch = scratch_copy(root)
    try:
        mutants = [mutant for name in args.files for mutant in mutants_of(scratch, name)]
        if args.file:
            chosen = [mutant for mutant in mutants if (mutant["file"], mutant["line"]) == (args.file, args.line)]
            if not chosen:
                sys.exit(f"mutate.py: error: no mutant on {args.file}:{args.line}; give a line holding an operator")
        else:
            chosen = random.Random(args.seed).sample(mutants, min(args.mutants, len(mutants)))
            chosen.sort(key=lambda mutant: (args.files.index(mutant["file"]), mutant["line"]))
        sample = {"scripts": [mutant["source"] for mutant in chosen], "mutants": args.mutants, "seed": args.seed}
        sample_key = hashlib.sha256(json.dumps(sample).encode()).hexdigest()
        earlier, known_tests = earlier_outcomes(root, sample_key) if args.again else ({}, None)
        lines, seconds = covering_tests(root, scratch, args)
        equivalents = read_equivalents(os.path.join(root, args.equivalents))
        counts = {"killed": 0, "survived": 0, "no tests": 0, "equivalent": 0}
        survivors, outcomes = [], {}
        for index, mutant in enumerate(chosen):
            started = time.monotonic()
            covering = covering_of(mutant, lines[mutant["file"]], seconds)
            new_tests = [test_id for test_id in covering if known_tests is not None and test_id not in known_tests]
            # with --again, the tests written since the last run first: they were written for its survivors
            test_ids = new_tests + [test_id for test_id in covering if test_id not in new_tests][: args.max_tests]
            if key(mutant) in equivalents:
                outcome = "equivalent"
            elif str(index) in earlier:
                outcome, test_ids = earlier[str(index)], []  # as the last run found: no tests run again
            elif not test_ids:
                outcome = "no tests"
            else:
                timeout = args.grace + 5 * sum(seconds[test_id] for test_id in test_ids)
                outcome = run_mutant(mutant, test_ids, timeout, scratch)
            counts[outcome.split(" (")[0]] += 1
            outcomes[str(index)] = outcome
            if outcome == "survived":
                survivors.append(key(mutant))
            print(f"{label(mutant)}  {outcome}, {len(test_ids)} tests, {time.monotonic() - started:.0f} s", flush=True)
    except KeyboardInterrupt:
        print("mutate.py: interrupted; .mutate/results.json still holds the last whole run", file=sys.stderr)
        sys.exit(130)
    finally:
        shutil.rmtree(scratch)
    if not args.file:
        results = Path(root) / ".mutate" / "results.json"
        results.write_text(json.dumps({"sample": sample_key, "outcomes": outcomes, "tests": sorted(seconds)}))
    report(counts, survivors, root)


def covering_of(mutant, file_lines, seconds):
    """The tests that run a mutant's line, fastest first. A def line runs once, at import, in whichever test imports
    its module first; its defaults act in the calls, so the tests that run the function's body count too."""
    first, last = mutant.get("body", (mutant["line"], mutant["line"]))
    found = {test for line in {mutant["line"], *range(first, last + 1)} for test in file_lines.get(str(line), [])}
    return sorted(found, key=lambda test_id: seconds[test_id])


def earlier_outcomes(root, sample_key):
    """The last run's kills in this same sample (same scripts, size and seed), by place in it, and the tests it knew."""
    results = read_json(Path(root) / ".mutate" / "results.json")
    if not isinstance(results, dict) or not isinstance(results.get("outcomes"), dict):
        sys.exit("mutate.py: error: no readable .mutate/results.json of an earlier run; run the sample whole first")
    if results.get("sample") != sample_key:
        sys.exit(
            "mutate.py: error: the last run was of another sample (a script, --mutants or --seed changed); run it whole"
        )
    outcomes = results["outcomes"].items()
    killed = {index: outcome for index, outcome in outcomes if outcome in ("killed", "killed (timeout)")}
    return killed, set(results.get("tests", ()))


def read_json(path):
    """A JSON file's content, or None when it is missing or unreadable (a cache or record to rebuild)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def report(counts, survivors, root):
    """The score line, and the survivors in the equivalents file's format, to check one by one."""
    tried = counts["killed"] + counts["survived"] + counts["no tests"]
    score = 100 * counts["killed"] / tried if tried else 0.0
    print(
        f"mutation score: {counts['killed']} killed of {tried} ({score:.0f}%), {counts['survived']} survived, "
        f"{counts['no tests']} not covered; {counts['equivalent']} skipped as equivalent",
        flush=True,
    )
    survivors_file = Path(root) / ".mutate" / "survivors.txt"
    survivors_file.parent.mkdir(exist_ok=True)
    survivors_file.write_text("".join(f"{survivor}\n" for survivor in survivors))
    print(f"survivors: {survivors_file}", flush=True)


if __name__ == "__main__":
    main()

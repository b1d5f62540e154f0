"""docs/celery-suite.md from the JUnit files of scripts/celery-suite.sh.

Usage: celery_suite_report.py VERSION RESULTS_DIR OUTPUT STACK...

Each test's outcome on each stack (passed, failed, skipped, xfailed, not run); every test
whose outcome on one of our stacks differs from the reference (redis+redis) is listed
with its cause from :data:`CAUSES` ("cause not named yet" when it has none: name it).
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

REFERENCE = "redis+redis"
STACK_NAMES = {
    "ours+ours": "ours + ours (SQLite broker, `cl_tasks.results:ResultBackend`)",
    "ours+redis": "ours + Redis backend",
    "redis+redis": "Redis + Redis (reference)",
}
#: Why a test's outcome differs from the reference: test id (or its start) -> cause.
CAUSES: dict[str, str] = {
    "t/integration/test_tasks.py::test_tasks::test_expired": (
        "not run (deselected on every stack): on our broker a message with `expires` that expires in"
        " the database is deleted without a REVOKED result, and `get()` without a timeout hangs"
        " (issue 17, the transport half: branch `delivery`)"
    ),
    "t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_simple_canvas": (
        "our transport delivers ready messages in channel order, not publish order: the"
        " `revoke_by_stamped_headers` broadcast can reach the worker after the task"
        " (issue 17, the transport half: branch `delivery`)"
    ),
    "t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_complex_canvas": (
        "the same delivery order across queues as `test_revoked_by_headers_simple_canvas` (branch `delivery`)"
    ),
    "t/integration/test_canvas.py::test_chain::test_chord_header_id_duplicated_on_rabbitmq_msg_duplication": (
        "the test publishes a message property that is not JSON (a `Signal`); our broker's"
        " `Store.put` raises `TypeError`, which the signal dispatcher swallows"
        " (issue 17, the transport half: branch `delivery`)"
    ),
    "t/integration/test_canvas.py::test_result_set::test_join_exhausted_timeout": (
        "the suite skips it unless the backend is Redis or rpc; covered by"
        " tests/test_results.py::test_join_native_gives_up_at_its_timeout"
    ),
    "t/integration/test_canvas.py::test_chord::test_error_propagates_from_chord": (
        "the suite marks it xfail for Redis only (Celery issue #6437); it fails the same way on"
        " our backend (a chain's failure never reaches a group after it), so it counts as failed"
    ),
}
#: What our own suite (tests/test_results.py) runs for the areas of the tests Celery's
#: suite skips unless the result backend is Redis (they read Redis as a side channel).
COVERED = (
    (
        "native join, get_many, join timeout",
        "test_mget_get_many_and_join_native, test_join_native_gives_up_at_its_timeout",
    ),
    ("groups: results, callbacks, errbacks", "test_group_and_nested_group, test_group_callback_and_errback"),
    (
        "chords: body sent by the last header part, no chord_unlock",
        "test_chord_body_is_sent_by_the_last_header_part_without_chord_unlock",
    ),
    (
        "chords: header failure, errbacks on header failure",
        "test_failed_header_fails_the_chord_at_once, test_chord_errback_runs_when_the_header_fails",
    ),
    (
        "chords of chords, chains of chords, headers holding groups",
        "test_chord_of_chords_and_chain_of_chords",
    ),
    (
        "add_to_chord, header task replaced by a chain",
        "test_add_to_chord_and_a_header_task_replaced_by_a_chain",
    ),
    (
        "re-applied frozen chord, duplicated header part (RabbitMQ redelivery)",
        "test_reapplying_a_frozen_chord_sends_the_body_again, test_a_duplicated_header_part_is_counted_once",
    ),
    ("the chord counter under concurrent increments", "test_counter_is_atomic_under_two_processes"),
)


def outcomes(junit: Path) -> dict[str, str]:
    """Test id -> passed | failed | skipped:<reason> | xfailed (the last report of a test wins)."""
    found: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("classname", "").replace(".", "/")
        module, _, cls = path.rpartition("/")
        test_id = f"{module}.py::{cls}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                kind = child.get("type", "")
                outcome = "xfailed" if "xfail" in kind else f"skipped:{child.get('message', '')}"
        found[test_id] = outcome
    return found


def cause(test_id: str) -> str:
    for known, why in CAUSES.items():
        if test_id.startswith(known):
            return why
    return "cause not named yet"


def report(version: str, results: Path, stacks: list[str]) -> str:
    """The report of every stack with a JUnit file in ``results`` (``stacks``: the ones just run first)."""
    known = [*stacks, *(stack for stack in STACK_NAMES if stack not in stacks)]
    runs = {
        stack: outcomes(results / f"{stack}.xml") for stack in known if (results / f"{stack}.xml").exists()
    }
    lines = [
        f"# Celery {version}'s own integration suite on our stack",
        "",
        "Made by `scripts/celery-suite.sh` (do not edit: run it again). The suite is",
        "`t/integration/` of the installed Celery's sdist (`test_tasks.py`, `test_canvas.py`,",
        "`test_inspect.py`, `test_serialization.py`), run unchanged; `TEST_BROKER`/`TEST_BACKEND`",
        "select the stack. `scripts/test.sh` runs a fast subset of it on ours + ours (`--ci`).",
        "",
        "| broker + result backend | passed | failed | skipped | xfailed |",
        "|---|---|---|---|---|",
    ]
    for stack, found in runs.items():
        counts = Counter(outcome.split(":", 1)[0] for outcome in found.values())
        numbers = " | ".join(str(counts[kind]) for kind in ("passed", "failed", "skipped", "xfailed"))
        lines.append(f"| {STACK_NAMES[stack]} | {numbers} |")
    reference = runs.get(REFERENCE, {})
    lines += ["", "## Where our stacks differ from the reference", ""]
    if not reference:
        lines.append("The reference was not run in this report.")
    differences = []
    for stack, found in runs.items():
        if stack == REFERENCE or not reference:
            continue
        for test_id in sorted(set(found) | set(reference)):
            ours, theirs = found.get(test_id, "not run"), reference.get(test_id, "not run")
            if ours.split(":", 1)[0] == theirs.split(":", 1)[0] or "redis result backend" in ours.lower():
                continue
            differences.append(f"| {stack} | `{test_id}` | {ours} | {theirs} | {cause(test_id)} |")
    if differences:
        lines += ["| stack | test | ours | reference | cause |", "|---|---|---|---|---|", *differences]
    elif reference:
        lines.append("None: every test has the reference's outcome on our stacks.")
    redis_only = sum(
        "redis result backend" in outcome.lower() for outcome in runs.get("ours+ours", {}).values()
    )
    lines += [
        "",
        "## Tests the suite runs on a Redis result backend only",
        "",
        f'On ours + ours, {redis_only} tests skip themselves ("Requires redis result backend"):',
        "they read Redis as a side channel (`redis_echo`, `redis_count`), not the result backend.",
        "`tests/test_results.py` covers their areas on our backend, on SQLite and PostgreSQL:",
        "",
        "| area | tests/test_results.py |",
        "|---|---|",
        *(f"| {area} | {tests} |" for area, tests in COVERED),
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    version, results, output, *stacks = argv
    Path(output).write_text(report(version, Path(results), stacks))
    print(f"wrote {output}")


if __name__ == "__main__":
    main(sys.argv[1:])

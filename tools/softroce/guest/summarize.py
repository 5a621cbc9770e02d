"""Guest side: turn pytest's junit XML into /out/summary.json and a pytest-style summary line.

    python3 summarize.py JUNIT.xml SUMMARY.json MODE

summary.json: {"mode", "passed", "failed", "skipped", "errors", "tests": {nodeid: outcome}}.
Prints ``SOFTROCE-SUMMARY: N passed, N failed, N skipped`` (errors count as failed).
"""

import json
import sys
import xml.etree.ElementTree as ET


def main(src: str, dst: str, mode: str) -> int:
    root = ET.parse(src).getroot()
    tests = {}
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname')}::{tc.get('name')}"
        kids = {c.tag for c in tc}
        if "failure" in kids or "error" in kids:
            tests[name] = "failed"
        elif "skipped" in kids:
            tests[name] = "skipped"
        else:
            tests[name] = "passed"
    n = {k: sum(1 for v in tests.values() if v == k) for k in ("passed", "failed", "skipped")}
    json.dump(dict(mode=mode, tests=tests, **n), open(dst, "w"), indent=1)
    print(f"SOFTROCE-SUMMARY: {n['passed']} passed, {n['failed']} failed, "
          f"{n['skipped']} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))

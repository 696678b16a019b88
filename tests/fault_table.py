"""Prints the fault suite's figures (the JSON rows SIMAGENT_FAULT_REPORT collects) as the
README's markdown table; rows of one fault are added up.

    python tests/fault_table.py REPORT.json
"""

import json
import sys

COLUMNS = ("trials", "committed", "received", "lost", "duplicated")


def table(rows: list[dict]) -> str:
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for row in rows:
        total = totals.setdefault((row["fault"], row["test"]), dict.fromkeys(COLUMNS, 0))
        for column in COLUMNS:
            total[column] += row[column]
    lines = ["| fault | test | trials | events committed | received | lost | duplicated |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (fault, test), total in totals.items():
        lines.append(f"| {fault} | `{test}` | " + " | ".join(str(total[c]) for c in COLUMNS) + " |")
    seeds = sorted({row["seed"] for row in rows})
    lines.append(f"\nseed {', '.join(map(str, seeds)) or '-'}; {len(rows)} rows")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(json.loads(open(sys.argv[1]).read())))

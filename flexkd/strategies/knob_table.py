"""The README's knob table, generated from the strategies' `Knobs` declarations.

    python -m flexkd.strategies.knob_table            # print it
    python -m flexkd.strategies.knob_table --write    # replace the section in README.md

tests/test_strategies.py fails while README.md holds another text between the markers.
"""

from __future__ import annotations

import json
import sys

from flexkd.schema import bounds, choices
from flexkd.strategies.base import SHIPPED_CONF, load_strategy_config, strategy_class, strategy_configs

README = SHIPPED_CONF.parent / "README.md"
START, END = "<!-- knob-table:start (python -m flexkd.strategies.knob_table --write) -->", \
    "<!-- knob-table:end -->"


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, list) else "null" if value is None else str(value)


def knob_table() -> str:
    names = sorted(n for n, p in strategy_configs().items() if p.is_relative_to(SHIPPED_CONF))
    classes = {n: strategy_class(load_strategy_config(n)) for n in names}
    lines = ["| strategy | class (`_target_`) |", "|---|---|"]
    lines += [f"| `{n}` | `{c.__module__}.{c.__qualname__}` |" for n, c in classes.items()]
    lines += ["", "| knob | default (strategies) | range or choices | meaning |", "|---|---|---|---|"]
    knobs: dict[str, dict] = {}  # knob -> {default: [strategies]}, in declaration order
    for n, cls in classes.items():
        for knob, value in cls.Knobs().model_dump(mode="json").items():
            knobs.setdefault(knob, {}).setdefault(_show(value), []).append(n)
    fields = {k: f for cls in classes.values() for k, f in cls.Knobs.model_fields.items()}
    for knob, by_default in knobs.items():
        info = fields[knob]
        defaults = "; ".join(f"{d} ({', '.join(s)})" if len(by_default) > 1 or len(s) < len(names)
                             else d for d, s in by_default.items())
        limits = " \\| ".join(str(c) for c in choices(info) or ()) or " and ".join(bounds(info)) or "-"
        lines.append(f"| `{knob}` | {defaults} | {limits} | {info.description or ''} |")
    return "\n".join(lines)


def readme_section(text: str) -> str:
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    table = knob_table()
    if "--write" not in argv:
        print(table)
        return
    from flexkd.storage import atomic_write_text

    text = README.read_text()
    before, rest = text.split(START, 1)
    atomic_write_text(README, f"{before}{START}\n{table}\n{END}{rest.split(END, 1)[1]}")
    print(f"wrote the knob table into {README}")


if __name__ == "__main__":
    main()

"""Generate the README's config reference from the config schema, so the two cannot drift: every key's
default and meaning from the YAML defaults and their comments, what it accepts from `unicom_ds.schema`
(the very rules `python slurm/submit.py` checks before anything runs).

    python docs/config_reference.py          # rewrite the README section
    python docs/config_reference.py --check  # exit 1 when the README is stale (a test runs this)
    python docs/config_reference.py --show   # print the table, change nothing
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from unicom_ds import schema  # noqa: E402
from unicom_ds.config import CONFIG_DIR, DEFAULT_FILES, defaults, flat_keys  # noqa: E402

README = ROOT / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w]*):(?P<rest>[^#]*)(#\s*(?P<comment>.*))?$")


def comments(path: Path) -> dict[str, str]:
    """Dotted key -> the comment on its line (children of a flow mapping share their parent's)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = ".".join([k for _, k in stack] + [m["key"]])
        out[key] = (m["comment"] or "").strip()
        stack.append((indent, m["key"]))
    return out


def _value(v) -> str:
    if OmegaConf.is_config(v):
        v = OmegaConf.to_container(v)
    text = "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return text.replace("|", "\\|")


def table() -> str:
    cfg = defaults()
    notes: dict[str, str] = {}
    sources: dict[str, str] = {}
    for name in DEFAULT_FILES:
        found = comments(CONFIG_DIR / name)
        notes.update(found)
        sources.update({k: name for k in found})
    rows = ["| key | default | accepts | file | meaning |", "| --- | --- | --- | --- | --- |"]
    for key in flat_keys(cfg):
        parts = key.split(".")
        note = next((notes[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                     if notes.get(".".join(parts[:i]))), "")
        source = next((sources[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                       if ".".join(parts[:i]) in sources), "")
        default = OmegaConf.select(cfg, key)
        accepts = schema.rule(key, default).describe().replace("|", "\\|")
        rows.append(f"| `{key}` | `{_value(default)}` | {accepts} | {source} | {note.replace('|', '/')} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"{README}: the markers {START} and {END} are missing")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail if README.md is stale")
    parser.add_argument("--show", action="store_true", help="print the table, change nothing")
    args = parser.parse_args()
    if args.show:
        print(table())
        return 0
    current = README.read_text()
    fresh = render(current)
    if args.check:
        if fresh != current:
            print("README.md's config reference is stale: run `python docs/config_reference.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    print(f"wrote the config reference into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

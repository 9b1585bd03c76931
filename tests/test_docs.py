"""The README's config reference is generated from the YAML defaults; this fails when it is stale."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]


def _reference():
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "docs" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_reference_is_fresh():
    result = subprocess.run([sys.executable, "docs/config_reference.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_reference_lists_every_default_key_with_its_value_and_comment():
    from unicom_ds.config import defaults, flat_keys

    table = _reference().table()
    cfg = defaults()
    for key in flat_keys(cfg):
        assert f"| `{key}` |" in table, key
    row = next(line for line in table.splitlines() if line.startswith("| `kmeans.mode` |"))
    assert f"`{cfg.kmeans.mode}`" in row and "normalize((img+txt)/2)" in row


def test_stale_readme_is_detected(tmp_path):
    ref = _reference()
    stale = f"intro\n{ref.START}\n| old |\n{ref.END}\nrest\n"
    fresh = ref.render(stale)
    assert fresh != stale and fresh.startswith("intro\n") and fresh.endswith("\nrest\n")
    assert ref.render(fresh) == fresh


def test_reference_comments_follow_nesting(tmp_path):
    yaml = tmp_path / "x.yaml"
    yaml.write_text("a:\n  b: 1   # the b\n  c:\n    d: 2 # deep\ne: 3 # top\n")
    assert _reference().comments(yaml) == {"a": "", "a.b": "the b", "a.c": "", "a.c.d": "deep", "e": "top"}


def test_readme_demo_paragraph_names_every_stage_the_demo_runs(tmp_path):
    from slurm import launch
    from unicom_ds import config

    cfg = config.resolve([f"config={config.CONFIG_DIR / 'demo.yaml'}", f"run_dir={tmp_path / 'run'}"])
    readme = (ROOT / "README.md").read_text()
    start = readme.index("`demo.sh` then writes")
    paragraph = readme[start:readme.index("\n\n", start)]
    steps = launch.steps_of(cfg)
    assert "detect" in steps
    for step in steps:
        assert f"(`{step}`)" in paragraph, step
    assert "minutes" in paragraph and "docs/benchmarks.md" in paragraph


# ---- links and anchors of the markdown docs --------------------------------------------------------------


_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+).+?\1")
_LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target><[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_PLAIN_MENTION = re.compile(r"(?P<path>docs/[\w.\-]+\.md)#(?P<anchor>[\w\-]+)")
_LINE_ANCHOR = re.compile(r"L\d+(-L\d+)?")


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped except '-' and '_', spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (a repeated heading gets -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(path.read_text()):
        m = _HEADING.match(line)
        if m:
            base = slug(m["text"])
            count = seen.get(base, 0)
            seen[base] = count + 1
            out.add(base if count == 0 else f"{base}-{count}")
    return out


def _check_target(where: str, source: Path, target: str, root: Path) -> str | None:
    """A problem with the relative link `target` of `source`, or None."""
    path_part, _, anchor = unquote(target).partition("#")
    dest = source if not path_part else (source.parent / path_part).resolve()
    if root.resolve() not in (dest, *dest.parents):
        return f"{where}: {target} points outside the repository"
    if not dest.exists():
        return f"{where}: {target}: no such file {dest.relative_to(root.resolve())}"
    if anchor:
        if dest.suffix.lower() == ".md":
            if anchor not in anchors(dest):
                return f"{where}: {target}: no heading with anchor #{anchor} in {dest.name}"
        elif not _LINE_ANCHOR.fullmatch(anchor):
            return f"{where}: {target}: #{anchor} names no heading ({dest.name} is not markdown)"
    return None


def link_problems(source: Path, root: Path = ROOT) -> list[str]:
    """Broken relative links of a markdown file: `[text](path)` and `[text](path#anchor)` whose file does not
    exist in the repository or whose anchor names no heading of it. http(s) and mailto links are not checked."""
    problems = []
    for number, line in _prose_lines(source.read_text()):
        for m in _LINK.finditer(_CODE_SPAN.sub("", line)):
            target = m["target"].strip("<>")
            if re.match(r"(https?:|mailto:)", target, re.I):
                continue
            problem = _check_target(f"{source.name}:{number}", source, target, root)
            if problem:
                problems.append(problem)
    return problems


def docs_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_of_the_docs_resolves():
    assert (ROOT / "docs" / "design.md").is_file()
    problems = [p for f in docs_files() for p in link_problems(f)]
    assert not problems, "\n".join(problems)


def test_plain_mentions_of_a_docs_anchor_resolve():
    """`docs/design.md#stage-contracts` in prose or a config comment (the README's key table copies those)."""
    problems = []
    for source in [*docs_files(), *sorted((ROOT / "slurm" / "configs").rglob("*.yaml"))]:
        for number, line in enumerate(source.read_text().splitlines(), 1):
            for m in _PLAIN_MENTION.finditer(line):
                problem = _check_target(f"{source.name}:{number}", ROOT / "README.md", m[0], ROOT)
                if problem:
                    problems.append(problem)
    assert not problems, "\n".join(problems)


def test_readme_links_the_design_doc_and_its_stage_contracts():
    readme = (ROOT / "README.md").read_text()
    assert "](docs/design.md#stage-contracts)" in readme
    assert "stage-contracts" in anchors(ROOT / "docs" / "design.md")
    assert "run_dir" in readme and "docs/design.md#stage-contracts" in readme.split("| `run_dir` |", 1)[1].split("\n")[0]


def test_link_check_finds_broken_links(tmp_path):
    """The checker itself: a missing file, a missing anchor and a link out of the tree are found; good links,
    links in code and web links are not."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Stage contracts\n\n### RUN/config.yaml\n\n## Title\n")
    readme = tmp_path / "README.md"
    readme.write_text(
        "[ok](docs/a.md) [ok](docs/a.md#stage-contracts) [ok](docs/a.md#runconfigyaml) [ok](docs/a.md#title-1)\n"
        "[ok](https://example.com/x.md) [ok](mailto:a@b.c) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](docs/missing.md) [bad anchor](docs/a.md#stage-contract) [out](../x.md) [self](#nothing)\n")
    problems = link_problems(readme, tmp_path)
    assert len(problems) == 4, problems
    assert any("missing.md" in p for p in problems) and any("#stage-contract in" in p for p in problems)
    assert any("outside" in p for p in problems) and any("#nothing" in p for p in problems)


def test_slug_follows_githubs_rule():
    assert slug("Stage contracts") == "stage-contracts"
    assert slug("RUN/config.yaml") == "runconfigyaml"
    assert slug("MLCD's multi-label layer") == "mlcds-multi-label-layer"
    assert slug("The `run_dir` key") == "the-run_dir-key"


def _repository_files() -> list[Path]:
    """The repository's files (tracked and not ignored); without git, a walk skipping what git ignores."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [ROOT / line for line in out.splitlines() if (ROOT / line).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", "runs", "data", "__pycache__", ".pytest_cache", "build"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)
                and not any(part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)]


def test_no_file_names_the_outside_design_page():
    """The project's design is docs/design.md; nothing may send readers to a page outside the repository."""
    needle = "DESIGN" + ".md"  # spelt apart so that this file does not name it
    files = [p for p in _repository_files()
             if p.name == "README.md" or p.suffix in (".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".txt", ".json")]
    assert any(p.name == "common.yaml" for p in files) and any(p.name == "launch.py" for p in files)
    named = [str(p.relative_to(ROOT)) for p in files if needle in p.read_text(errors="replace")]
    assert not named, f"{needle} named in: {', '.join(named)}"

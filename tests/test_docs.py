"""The documentation stays true to the code: the CLI reference is current, the README is a short
user's guide that starts with the two set-up commands, and every relative link leads somewhere."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
QUICK_START = 'pip install torch==2.13.0 && pip install . && unet demo'
TESTS = 'pip install -e ".[test]" && python -m pytest'
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def load_script(name: str):
    """A module of scripts/ by file path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_cli_reference_is_current() -> None:
    generator = load_script("make_cli_reference")
    expected = generator.render()
    current = (DOCS / "cli.md").read_text(encoding="utf-8") if (DOCS / "cli.md").is_file() else ""
    assert current == expected, ("docs/cli.md is stale (the commands or their options changed): "
                                 "run `python scripts/make_cli_reference.py` and commit docs/cli.md")


def test_cli_reference_lists_every_command() -> None:
    import typer.main

    from unetcli.cli import app

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for name in typer.main.get_command(app).commands:
        assert f"## unet {name}\n" in text


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 350, f"README.md has {len(lines)} lines; move detail to docs/ (limit 350)"


def test_readme_starts_with_both_setup_commands() -> None:
    head = "\n".join(README.read_text(encoding="utf-8").splitlines()[:40])
    assert QUICK_START in head, "the quick-start command must be in README.md's first 40 lines"
    assert TESTS in head, "the test command must be in README.md's first 40 lines"


def markdown_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes for a Markdown file (lower case, punctuation dropped,
    spaces to hyphens, -1, -2, ... for repeats)."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)  # links in code are not links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part) if file_part else path
        if not linked.exists():
            broken.append(f"{path.relative_to(root)}: {target}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{path.relative_to(root)}: {target} (no such heading)")
    return broken


def test_relative_links_point_to_files_that_exist() -> None:
    assert [b for p in markdown_files() for b in broken_links(p)] == []


def test_link_checker_sees_a_broken_link(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Top, of page\n[ok](page.md) [web](https://example.org) [gone](missing.md#x) [here](#top-of-page)"
                    " [nowhere](#bottom)\n```\n[code](nope.md)\n```\n")
    assert broken_links(page, tmp_path) == ["page.md: missing.md#x", "page.md: #bottom (no such heading)"]

"""The documentation stays true to the code: the CLI reference is current, the README is a short
user's guide that starts with the two set-up commands, and every relative link leads somewhere."""

from __future__ import annotations

import ast
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


# --------------------------------------------------------------------------- scripts/

SCRIPTS = ROOT / "scripts"


def script_modules() -> dict[str, Path]:
    """Module name -> file for scripts/: each script by its stem, the shared library as benchlib.*."""
    found = {p.stem: p for p in SCRIPTS.glob("*.py")}
    for p in (SCRIPTS / "benchlib").glob("*.py"):
        found["benchlib" if p.stem == "__init__" else f"benchlib.{p.stem}"] = p
    return found


def script_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """scripts/ modules that ``path`` imports anywhere in its body (function-level imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
    return {m for m in found if m in modules}


def test_scripts_import_only_the_shared_library() -> None:
    """A script imports benchlib, never another script; benchlib never imports a script."""
    modules = script_modules()
    wrong = sorted(f"{name} -> {dep}" for name, path in modules.items()
                   for dep in script_imports(path, modules) if not dep.startswith("benchlib"))
    assert wrong == [], "move what scripts share into scripts/benchlib/"


def test_scripts_have_no_import_cycle() -> None:
    modules = script_modules()
    graph = {name: script_imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def cycle_from(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path + [node, dep]
            if dep not in state and (found := cycle_from(dep, path + [node])):
                return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = cycle_from(name, [])
            assert cycle is None, "import cycle in scripts/: " + " -> ".join(cycle or [])


def test_scripts_do_not_edit_sys_path() -> None:
    """Scripts run as ``python scripts/NAME.py`` have scripts/ on sys.path already."""
    edits = []
    for name, path in script_modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Attribute) and node.attr in ("insert", "append", "extend")
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "path"
                    and isinstance(node.value.value, ast.Name) and node.value.value.id == "sys"):
                edits.append(f"{name}:{node.lineno}")
    assert edits == []


def test_scripts_score_dice_with_the_package_metric() -> None:
    """No hand-written Dice in scripts/ (nnunet_reference.py runs in nnU-Net's own environment, which
    need not have unetcli, and is the one exception)."""
    own = [name for name, path in script_modules().items() if name != "nnunet_reference"
           for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
           if isinstance(node, ast.FunctionDef) and node.name in ("dice", "dice_score", "dice_coefficient")]
    assert own == []

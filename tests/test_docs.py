"""The documentation holds together: every relative link in README.md and docs/ leads to a file
that exists (and, with an ``#anchor``, to a heading of that file), and every setting the code
reads is documented once, in the settings table of docs/operations.md."""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

from auth.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OPERATIONS = ROOT / "docs" / "operations.md"
CODE_PACKAGES = ("api", "auth", "ml")

# Environment variables the code reads that an operator never sets, each with the reason. None
# today: PROMETHEUS_MULTIPROC_DIR is set by `modelgate serve` itself, but an operator who starts
# the app another way must set it, so it is documented.
INTERNAL_VARIABLES: dict[str, str] = {}

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\n]|\][^(\n])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_VARIABLE = re.compile(r"`([A-Z][A-Z0-9_]*[A-Z0-9_*])`")


def _prose(text: str) -> str:
    """The text without its fenced code blocks: links and headings in code are not markdown."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower case, without punctuation but
    hyphens and underscores, spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link counts by its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file, a repeated heading numbered as GitHub does."""
    seen: Counter[str] = Counter()
    found = set()
    for heading in _HEADING.findall(_prose(path.read_text())):
        base = slug(heading)
        found.add(base if seen[base] == 0 else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def relative_links(path: Path) -> list[str]:
    """The targets of the markdown links of a page that stay inside the repository."""
    text = _INLINE_CODE.sub("", _prose(path.read_text()))
    return [
        target
        for target in _LINK.findall(text)
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:...
    ]


def broken_links(pages: list[Path], root: Path = ROOT) -> list[str]:
    """Every relative link of ``pages`` whose file, or heading, does not exist (named relative
    to ``root``)."""
    broken = []
    for page in pages:
        for target in relative_links(page):
            file_part, _, anchor = target.partition("#")
            destination = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(root)}: ({target})"
            if not destination.exists():
                broken.append(f"{where}: no such file")
            elif anchor and (destination.suffix != ".md" or anchor not in anchors(destination)):
                broken.append(f"{where}: no heading with this anchor")
    return broken


def test_the_slugs_are_githubs() -> None:
    assert slug("The walk of one `POST /api/v1/predict`") == "the-walk-of-one-post-apiv1predict"
    assert slug("Operator's checklist") == "operators-checklist"
    assert slug("Accounting (group commit)") == "accounting-group-commit"
    assert slug("The 1-second rule") == "the-1-second-rule"


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    assert (ROOT / "docs").is_dir()
    assert sum(len(relative_links(page)) for page in PAGES) > 20
    assert broken_links(PAGES) == []


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md#a-section) [here](#page) [gone](missing.md) "
        "[no heading](other.md#nothing) `[code](missing.md)`\n\n```\n[fenced](missing.md)\n```\n"
    )
    assert broken_links([page], tmp_path) == [
        "page.md: (missing.md): no such file",
        "page.md: (other.md#nothing): no heading with this anchor",
    ]


def _settings_table() -> list[list[str]]:
    """The first cells' variables of each row of the table under "## Settings" in
    docs/operations.md."""
    section = OPERATIONS.read_text().split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table = re.search(r"^\|.*?(?=\n\n|\Z)", section, re.MULTILINE | re.DOTALL)
    assert table, "docs/operations.md has no settings table"
    rows = table.group(0).splitlines()[2:]  # past the header and its separator
    return [_VARIABLE.findall(row.split("|")[1]) for row in rows]


def _module_constants(path: Path) -> dict[str, str]:
    """The module-level string constants of a Python file (``NAME = "..."``)."""
    constants = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            constants.update({t.id: value.value for t in targets if isinstance(t, ast.Name)})
    return constants


def _module_path(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _is_environ(node: ast.expr) -> bool:
    """``os.environ``, or a mapping the code calls ``environ`` (a parameter standing for it)."""
    return (isinstance(node, ast.Name) and node.id == "environ") or (
        isinstance(node, ast.Attribute) and node.attr == "environ"
    )


def _is_getenv(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "getenv") or (
        isinstance(node, ast.Attribute) and node.attr == "getenv"
    )


def _variable_names(path: Path) -> list[tuple[int, str | None]]:
    """Each place a Python file reads, writes or tests an environment variable by name: its line
    and the name (None when it cannot be told from the source)."""
    tree = ast.parse(path.read_text())
    constants = _module_constants(path)
    imported: dict[str, tuple[str, str | None]] = {}  # local name -> (module, attribute)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                imported[alias.asname or alias.name] = (alias.name, None)

    def constant_of(module: str, name: str) -> str | None:
        source = _module_path(module)
        return _module_constants(source).get(name) if source else None

    def resolve(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name):
            if node.id in constants:
                return constants[node.id]
            if node.id in imported:
                module, attribute = imported[node.id]
                return constant_of(module, attribute) if attribute else None
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module, attribute = imported.get(node.value.id, ("", None))
            if module:
                full = f"{module}.{attribute}" if attribute else module
                return constant_of(full, node.attr)
        return None

    found = []
    for node in ast.walk(tree):
        key: ast.expr | None = None
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in {"get", "pop", "setdefault"}:
                key = node.args[0] if _is_environ(func.value) else None
            elif _is_getenv(func):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and _is_environ(node.value):
            key = node.slice
        elif isinstance(node, ast.Compare) and any(_is_environ(c) for c in node.comparators):
            key = node.left
        if key is not None:
            found.append((node.lineno, resolve(key)))
    return found


def variables_the_code_reads() -> set[str]:
    """Every environment variable named in api/, auth/ and ml/: the settings' (``MODELGATE_`` and
    the field's name) and those read through ``os.environ`` or ``os.getenv``."""
    names = {f"MODELGATE_{field.upper()}" for field in Settings.model_fields}
    for package in CODE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, name in _variable_names(path):
                assert name is not None, (
                    f"{path.relative_to(ROOT)}:{line}: an environment variable whose name this "
                    "test cannot read; name it with a string constant"
                )
                names.add(name)
    return names


def undocumented_settings(rows: list[list[str]], read: set[str]) -> list[str]:
    """What is wrong between the settings table's rows and the variables the code reads."""
    listed = Counter(name for row in rows for name in row)
    problems = [f"{name} is not in the table" for name in sorted(read) if listed[name] == 0]
    problems += [f"{name} is in the table {n} times" for name, n in sorted(listed.items()) if n > 1]
    problems += [
        f"{name} is in the table but the code reads no such setting"
        for name in sorted(listed)
        if name.startswith("MODELGATE_") and name not in read
    ]
    return problems


def test_the_environment_scan_finds_what_the_code_reads() -> None:
    read = variables_the_code_reads()
    assert {
        "MODELGATE_DATABASE_URL",
        "WEB_CONCURRENCY",
        "PROMETHEUS_MULTIPROC_DIR",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_SDK_DISABLED",
    } <= read


def test_every_setting_the_code_reads_is_documented_once_in_the_settings_table() -> None:
    read = variables_the_code_reads() - set(INTERNAL_VARIABLES)
    assert undocumented_settings(_settings_table(), read) == []


def test_no_other_page_documents_a_setting_in_a_table_of_its_own() -> None:
    """One place for each setting: no other table in README.md or docs/ starts a row with one."""
    documented = {name for row in _settings_table() for name in row}
    elsewhere = []
    for page in PAGES:
        text = _prose(page.read_text())
        if page == OPERATIONS:
            settings = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
            text = text.replace(settings, "")
        for row in re.findall(r"^\|([^|\n]*)\|", text, flags=re.MULTILINE):
            elsewhere += [
                f"{page.relative_to(ROOT)}: {name}"
                for name in _VARIABLE.findall(row)
                if name in documented
            ]
    assert elsewhere == []


# The layout in docs/architecture.md: every module of api/, auth/ and ml/ has a row, and every
# path a page names in backticks exists, so that a moved or split module cannot leave the map
# (or a page) pointing at a file that is gone.
LAYOUT_ROW = re.compile(r"^\| `((?:api|auth|ml)/[\w/]*(?:\.py)?)` \|", re.MULTILINE)
# "(then `old/path.py`)" names where a module used to be, on purpose.
NAMED_PATH = re.compile(r"(?<!then )`((?:api|auth|ml|tests|bench|migrations)/[\w/.-]*)`")


def layout_rows(text: str) -> set[str]:
    """The paths that head a row of a layout table."""
    return set(LAYOUT_ROW.findall(text))


def unmapped_modules(rows: set[str], root: Path = ROOT) -> list[str]:
    """Modules of api/, auth/ and ml/ with no row of their own (``__init__.py`` and
    ``__main__.py`` are covered by their package's row)."""
    missing = []
    for package in ("api", "auth", "ml"):
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root).as_posix()
            if path.name in ("__init__.py", "__main__.py"):
                covered = relative in rows or f"{path.parent.relative_to(root).as_posix()}/" in rows
                if path.parent.name == package or covered:
                    continue
            elif relative in rows:
                continue
            missing.append(relative)
    return missing


def named_paths_that_do_not_exist(pages: list[Path], root: Path = ROOT) -> list[str]:
    """``path`` mentions in the pages that name no file or folder of the repository."""
    gone = []
    for page in pages:
        for name in NAMED_PATH.findall(page.read_text()):
            if "*" not in name and not (root / name.rstrip("/")).exists():
                gone.append(f"{page.relative_to(root)}: {name}")
    return gone


def test_the_architecture_page_maps_every_module() -> None:
    rows = layout_rows((ROOT / "docs" / "architecture.md").read_text())
    assert unmapped_modules(rows) == []


def test_every_path_the_docs_name_exists() -> None:
    assert named_paths_that_do_not_exist(PAGES) == []


def test_a_module_missing_from_the_map_or_a_path_that_is_gone_is_caught(tmp_path: Path) -> None:
    (tmp_path / "api" / "http").mkdir(parents=True)
    (tmp_path / "auth").mkdir()
    (tmp_path / "ml").mkdir()
    for name in ("api/__init__.py", "api/http/__init__.py", "api/http/a.py", "api/http/b.py"):
        (tmp_path / name).write_text("")
    rows = layout_rows("| `api/http/` | plumbing |\n| `api/http/a.py` | a |\n")
    assert unmapped_modules(rows, tmp_path) == ["api/http/b.py"]
    page = tmp_path / "page.md"
    page.write_text("See `api/http/a.py` and `api/http/gone.py`.\n")
    assert named_paths_that_do_not_exist([page], tmp_path) == ["page.md: api/http/gone.py"]

"""The docs stay true to the code: the README's recipe reference is the schema's, and the recipes and
scripts the docs name exist (and the recipes validate)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from lorafit.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def load_reference_script():
    spec = importlib.util.spec_from_file_location("recipe_reference", ROOT / "scripts" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_recipe_reference_is_the_schema():
    reference = load_reference_script()
    in_readme = reference.readme_table((ROOT / "README.md").read_text())
    assert in_readme is not None, "README.md lost the recipe reference markers"
    assert in_readme == reference.table(), "README's recipe reference is stale: python scripts/recipe_reference.py --write"


def test_recipe_reference_has_every_key_with_its_default():
    rows = {key.strip("`"): (default, meaning) for key, default, meaning in load_reference_script().rows()}
    assert rows["lora.rank"] == ("8", "r: the rank of the update B·A.")
    assert rows["lora.target_modules"][0] == "`[query, value]`"
    assert rows["optim.lr"][0] == "0.0005" and rows["lora.alpha"][0] == "16"
    assert rows["train.eval_every"][0] == "200"
    assert rows["data.eval_split"][0] == "null"
    assert rows["optim.scheduler"][1].endswith("One of: `linear`, `cosine`, `constant`.")
    assert "runs/&lt;name&gt;" in rows["train.output_dir"][1]


def named_in_docs(pattern: str) -> set[str]:
    return {m for doc in DOCS for m in re.findall(pattern, doc.read_text())}


@pytest.mark.parametrize("recipe", sorted(named_in_docs(r"configs/[\w.-]+\.yaml")))
def test_recipes_named_in_docs_validate(recipe):
    assert load_recipe(ROOT / recipe).model.name


def test_scripts_and_modules_named_in_docs_exist():
    named = named_in_docs(r"(?:scripts|lorafit|tests)/[\w/]+\.(?:py|sh)") | named_in_docs(r"docs/\w+\.md")
    assert {"scripts/bench.py", "scripts/recipe_reference.py", "docs/performance.md"} <= named
    assert [path for path in sorted(named) if not (ROOT / path).exists()] == []


def heading_anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", doc.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_docs_resolve():
    broken = []
    for doc in DOCS:
        for target, anchor in re.findall(r"\]\(([\w./-]*\.md|)(?:#([\w-]+))?\)", doc.read_text()):
            path = (doc.parent / target).resolve() if target else doc
            if not path.exists() or (anchor and anchor not in heading_anchors(path)):
                broken.append(f"{doc.name}: ({target}#{anchor})")
    assert broken == []

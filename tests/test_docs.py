"""The docs: the layout diagram is what its generator draws, every image the docs show exists, the README stays short."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "docs" / "diagrams" / "layouts.py"
DIAGRAM = REPO / "docs" / "diagrams" / "layouts.svg"
README_LIMIT_BYTES = 14_000
SVG = "{http://www.w3.org/2000/svg}"

# Markdown images, ![alt](target "title"), and HTML ones, <img src="target">.
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HTML_IMAGE = re.compile(r"<img\b[^>]*\bsrc=[\"']([^\"']+)[\"']", re.IGNORECASE)


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("layouts", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class body runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_the_committed_diagram_is_what_the_generator_writes(tmp_path: Path) -> None:
    output = tmp_path / "layouts.svg"
    proc = subprocess.run(
        [sys.executable, str(GENERATOR), "--output", str(output)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert output.read_bytes() == DIAGRAM.read_bytes(), (
        "docs/diagrams/layouts.svg differs from what docs/diagrams/layouts.py draws: change the script, not the SVG, "
        "and run `python docs/diagrams/layouts.py`"
    )
    # Twice the same bytes: nothing in the output depends on the run.
    again = tmp_path / "again.svg"
    subprocess.run([sys.executable, str(GENERATOR), "--output", str(again)], check=True, timeout=60)
    assert again.read_bytes() == output.read_bytes()


def test_the_diagram_is_plain_svg_that_github_shows_as_an_image() -> None:
    text = DIAGRAM.read_text(encoding="utf-8")
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg"
    assert root.get("viewBox") and root.get("width") and root.get("height")
    # An <img> on GitHub runs no script and fetches nothing: everything must be inside the file.
    tags = {element.tag.removeprefix(SVG) for element in root.iter()}
    assert not tags & {"script", "image", "foreignObject", "style", "a"}, tags
    assert "@import" not in text and "@font-face" not in text and "http" not in text.replace(SVG[1:-1], "")
    # One panel per layout, in the order the docs describe them.
    panels = [group.get("id") for group in root.findall(f"{SVG}g")]
    assert panels == ["single", "ha", "replicas"]
    for label in ("Elastic IP", "Auto Scaling group: min = max = desired = 1", "Network Load Balancer"):
        assert label in text, label


def test_a_label_too_long_for_its_box_is_an_error_not_an_overlap() -> None:
    layouts = generator()
    canvas = layouts.Canvas()
    box = layouts.Box(0, 0, 100, 30)
    canvas.text(50, 20, "fits", anchor="middle", within=box)
    with pytest.raises(layouts.DiagramError, match="does not fit its box"):
        canvas.text(50, 20, "a label far too long for a box one hundred pixels wide", anchor="middle", within=box)
    with pytest.raises(layouts.DiagramError, match="outside its box"):
        canvas.text(50, 60, "below", anchor="middle", within=box)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("document", documents(), ids=lambda path: str(path.relative_to(REPO)))
def test_every_image_a_document_shows_exists(document: Path) -> None:
    text = document.read_text(encoding="utf-8")
    targets = MARKDOWN_IMAGE.findall(text) + HTML_IMAGE.findall(text)
    missing = [
        target
        for target in targets
        if not re.match(r"[a-z]+:", target) and not (document.parent / target.split("#")[0]).is_file()
    ]
    assert not missing, f"{document.relative_to(REPO)} shows images that do not exist: {missing}"


def test_the_readme_and_the_aws_guide_show_the_layout_diagram() -> None:
    for document in (REPO / "README.md", REPO / "docs" / "aws.md"):
        targets = MARKDOWN_IMAGE.findall(document.read_text(encoding="utf-8"))
        shown = {(document.parent / target).resolve() for target in targets}
        assert DIAGRAM.resolve() in shown, f"{document.relative_to(REPO)} does not show {DIAGRAM.relative_to(REPO)}"


def test_the_image_pattern_finds_what_it_must() -> None:
    text = '![a](x.svg) ![c](w.png "title") <img alt="d" src="v.svg"> [not an image](u.md)'
    assert MARKDOWN_IMAGE.findall(text) + HTML_IMAGE.findall(text) == ["x.svg", "w.png", "v.svg"]


def test_the_readme_stays_under_its_size_limit() -> None:
    size = len((REPO / "README.md").read_bytes())
    assert size < README_LIMIT_BYTES, (
        f"README.md is {size} bytes; keep it under {README_LIMIT_BYTES} by moving detail into docs/"
    )

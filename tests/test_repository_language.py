"""The repository describes the product, not how it was built: no tracked text file speaks of
work sessions, issue numbers or leads. Runtime words such as ONNX Runtime's
``InferenceSession`` stay allowed."""

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.starts_processes  # git ls-files; see tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|"
            "twelfth|this|last|earlier|previous|next|same|that")
FORBIDDEN = re.compile(
    rf"\b(?:{ORDINALS})(?: developer'?s?)? sessions?\b"   # an ordinal and a work session
    r"|\bissue #?\d+\b"                                    # an issue's number
    r"|\bthe lead\b"
    r"|\bsessions? of (?:work|development)\b",
    re.IGNORECASE)
S, I = "sess" + "ion", "iss" + "ue"  # spelled apart, so that this file holds no such phrase


def tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for name in names:
        path = ROOT / name
        if path.suffix in {".png", ".jpg", ".pth", ".pkl", ".zip"} or not path.is_file():
            continue
        try:
            yield name, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue


def test_no_file_speaks_of_how_the_work_was_organized():
    this = Path(__file__).relative_to(ROOT).as_posix()
    found = [f"{name}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
             for name, text in tracked_text_files() if name != this
             for m in FORBIDDEN.finditer(text)]
    assert not found, "\n".join(found[:20])


@pytest.mark.parametrize("text, bad", [
    (f"Measured in the ninth {S}", True), (f"as this {S} showed", True),
    (f"{I} 8 says", True), ("asked by the " + "lead", True), (f"the last developer's {S}", True),
    ("ort.InferenceSession(path)", False), ("Session-wide test order", False),
    (f"a {S} of ONNX Runtime", False), (f"{I} tracker", False)])
def test_the_pattern(text, bad):
    assert bool(FORBIDDEN.search(text)) is bad

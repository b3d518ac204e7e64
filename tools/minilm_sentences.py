"""Harvest real English sentences from the Python standard library's docstrings.

Used by tools/export_minilm.py to build calibration and evaluation text for the
MiniLM benchmark without any download. Standard library only: the source files
are parsed with `ast` (nothing is imported), walked in sorted order, and the
result is shuffled with a fixed seed, so the list is identical on every run of
the same Python version.

Run directly to print how many sentences are available and a few samples:
    python tools/minilm_sentences.py
"""

import ast
import random
import re
import sysconfig
import tokenize
from pathlib import Path

MIN_WORDS = 6
MAX_WORDS = 40
SEED = 0

# Folders whose files are tests or test data rather than documentation.
SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}

# A sentence ends at . ! or ? followed by space and a capital letter (or an opening quote/bracket).
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")

# Characters that mark code or markup rather than prose.
CODE_CHARS = set("{}[]<>=|\\`@#$~^*_;")


def stdlib_source_files():
    """Return the standard library's .py files in sorted order, tests left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in SKIPPED_DIRS for part in parts[:-1]) or parts[-1].startswith("test_"):
            continue
        files.append(path)
    return files


def docstrings_of_file(path):
    """Return the docstrings of a module, its classes and functions, in a fixed walk order."""
    try:
        with tokenize.open(path) as handle:
            tree = ast.parse(handle.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, kinds):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docs.append(doc)
    return docs


def prose_paragraphs(docstring):
    """Return the docstring's paragraphs that read as prose (no indented or example lines)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", docstring):
        lines = block.splitlines()
        if not lines:
            continue
        if any(line[:1].isspace() or line.lstrip().startswith((">>>", "...", "-", "+", ":")) for line in lines):
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    return paragraphs


def is_clean_sentence(sentence):
    """Keep capitalised, punctuated sentences of plain words within the length bounds, not lists."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not sentence[0].isupper() or sentence[-1] not in ".!?":
        return False
    if any(char in CODE_CHARS for char in sentence) or "()" in sentence or "--" in sentence:
        return False
    if not sentence.isascii() or sentence.isupper() or sentence.count(",") > 6:
        return False  # non-English, shouted licence text, or a list of names
    letters = sum(char.isalpha() or char.isspace() for char in sentence)
    return letters / len(sentence) >= 0.9


def harvest_sentences(seed=SEED):
    """Return deduplicated stdlib docstring sentences, shuffled with a fixed seed."""
    seen = set()
    sentences = []
    for path in stdlib_source_files():
        for doc in docstrings_of_file(path):
            for paragraph in prose_paragraphs(doc):
                for sentence in SENTENCE_BREAK.split(re.sub(r"\s+", " ", paragraph).strip()):
                    if is_clean_sentence(sentence) and sentence not in seen:
                        seen.add(sentence)
                        sentences.append(sentence)
    random.Random(seed).shuffle(sentences)
    return sentences


if __name__ == "__main__":
    found = harvest_sentences()
    print(f"{len(found)} sentences")
    for line in found[:15]:
        print("  ", line)

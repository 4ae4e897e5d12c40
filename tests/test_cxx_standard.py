"""The C++ and CUDA sources stay within C++17.

setup.py accepts torch >= 2.4, and torch's extension builder passes ``-std=c++17`` up to torch 2.10
(``-std=c++20`` from then on): a C++20-only facility compiles here and breaks the build on the GPU
machines' torch 2.11 (it did once: ``std::bit_cast``). The torch headers of the version installed
here need C++20, so the sources cannot simply be compiled as C++17 in this test; it looks for the
C++20 library headers, names and keywords instead, in the code with its comments removed.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

SOURCES = sorted(p for p in (Path(__file__).resolve().parent.parent / "csrc").rglob("*")
                 if p.suffix in {".cpp", ".h", ".cu", ".cuh"})
CXX20_HEADERS = ("bit", "span", "ranges", "format", "numbers", "concepts", "compare", "source_location",
                 "coroutine", "barrier", "latch", "semaphore", "stop_token", "syncstream", "version")
CXX20_PATTERNS = {
    "a C++20 library header": re.compile(r"#\s*include\s*<(%s)>" % "|".join(CXX20_HEADERS)),
    "a C++20 library name": re.compile(r"\bstd::(bit_cast|bit_width|popcount|countl_zero|countr_zero|has_single_bit|"
                                       r"span|ranges|views|format|numbers|midpoint|lerp|ssize|to_address|"
                                       r"is_constant_evaluated|erase_if|make_unique_for_overwrite)\b"),
    "a C++20 keyword": re.compile(r"\b(consteval|constinit|co_await|co_yield|co_return|concept|requires)\b"),
    "the three-way comparison operator": re.compile(r"<=>"),
    "a C++20 attribute": re.compile(r"\[\[\s*(likely|unlikely|no_unique_address)\s*\]\]"),
}


def without_comments_and_strings(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return re.sub(r'"(\\.|[^"\\\n])*"', '""', text)


def test_there_are_sources():
    assert any(p.suffix == ".cpp" for p in SOURCES) and any(p.suffix == ".cu" for p in SOURCES)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_source_is_cxx17(source):
    code = without_comments_and_strings(source.read_text())
    found = [f"line {code.count(chr(10), 0, match.start()) + 1}: {what} ({match.group(0)})"
             for what, pattern in CXX20_PATTERNS.items() for match in pattern.finditer(code)]
    assert not found, f"{source.name} uses C++20, which torch < 2.10 does not build extensions with: {found}"


def test_the_check_catches_bit_cast():
    code = without_comments_and_strings("// std::bit_cast in a comment is fine\nfloat f = std::bit_cast<float>(u);")
    assert [what for what, p in CXX20_PATTERNS.items() if p.search(code)] == ["a C++20 library name"]

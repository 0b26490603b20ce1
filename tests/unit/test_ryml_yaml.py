"""Differential: rapidyaml's reading (shared/ryml_yaml.py) against PyYAML's, or a decline.

The corpus: every YAML file of the repository, every YAML text in the tests (string constants
with a key on a line), a generated bulk manifest, and the cases where YAML 1.1 and JSON differ.
"""

from __future__ import annotations

import ast
import gc
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import gcpause, kube_yaml, ryml_yaml
from shared.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[2]


def pyyaml(text: str) -> list[Any] | None:
    """PyYAML's reading, kube_yaml's way; None when it is an error."""
    try:
        return list(yaml.load_all(text, Loader=kube_yaml._Loader))
    except (yaml.YAMLError, ValueError):
        return None


def ryml(text: str) -> list[Any] | None:
    return ryml_yaml.load_all(text, kube_yaml._Loader(""))


def corpus() -> list[tuple[str, str]]:
    out = []
    for path in sorted(REPO.glob("**/*.y*ml")):
        parts = path.relative_to(REPO).parts
        if (
            parts[0].startswith(".")
            or "node_modules" in parts
            or path.suffix
            not in (
                ".yaml",
                ".yml",
            )
        ):
            continue
        out.append((str(path.relative_to(REPO)), path.read_text()))
    for path in sorted((REPO / "tests").glob("**/*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and "\n" in node.value
                and ": " in node.value
                and ("kind:" in node.value or "apiVersion" in node.value)
            ):
                out.append((f"{path.relative_to(REPO)}:{node.lineno}", node.value))
    return out


CORPUS = corpus()

# where YAML 1.1 (PyYAML) and JSON (what rapidyaml emits) part, and what it cannot emit
DIFFERENT = [
    "a: yes\nb: no\nc: on\nd: off\ne: Yes\nf: NO\n",
    "a: True\nb: FALSE\nc: Null\nd: ~\n",
    "a: 0x1F\n",
    "a: 010\n",
    "a: 1_000\n",
    "a: .inf\nb: -.Inf\nc: .nan\n",
    "a: 1e3\n",
    "a: 1.0e+3\n",
    "a: [1e3, 2]\n",
    "a: 1:20\n",
    "a: +1\n",
    "a: 0b101\n",
    "80: http\ntrue: x\n",
    "a: &x 1\nb: *x\n",
    "base: &b {x: 1}\nc:\n  <<: *b\n  y: 2\n",
    "a: !!str 1\nb: !!int '2'\n",
    "a: 1\na: 2\n",
    "a: 1\nb:\n  c: 1\n  c: 2\n",
    "%YAML 1.1\n---\na: 1\n",
    "? complex\n: key\n",
    "a: =\n",
    "a: 'yes'\nb: \"0x1F\"\nc: yes\n",
    "a: '1e3'\nb: 1e3\n",
    "a: '80'\nb: 80\n80: c\n",
]
SAME = [
    "",
    "# only a comment\n",
    "---\n",
    "---\n---\n",
    "a: 1\n---\n",
    "a: 1\n---\nb: 2\n",
    "a:\n",
    "a: 1\nb: true\nc: false\nd: null\ne: 1.5\nf: -1\ng: 0\nh: 123456789012345678901234\n",
    "a: 10.0.0.1\nd: nginx:1.25\ne: http://x/y\nf: 'quoted: text'\ng: \"# not a comment\"\n",
    "a: {}\nb: []\nc: {d: [1, 2, {e: f}]}\n",
    "spec:\n  ports:\n  - name: http\n    port: 80\n  - name: https\n    port: 443\n",
    "- a\n- b: 1\n  c: 2\n-\n- - x\n  - y\n",
    "a: |\n  line 1\n  line 2\nb: >\n  folded\n  text\nc: |-\n  kept\n",
    "a: one\n  two\n",
    "a: caf\u00e9\nb: \"\\u00e9\\t\\x41\"\nc: 'it''s'\n",
    "a: 1 # comment\n",
    "a: 'true'\nb: \"80\"\nc: 'null'\n",
    "a: b\r\nc: d\r\n",
    "plain scalar document\n",
    "a: .5\nb: 0o17\n",
    "a: 2001-12-14\nb: 2001-12-14t21:59:43.10-05:00\n",  # kubectl's reading: strings
    "a: '80'\nb: 80\nc: 'yes'\nd: \"~\"\n",
]
INVALID = ["a: [1, 2\n", "a: b: c\n", "a:\n  - b\n c: d\n", "\ta: 1\n"]


@pytest.mark.parametrize("name,text", CORPUS, ids=[name for name, _ in CORPUS])
def test_the_repository_manifests_read_alike(name: str, text: str) -> None:
    got = ryml(text)
    if got is not None:  # declining is always allowed; a different answer never
        assert got == pyyaml(text), name


def test_the_corpus_is_read_by_rapidyaml() -> None:
    """The differential means something: most of the corpus takes the fast path."""
    assert ryml_yaml.ryml is not None
    assert len(CORPUS) >= 20
    valid = [(name, text) for name, text in CORPUS if pyyaml(text) is not None]
    read = [name for name, text in valid if ryml(text) is not None]
    assert len(read) >= 0.8 * len(valid), set(dict(valid)) - set(read)


@pytest.mark.parametrize("text", DIFFERENT + SAME + INVALID)
def test_same_as_pyyaml_or_declined(text: str) -> None:
    got = ryml(text)
    if got is not None:
        assert got == pyyaml(text)


@pytest.mark.parametrize("text", DIFFERENT + INVALID)
def test_declines_where_json_is_not_yaml(text: str) -> None:
    assert ryml(text) is None


@pytest.mark.parametrize("text", SAME)
def test_reads_what_it_can_itself(text: str) -> None:
    assert ryml(text) == pyyaml(text)


def test_bulk_manifest_through_kube_yaml() -> None:
    docs: list[Any] = []
    for i in range(1000):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"s{i}", "namespace": "bench", "annotations": {"a/b": "on"}},
                "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250}", "ports": [{"port": 80}]},
            }
        )
        docs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": f"s{i}-1", "labels": {"kubernetes.io/service-name": f"s{i}"}},
                "endpoints": [{"addresses": [f"10.250.{i // 250}.{i % 250}"], "ready": True}],
            }
        )
    text = yaml.safe_dump_all(docs)
    assert len(text) >= kube_yaml.FAST_READER_MIN_BYTES
    assert ryml(text) == docs == list(yaml.load_all(text, Loader=kube_yaml._CLoader))
    assert kube_yaml.load_all(text, "f") == docs


def test_errors_still_come_from_pyyaml(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(kube_yaml, "FAST_READER_MIN_BYTES", 0)
    with pytest.raises(InvalidArgument, match="duplicate key"):
        kube_yaml.load_all("a: 1\na: 2\n", "f.yaml")
    with pytest.raises(InvalidArgument, match=r"f.yaml: invalid YAML at line 2"):
        kube_yaml.load_all("a: [1, 2\n", "f.yaml")
    assert capfd.readouterr().err == ""  # rapidyaml's own message is not shown


def test_gc_pause_nests() -> None:
    assert gc.isenabled()
    with gcpause.paused():
        with gcpause.paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    gcpause.hold()  # a pause over several turns of a loop, inside and around others
    with gcpause.paused():
        pass
    assert not gc.isenabled()
    gcpause.release(freeze=False)
    assert gc.isenabled()
